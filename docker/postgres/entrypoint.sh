#!/bin/sh
# The first start initialises $PGDATA (an empty volume): the superuser POSTGRES_USER with
# POSTGRES_PASSWORD and database POSTGRES_DB, password logins over TCP (the socket, inside the
# container only, trusts its local users, as the official image's does). Later starts keep what
# is there: a changed POSTGRES_PASSWORD is then not applied, as with the official image.
set -eu

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required (no default password)}"
    user=${POSTGRES_USER:-postgres}
    database=${POSTGRES_DB:-$user}
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    # TCP from anywhere on the container's networks, always with a password.
    printf '%s\n' 'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
    # The database, on a server that listens on its socket only (not yet on TCP, so the
    # healthcheck, which asks over TCP, waits for the real start).
    pg_ctl --pgdata="$PGDATA" --options="-c listen_addresses=''" --wait start >/dev/null
    if [ "$database" != postgres ]; then
        psql --no-psqlrc --quiet --username="$user" --dbname=postgres \
            --host=/var/run/postgresql --set ON_ERROR_STOP=1 \
            --command="CREATE DATABASE \"$database\""
    fi
    pg_ctl --pgdata="$PGDATA" --mode=fast --wait stop >/dev/null
    echo "postgres-entrypoint: initialised $PGDATA (user $user, database $database)"
fi

if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
