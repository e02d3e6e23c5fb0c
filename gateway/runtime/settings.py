"""Typed settings, read from `GATEWAY_*` environment variables (and a `.env` file when present).

One class per service, all sharing the connection settings. Build them at startup
(`WorkerSettings()`), never at import time.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import (
    AmqpDsn,
    AnyHttpUrl,
    Field,
    PostgresDsn,
    RedisDsn,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.contract.messages import DEDUP_WINDOW_DAYS, MAX_BATCH_ITEMS

Environment = Literal["development", "test", "production"]

#: Secrets that must never guard a real deployment: defaults of this project's ancestors and of
#: the software it runs on.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "",
        "admin",
        "changeme",
        "change-me",
        "dev",
        "gateway",
        "gateway-api",
        "gateway-bridge",
        "gateway-worker",
        "guest",
        "operator",
        "password",
        "postgres",
        "rabbitmq",
        "redis",
        "secret",
    }
)
MIN_SECRET_LENGTH = 16


def weak_secret(secret: str | None, user: str | None = None) -> str | None:
    """Why `secret` must not guard a real deployment, or None when it may."""
    if not secret:
        return "no password or token is set"
    if secret.lower() in KNOWN_DEFAULT_SECRETS or (user and secret.lower() == user.lower()):
        return "it is a known default"
    if len(secret) < MIN_SECRET_LENGTH:
        return f"it is shorter than {MIN_SECRET_LENGTH} characters"
    if len(set(secret)) < 6:
        return "it repeats too few characters"
    return None


def _weak_url(name: str, url: object) -> str | None:
    """A connection URL's password, checked as a secret (None when it is strong)."""
    password = getattr(url, "password", None)
    if not password and hasattr(url, "hosts"):  # multi-host DSNs (PostgresDsn)
        hosts = url.hosts()
        password = hosts[0].get("password") if hosts else None
        user = hosts[0].get("username") if hosts else None
    else:
        user = getattr(url, "username", None)
    problem = weak_secret(password, user)
    return f"{name}: {problem}" if problem else None


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    environment: Environment = "development"
    #: Connections default to the local stack's ports, without credentials: the local stack gives
    #: its services theirs, and every other deployment sets its own.
    amqp_url: AmqpDsn = AmqpDsn("amqp://127.0.0.1:5673/%2F")
    database_url: PostgresDsn = PostgresDsn("postgresql+psycopg2://gateway@127.0.0.1:5433/gateway")
    redis_url: RedisDsn = RedisDsn("redis://127.0.0.1:6380/0")
    log_level: str = "INFO"
    #: `json` (one object per line, for containers), `text` (for terminals), or `auto`.
    log_format: Literal["auto", "json", "text"] = "auto"
    #: A device is online while now - last_seen < factor x its heartbeat interval.
    offline_factor: float = Field(default=3.0, gt=1.0)
    default_heartbeat_interval_s: int = Field(default=30, ge=1)
    #: Interface of the bridge's and worker's small /healthz, /readyz, /metrics server.
    health_host: str = "127.0.0.1"
    #: Seconds a service waits for its open work to finish on SIGTERM.
    shutdown_timeout_s: float = Field(default=8.0, gt=0)
    #: RabbitMQ's management API as the broker administrator (`http://gateway:<password>@host:
    #: 15672`): whoever disables a device or rotates its token (the api, the `gateway devices`
    #: command) closes the device's live MQTT connections through it. Required by the api
    #: outside development.
    broker_management_url: AnyHttpUrl | None = None

    @model_validator(mode="after")
    def _secrets_are_safe(self) -> CommonSettings:
        """Outside development every password a service holds must be its deployment's own."""
        if self.environment == "development":
            return self
        problems = [
            problem
            for name, url in self.secret_urls().items()
            if (problem := _weak_url(name, url)) is not None
        ]
        if problems:
            raise ValueError(
                "unsafe secrets: "
                + "; ".join(problems)
                + " (generate each, e.g. python3 -c"
                + " 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return self

    def secret_urls(self) -> dict[str, object]:
        """The connection URLs whose passwords are checked outside development."""
        urls: dict[str, object] = {
            "GATEWAY_AMQP_URL": self.amqp_url,
            "GATEWAY_DATABASE_URL": self.database_url,
            "GATEWAY_REDIS_URL": self.redis_url,
        }
        if self.broker_management_url is not None:
            urls["GATEWAY_BROKER_MANAGEMENT_URL"] = self.broker_management_url
        return urls


class BridgeSettings(CommonSettings):
    bridge_prefetch: int = Field(default=500, ge=1)
    #: Heartbeats forwarded together in one work message, and how long the first one waits
    #: for company (1 = one message per heartbeat).
    bridge_batch_size: int = Field(default=100, ge=1, le=MAX_BATCH_ITEMS)
    bridge_linger_ms: int = Field(default=20, ge=0)
    #: Seconds to wait for the broker to confirm a forwarded message.
    bridge_confirm_timeout_s: float = Field(default=10.0, gt=0)
    #: Port of the bridge's /healthz, /readyz and /metrics (0 = off).
    bridge_health_port: int = Field(default=8010, ge=0, le=65535)


class WorkerSettings(CommonSettings):
    worker_batch_size: int = Field(default=500, ge=1)
    #: How long a partial batch waits for more messages before it is written. With 0, a batch
    #: is written as soon as the previous one is done, and what arrived meanwhile is the next.
    worker_linger_ms: int = Field(default=0, ge=0)
    worker_prefetch: int = Field(default=1000, ge=1)
    #: How often the sweeper looks for devices whose deadline has passed.
    worker_sweep_period_s: float = Field(default=1.0, gt=0)
    #: Port of the worker's /healthz, /readyz and /metrics (0 = off).
    worker_health_port: int = Field(default=8011, ge=0, le=65535)
    #: A copy of a heartbeat stored up to this many days after the first is recognized and
    #: skipped (0: as long as the first is kept; each day costs index lookups per batch).
    dedup_window_days: int = Field(default=DEDUP_WINDOW_DAYS, ge=0)
    #: Days of heartbeats kept: older daily partitions are dropped whole (0 keeps everything).
    retention_days: int = Field(default=30, ge=0)
    #: Days of dead letters and of status events kept: older rows are deleted in batches by
    #: maintenance (0 keeps everything).
    dead_letter_retention_days: int = Field(default=30, ge=0)
    event_retention_days: int = Field(default=30, ge=0)
    #: Dead letters kept per device per hour (those without a device share one allowance);
    #: the rest are counted in one `over_cap` entry per device and hour (0: no cap).
    dead_letter_cap_per_hour: int = Field(default=1000, ge=0, le=2**31 - 1)
    #: Daily partitions created ahead of time, and how often the worker checks.
    partitions_ahead_days: int = Field(default=3, ge=1)
    maintenance_period_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _prefetch_covers_batch(self) -> WorkerSettings:
        if self.worker_prefetch < self.worker_batch_size:
            raise ValueError("worker_prefetch must be at least worker_batch_size")
        return self


class ApiSettings(CommonSettings):
    api_host: str = "127.0.0.1"
    #: The plain HTTP listener for devices and operators (0 = off: HTTPS only).
    api_port: int = Field(default=8000, ge=0, le=65535)
    api_workers: int = Field(default=1, ge=1)
    #: The listener RabbitMQ calls to admit devices (auth_backend_http); never expose it.
    api_internal_host: str = "127.0.0.1"
    api_internal_port: int = Field(default=8001, ge=1, le=65535)
    #: The HTTPS listener (0 = off), on GATEWAY_API_TLS_HOST (default: GATEWAY_API_HOST), with
    #: the certificate (PEM; the chain after it, if any) and its unencrypted key.
    api_tls_port: int = Field(default=0, ge=0, le=65535)
    api_tls_host: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Seconds to wait for the broker to confirm an HTTP heartbeat before answering 503.
    api_confirm_timeout_s: float = Field(default=5.0, gt=0)
    #: Concurrent HTTP heartbeats published together in one work message (each still answered
    #: only after the broker's confirm), and how long the first one waits for company.
    api_batch_size: int = Field(default=100, ge=1, le=MAX_BATCH_ITEMS)
    api_linger_ms: int = Field(default=2, ge=0)
    operator_token: str = ""
    #: Longest any one statement of the api may run (PostgreSQL `statement_timeout`, set once
    #: per connection); a read cut short answers 503 with Retry-After (0: no limit).
    api_statement_timeout_ms: int = Field(default=5000, ge=0, le=2**31 - 1)

    def secret_urls(self) -> dict[str, object]:
        # The api must be able to close a disabled device's connections.
        management = {"GATEWAY_BROKER_MANAGEMENT_URL": self.broker_management_url}
        return {**super().secret_urls(), **management}

    @model_validator(mode="after")
    def _listeners_differ(self) -> ApiSettings:
        ports = {
            "GATEWAY_API_PORT": self.api_port,
            "GATEWAY_API_INTERNAL_PORT": self.api_internal_port,
            "GATEWAY_API_TLS_PORT": self.api_tls_port,
        }
        opened = [port for port in ports.values() if port]
        if len(set(opened)) < len(opened):
            raise ValueError(f"{', '.join(ports)} must differ (0 turns a listener off)")
        if not (self.api_port or self.api_tls_port):
            raise ValueError("GATEWAY_API_PORT and GATEWAY_API_TLS_PORT are both 0: no listener")
        return self

    @model_validator(mode="after")
    def _tls_has_its_files(self) -> ApiSettings:
        if self.api_tls_port and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError(
                "GATEWAY_API_TLS_PORT needs GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE "
                "(gateway tls init --out DIR writes a CA and both)"
            )
        if self.api_tls_host is None:
            self.api_tls_host = self.api_host
        return self

    @model_validator(mode="after")
    def _operator_token_is_safe(self) -> ApiSettings:
        problem = weak_secret(self.operator_token)
        if problem is not None:
            if self.environment != "development":
                raise ValueError(
                    f"GATEWAY_OPERATOR_TOKEN is unsafe ({problem}); "
                    "set a random one of at least 16 characters "
                    '(python -c "import secrets; print(secrets.token_urlsafe(32))")'
                )
            if not self.operator_token:
                # Development without a token: a random one nobody can guess, so
                # operator endpoints are never open by accident.
                self.operator_token = secrets.token_urlsafe(32)
        return self


S = TypeVar("S", bound=CommonSettings)


def load(cls: type[S]) -> S:
    """Build settings at startup; on a bad value, exit with a message naming the variable."""
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            name = "GATEWAY_" + str(error["loc"][0]).upper() if error["loc"] else "settings"
            problems.append(f"  {name}: {error['msg'].removeprefix('Value error, ')}")
        sys.exit("invalid settings:\n" + "\n".join(problems))
