"""What every part of the local stack shares: ports, processes, waiting, packages."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]
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
        return pid if alive(pid, self.signature) else None


def write_private(path: Path, text: str) -> None:
    """Write a file that holds a secret: readable by its owner only, from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)


def missing_packages(packages: dict[str, str]) -> list[str]:
    return [pkg for pkg, command in packages.items() if not have(command)]


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


def have(command: str) -> bool:
    if command == "initdb":
        return find_postgres_bindir() is not None
    return Path(command).exists() if command.startswith("/") else shutil.which(command) is not None


def alive(pid: int, signature: str) -> bool:
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


def terminate(pid: int, signature: str, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL: only the pid we started, checked by its command line."""
    if not alive(pid, signature):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, signature):
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


def require_free(*ports: int) -> None:
    taken = [port for port in ports if port_open(port)]
    if taken:
        raise StackError(
            f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 are taken by another process; "
            "stop it or run `make down`"
        )


def wait_for(what: str, ready, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise StackError(f"{what} was not ready after {timeout:.0f} s; see {log}")


def find_postgres_bindir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None
