"""The gateway's own broker accounts: who they are, what each may do, and how their secrets are
given.

RabbitMQ checks these internal users before it asks the api about devices. None of them has a
known password: the local stack generates each one under `.run/<stack>/secrets/`, and docker
compose takes them from the environment (`GATEWAY_BROKER_<ACCOUNT>_PASSWORD`) and refuses to
start without them. They are rendered into a definitions file of their own (users, permissions,
topic permissions), merged at deployment with the topology of `rabbitmq/definitions.json` into
the one definitions file the broker loads at boot.

What each may do, and no more:
- `gateway` (operators, and the api closing a device's live connections): the management API
  only. It is an administrator because RabbitMQ 3.10 lets no other tag close another user's
  connection, and it has no permission on any vhost, so it can log in neither over AMQP nor MQTT.
- `gateway-bridge`, `gateway-worker`, `gateway-api`: AMQP on the gateway's own exchanges and
  queues. Only the bridge reads `amq.topic`, to bind the MQTT inbox with `devices.#` (RabbitMQ
  checks a binding's key against topic permissions). Topic permissions on `amq.topic` let none
  of them publish under `devices.`, except that the api may publish a device's commands: a
  service account cannot speak for a device.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.amqp.topology import MQTT_EXCHANGE, MQTT_INBOX_BINDING

#: The operators' account, also used by the api to close a device's connections.
ADMIN = "gateway"
BRIDGE = "gateway-bridge"
WORKER = "gateway-worker"
API = "gateway-api"
SERVICES = (BRIDGE, WORKER, API)

#: The vhost of devices (MQTT) and of the gateway's own queues.
VHOST = "/"
#: Nothing: a regular expression that no resource or routing key matches.
NOTHING = "^$"
PERMISSIONS = ("configure", "write", "read")
GATEWAY_RESOURCES = r"^gateway\..*"
AMQ_TOPIC = re.escape(MQTT_EXCHANGE)


@dataclass(frozen=True)
class Account:
    name: str
    tags: tuple[str, ...] = ()
    #: configure, write, read on the vhost; None: no access to the vhost at all.
    permissions: tuple[str, str, str] | None = None
    #: write, read on `amq.topic` routing keys (`devices.<id>.<kind>`).
    topic_permissions: tuple[str, str] = (NOTHING, NOTHING)

    @property
    def password_variable(self) -> str:
        """The environment variable that gives this account's password (compose)."""
        role = "admin" if self.name == ADMIN else self.name.removeprefix("gateway-")
        return f"GATEWAY_BROKER_{role.upper()}_PASSWORD"


ACCOUNTS = (
    Account(ADMIN, tags=("administrator",)),
    Account(
        BRIDGE,
        permissions=(GATEWAY_RESOURCES, GATEWAY_RESOURCES, rf"^(gateway\..*|{AMQ_TOPIC})$"),
        # RabbitMQ checks a binding's key against the read pattern: the inbox's, and only it.
        topic_permissions=(NOTHING, rf"^{MQTT_INBOX_BINDING.replace('.', '[.]')}$"),
    ),
    Account(WORKER, permissions=(GATEWAY_RESOURCES, GATEWAY_RESOURCES, GATEWAY_RESOURCES)),
    Account(
        API,
        # It writes `amq.topic` only to send a device its commands (topic permissions).
        permissions=(GATEWAY_RESOURCES, rf"^(gateway\..*|{AMQ_TOPIC})$", GATEWAY_RESOURCES),
        topic_permissions=(r"^devices\.[A-Za-z0-9_-]{1,64}\.commands$", NOTHING),
    ),
)
ADMIN_ACCOUNT = ACCOUNTS[0]
ACCOUNT_NAMES = tuple(account.name for account in ACCOUNTS)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """A password hash in RabbitMQ's `rabbit_password_hashing_sha256` format."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(passwords: Mapping[str, str]) -> dict[str, Any]:
    """Users, permissions and topic permissions in RabbitMQ's definitions format, given every
    account's password by name. Refuses a missing or weak password."""
    from gateway.runtime.settings import (
        weak_secret,  # settings imports the topology, not this module
    )

    for account in ACCOUNTS:
        problem = weak_secret(passwords.get(account.name, ""), account.name)
        if problem is not None:
            raise ValueError(f"broker account {account.name}: {problem}")
    return {
        "users": [
            {
                "name": a.name,
                "password_hash": password_hash(passwords[a.name]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(a.tags),
            }
            for a in ACCOUNTS
        ],
        "permissions": [
            {
                "user": a.name,
                "vhost": VHOST,
                **dict(zip(("configure", "write", "read"), a.permissions, strict=True)),
            }
            for a in ACCOUNTS
            if a.permissions is not None
        ],
        "topic_permissions": [
            {
                "user": a.name,
                "vhost": VHOST,
                "exchange": MQTT_EXCHANGE,
                "write": a.topic_permissions[0],
                "read": a.topic_permissions[1],
            }
            for a in ACCOUNTS
            if a.permissions is not None
        ],
    }


def passwords_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every account's password from `GATEWAY_BROKER_<ACCOUNT>_PASSWORD` (compose)."""
    environ = os.environ if environ is None else environ
    missing = [a.password_variable for a in ACCOUNTS if not environ.get(a.password_variable)]
    if missing:
        raise ValueError("missing broker passwords: set " + ", ".join(missing))
    return {a.name: environ[a.password_variable] for a in ACCOUNTS}


def render(topology: Mapping[str, Any], passwords: Mapping[str, str]) -> str:
    """What the broker loads at boot: the topology (`rabbitmq/definitions.json`) and the
    accounts with these passwords, in one file (RabbitMQ 3.10 applies one file of a folder)."""
    return json.dumps({**topology, **definitions(passwords)}, indent=2) + "\n"
