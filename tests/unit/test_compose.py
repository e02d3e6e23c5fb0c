"""docker-compose.yaml, docker-compose.production.yaml, Dockerfile and .dockerignore, checked
without a Docker engine.

The file must parse, pass docker-compose's own validation, start only console scripts the project
declares, set only GATEWAY_* variables the settings classes read (with values they accept), run the
broker from the same `rabbitmq/` files as the local stack, give every long-running service a
healthcheck that the services depending on it wait for, and serve devices over TLS (only over TLS
with the production override).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.amqp import accounts
from gateway.devtools.localstack import LocalStack
from gateway.runtime import settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
PRODUCTION_FILE = ROOT / "docker-compose.production.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IN_CI = os.environ.get("CI", "").lower() == "true"

SETTINGS_CLASSES = (
    settings.CommonSettings,
    settings.BridgeSettings,
    settings.WorkerSettings,
    settings.ApiSettings,
)
#: The settings class each console script builds at startup.
SETTINGS_OF_SCRIPT: dict[str, type[settings.CommonSettings]] = {
    "gateway": settings.CommonSettings,
    "gateway-bridge": settings.BridgeSettings,
    "gateway-worker": settings.WorkerSettings,
    "gateway-api": settings.ApiSettings,
}

INFRASTRUCTURE = ("rabbitmq", "postgres", "redis")
APP_SERVICES = ("bridge", "worker", "api")
ONE_SHOT = ("migrate", "tls-init", "broker-definitions")
#: Services that reach PostgreSQL.
USES_DATABASE = ("migrate", *APP_SERVICES)
#: service -> {dependency: condition}; compose must say exactly this.
EXPECTED_DEPENDENCIES = {
    "rabbitmq": {
        "tls-init": "service_completed_successfully",
        "broker-definitions": "service_completed_successfully",
    },
    "migrate": {"postgres": "service_healthy"},
    "bridge": {"rabbitmq": "service_healthy"},
    "worker": {
        "rabbitmq": "service_healthy",
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
    },
    "api": {
        "rabbitmq": "service_healthy",
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
        "tls-init": "service_completed_successfully",
    },
}
#: The env var that holds the port each app service's /readyz answers on.
READYZ_PORT_VARIABLE = {
    "bridge": "GATEWAY_BRIDGE_HEALTH_PORT",
    "worker": "GATEWAY_WORKER_HEALTH_PORT",
    "api": "GATEWAY_API_INTERNAL_PORT",  # the listener every profile has
}

#: repo file -> where the rabbitmq container must see it (read-only).
RABBITMQ_MOUNTS = {
    "rabbitmq/rabbitmq.conf": "/etc/rabbitmq/rabbitmq.conf",
    "rabbitmq/enabled_plugins": "/etc/rabbitmq/enabled_plugins",
}
#: Where broker-definitions writes what rabbitmq loads (the topology and the accounts), and
#: where rabbitmq finds it.
DEFINITIONS_OUT = "/definitions/definitions.json"
DEFINITIONS_IN = "/etc/rabbitmq/definitions/definitions.json"
#: The secrets compose requires (no defaults), with values for the checks of this file.
COMPOSE_SECRETS = {
    "GATEWAY_OPERATOR_TOKEN": "test-operator-token-8Hq2Lw9Zx",
    "GATEWAY_POSTGRES_PASSWORD": "test-postgres-3Kd8Wq1Vz",
    "GATEWAY_REDIS_PASSWORD": "test-redis-7Jx2Mb5Qr",
    **{a.password_variable: f"test-{a.name}-9Tr4Yp6Nc" for a in accounts.ACCOUNTS},
}
#: rabbitmq.conf keys the local stack may set differently: its own ports, loopback, file paths,
#: and where its api's internal listener is.
LOCAL_STACK_OVERRIDES = frozenset(
    {
        "listeners.tcp.default",
        "mqtt.listeners.tcp.default",
        "management.tcp.ip",
        "management.tcp.port",
        "prometheus.tcp.ip",
        "prometheus.tcp.port",
        "load_definitions",
        "auth_http.user_path",
        "auth_http.vhost_path",
        "auth_http.resource_path",
        "auth_http.topic_path",
        "mqtt.listeners.ssl.default",
        "ssl_options.cacertfile",
        "ssl_options.certfile",
        "ssl_options.keyfile",
        "web_mqtt.ssl.cacertfile",
        "web_mqtt.ssl.certfile",
        "web_mqtt.ssl.keyfile",
        "web_mqtt.ssl.ip",
        "web_mqtt.ssl.port",
    }
)
#: Every image is built on one base, the caller's BASE_IMAGE (see docker/base-image.sh).
BASE_IMAGE_ARGUMENT = {"BASE_IMAGE": "${BASE_IMAGE:-debian:trixie-slim}"}
#: Where the containers find the certificate files (the `tls` volume tls-init writes).
TLS_FILES_IN = {
    "rabbitmq": "/etc/rabbitmq/tls",
    "api": "/tls",
    "tls-init": "/tls",
}


# ---- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict), "docker-compose.yaml is not a mapping"
    assert isinstance(document.get("services"), dict), "docker-compose.yaml has no `services:`"
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        reason = (
            "docker-compose is not installed (Debian package `docker-compose`: "
            "apt-get install -y docker-compose, or `gateway stack install --with-test-tools`)"
        )
        if IN_CI:
            pytest.fail(reason + " (CI=true: a missing tool is a failure)")
        pytest.skip(reason)
    return binary


def compose_config(
    *files: Path, quiet: bool = False, secrets: bool = True
) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f ... config`: the files merged and validated by compose itself."""
    arguments = [item for path in files for item in ("-f", str(path))]
    return subprocess.run(
        [docker_compose(), *arguments, "config", *(["-q"] if quiet else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # Compose's own defaults, not the caller's (TLS_HOSTS, GATEWAY_ENVIRONMENT, ...), and
        # the secrets a user must give.
        env={
            **{name: value for name, value in os.environ.items() if name in ("PATH", "HOME")},
            **(COMPOSE_SECRETS if secrets else {}),
        },
    )


@pytest.fixture(scope="module")
def production() -> dict[str, dict[str, Any]]:
    """The services as `-f docker-compose.yaml -f docker-compose.production.yaml` runs them."""
    result = compose_config(COMPOSE_FILE, PRODUCTION_FILE)
    assert result.returncode == 0, f"docker-compose config rejects the override:\n{result.stderr}"
    assert "WARNING" not in result.stderr, f"docker-compose config warns:\n{result.stderr}"
    return yaml.safe_load(result.stdout)["services"]


def accepted_variables() -> set[str]:
    """What the settings classes read, and the broker passwords `gateway definitions` reads."""
    fields = {"GATEWAY_" + name.upper() for cls in SETTINGS_CLASSES for name in cls.model_fields}
    return fields | {account.password_variable for account in accounts.ACCOUNTS}


def declared_scripts() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["scripts"])


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment:`, in either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` resolved to the defaults, and
    its required `${VAR:?message}` to this file's secrets."""
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: COMPOSE_SECRETS.get(m.group(1), ""), value)
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs, from the short or the long syntax."""
    pairs = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((int(port["published"]), int(port["target"])))
        else:
            *_, host, container = interpolate(str(port)).split("/")[0].split(":")
            pairs.add((int(host), int(container)))
    return pairs


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (host path, read-only) for the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
            continue
        source, target, *options = str(volume).split(":")
        if source.startswith((".", "/", "~")):
            mounts[target] = (source, "ro" in ",".join(options).split(","))
    return mounts


def conf_lines(text: str) -> dict[str, str]:
    """The `key = value` lines of a rabbitmq.conf, by key."""
    lines = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and "=" in stripped:
            lines[stripped.split("=", 1)[0].strip()] = stripped
    return lines


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


# ---- 1, 2: the file parses and compose accepts it -------------------------------------------


def test_compose_file_parses_and_has_the_expected_services(services: dict[str, Any]) -> None:
    expected = {*INFRASTRUCTURE, *ONE_SHOT, *APP_SERVICES}
    assert set(services) == expected, (
        f"docker-compose.yaml services are {sorted(services)}, expected {sorted(expected)}; "
        "update this test when the stack gains or loses a service"
    )


@pytest.mark.parametrize(
    "files", [(COMPOSE_FILE,), (COMPOSE_FILE, PRODUCTION_FILE)], ids=["base", "production"]
)
def test_docker_compose_accepts_the_file(files: tuple[Path, ...]) -> None:
    result = compose_config(*files, quiet=True)
    assert result.returncode == 0, f"docker-compose config rejects the file:\n{result.stderr}"
    assert "WARNING" not in result.stderr, f"docker-compose config warns:\n{result.stderr}"


# ---- 3, 4: commands and settings ------------------------------------------------------------


@pytest.mark.parametrize("name", [*ONE_SHOT, *APP_SERVICES])
def test_service_runs_a_declared_console_script_from_the_project_image(
    services: dict[str, Any], name: str
) -> None:
    service = services[name]
    words = command_words(service)
    assert words, f"service {name} has no `command:`"
    assert words[0] in declared_scripts(), (
        f"service {name} runs {words[0]!r}, which is not in pyproject's [project.scripts] "
        f"({sorted(declared_scripts())})"
    )
    assert service.get("build") == {"context": ".", "args": BASE_IMAGE_ARGUMENT}, (
        f"service {name} must be built from the project's Dockerfile on the stack's base image"
    )
    images = {services[other].get("image") for other in (*ONE_SHOT, *APP_SERVICES)}
    assert None not in images and len(images) == 1, (
        f"migrate, bridge, worker and api must share one image, got {images}"
    )


@pytest.mark.parametrize("name", sorted({*EXPECTED_DEPENDENCIES, *INFRASTRUCTURE, *ONE_SHOT}))
def test_gateway_variables_are_settings_fields(services: dict[str, Any], name: str) -> None:
    gateway_variables = {var for var in environment(services[name]) if var.startswith("GATEWAY_")}
    unknown = sorted(gateway_variables - accepted_variables())
    assert not unknown, (
        f"service {name} sets {unknown}, which no settings class in gateway/runtime/settings.py "
        "reads (a typo, or a renamed field?)"
    )


@pytest.mark.parametrize("name", [*ONE_SHOT, *APP_SERVICES])
def test_service_environment_builds_its_settings(
    services: dict[str, Any],
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With compose's defaults (no .env), each service's settings validate: it would start."""
    for var in list(os.environ):
        if var.startswith("GATEWAY_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)  # no stray .env
    for var, value in environment(services[name]).items():
        monkeypatch.setenv(var, interpolate(value))
    script = command_words(services[name])[0]
    settings_class = SETTINGS_OF_SCRIPT.get(script)
    if settings_class is None:
        pytest.fail(f"service {name} runs {script!r}; add it to SETTINGS_OF_SCRIPT in this test")
    try:
        built = settings_class()
    except ValidationError as exc:
        pytest.fail(f"service {name}'s environment does not build {settings_class.__name__}: {exc}")
    if name in USES_DATABASE:
        assert "@postgres:5432/" in str(built.database_url), (
            f"service {name} must reach PostgreSQL at postgres:5432, not {built.database_url}"
        )
    if name in APP_SERVICES:
        assert "@rabbitmq:5672/" in str(built.amqp_url), f"service {name}: wrong GATEWAY_AMQP_URL"
        assert (built.redis_url.host, built.redis_url.port) == ("redis", 6379), (
            f"service {name}: wrong GATEWAY_REDIS_URL"
        )
        assert built.redis_url.password == COMPOSE_SECRETS["GATEWAY_REDIS_PASSWORD"]
        assert built.log_format == "json", f"service {name} must log JSON lines in a container"


def test_api_environment_and_operator_token_come_from_the_caller(
    services: dict[str, Any],
) -> None:
    env = environment(services["api"])
    assert env.get("GATEWAY_ENVIRONMENT") == "${GATEWAY_ENVIRONMENT:-development}", (
        "api: GATEWAY_ENVIRONMENT must default to development but be overridable"
    )
    assert env.get("GATEWAY_OPERATOR_TOKEN", "").startswith("${GATEWAY_OPERATOR_TOKEN"), (
        "api: GATEWAY_OPERATOR_TOKEN must come from the caller's environment, never the file"
    )
    assert env.get("GATEWAY_API_HOST") == "0.0.0.0", "api must listen on 0.0.0.0 in a container"


# ---- 5: the broker runs from the same files as the local stack ------------------------------


@pytest.mark.parametrize("name", INFRASTRUCTURE)
def test_infrastructure_is_built_from_debian_packages(services: dict[str, Any], name: str) -> None:
    assert services[name].get("build") == {
        "context": f"docker/{name}",
        "args": BASE_IMAGE_ARGUMENT,
    }, f"{name} must be built from docker/{name}/Dockerfile on the stack's base image"
    assert (ROOT / "docker" / name / "Dockerfile").is_file()


def test_rabbitmq_mounts_the_shared_config_read_only(services: dict[str, Any]) -> None:
    rabbitmq = services["rabbitmq"]
    mounts = bind_mounts(rabbitmq)
    expected = {target: source for source, target in RABBITMQ_MOUNTS.items()}
    assert set(mounts) == set(expected), (
        f"rabbitmq bind-mounts {sorted(mounts)}, expected exactly {sorted(expected)}"
    )
    for target, (source, read_only) in mounts.items():
        resolved = (ROOT / source).resolve()
        assert resolved == (ROOT / expected[target]).resolve(), (
            f"rabbitmq mounts {source} at {target}, expected ./{expected[target]}"
        )
        assert resolved.is_file(), f"{expected[target]} is mounted but missing from the repo"
        assert read_only, f"rabbitmq must mount {target} read-only (`:ro`)"


def test_local_stack_uses_the_same_rabbitmq_config() -> None:
    shared = conf_lines((ROOT / "rabbitmq" / "rabbitmq.conf").read_text())
    local = conf_lines(LocalStack.dev().rabbitmq_config())
    for key, line in shared.items():
        if key not in LOCAL_STACK_OVERRIDES:
            assert local.get(key) == line, (
                f"rabbitmq/rabbitmq.conf says {line!r}, the local stack says {local.get(key)!r}: "
                "docker compose and `gateway stack` would run different brokers"
            )
    extra = sorted(set(local) - set(shared) - LOCAL_STACK_OVERRIDES)
    assert not extra, f"the local stack adds settings compose lacks: {extra}"
    assert shared.get("load_definitions") == "load_definitions = " + DEFINITIONS_IN, (
        "rabbitmq.conf must load the definitions from where compose mounts them"
    )
    stack = LocalStack.dev()
    local_definitions = Path(local["load_definitions"].split("=", 1)[1].strip())
    assert local_definitions == stack.definitions_file, (
        f"the local stack loads {local_definitions}, not the definitions it writes"
    )


def test_local_stack_uses_the_same_enabled_plugins() -> None:
    plugins = Path(LocalStack.dev().rabbitmq_env()["RABBITMQ_ENABLED_PLUGINS_FILE"])
    assert plugins.resolve() == (ROOT / "rabbitmq" / "enabled_plugins").resolve(), (
        f"the local stack enables the plugins of {plugins}, compose those of "
        "rabbitmq/enabled_plugins"
    )
    assert "rabbitmq_mqtt" in plugins.read_text(), "rabbitmq/enabled_plugins lacks rabbitmq_mqtt"


# ---- 6: healthchecks, dependencies, ports ---------------------------------------------------


@pytest.mark.parametrize("name", [*INFRASTRUCTURE, *APP_SERVICES])
def test_long_running_service_has_a_healthcheck(services: dict[str, Any], name: str) -> None:
    healthcheck = services[name].get("healthcheck") or {}
    assert healthcheck.get("test") and not healthcheck.get("disable"), (
        f"service {name} runs for good but has no healthcheck; services depending on it "
        "could not wait for it"
    )


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_healthcheck_asks_readyz_on_the_service_port(
    services: dict[str, Any], name: str
) -> None:
    service = services[name]
    test = service["healthcheck"]["test"]
    probe = " ".join(test) if isinstance(test, list) else str(test)
    port = environment(service).get(READYZ_PORT_VARIABLE[name])
    assert port, f"service {name} must set {READYZ_PORT_VARIABLE[name]} (its healthcheck uses it)"
    assert f"127.0.0.1:{interpolate(port)}/readyz" in probe, (
        f"service {name}'s healthcheck must fetch http://127.0.0.1:{port}/readyz, got: {probe}"
    )
    assert service.get("restart") == "unless-stopped", (
        f"service {name} must have `restart: unless-stopped`"
    )


@pytest.mark.parametrize("name", list(EXPECTED_DEPENDENCIES))
def test_service_waits_for_its_dependencies(services: dict[str, Any], name: str) -> None:
    depends_on = services[name].get("depends_on") or {}
    assert isinstance(depends_on, dict), (
        f"service {name}: use depends_on's long form with `condition:`, so it waits for health"
    )
    conditions = {dep: (spec or {}).get("condition") for dep, spec in depends_on.items()}
    assert conditions == EXPECTED_DEPENDENCIES[name], (
        f"service {name} depends on {conditions}, expected {EXPECTED_DEPENDENCIES[name]}"
    )


def test_amqp_and_management_are_published_on_loopback_only(services: dict[str, Any]) -> None:
    for port in map(interpolate, services["rabbitmq"]["ports"]):
        host_ip, *_ = str(port).split(":") if str(port).count(":") == 2 else ("",)
        container = int(str(port).split(":")[-1].split("/")[0])
        if container in (5672, 15672, 15692):
            assert host_ip == "127.0.0.1", f"rabbitmq publishes {port} to every interface"


def test_mqtt_and_api_are_published(services: dict[str, Any]) -> None:
    assert (1883, 1883) in published_ports(services["rabbitmq"]), (
        "rabbitmq must publish MQTT on host port 1883"
    )
    assert (8000, 8000) in published_ports(services["api"]), "api must publish host port 8000"
    assert environment(services["api"]).get("GATEWAY_API_PORT") == "8000", (
        "api must listen on 8000, the port it publishes"
    )
    for name in ("bridge", "worker"):
        assert not published_ports(services[name]), (
            f"service {name} publishes host ports: `--scale {name}=N` would collide"
        )


def test_data_lives_in_named_volumes(compose: dict[str, Any], services: dict[str, Any]) -> None:
    volumes = set(compose.get("volumes") or {})
    for name, path in (("postgres", "/var/lib/postgresql/data"), ("rabbitmq", "/var/lib/rabbitmq")):
        named = {
            str(v).split(":")[1]
            for v in services[name].get("volumes", [])
            if str(v).split(":")[0] in volumes
        }
        assert path in named, f"service {name} must keep {path} in a named volume"


# ---- the image ------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert bases and all(base == "${BASE_IMAGE}" for base in bases), (
        f"the image must build on the stack's BASE_IMAGE, got {bases}"
    )
    assert re.search(r"^ARG BASE_IMAGE=debian:trixie-slim$", DOCKERFILE.read_text(), re.M), (
        "the Dockerfile's BASE_IMAGE must default to Debian's own image"
    )
    copied = " ".join(args for word, args in instructions if word == "COPY")
    for needed in ("pyproject.toml", "README.md", "gateway/", "bridge/", "worker/", "api/"):
        assert needed in copied, f"the Dockerfile does not COPY {needed} (pip install . needs it)"
    installs = " ".join(args for word, args in instructions if word == "RUN")
    assert "pip install ." in installs and "[dev]" not in installs, (
        "the image must `pip install .` the project, without the dev extras"
    )
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        "the image must run as a non-root USER"
    )
    env_names = {
        match
        for word, args in instructions
        if word == "ENV"
        for match in re.findall(r"(GATEWAY_\w+)=", args)
    }
    unknown = sorted(env_names - accepted_variables())
    assert not unknown, f"the Dockerfile sets {unknown}, which no settings class reads"


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".venv", ".run", ".git", "tests", "**/__pycache__"):
        assert excluded in patterns, f".dockerignore must exclude {excluded}"
    for needed in ("pyproject.toml", "README.md", "gateway", "bridge", "worker", "api"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the build needs"


def test_rabbitmq_asks_the_api_internal_listener(services: dict[str, Any]) -> None:
    shared = conf_lines((ROOT / "rabbitmq" / "rabbitmq.conf").read_text())
    api_env = services["api"]["environment"]
    port = api_env["GATEWAY_API_INTERNAL_PORT"]
    for check in ("user", "vhost", "resource", "topic"):
        line = shared[f"auth_http.{check}_path"]
        assert line.endswith(f"http://api:{port}/internal/rabbitmq/{check}"), line
    published = {str(p).split(":")[-1] for p in services["api"].get("ports", [])}
    assert port not in published, "the internal listener must never be published"


# ---- TLS ------------------------------------------------------------------------------------


def volume_mounts(service: dict[str, Any], volume: str) -> dict[str, bool]:
    """container path -> read-only, for each mount of named volume `volume`."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("source") == volume:
                mounts[entry["target"]] = bool(entry.get("read_only"))
            continue
        source, target, *options = str(entry).split(":")
        if source == volume:
            mounts[target] = "ro" in ",".join(options).split(",")
    return mounts


def test_devices_reach_broker_and_api_over_tls(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    assert {(8883, 8883), (15676, 15676)} <= published_ports(services["rabbitmq"]), (
        "rabbitmq must publish MQTT over TLS on 8883 and MQTT over WebSocket with TLS on 15676"
    )
    assert (8443, 8443) in published_ports(services["api"]), "api must publish HTTPS on 8443"
    assert "tls" in (compose.get("volumes") or {}), "the certificates live in a `tls` volume"
    for name, path in TLS_FILES_IN.items():
        mounts = volume_mounts(services[name], "tls")
        assert path in mounts, f"service {name} must mount the `tls` volume at {path}"
        assert mounts[path] == (name != "tls-init"), (
            f"service {name} must mount `tls` {'read-only' if name != 'tls-init' else 'writable'}"
        )
    env = environment(services["api"])
    assert env.get("GATEWAY_API_TLS_PORT") == "8443", (
        "api must serve HTTPS on the port it publishes"
    )
    assert env.get("GATEWAY_TLS_CERT_FILE") == f"{TLS_FILES_IN['api']}/server.pem"
    assert env.get("GATEWAY_TLS_KEY_FILE") == f"{TLS_FILES_IN['api']}/server-key.pem"
    conf = {
        key: line.split("=", 1)[1].strip()
        for key, line in conf_lines((ROOT / "rabbitmq" / "rabbitmq.conf").read_text()).items()
    }
    assert conf["mqtt.listeners.ssl.default"] == "8883"
    assert conf["web_mqtt.ssl.port"] == "15676"
    assert conf["web_mqtt.tcp.listener"] == "none", "plain MQTT over WebSocket must stay closed"
    for prefix in ("ssl_options", "web_mqtt.ssl"):
        for key, file in (("cacertfile", "ca"), ("certfile", "server"), ("keyfile", "server-key")):
            assert conf[f"{prefix}.{key}"] == f"{TLS_FILES_IN['rabbitmq']}/{file}.pem", (
                f"rabbitmq.conf's {prefix}.{key} must name the file tls-init writes"
            )
    assert "rabbitmq_web_mqtt" in (ROOT / "rabbitmq" / "enabled_plugins").read_text()


def test_tls_init_writes_the_files_the_services_read(
    services: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run tls-init's own command (into a temporary folder): the files rabbitmq.conf and the
    api's settings name are there, for the compose host names, readable by both readers."""
    from gateway.cli.main import main as gateway
    from gateway.runtime.certificates import covered_names

    words = [interpolate(word) for word in command_words(services["tls-init"])]
    assert words[:3] == ["gateway", "tls", "init"], f"tls-init runs {words}"
    out = words[words.index("--out") + 1]
    assert out == TLS_FILES_IN["tls-init"], f"tls-init writes into {out}"
    arguments = [str(tmp_path) if word == out else word for word in words[1:]]
    if os.geteuid() != 0:  # giving files away needs root, as the container has
        owner = arguments.index("--owner")
        del arguments[owner : owner + 2]
    assert gateway(arguments) == 0
    assert "server.pem" in capsys.readouterr().out
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        assert (tmp_path / name).is_file(), f"tls-init did not write {name}"
    assert {"rabbitmq", "api", "localhost", "127.0.0.1"} <= covered_names(tmp_path / "server.pem")
    key = (tmp_path / "server-key.pem").stat()
    if os.geteuid() == 0:
        assert (key.st_uid, key.st_gid, key.st_mode & 0o777) == (10001, 999, 0o640), (
            "the key must be the api's (uid 10001) and readable by rabbitmq's group (999) only"
        )
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o077 == 0, "the CA key must stay private"


def test_production_override_serves_devices_on_tls_only(
    production: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rabbitmq = production["rabbitmq"]
    mounts = {
        target: source for source, target, *_ in (str(v).split(":") for v in rabbitmq["volumes"])
    }
    override = mounts.get("/etc/rabbitmq/conf.d/90-tls-only.conf")
    assert override and Path(override).resolve() == ROOT / "rabbitmq" / "tls-only.conf", (
        "the production override must add rabbitmq/tls-only.conf to rabbitmq's conf.d"
    )
    assert conf_lines((ROOT / "rabbitmq" / "tls-only.conf").read_text()) == {
        "mqtt.listeners.tcp": "mqtt.listeners.tcp = none"
    }
    assert (443, 15676) in published_ports(rabbitmq), "MQTT over WSS must be on 443 too"
    for name in APP_SERVICES:
        env = environment(production[name])
        assert env["GATEWAY_ENVIRONMENT"] == "production", f"{name} must run in production"
    env = environment(production["api"])
    for var in list(os.environ):
        if var.startswith("GATEWAY_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("GATEWAY_OPERATOR_TOKEN", "a-safe-operator-token-of-some-length")
    api = settings.ApiSettings()
    assert (api.api_port, api.api_tls_port) == (0, 8443), (
        "in production the api must serve HTTPS only (GATEWAY_API_PORT=0)"
    )


# ---- secrets --------------------------------------------------------------------------------


def test_compose_refuses_to_start_without_its_secrets() -> None:
    result = compose_config(COMPOSE_FILE, quiet=True, secrets=False)
    assert result.returncode != 0, "docker-compose accepts the file with no secrets set"
    assert "make compose-env" in result.stderr, result.stderr


def test_no_password_or_token_is_written_in_the_file() -> None:
    """Every password in a connection URL, and every secret variable, is required from the
    caller (`${VAR:?...}`): none has a default, none is a literal."""
    text = COMPOSE_FILE.read_text()
    for url in re.findall(r"\w+://[^\s\"']+", text):
        userinfo = url.split("://", 1)[1].split("@", 1)
        if len(userinfo) == 2 and ":" in userinfo[0]:
            password = userinfo[0].split(":", 1)[1]
            assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", password), f"{url}: a literal password"
    for name in COMPOSE_SECRETS:
        for use in re.findall(rf"\$\{{{name}([^}}]*)\}}", text):
            assert use.startswith(":?"), f"${{{name}{use}}} has a default"


def test_broker_definitions_writes_what_rabbitmq_loads(
    services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run broker-definitions' own command with the secrets: the topology of the repo's file
    and every account, with hashes of the given passwords (never the passwords)."""
    from gateway.cli.main import main as gateway

    service = services["broker-definitions"]
    words = [interpolate(word) for word in command_words(service)]
    assert words[:3] == ["gateway", "definitions", "--accounts"], f"it runs {words}"
    topology = words[words.index("--topology") + 1]
    assert bind_mounts(service)[topology] == ("./rabbitmq/definitions.json", True)
    out = words[words.index("--out") + 1]
    assert out == DEFINITIONS_OUT
    assert volume_mounts(services["rabbitmq"], "broker-definitions") == {
        str(Path(DEFINITIONS_IN).parent): True
    }
    assert volume_mounts(service, "broker-definitions") == {str(Path(out).parent): False}
    for var, value in environment(service).items():
        monkeypatch.setenv(var, interpolate(value))
    arguments = [
        str(ROOT / "rabbitmq" / "definitions.json") if word == topology else word
        for word in words[1:]
    ]
    arguments[arguments.index(out)] = str(tmp_path / "definitions.json")
    assert gateway(arguments) == 0
    written = (tmp_path / "definitions.json").read_text()
    loaded = json.loads(written)
    shared = json.loads((ROOT / "rabbitmq" / "definitions.json").read_text())
    assert all(loaded[key] == value for key, value in shared.items())
    assert {user["name"] for user in loaded["users"]} == set(accounts.ACCOUNT_NAMES)
    for value in COMPOSE_SECRETS.values():
        assert value not in written
    monkeypatch.setenv(accounts.ADMIN_ACCOUNT.password_variable, "gateway")
    assert gateway(arguments) == 1, "a known password must be refused"
