#!/bin/sh
# A Debian base image made from Debian's packages alone, for machines that reach Debian's
# mirror but no image registry:
#
#   docker/base-image.sh [TAG] [SUITE]      (default: gw-base:trixie trixie; needs root)
#
# then build the stack on it:  GATEWAY_BASE_IMAGE=gw-base:trixie docker compose up --build
#
# debootstrap (minbase) writes the root file system, `docker import` loads it as an image. The
# machine's own extra certificate authorities (/usr/local/share/ca-certificates/*.crt) are added
# to the image's trust store, so builds behind an intercepting proxy reach Debian's and PyPI's
# mirrors; nothing else of the machine goes in. Set DOCKER_HOST to use a private dockerd.
set -eu

tag=${1:-gw-base:trixie}
suite=${2:-trixie}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "base-image.sh: apt-get install -y debootstrap" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/gw-base.XXXXXX")
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror" >&2
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >&2
fi
# The suite's updates and security updates too, as Debian's own images list them.
if [ "$suite" != sid ]; then
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: %s\n\n' \
        "$mirror" "$suite" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg \
        > "$root/etc/apt/sources.list.d/debian.sources"
    printf 'Types: deb\nURIs: %s-security\nSuites: %s-security\nComponents: main\nSigned-By: %s\n' \
        "${mirror%/debian}/debian" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg \
        >> "$root/etc/apt/sources.list.d/debian.sources"
    rm -f "$root/etc/apt/sources.list"
fi
# As Debian's own container images: no package caches, no documentation installed later.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
    > "$root/etc/dpkg/dpkg.cfg.d/excludes"
printf '%s\n' 'APT::Install-Recommends "false";' 'APT::Install-Suggests "false";' \
    > "$root/etc/apt/apt.conf.d/90no-recommends"

tar -C "$root" -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$tag"
