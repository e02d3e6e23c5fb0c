"""The stack's RabbitMQ node: its configuration from `rabbitmq/`, definitions, rabbitmqctl and
the management API."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from gateway.amqp import accounts
from gateway.devtools.localstack.base import (
    RABBITMQ_DIR,
    RABBITMQ_SERVER,
    RABBITMQCTL,
    StackError,
    port_open,
    require_free,
    terminate,
    write_private,
)


class RabbitMQNode:
    """The part of `LocalStack` that runs RabbitMQ."""

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
        write_private(self.definitions_file, accounts.render(topology_definitions, passwords))

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
        require_free(p.amqp, p.mqtt, p.mqtt_tls, p.web_mqtt_tls, p.management, p.dist)
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
        terminate(pid, component.signature, timeout=30)


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
        lines.append("## Local stack (gateway/devtools/localstack.py)")
        lines.extend(f"{key} = {value}" for key, value in added.items())
    return "\n".join(lines) + "\n"


# ---- system packages ----------------------------------------------------------------------
