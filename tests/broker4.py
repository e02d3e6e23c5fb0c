"""The test stack with RabbitMQ 4 in place of the host's 3.10: the broker-facing tests on every
broker version the project supports.

`GATEWAY_TEST_BROKER=rabbitmq4 pytest ...` makes the suite's `stack` fixture start this stack:
the same local stack (PostgreSQL, Redis, bridge, worker and api on the host, the same ports),
whose RabbitMQ node runs in the image of docker/rabbitmq (Debian trixie's 4.0.5, the broker of
docker-compose.yaml) on the private dockerd of tests/dockerd.py. The container shares the host's
network and process namespaces, so the node listens on the stack's own ports and its pid is a
host pid, and it reads and writes the stack's own files (config, definitions, TLS files, data,
logs), under `.run/test-rabbitmq4/` so they never mix with the 3.10 node's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dockerd import BASE_IMAGE, Dockerd, DockerdError, install_packages

from gateway.devtools.localstack import RABBITMQ_DIR, LocalStack, StackError, require_free

#: The broker under test: unset (or `rabbitmq3`) is the host's, `rabbitmq4` this module's.
BROKER_VARIABLE = "GATEWAY_TEST_BROKER"
IMAGE = "heartbeat-gateway-rabbitmq:latest"
ROOT = Path(__file__).resolve().parent.parent


def broker_stack_class() -> type[LocalStack]:
    """The stack class the suite runs on, by GATEWAY_TEST_BROKER."""
    broker = os.environ.get(BROKER_VARIABLE, "rabbitmq3")
    if broker == "rabbitmq4":
        return Rabbitmq4Stack
    if broker != "rabbitmq3":
        raise StackError(f"{BROKER_VARIABLE}={broker}: expected rabbitmq3 or rabbitmq4")
    return LocalStack


class Rabbitmq4Stack(LocalStack):
    _dockerd: Dockerd | None = None

    @property
    def run_dir(self) -> Path:
        return self.root / ".run" / f"{self.name}-rabbitmq4"

    @property
    def container(self) -> str:
        return f"gateway-{self.name}-rabbitmq4-{self.ports.amqp}"

    def docker(self, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self._dockerd is not None
        done = subprocess.run(
            ["docker", *arguments],
            env=self._dockerd.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"docker {arguments[0]} failed: {done.stderr.strip()[-2000:]}")
        return done

    def ensure_engine(self) -> None:
        """The private dockerd (started if needed) and the RabbitMQ 4 image (built if missing)."""
        if self._dockerd is not None:
            return
        engine = Dockerd()
        try:
            install_packages()
            engine.start()
            self._dockerd = engine
            if not engine.has_image(IMAGE):
                engine.ensure_base_image()
                self.docker(
                    "build",
                    "--build-arg",
                    f"BASE_IMAGE={BASE_IMAGE}",
                    "-t",
                    IMAGE,
                    str(ROOT / "docker" / "rabbitmq"),
                    timeout=900,
                )
        except DockerdError as exc:
            raise StackError(f"RabbitMQ 4 runs in a container: {exc}") from exc

    def start_rabbitmq(self) -> None:
        if self.component("rabbitmq").pid():
            return
        self.ensure_engine()
        base = self.run_dir / "rabbitmq"
        for sub in ("home", "mnesia"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.make_tls_files()
        (base / "rabbitmq.conf").write_text(self.rabbitmq_config())
        self.write_definitions()
        p = self.ports
        require_free(p.amqp, p.mqtt, p.mqtt_tls, p.web_mqtt_tls, p.management, p.dist)
        self.docker("rm", "-f", self.container)
        environment = {
            name: value
            for name, value in self.rabbitmq_env().items()
            if (name.startswith("RABBITMQ_") or name == "HOME")
            # The node runs in the foreground in its container (the host's is `-detached`).
            and name != "RABBITMQ_ALLOW_INPUT"
        }
        environment["RABBITMQ_LOGS"] = str(self.log_dir / f"{self.node_name}.log")
        self.docker(
            "run",
            "--detach",
            "--rm",
            "--name",
            self.container,
            "--network",
            "host",
            "--pid",
            "host",
            "--user",
            "0:0",
            "--volume",
            f"{self.run_dir}:{self.run_dir}",
            "--volume",
            f"{RABBITMQ_DIR}:{RABBITMQ_DIR}:ro",
            *(w for name, value in environment.items() for w in ("--env", f"{name}={value}")),
            IMAGE,
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
        )

    def rabbitmqctl(self, *args: str) -> str:
        self.ensure_engine()
        done = self.docker(
            "exec",
            "--env",
            f"HOME={self.run_dir / 'rabbitmq' / 'home'}",
            self.container,
            "/usr/lib/rabbitmq/bin/rabbitmqctl",
            "-n",
            self.node_name,
            *args,
            timeout=60,
        )
        return done.stdout

    def stop_rabbitmq(self) -> None:
        if self._dockerd is None:
            engine = Dockerd()
            if not engine.answers():
                return  # no engine, so no container
            self._dockerd = engine  # not started here: its stop() leaves it running
        if self.container in self.docker("ps", "--format", "{{.Names}}").stdout.split():
            self.docker("stop", "--time", "60", self.container, timeout=120)

    def up(self, *, apps: bool = True, echo: bool = True) -> None:
        try:
            super().up(apps=apps, echo=echo)
        except BaseException:
            self.down(echo=False)  # nothing left running (the engine included) when it fails
            raise

    def down(self, *, echo: bool = True) -> None:
        super().down(echo=echo)
        if self._dockerd is not None:
            self._dockerd.stop()
            self._dockerd = None
