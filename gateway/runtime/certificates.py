"""The certificates of the TLS listeners: a local certificate authority and a server certificate.

`ensure(directory, hosts)` writes, once, and reuses afterwards:

| file | what | mode |
| --- | --- | --- |
| `ca.pem` | the CA certificate: what devices and clients trust (`--cafile`, `--cacert`) | 0644 |
| `ca-key.pem` | the CA's key, kept to issue the next server certificate under the same CA | 0600 |
| `server.pem` | the server certificate, for `hosts` (DNS names and IP addresses) | 0644 |
| `server-key.pem` | its key | 0600 |

A server certificate is issued again (under the same CA, so clients keep trusting it) when it lacks
one of `hosts` or has less than `RENEW_BEFORE` left. A directory without `ca-key.pem` holds
files someone else issued: they are used as they are and never rewritten.

Made with the `cryptography` package, not the `openssl` command: no subprocess to run and no
output to parse, one code path on a Debian machine, in the project's image (`gateway tls init`)
and in tests, and reading back an existing certificate (its names, its expiry, its issuer) to
decide whether to reuse it is a few attribute reads instead of parsing `openssl x509 -text`.
Keys are ECDSA P-256: small, fast handshakes, accepted by Erlang/OTP (RabbitMQ), OpenSSL
(Python, curl), mosquitto and every MQTT client library worth using.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server-key.pem"

#: The names every local server certificate covers, besides those asked for.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
#: Clocks of devices run a little behind: certificates start being valid a bit in the past.
BACKDATE = datetime.timedelta(hours=1)
ORGANIZATION = "Heartbeat gateway"


@dataclass(frozen=True)
class TlsFiles:
    """Where a TLS listener finds its files. `ca` is what clients trust (None: a certificate
    of a public CA, which clients already trust)."""

    ca: Path | None
    cert: Path
    key: Path

    @classmethod
    def under(cls, directory: Path) -> TlsFiles:
        return cls(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)


def ensure(
    directory: Path,
    hosts: Iterable[str] = (),
    *,
    owner: tuple[int, int] | None = None,
    now: datetime.datetime | None = None,
) -> TlsFiles:
    """The CA and a server certificate for `hosts` (plus `LOCAL_HOSTS`) under `directory`,
    made if missing, renewed if short of a name or of time, else left as they are.

    `owner` (uid, gid): give the server certificate, its key and `ca.pem` to that owner and
    let the group read the key too (0640), for a key that two accounts read (in compose, the
    api's user and RabbitMQ's group). Needs the right to chown (root)."""
    now = now or datetime.datetime.now(datetime.UTC)
    names = _unique([*LOCAL_HOSTS, *hosts])
    files = TlsFiles.under(directory)
    ca_path, ca_key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if files.cert.exists() and files.key.exists() and not ca_key_path.exists():
        return files  # the user's own: not ours to rewrite
    directory.mkdir(parents=True, exist_ok=True)
    if ca_key_path.exists() and ca_path.exists():
        ca_key = _load_key(ca_key_path)
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    else:
        ca_key, ca_cert = _make_ca(now)
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not _still_good(files, ca_cert, names, now):
        key, cert = _make_server(ca_key, ca_cert, names, now)
        _write(files.key, _key_pem(key), 0o600 if owner is None else 0o640)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if owner is not None:
        for path in (ca_path, files.cert, files.key):
            os.chown(path, *owner)
        files.key.chmod(0o640)
    return files


def covered_names(cert_file: Path) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return _names_of(cert)


# ---- making ---------------------------------------------------------------------------------


def _make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{ORGANIZATION} local CA"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures (TLS with ECDSA keys); and certificates and CRLs for a CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_server(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    names: list[str],
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _still_good(
    files: TlsFiles, ca_cert: x509.Certificate, names: list[str], now: datetime.datetime
) -> bool:
    """Is the server certificate there, issued by this CA, for all `names`, not near expiry?"""
    if not (files.cert.exists() and files.key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = _load_key(files.key)
    except ValueError:
        return False
    return (
        cert.issuer == ca_cert.subject
        and cert.public_key() == key.public_key()
        and set(names) <= _names_of(cert)
        and cert.not_valid_after_utc - RENEW_BEFORE > now
    )


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    }


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in names:
        name = name.strip()
        if name:
            seen.setdefault(str(ipaddress.ip_address(name)) if _is_ip(name) else name.lower())
    return list(seen)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# ---- files ----------------------------------------------------------------------------------


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path} holds neither an ECDSA nor an RSA key")
    return key


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` at once, never readable by others than `mode` allows, even briefly."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
