"""The whole stack on one Debian machine, without Docker.

Starts a RabbitMQ node of the project's own (with the MQTT plugin, from `rabbitmq/`), a
PostgreSQL cluster and a Redis server on ports that never collide with system services, applies
the migrations, then starts bridge, worker and api. Every process's pid and log live under
`.run/<stack>/`. Two stacks exist: `dev` (`make run`, `make up`) and `test` (`make test`), on
different ports, so tests never touch the stack a developer is using.

Devices reach the stack over TLS too (MQTT, MQTT over WebSocket, HTTPS), with a CA and a server
certificate made once under `.run/<stack>/tls/` (or the user's own, `GATEWAY_TLS_CERT_FILE` and
`GATEWAY_TLS_KEY_FILE`). With `GATEWAY_ENVIRONMENT=production` device traffic is TLS only: no
plain MQTT listener and no plain public api listener.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import accounts, certificates, topology
from gateway.certificates import TlsFiles

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_DIR = PROJECT_ROOT / "rabbitmq"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")

#: Debian packages the stack runs on, and the command that shows each is there.
SYSTEM_PACKAGES = {
    "rabbitmq-server": str(RABBITMQ_SERVER),
    "postgresql": "initdb",
    "redis-server": "redis-server",
}
#: Extra Debian packages the test suite uses: real third-party clients and compose's validator.
TEST_PACKAGES = {
    "mosquitto-clients": "mosquitto_pub",
    "docker-compose": "docker-compose",
    "curl": "curl",
}

#: The local stack's database and its owner role (password: the stack's `postgres` secret).
DATABASE = "gateway"
DATABASE_USER = "gateway"


class StackError(RuntimeError):
    """Something the stack needs is missing or did not start; the message says what to do."""


@dataclass(frozen=True)
class Ports:
    amqp: int
    mqtt: int
    management: int
    prometheus: int
    dist: int
    postgres: int
    redis: int
    api: int
    #: The api's internal listener, which RabbitMQ calls to admit devices.
    api_internal: int
    bridge_health: int
    worker_health: int
    #: MQTT over TLS, MQTT over WebSocket with TLS (path /ws), the api over HTTPS.
    mqtt_tls: int
    web_mqtt_tls: int
    api_tls: int


# fmt: off
DEV_PORTS = Ports(5673, 1884, 15673, 15693, 25673, 5433, 6380, 8000, 8001, 8010, 8011,
                  8884, 15676, 8443)
TEST_PORTS = Ports(5773, 1984, 15773, 15793, 25773, 5533, 6480, 8100, 8101, 8110, 8111,
                   8984, 15776, 8543)
BENCH_PORTS = Ports(5873, 2084, 15873, 15893, 25873, 5633, 6580, 8200, 8201, 8210, 8211,
                    9084, 15876, 8643)
# fmt: on
#: The path of MQTT over WebSocket (RabbitMQ's default).
WEB_MQTT_PATH = "/ws"


@dataclass
class Component:
    name: str
    pid_file: Path
    log_file: Path
    #: A word the process's command line must contain (guards against reused pids).
    signature: str

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid, self.signature) else None


@dataclass
class LocalStack:
    name: str = "dev"
    ports: Ports = DEV_PORTS
    root: Path = PROJECT_ROOT
    #: Extra GATEWAY_* variables for the app processes.
    app_env: dict[str, str] = field(default_factory=dict)
    #: rabbitmq.conf lines this stack sets differently (benchmarks compare configurations).
    rabbitmq_overrides: dict[str, str] = field(default_factory=dict)
    #: PostgreSQL settings this stack adds (`-c name=value`).
    postgres_settings: dict[str, str] = field(default_factory=dict)
    _processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @classmethod
    def dev(cls) -> LocalStack:
        return cls("dev", DEV_PORTS)

    @classmethod
    def test(cls) -> LocalStack:
        """The test suite's stack. `GATEWAY_TEST_PORT_OFFSET` shifts every port (and the
        broker's node name), so two checkouts can run their suites side by side."""
        offset = int(os.environ.get("GATEWAY_TEST_PORT_OFFSET", "0"))
        ports = Ports(*(port + offset for port in dataclasses.astuple(TEST_PORTS)))
        return cls("test", ports)

    @classmethod
    def bench(cls) -> LocalStack:
        # Commit times of rows, so latencies end at the commit, not at the transaction's start.
        return cls("bench", BENCH_PORTS, postgres_settings={"track_commit_timestamp": "on"})

    # ---- layout ---------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.root / ".run" / self.name

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def tls_dir(self) -> Path:
        return self.run_dir / "tls"

    @property
    def node_name(self) -> str:
        """The RabbitMQ node's name, unique per port set (Erlang's epmd refuses a name twice)."""
        suffix = "" if self.ports in (DEV_PORTS, TEST_PORTS, BENCH_PORTS) else f"-{self.ports.dist}"
        return f"gateway-{self.name}{suffix}@localhost"

    def component(self, name: str) -> Component:
        """`rabbitmq`, `postgres`, `redis`, or an app: `bridge`, `worker`, `api`, and extra
        instances such as `worker-2`."""
        signatures = {
            "rabbitmq": str(self.run_dir / "rabbitmq" / "home"),
            "postgres": "postgres",
            "redis": f":{self.ports.redis}",
            "bridge": "gateway-bridge",
            "worker": "gateway-worker",
            "api": "gateway-api",
        }
        kind = name.split("-", 1)[0]
        if name == "postgres":
            pid_file = self.run_dir / "postgres" / "data" / "postmaster.pid"
            log_file = self.run_dir / "postgres" / "postgres.log"
        else:
            pid_file = self.run_dir / f"{name}.pid"
            log_file = self.log_dir / f"{name}.log"
        return Component(name, pid_file, log_file, signatures[kind])

    def health_port(self, name: str) -> int:
        """Where app `name` answers /readyz; extra instances take the base port + 20 x (n - 1).
        The api answers on its internal listener when it has no plain public one."""
        kind, _, instance = name.partition("-")
        base = {
            "api": self.ports.api_internal if self.tls_only else self.ports.api,
            "bridge": self.ports.bridge_health,
            "worker": self.ports.worker_health,
        }[kind]
        return base + 20 * (int(instance) - 1) if instance else base

    # ---- secrets --------------------------------------------------------------------------

    def secret(self, name: str) -> str:
        """A password of this stack (`broker-<account>`, `postgres`, `redis`), generated once
        into `.run/<stack>/secrets/` (readable by its owner only) and reused afterwards."""
        path = self.run_dir / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            _write_private(path, secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    def broker_password(self, account: str) -> str:
        return self.secret(f"broker-{account}")

    def amqp_url_for(self, account: str, vhost: str = "/") -> str:
        """AMQP as one of the broker accounts (`gateway.accounts`)."""
        quoted = urllib.parse.quote(vhost, safe="")
        return (
            f"amqp://{account}:{self.broker_password(account)}@127.0.0.1:{self.ports.amqp}/{quoted}"
        )

    @property
    def management_api_url(self) -> str:
        """The management API as the broker administrator (what the api is given)."""
        admin = accounts.ADMIN
        return f"http://{admin}:{self.broker_password(admin)}@127.0.0.1:{self.ports.management}"

    @property
    def database_url(self) -> str:
        return (
            f"postgresql+psycopg2://{DATABASE_USER}:{self.secret('postgres')}"
            f"@127.0.0.1:{self.ports.postgres}/{DATABASE}"
        )

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.secret('redis')}@127.0.0.1:{self.ports.redis}/0"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    @property
    def api_https_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.api_tls}"

    def device_ports(self, service: str) -> tuple[int, ...]:
        """The ports devices reach `service` (`mqtt` or `api`) on in this stack."""
        p = self.ports
        if service == "mqtt":
            return (
                (p.mqtt_tls, p.web_mqtt_tls)
                if self.tls_only
                else (p.mqtt, p.mqtt_tls, p.web_mqtt_tls)
            )
        return (p.api_tls,) if self.tls_only else (p.api, p.api_tls)

    @property
    def environment(self) -> str:
        return self.app_env.get(
            "GATEWAY_ENVIRONMENT", os.environ.get("GATEWAY_ENVIRONMENT", "development")
        )

    @property
    def tls_only(self) -> bool:
        """Device traffic on TLS only (production): no plain MQTT listener, no plain public api
        listener. RabbitMQ still calls the api's internal listener, on loopback."""
        return self.environment == "production"

    def tls_files(self) -> TlsFiles:
        """Where the TLS listeners' files are: the user's own when `GATEWAY_TLS_CERT_FILE` and
        `GATEWAY_TLS_KEY_FILE` are set (and `GATEWAY_TLS_CA_FILE`, what clients trust, if
        any), else under `.run/<stack>/tls/` (see `make_tls_files`)."""
        cert = os.environ.get("GATEWAY_TLS_CERT_FILE")
        key = os.environ.get("GATEWAY_TLS_KEY_FILE")
        if not (cert or key):
            return TlsFiles.under(self.tls_dir)
        if not (cert and key):
            raise StackError("set both GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE, or neither")
        ca = os.environ.get("GATEWAY_TLS_CA_FILE")
        return TlsFiles(Path(ca) if ca else None, Path(cert), Path(key))

    def make_tls_files(self) -> TlsFiles:
        """The stack's own CA and server certificate, made once and reused (renewed when near
        expiry); the user's own files are only checked to be there."""
        files = self.tls_files()
        if files == TlsFiles.under(self.tls_dir):
            return certificates.ensure(self.tls_dir)
        missing = [str(p) for p in (files.ca, files.cert, files.key) if p and not p.is_file()]
        if missing:
            raise StackError(f"TLS file(s) not found: {', '.join(missing)}")
        return files

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    def operator_token(self) -> str:
        """GATEWAY_OPERATOR_TOKEN when set, else a random one kept in `.run/<stack>/`."""
        token = os.environ.get("GATEWAY_OPERATOR_TOKEN")
        if token:
            return token
        path = self.run_dir / "operator-token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32) + "\n")
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self, app: str, *, health_port: int | None = None) -> dict[str, str]:
        """The environment of app `app` (bridge, worker, api): the user's GATEWAY_* settings,
        then this stack's connections, with the app's own broker account."""
        tls = self.tls_files()
        env = dict(os.environ)
        env.update(
            GATEWAY_ENVIRONMENT=os.environ.get("GATEWAY_ENVIRONMENT", "development"),
            GATEWAY_AMQP_URL=self.amqp_url_for(f"gateway-{app}"),
            GATEWAY_DATABASE_URL=self.database_url,
            GATEWAY_REDIS_URL=self.redis_url,
            GATEWAY_API_HOST="127.0.0.1",
            GATEWAY_API_PORT="0" if self.tls_only else str(self.ports.api),
            GATEWAY_API_INTERNAL_HOST="127.0.0.1",
            GATEWAY_API_INTERNAL_PORT=str(self.ports.api_internal),
            GATEWAY_API_TLS_PORT=str(self.ports.api_tls),
            GATEWAY_TLS_CERT_FILE=str(tls.cert),
            GATEWAY_TLS_KEY_FILE=str(tls.key),
            GATEWAY_BRIDGE_HEALTH_PORT=str(self.ports.bridge_health),
            GATEWAY_WORKER_HEALTH_PORT=str(self.ports.worker_health),
            GATEWAY_OPERATOR_TOKEN=self.operator_token(),
            GATEWAY_BROKER_MANAGEMENT_URL=self.management_api_url,
            GATEWAY_LOG_FORMAT=os.environ.get("GATEWAY_LOG_FORMAT", "text"),
        )
        if health_port is not None and app in ("bridge", "worker"):
            env[f"GATEWAY_{app.upper()}_HEALTH_PORT"] = str(health_port)
        env.update(self.app_env)
        return env

    # ---- lifecycle ------------------------------------------------------------------------

    def up(self, *, apps: bool = True, echo: bool = True) -> None:
        """Start whatever is not running yet (idempotent) and wait until it is ready."""
        require_system_packages(SYSTEM_PACKAGES)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.make_tls_files()
        self.start_rabbitmq()
        self.start_postgres()
        self.start_redis()
        self.wait_infrastructure()
        self.migrate()
        if apps:
            for name in ("worker", "bridge", "api"):
                self.start_app(name)
            self.wait_apps()
        if echo:
            self.print_summary(apps=apps)

    def down(self, *, echo: bool = True) -> None:
        """Stop everything this stack started, apps first (idempotent)."""
        extra = sorted(
            p.stem
            for kind in ("api", "bridge", "worker")
            for p in self.run_dir.glob(f"{kind}-*.pid")
        )
        for name in ("api", "bridge", "worker", *extra):
            self.stop_app(name)
        self.stop_redis()
        self.stop_postgres()
        self.stop_rabbitmq()
        if echo:
            print(f"stack {self.name}: stopped")

    def run(self) -> None:
        """`make run`: start everything, follow until Ctrl-C, then stop everything."""

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        # Explicitly: a shell that starts us in the background sets SIGINT to "ignore".
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
        try:
            self.up()
            print("Ctrl-C stops the stack.", flush=True)
            while True:
                for name in ("worker", "bridge", "api"):
                    if self.component(name).pid() is None:
                        print(f"{name} exited; see {self.component(name).log_file}", flush=True)
                        self.start_app(name)
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping...", flush=True)
        finally:
            self.down()

    def status(self) -> dict[str, int | None]:
        names = ("rabbitmq", "postgres", "redis", "worker", "bridge", "api")
        return {name: self.component(name).pid() for name in names}

    def print_summary(self, *, apps: bool) -> None:
        p = self.ports
        tls = self.tls_files()
        trust = f"--cafile {tls.ca} " if tls.ca else ""
        lines = [f"stack {self.name} is up (pids and logs in {self.run_dir})"]
        if not self.tls_only:
            lines.append(
                f"  MQTT        127.0.0.1:{p.mqtt}   (mosquitto_pub -h 127.0.0.1 -p {p.mqtt} ...)"
            )
        lines += [
            f"  MQTT, TLS   127.0.0.1:{p.mqtt_tls}   (mosquitto_pub {trust}-p {p.mqtt_tls} ...)",
            f"  MQTT, WSS   wss://127.0.0.1:{p.web_mqtt_tls}{WEB_MQTT_PATH}",
            f"  AMQP        127.0.0.1:{p.amqp}",
            f"  management  {self.management_url}   (user {accounts.ADMIN})",
            f"  PostgreSQL  127.0.0.1:{p.postgres}, database {DATABASE}, user {DATABASE_USER}",
            f"  Redis       127.0.0.1:{p.redis}",
            f"  passwords   {self.run_dir / 'secrets'}/ (generated; never leave this machine)",
        ]
        if apps:
            if not self.tls_only:
                lines.append(f"  API         {self.api_url}   (docs: {self.api_url}/docs)")
            lines += [
                f"  API, HTTPS  {self.api_https_url}   (docs: {self.api_https_url}/docs)",
                f"  bridge      http://127.0.0.1:{p.bridge_health}/readyz",
                f"  worker      http://127.0.0.1:{p.worker_health}/readyz",
                f"  operator token: {self.operator_token()}",
            ]
        if tls.ca:
            lines.append(f"  TLS clients trust {tls.ca}")
        lines.append(f"  logs        {self.log_dir}/ and {self.component('postgres').log_file}")
        print("\n".join(lines), flush=True)

    # ---- RabbitMQ -------------------------------------------------------------------------

    def rabbitmq_env(self) -> dict[str, str]:
        base = self.run_dir / "rabbitmq"
        return {
            **os.environ,
            "HOME": str(base / "home"),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(RABBITMQ_DIR / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_DIST_PORT": str(self.ports.dist),
            "RABBITMQ_PID_FILE": str(self.component("rabbitmq").pid_file),
            "RABBITMQ_ALLOW_INPUT": "false",
        }

    def rabbitmq_config(self) -> str:
        """`rabbitmq/rabbitmq.conf` as docker compose mounts it, plus this stack's ports and
        certificate files; no plain MQTT listener in production (as `rabbitmq/tls-only.conf`
        does for compose)."""
        shared = (RABBITMQ_DIR / "rabbitmq.conf").read_text()
        p = self.ports
        tls = self.tls_files()
        # The same files for MQTT over TLS (ssl_options) and over WebSocket (web_mqtt.ssl);
        # without a CA file (a public CA's certificate) the line is left out.
        tls_options = {
            "cacertfile": None if tls.ca is None else str(tls.ca),
            "certfile": str(tls.cert),
            "keyfile": str(tls.key),
        }
        plain_mqtt = (
            config_lines((RABBITMQ_DIR / "tls-only.conf").read_text())
            if self.tls_only
            else {"mqtt.listeners.tcp.default": f"127.0.0.1:{p.mqtt}"}
        )
        overrides = {
            "load_definitions": str(self.definitions_file),
            "listeners.tcp.default": f"127.0.0.1:{p.amqp}",
            **plain_mqtt,
            "mqtt.listeners.ssl.default": f"127.0.0.1:{p.mqtt_tls}",
            **{f"ssl_options.{name}": path for name, path in tls_options.items()},
            **{f"web_mqtt.ssl.{name}": path for name, path in tls_options.items()},
            "web_mqtt.ssl.ip": "127.0.0.1",
            "web_mqtt.ssl.port": str(p.web_mqtt_tls),
            "management.tcp.ip": "127.0.0.1",
            "management.tcp.port": str(p.management),
            "prometheus.tcp.ip": "127.0.0.1",
            "prometheus.tcp.port": str(p.prometheus),
            **{
                f"auth_http.{check}_path": (
                    f"http://127.0.0.1:{p.api_internal}/internal/rabbitmq/{check}"
                )
                for check in ("user", "vhost", "resource", "topic")
            },
            **self.rabbitmq_overrides,
        }
        return apply_overrides(shared, overrides)

    @property
    def definitions_file(self) -> Path:
        """What the node loads at boot: the shared topology and this stack's accounts."""
        return self.run_dir / "rabbitmq" / "definitions.json"

    def write_definitions(self) -> None:
        topology_definitions = json.loads((RABBITMQ_DIR / "definitions.json").read_text())
        passwords = {name: self.broker_password(name) for name in accounts.ACCOUNT_NAMES}
        _write_private(self.definitions_file, accounts.render(topology_definitions, passwords))

    def start_rabbitmq(self) -> None:
        if self.component("rabbitmq").pid():
            return
        base = self.run_dir / "rabbitmq"
        for sub in ("home", "mnesia"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.make_tls_files()
        (base / "rabbitmq.conf").write_text(self.rabbitmq_config())
        self.write_definitions()
        p = self.ports
        _require_free(p.amqp, p.mqtt, p.mqtt_tls, p.web_mqtt_tls, p.management, p.dist)
        subprocess.run(
            [str(RABBITMQ_SERVER), "-detached"],
            env=self.rabbitmq_env(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def rabbitmq_ready(self) -> bool:
        """The node is up, its device listeners accept connections, and it has loaded the
        topology (queues exist before devices connect)."""
        if not all(port_open(port) for port in (self.ports.amqp, *self.device_ports("mqtt"))):
            return False
        try:
            self.management("GET", "/api/queues/%2F/gateway.mqtt.inbox")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def management(self, method: str, path: str, body: object | None = None) -> object:
        """Call the management HTTP API as the broker administrator."""
        credentials = f"{accounts.ADMIN}:{self.broker_password(accounts.ADMIN)}"
        request = urllib.request.Request(
            self.management_url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            data = response.read()
        return json.loads(data) if data else None

    def rabbitmqctl(self, *args: str) -> str:
        """Run `rabbitmqctl` against this stack's node; returns what it printed."""
        done = subprocess.run(
            [str(RABBITMQCTL), "-n", self.node_name, *args],
            env=self.rabbitmq_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def stop_rabbitmq(self) -> None:
        component = self.component("rabbitmq")
        pid = component.pid()
        if pid is None:
            return
        subprocess.run(
            [str(RABBITMQCTL), "stop", str(component.pid_file)],
            env=self.rabbitmq_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        _terminate(pid, component.signature, timeout=30)

    # ---- PostgreSQL -----------------------------------------------------------------------

    def start_postgres(self) -> None:
        if self.component("postgres").pid():
            return
        base = self.run_dir / "postgres"
        data = base / "data"
        bindir = _postgres_bindir()
        as_owner = _postgres_runner(base)
        if not (data / "PG_VERSION").exists():
            _chown_for_postgres(base)
            subprocess.run(
                [
                    *as_owner,
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    DATABASE_USER,
                    # Local (socket) connections are trusted: only this machine's users reach
                    # the socket, which lives in the stack's own folder. TCP needs the password.
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        _require_free(self.ports.postgres)
        options = (
            f"-p {self.ports.postgres} -c listen_addresses=127.0.0.1 -k {base} "
            "-c max_connections=200 -c shared_buffers=256MB -c synchronous_commit=on"
            + "".join(f" -c {name}={value}" for name, value in self.postgres_settings.items())
        )
        subprocess.run(
            [
                *as_owner,
                str(bindir / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                str(self.component("postgres").log_file),
                "-o",
                options,
                "-w",
                "-t",
                "60",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._create_database()

    def _create_database(self) -> None:
        with self._postgres_admin() as cur:
            # The stack's secret, set on every start (a lost secret file is simply replaced).
            cur.execute(f'ALTER ROLE "{DATABASE_USER}" PASSWORD %s', (self.secret("postgres"),))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')

    @contextlib.contextmanager
    def _postgres_admin(self) -> Iterator[Any]:
        """A cursor on the `postgres` database over the stack's own socket, in autocommit (for
        CREATE and DROP DATABASE, and setting the role's password)."""
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(
                host=str(self.run_dir / "postgres"),
                port=self.ports.postgres,
                user=DATABASE_USER,
                dbname="postgres",
                connect_timeout=5,
            )
        ) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur

    def empty(self) -> None:
        """Start over from nothing stored: a new, migrated gateway database, no Redis keys and
        empty queues (benchmarks start each run from the same state). Stops the apps first."""
        import redis

        for name in ("api", "bridge", "worker"):
            self.stop_app(name)
        with self._postgres_admin() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        self._create_database()
        self.migrate()
        with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
            client.flushdb()
        self.purge(topology.MQTT_INBOX_QUEUE, topology.WORK_QUEUE, topology.REJECTED_QUEUE)

    def purge(self, *queues: str) -> None:
        """Empty these queues of the gateway (over AMQP as the bridge, whose account may read
        every one: the administrator has no access to the vhost's messages)."""
        import aio_pika
        from aio_pika.exceptions import ChannelNotFoundEntity

        async def purge_all() -> None:
            async with await aio_pika.connect(self.amqp_url_for(accounts.BRIDGE)) as connection:
                for queue in queues:
                    channel = await connection.channel()
                    with contextlib.suppress(ChannelNotFoundEntity):  # not declared yet
                        await (await channel.get_queue(queue)).purge()

        asyncio.run(purge_all())

    def stop_postgres(self, *, mode: str = "fast") -> None:
        """`pg_ctl stop` in `mode`: `fast` (sessions ended, a checkpoint, then exit) or
        `immediate` (every process quits at once, no checkpoint: the next start recovers from
        the WAL, as after a crash)."""
        component = self.component("postgres")
        pid = component.pid()
        if pid is None:
            return
        base = self.run_dir / "postgres"
        subprocess.run(
            [
                *_postgres_runner(base),
                str(_postgres_bindir() / "pg_ctl"),
                "stop",
                "-D",
                str(base / "data"),
                "-m",
                mode,
                "-w",
            ],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _terminate(pid, component.signature, timeout=30)

    def migrate(self) -> None:
        from gateway.db import migrate

        migrate(self.database_url)

    # ---- Redis ----------------------------------------------------------------------------

    def start_redis(self) -> None:
        component = self.component("redis")
        if component.pid():
            return
        directory = self.run_dir / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        # The password goes in a file, never on the command line (which every user can read).
        config = directory / "redis.conf"
        _write_private(config, f"requirepass {self.secret('redis')}\n")
        _require_free(self.ports.redis)
        subprocess.run(
            [
                "redis-server",
                str(config),
                "--port",
                str(self.ports.redis),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--pidfile",
                str(component.pid_file),
                "--logfile",
                str(component.log_file),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop_redis(self) -> None:
        component = self.component("redis")
        pid = component.pid()
        if pid is not None:
            _terminate(pid, component.signature, timeout=10)

    def redis_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports.redis), timeout=1) as sock:
                sock.sendall(b"AUTH %s\r\nPING\r\n" % self.secret("redis").encode())
                reply = b""
                while reply.count(b"\r\n") < 2 and (chunk := sock.recv(64)):
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False

    # ---- bridge, worker, api --------------------------------------------------------------

    def start_app(self, name: str, *, env: dict[str, str] | None = None) -> int:
        component = self.component(name)
        pid = component.pid()
        if pid:
            return pid
        kind = name.split("-", 1)[0]
        executable = Path(sys.executable).parent / f"gateway-{kind}"
        if not executable.exists():
            raise StackError(f"{executable} is missing: run `make install` (pip install -e .)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with component.log_file.open("ab") as log:
            process = subprocess.Popen(
                [str(executable)],
                env=env or self.env(kind, health_port=self.health_port(name)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        component.pid_file.write_text(f"{process.pid}\n")
        self._processes[name] = process
        return process.pid

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """The exit code of app `name` if this object started it and it exits within `timeout`."""
        process = self._processes.get(name)
        if process is None:
            return None
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_app(self, name: str, timeout: float = 15) -> None:
        component = self.component(name)
        pid = component.pid()
        if pid is not None:
            _terminate(pid, component.signature, timeout=timeout)
        component.pid_file.unlink(missing_ok=True)

    def app_ready(self, name: str) -> bool:
        port = self.health_port(name)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    # ---- waiting --------------------------------------------------------------------------

    def wait_infrastructure(self, timeout: float = 90) -> None:
        self.wait_rabbitmq(timeout)
        self.revoke_stale_permissions()
        _wait("Redis", self.redis_ready, timeout, self.component("redis").log_file)

    def wait_rabbitmq(self, timeout: float = 90) -> None:
        _wait("RabbitMQ", self.rabbitmq_ready, timeout, self.log_dir / f"{self.node_name}.log")

    def revoke_stale_permissions(self) -> None:
        """Loading definitions adds and updates, never removes: an account that must have no
        access to the vhost (the administrator) loses what an older version gave it."""
        vhost = urllib.parse.quote(accounts.VHOST, safe="")
        for account in accounts.ACCOUNTS:
            if account.permissions is None:
                with contextlib.suppress(urllib.error.HTTPError):  # 404: nothing to revoke
                    self.management("DELETE", f"/api/permissions/{vhost}/{account.name}")

    def wait_apps(self, names: tuple[str, ...] = ("worker", "bridge", "api"), timeout=60) -> None:
        for name in names:
            component = self.component(name)

            def ready(name: str = name, component: Component = component) -> bool:
                if component.pid() is None:
                    raise StackError(f"{name} exited; see {component.log_file}")
                return self.app_ready(name)

            _wait(name, ready, timeout, component.log_file)


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds a secret: readable by its owner only, from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)


def config_lines(config: str) -> dict[str, str]:
    """The `key = value` lines of a rabbitmq.conf."""
    lines = {}
    for line in config.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            lines[key.strip()] = value.strip()
    return lines


def apply_overrides(config: str, overrides: Mapping[str, str | None]) -> str:
    """Replace `key = value` lines of a rabbitmq.conf (appending keys it lacks); a key whose
    value is None is left out."""
    lines = []
    pending = dict(overrides)
    for line in config.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in pending:
            value = pending.pop(key)
            if value is not None:
                lines.append(f"{key} = {value}")
        else:
            lines.append(line)
    added = {key: value for key, value in pending.items() if value is not None}
    if added:
        lines.append("")
        lines.append("## Local stack (gateway/localstack.py)")
        lines.extend(f"{key} = {value}" for key, value in added.items())
    return "\n".join(lines) + "\n"


# ---- system packages ----------------------------------------------------------------------


def missing_packages(packages: dict[str, str]) -> list[str]:
    return [pkg for pkg, command in packages.items() if not _have(command)]


def require_system_packages(packages: dict[str, str]) -> None:
    """Install missing Debian packages when root; otherwise say what to install."""
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(
            "missing system packages: "
            + " ".join(missing)
            + f"\ninstall them with: sudo apt-get install -y {' '.join(missing)}"
        )
    print(f"installing {' '.join(missing)} with apt-get...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env
    )
    still = missing_packages(packages)
    if still:
        raise StackError(f"apt-get did not provide: {' '.join(still)}")


def _have(command: str) -> bool:
    if command == "initdb":
        return _find_postgres_bindir() is not None
    return Path(command).exists() if command.startswith("/") else shutil.which(command) is not None


def _find_postgres_bindir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _postgres_bindir() -> Path:
    bindir = _find_postgres_bindir()
    if bindir is None:
        raise StackError("PostgreSQL is not installed: apt-get install -y postgresql")
    return bindir


def _postgres_runner(base: Path) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as the `postgres` user then."""
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _chown_for_postgres(base: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        for path in base.rglob("*"):
            shutil.chown(path, "postgres", "postgres")


# ---- processes ----------------------------------------------------------------------------


def _alive(pid: int, signature: str) -> bool:
    """Is `pid` running, and is it ours (its command line contains `signature`)?"""
    for _ in range(20):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        if cmdline:
            return signature in cmdline.replace(b"\0", b" ").decode(errors="replace")
        # The kernel answers an empty command line while the process's memory is busy (a
        # Python process starting up): ask again rather than call it gone.
        time.sleep(0.01)
    return True


def _terminate(pid: int, signature: str, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL: only the pid we started, checked by its command line."""
    if not _alive(pid, signature):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid, signature):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _require_free(*ports: int) -> None:
    taken = [port for port in ports if port_open(port)]
    if taken:
        raise StackError(
            f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 are taken by another process; "
            "stop it or run `make down`"
        )


def _wait(what: str, ready, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise StackError(f"{what} was not ready after {timeout:.0f} s; see {log}")


@contextlib.contextmanager
def running(stack: LocalStack, *, apps: bool = True) -> Iterator[LocalStack]:
    """Start `stack` if needed and stop it afterwards only if this call started it."""
    was_running = stack.component("rabbitmq").pid() is not None
    stack.up(apps=apps, echo=False)
    try:
        yield stack
    finally:
        if not was_running:
            stack.down(echo=False)
