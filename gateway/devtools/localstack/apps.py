"""The stack's own processes: bridge, worker and api (and extra instances of them)."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from gateway.devtools.localstack.base import StackError, terminate


class AppProcesses:
    """The part of `LocalStack` that runs the gateway's services."""

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
            terminate(pid, component.signature, timeout=timeout)
        component.pid_file.unlink(missing_ok=True)

    def app_ready(self, name: str) -> bool:
        port = self.health_port(name)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False
