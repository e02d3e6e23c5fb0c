"""A private Docker engine for the compose tests, started and stopped like the other services.

Debian's `dockerd` (package docker.io) runs as root with a data-root, an exec-root and a socket
of its own under GATEWAY_DOCKER_ROOT (default /var/lib/gw-docker): outside the clone, so the
images it builds are reused by the next run on this machine, and apart from any system Docker.
An engine already answering on that socket is used as it is and left running; one this module
started is stopped by its pid. The base image (docker/base-image.sh: Debian trixie from
Debian's mirror, no registry needed) is made once and kept with the other images.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER_ROOT = Path(os.environ.get("GATEWAY_DOCKER_ROOT", "/var/lib/gw-docker"))
#: The base image every image of the stack is built on (compose's BASE_IMAGE).
BASE_IMAGE = "gw-base:trixie"


#: Debian packages the engine and the base image need (package -> command), installed by
#: `install_packages` when root, as `gateway stack install` does for the stack's.
PACKAGES = {
    "docker.io": "/usr/sbin/dockerd",
    "docker-compose": "docker-compose",
    "debootstrap": "/usr/sbin/debootstrap",
}


class DockerdError(RuntimeError):
    """The engine is missing or did not start; the message says why."""


def install_packages() -> None:
    """Install what is missing of PACKAGES (root), or say what to install."""
    from gateway.devtools.localstack import StackError, require_system_packages

    try:
        require_system_packages(PACKAGES)
    except (StackError, OSError, subprocess.CalledProcessError) as exc:
        raise DockerdError(str(exc)) from exc


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Dockerd:
    root: Path = DOCKER_ROOT
    _process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        """The value of DOCKER_HOST for clients of this engine."""
        return f"unix://{self.socket}"

    @property
    def log_file(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def started_here(self) -> bool:
        return self._process is not None

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, **extra}

    def api(self, method: str, path: str, timeout: float = 10.0) -> tuple[int, object]:
        """One call to the engine's HTTP API on its socket: (status, decoded JSON or text)."""
        conn = _UnixConnection(self.socket, timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body

    def answers(self) -> bool:
        try:
            return self.api("GET", "/_ping", timeout=3)[0] == 200
        except OSError:
            return False

    def start(self, timeout: float = 90.0) -> None:
        """Use the engine on the socket, or start one (root only)."""
        if self.answers():
            return
        binary = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not Path(binary).exists():
            raise DockerdError("dockerd is missing (Debian package docker.io)")
        if os.geteuid() != 0:
            raise DockerdError("a private dockerd needs root")
        for folder in (self.root, self.root / "data", self.root / "exec"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "--data-root",
                    str(self.root / "data"),
                    "--exec-root",
                    str(self.root / "exec"),
                    "--host",
                    self.host,
                    "--pidfile",
                    str(self.root / "docker.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise DockerdError(f"dockerd exited at start:\n{self.log_tail()}")
            if self.answers():
                return
            time.sleep(0.2)
        self.stop()
        raise DockerdError(f"dockerd did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the engine if this object started it (by its pid); leave any other alone."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def has_image(self, name: str) -> bool:
        return self.api("GET", f"/images/{name}/json")[0] == 200

    def ensure_base_image(self, name: str = BASE_IMAGE) -> float:
        """Make the base image from Debian's mirror unless it exists; the seconds it took."""
        if self.has_image(name):
            return 0.0
        started = time.monotonic()
        suite = name.rsplit(":", 1)[-1]
        result = subprocess.run(
            [str(ROOT / "docker" / "base-image.sh"), name, suite],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            raise DockerdError(f"docker/base-image.sh failed:\n{result.stderr[-3000:]}")
        return time.monotonic() - started
