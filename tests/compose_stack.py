"""docker-compose.yaml started for real, on the private engine of tests/dockerd.py.

The very file users run, with its documented knobs only: BASE_IMAGE (the base made from
Debian's packages by docker/base-image.sh), the host ports (HOST_PORT_*, each shifted by
GATEWAY_TEST_PORT_OFFSET so checkouts never collide, and never 1883, which this machine's own
Mosquitto may hold), PUBLISH_ADDRESS=127.0.0.1 (the tests talk to loopback only), and secrets
generated for the run. Nothing of the caller's environment reaches compose but PATH and HOME.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dockerd import BASE_IMAGE, Dockerd

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
PRODUCTION_FILE = ROOT / "docker-compose.production.yaml"

#: Host port variable -> port at offset 0 (clear of the local stacks' and the benchmarks').
HOST_PORTS = {
    "HOST_PORT_MQTT": 2284,
    "HOST_PORT_MQTT_TLS": 9284,
    "HOST_PORT_MQTT_WSS": 15976,
    "HOST_PORT_MQTT_WSS_HTTPS": 8843,
    "HOST_PORT_API": 8300,
    "HOST_PORT_API_TLS": 8743,
    "HOST_PORT_AMQP": 5973,
    "HOST_PORT_MANAGEMENT": 15973,
    "HOST_PORT_PROMETHEUS": 15993,
}
SECRET_VARIABLES = (
    "GATEWAY_OPERATOR_TOKEN",
    "GATEWAY_POSTGRES_PASSWORD",
    "GATEWAY_REDIS_PASSWORD",
    "GATEWAY_BROKER_ADMIN_PASSWORD",
    "GATEWAY_BROKER_BRIDGE_PASSWORD",
    "GATEWAY_BROKER_WORKER_PASSWORD",
    "GATEWAY_BROKER_API_PASSWORD",
)
LONG_RUNNING = ("rabbitmq", "postgres", "redis", "bridge", "worker", "api")
ONE_SHOT = ("tls-init", "broker-definitions", "migrate")
#: One service per distinct image: built side by side first, the rest then come from cache.
DISTINCT_IMAGES = ("rabbitmq", "postgres", "redis", "migrate")


class ComposeError(RuntimeError):
    pass


@dataclass
class ComposeStack:
    dockerd: Dockerd
    offset: int = 0
    secrets: dict[str, str] = field(
        default_factory=lambda: {name: secrets.token_urlsafe(32) for name in SECRET_VARIABLES}
    )
    #: What each step took, in seconds (the test report prints them).
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_tests(cls, dockerd: Dockerd) -> ComposeStack:
        return cls(dockerd, int(os.environ.get("GATEWAY_TEST_PORT_OFFSET", "0")))

    @property
    def project(self) -> str:
        return f"gwcompose{self.offset}"

    def port(self, variable: str) -> int:
        return HOST_PORTS[variable] + self.offset

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port('HOST_PORT_API')}"

    @property
    def mqtt_port(self) -> int:
        return self.port("HOST_PORT_MQTT")

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.port('HOST_PORT_MANAGEMENT')}"

    @property
    def operator_token(self) -> str:
        return self.secrets["GATEWAY_OPERATOR_TOKEN"]

    def env(self, **overrides: str | None) -> dict[str, str]:
        """Compose's environment: the knobs above and the secrets; `None` removes one."""
        env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
        env.update(
            DOCKER_HOST=self.dockerd.host,
            COMPOSE_PROJECT_NAME=self.project,
            BASE_IMAGE=BASE_IMAGE,
            PUBLISH_ADDRESS="127.0.0.1",
            **{name: str(self.port(name)) for name in HOST_PORTS},
            **self.secrets,
        )
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def compose(
        self,
        *arguments: str,
        files: tuple[Path, ...] = (COMPOSE_FILE,),
        timeout: float = 600,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("docker-compose")
        if binary is None:
            raise ComposeError("docker-compose is missing (Debian package docker-compose)")
        command = [binary, *(w for f in files for w in ("-f", str(f))), *arguments]
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env if env is not None else self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ComposeError(
                f"{' '.join(command[1:])} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def timed(self, what: str, *arguments: str, timeout: float = 1800) -> None:
        started = time.monotonic()
        self.compose(*arguments, timeout=timeout)
        self.timings[what] = time.monotonic() - started

    def build(self) -> None:
        self.timings["base image"] = self.dockerd.ensure_base_image()
        started = time.monotonic()
        self.compose("build", "--parallel", *DISTINCT_IMAGES, timeout=1800)
        self.compose("build", timeout=1800)
        self.timings["build"] = time.monotonic() - started

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        arguments = ("ps", "-a", "-q", service) if all_states else ("ps", "-q", service)
        return self.compose(*arguments).stdout.split()

    def inspect(self, container: str) -> dict:
        status, body = self.dockerd.api("GET", f"/containers/{container}/json")
        if status != 200 or not isinstance(body, dict):
            raise ComposeError(f"cannot inspect container {container}: {status} {body}")
        return body

    def health(self) -> dict[str, list[str]]:
        """service -> the state of each of its containers (`healthy`, `exited 0`, ...)."""
        states: dict[str, list[str]] = {}
        for service in (*LONG_RUNNING, *ONE_SHOT):
            for container in self.containers(service, all_states=service in ONE_SHOT):
                state = self.inspect(container)["State"]
                if service in ONE_SHOT or not state["Running"]:
                    word = f"{state['Status']} {state['ExitCode']}"
                else:
                    word = state.get("Health", {}).get("Status", state["Status"])
                states.setdefault(service, []).append(word)
        return states

    def wait_healthy(self, timeout: float = 300) -> dict[str, list[str]]:
        """Until every long-running container is healthy and every one-shot exited 0."""
        deadline = time.monotonic() + timeout
        states: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            states = self.health()
            one_shots_done = all(states.get(s) == ["exited 0"] for s in ONE_SHOT)
            running = all(
                states.get(s) and all(w == "healthy" for w in states[s]) for s in LONG_RUNNING
            )
            if one_shots_done and running:
                return states
            if any(
                w.startswith("exited") and w != "exited 0"
                for s in ONE_SHOT
                for w in states.get(s, [])
            ):
                break
            time.sleep(1)
        logs = self.compose("logs", "--no-color", "--tail=30", check=False).stdout
        raise ComposeError(f"the stack is not healthy: {states}\n{logs[-6000:]}")

    def up(self, *arguments: str, timeout: float = 300) -> float:
        """`up -d` (with `arguments`) until healthy; the seconds it took."""
        started = time.monotonic()
        self.compose("up", "-d", *arguments, timeout=timeout)
        self.wait_healthy(timeout)
        return time.monotonic() - started

    def psql(self, sql: str) -> list[list[str]]:
        """Rows of `sql` run by the database's own psql in the postgres container."""
        result = self.compose(
            "exec",
            "-T",
            "postgres",
            "psql",
            "--no-psqlrc",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "gateway",
            "-d",
            "gateway",
            "-At",
            "-F",
            "\t",
            "-c",
            sql,
            timeout=60,
        )
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)
