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

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.amqp import accounts
from gateway.devtools.localstack.apps import AppProcesses
from gateway.devtools.localstack.base import (
    BENCH_PORTS,
    DATABASE,
    DATABASE_USER,
    DEV_PORTS,
    PROJECT_ROOT,
    SYSTEM_PACKAGES,
    TEST_PORTS,
    WEB_MQTT_PATH,
    Component,
    Ports,
    StackError,
    require_system_packages,
    wait_for,
    write_private,
)
from gateway.devtools.localstack.postgres import PostgresCluster
from gateway.devtools.localstack.rabbitmq import RabbitMQNode
from gateway.devtools.localstack.redis import RedisServer
from gateway.runtime import certificates
from gateway.runtime.certificates import TlsFiles


@dataclass
class LocalStack(RabbitMQNode, PostgresCluster, RedisServer, AppProcesses):
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
            write_private(path, secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    def broker_password(self, account: str) -> str:
        return self.secret(f"broker-{account}")

    def amqp_url_for(self, account: str, vhost: str = "/") -> str:
        """AMQP as one of the broker accounts (`gateway.amqp.accounts`)."""
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

    # ---- waiting --------------------------------------------------------------------------

    def wait_infrastructure(self, timeout: float = 90) -> None:
        self.wait_rabbitmq(timeout)
        self.revoke_stale_permissions()
        wait_for("Redis", self.redis_ready, timeout, self.component("redis").log_file)

    def wait_rabbitmq(self, timeout: float = 90) -> None:
        wait_for("RabbitMQ", self.rabbitmq_ready, timeout, self.log_dir / f"{self.node_name}.log")

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

            wait_for(name, ready, timeout, component.log_file)


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
