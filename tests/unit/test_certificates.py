"""The local CA and server certificates (gateway/runtime/certificates.py), and how the local stack
uses them: made once and reused, renewed under the same CA, the user's own files left alone, keys
private, and what a TLS client checks (chain, host names) holds."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest

from gateway.devtools.localstack import LocalStack, StackError, config_lines
from gateway.runtime import certificates
from gateway.runtime.certificates import TlsFiles


def handshake(files: TlsFiles, host: str) -> str:
    """A real TLS handshake between Python's client (checking chain and host name, as curl and
    paho do) and a server using `files`; returns the negotiated version."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.cert, files.key)
    client = ssl.create_default_context(cafile=files.ca)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            # The client may refuse the certificate: then the server's handshake fails too.
            with contextlib.suppress(OSError), server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=host) as tls,
        ):
            version = tls.version() or ""
        thread.join(5)
    return version


def test_a_new_folder_gets_a_ca_and_a_certificate_clients_accept(tmp_path: Path) -> None:
    files = certificates.ensure(tmp_path / "tls", ["rabbitmq", "api"])
    assert files == TlsFiles.under(tmp_path / "tls")
    assert certificates.covered_names(files.cert) == {
        "localhost",
        "127.0.0.1",
        "::1",
        "rabbitmq",
        "api",
    }
    for name in ("ca-key.pem", "server-key.pem"):
        assert (tmp_path / "tls" / name).stat().st_mode & 0o777 == 0o600, f"{name} is not 0600"
    for host in ("localhost", "127.0.0.1", "rabbitmq"):
        assert handshake(files, host).startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(files, "elsewhere.example.com")


def test_files_are_made_once_and_reused(tmp_path: Path) -> None:
    first = certificates.ensure(tmp_path, ["api"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = certificates.ensure(tmp_path, ["api"])
    assert again == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_new_host_or_a_near_expiry_renews_the_certificate_under_the_same_ca(
    tmp_path: Path,
) -> None:
    files = certificates.ensure(tmp_path, ["api"])
    ca = files.ca.read_bytes()
    first = files.cert.read_bytes()
    certificates.ensure(tmp_path, ["api", "gateway.example.com"])
    second = files.cert.read_bytes()
    assert second != first and files.ca.read_bytes() == ca, "the CA must stay: devices trust it"
    assert "gateway.example.com" in certificates.covered_names(files.cert)
    assert handshake(files, "gateway.example.com")
    later = (
        datetime.datetime.now(datetime.UTC)
        + certificates.SERVER_VALIDITY
        - datetime.timedelta(days=10)
    )
    certificates.ensure(tmp_path, ["api", "gateway.example.com"], now=later)
    assert files.cert.read_bytes() != second, "a certificate near its end must be renewed"
    assert files.ca.read_bytes() == ca


def test_a_folder_without_the_ca_key_holds_the_users_own_files(tmp_path: Path) -> None:
    files = certificates.ensure(tmp_path, ["api"])
    (tmp_path / certificates.CA_KEY_FILE).unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert certificates.ensure(tmp_path, ["another-host"]) == files
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_local_stack_makes_its_files_under_run(tmp_path: Path, monkeypatch) -> None:
    for var in ("GATEWAY_TLS_CERT_FILE", "GATEWAY_TLS_KEY_FILE", "GATEWAY_TLS_CA_FILE"):
        monkeypatch.delenv(var, raising=False)
    stack = LocalStack("tls-files", root=tmp_path)
    files = stack.make_tls_files()
    assert files == TlsFiles.under(tmp_path / ".run" / "tls-files" / "tls")
    assert files.ca and files.ca.is_file() and files.cert.is_file() and files.key.is_file()
    conf = config_lines(stack.rabbitmq_config())
    for prefix in ("ssl_options", "web_mqtt.ssl"):
        assert conf[f"{prefix}.cacertfile"] == str(files.ca)
        assert conf[f"{prefix}.certfile"] == str(files.cert)
        assert conf[f"{prefix}.keyfile"] == str(files.key)
    assert conf["mqtt.listeners.ssl.default"] == f"127.0.0.1:{stack.ports.mqtt_tls}"
    assert conf["web_mqtt.ssl.port"] == str(stack.ports.web_mqtt_tls)
    assert conf["web_mqtt.ssl.ip"] == "127.0.0.1"
    assert conf["web_mqtt.tcp.listener"] == "none"
    monkeypatch.setenv("GATEWAY_OPERATOR_TOKEN", "x" * 32)
    env = stack.env("api")
    assert env["GATEWAY_API_TLS_PORT"] == str(stack.ports.api_tls)
    assert (env["GATEWAY_TLS_CERT_FILE"], env["GATEWAY_TLS_KEY_FILE"]) == (
        str(files.cert),
        str(files.key),
    )


def test_local_stack_takes_the_users_own_certificate(tmp_path: Path, monkeypatch) -> None:
    own = certificates.ensure(tmp_path / "own", ["gateway.example.com"])
    (tmp_path / "own" / certificates.CA_KEY_FILE).unlink()
    monkeypatch.setenv("GATEWAY_TLS_CERT_FILE", str(own.cert))
    monkeypatch.setenv("GATEWAY_TLS_KEY_FILE", str(own.key))
    monkeypatch.delenv("GATEWAY_TLS_CA_FILE", raising=False)
    monkeypatch.setenv("GATEWAY_OPERATOR_TOKEN", "x" * 32)
    stack = LocalStack("own-tls", root=tmp_path)
    assert stack.make_tls_files() == TlsFiles(None, own.cert, own.key)
    conf = config_lines(stack.rabbitmq_config())
    assert conf["ssl_options.certfile"] == str(own.cert)
    assert conf["web_mqtt.ssl.keyfile"] == str(own.key)
    assert not any(key.endswith("cacertfile") for key in conf), "no CA given: none configured"
    env = stack.env("api")
    assert (env["GATEWAY_TLS_CERT_FILE"], env["GATEWAY_TLS_KEY_FILE"]) == (
        str(own.cert),
        str(own.key),
    )
    assert not (tmp_path / ".run" / "own-tls" / "tls").exists(), "made a CA it did not need"
    monkeypatch.setenv("GATEWAY_TLS_KEY_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(StackError, match=r"missing\.pem"):
        stack.make_tls_files()


def test_production_profile_of_the_local_stack_has_no_plain_device_listener(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("GATEWAY_OPERATOR_TOKEN", "x" * 32)
    development = LocalStack("profile", root=tmp_path)
    production = LocalStack("profile", root=tmp_path, app_env={"GATEWAY_ENVIRONMENT": "production"})
    assert not development.tls_only and production.tls_only
    dev_conf = config_lines(development.rabbitmq_config())
    prod_conf = config_lines(production.rabbitmq_config())
    assert dev_conf["mqtt.listeners.tcp.default"] == f"127.0.0.1:{development.ports.mqtt}"
    assert "mqtt.listeners.tcp.default" not in prod_conf
    assert prod_conf["mqtt.listeners.tcp"] == "none"
    assert prod_conf["mqtt.listeners.ssl.default"] == dev_conf["mqtt.listeners.ssl.default"]
    assert development.env("api")["GATEWAY_API_PORT"] == str(development.ports.api)
    assert production.env("api")["GATEWAY_API_PORT"] == "0"
    assert production.health_port("api") == production.ports.api_internal
    p = production.ports
    assert production.device_ports("mqtt") == (p.mqtt_tls, p.web_mqtt_tls)
    assert production.device_ports("api") == (p.api_tls,)
