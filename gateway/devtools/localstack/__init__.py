"""The whole stack on one Debian machine, without Docker: `LocalStack` (in `stack`) is made of
one part per service (`rabbitmq`, `postgres`, `redis`, `apps`) over what they share (`base`)."""

from gateway.devtools.localstack.base import (
    BENCH_PORTS,
    DEV_PORTS,
    PROJECT_ROOT,
    RABBITMQ_DIR,
    SYSTEM_PACKAGES,
    TEST_PACKAGES,
    TEST_PORTS,
    WEB_MQTT_PATH,
    Ports,
    StackError,
    missing_packages,
    port_open,
    require_free,
    require_system_packages,
)
from gateway.devtools.localstack.rabbitmq import apply_overrides, config_lines
from gateway.devtools.localstack.stack import LocalStack, running

__all__ = [
    "BENCH_PORTS",
    "DEV_PORTS",
    "PROJECT_ROOT",
    "RABBITMQ_DIR",
    "SYSTEM_PACKAGES",
    "TEST_PACKAGES",
    "TEST_PORTS",
    "WEB_MQTT_PATH",
    "LocalStack",
    "Ports",
    "StackError",
    "apply_overrides",
    "config_lines",
    "missing_packages",
    "port_open",
    "require_free",
    "require_system_packages",
    "running",
]
