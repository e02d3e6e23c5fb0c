"""The device registry: registration, token rotation, enable/disable, and authentication.

Used by the api (HTTP and the endpoints RabbitMQ calls) and by the `gateway devices` CLI. Every
write returns the device's new state so callers can mirror it to Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field
from sqlalchemy import Connection, case, func, select, update
from sqlalchemy.dialects.postgresql import insert

from gateway.contract.credentials import new_token, token_hash, token_matches
from gateway.contract.messages import DeviceStatus
from gateway.contract.topics import DeviceId
from gateway.storage import liveness
from gateway.storage.mirror import DeviceState
from gateway.storage.schema import devices

#: RabbitMQ's internal users (service accounts) are checked before devices: no device may take
#: one of their names.
RESERVED_PREFIXES = ("gateway", "guest")
MAX_INTERVAL_S = 86_400
#: PostgreSQL NOTIFY channel: a device's credentials changed (payload: its id).
CREDENTIALS_CHANNEL = "gateway_credentials"


class RegistryError(Exception):
    """A registry request that cannot be done; the message is safe to show."""


class DeviceExists(RegistryError):
    pass


class UnknownDevice(RegistryError):
    pass


class ReservedDeviceId(RegistryError):
    pass


class Registration(BaseModel):
    device_id: DeviceId
    heartbeat_interval_s: int = Field(default=30, ge=1, le=MAX_INTERVAL_S)


class DeviceChanges(BaseModel):
    heartbeat_interval_s: int | None = Field(default=None, ge=1, le=MAX_INTERVAL_S)
    enabled: bool | None = None


class IssuedToken(BaseModel):
    """A device's credentials, shown once: only the token's hash is kept."""

    device_id: str
    token: str
    heartbeat_interval_s: int
    mqtt_username: str
    note: str = "Store the token now: it is not shown again. `rotate` issues a new one."


class Verdict(StrEnum):
    OK = "ok"
    UNKNOWN_DEVICE = "unknown_device"
    BAD_TOKEN = "bad_token"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Identity:
    device_id: str
    enabled: bool


def _issued(token: str, state: DeviceState) -> IssuedToken:
    return IssuedToken(
        device_id=state.device_id,
        token=token,
        heartbeat_interval_s=state.heartbeat_interval_s,
        mqtt_username=state.device_id,
    )


def _returning_state(conn: Connection, stmt) -> DeviceState | None:
    row = conn.execute(stmt.returning(*devices.c)).mappings().first()
    return DeviceState.from_row(row) if row else None


def register(conn: Connection, registration: Registration) -> tuple[IssuedToken, DeviceState]:
    """Register a device and issue its first token.

    A device already seen but never registered (no token) is claimed; a registered one is not.
    """
    device_id = registration.device_id
    if device_id.lower().startswith(RESERVED_PREFIXES):
        raise ReservedDeviceId(
            f"device ids starting with {' or '.join(RESERVED_PREFIXES)} are reserved"
        )
    token = new_token()
    now = func.now()
    values = {
        "device_id": device_id,
        "heartbeat_interval_s": registration.heartbeat_interval_s,
        "token_hash": token_hash(token),
        "enabled": True,
        "registered_at": now,
        "token_rotated_at": now,
    }
    stmt = insert(devices).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[devices.c.device_id],
        set_={
            **{k: stmt.excluded[k] for k in values if k != "device_id"},
            "version": devices.c.version + 1,
        },
        where=devices.c.registered_at.is_(None),
    )
    state = _returning_state(conn, stmt)
    if state is None:
        raise DeviceExists(f"device {device_id!r} is already registered; rotate its token instead")
    announce(conn, device_id)
    return _issued(token, state), state


def announce(conn: Connection, device_id: str) -> None:
    """Tell every api process, on commit, that this device's credentials changed (or that it
    has credentials now)."""
    conn.execute(select(func.pg_notify(CREDENTIALS_CHANNEL, device_id)))


def rotate(conn: Connection, device_id: str) -> tuple[IssuedToken, DeviceState]:
    """Issue a new token; the old one stops working at once."""
    token = new_token()
    state = _returning_state(
        conn,
        update(devices)
        .where(devices.c.device_id == device_id, devices.c.registered_at.is_not(None))
        .values(
            token_hash=token_hash(token),
            token_rotated_at=func.now(),
            version=devices.c.version + 1,
        ),
    )
    if state is None:
        raise UnknownDevice(f"no registered device {device_id!r}")
    announce(conn, device_id)
    return _issued(token, state), state


def change(
    conn: Connection, device_id: str, changes: DeviceChanges, *, offline_factor: float = 3.0
) -> DeviceState:
    """Change a device's interval or enable it; an online device's deadline follows its new
    interval at once. A device disabled is offline at once (reason `disabled`, an event of its
    own): it may no longer speak, so it is not up."""
    values = changes.model_dump(exclude_none=True)
    before = liveness.lock_statuses(conn, [device_id]).status if changes.enabled is False else {}
    if before.get(device_id) == DeviceStatus.ONLINE:
        values |= {
            "status": DeviceStatus.OFFLINE.value,
            "status_changed_at": func.now(),
            "status_reason": "disabled",
            "offline_deadline": None,
        }
    if changes.heartbeat_interval_s is not None and "offline_deadline" not in values:
        d = devices.c
        values["offline_deadline"] = case(
            (
                d.status == "online",
                d.last_seen
                + func.make_interval(
                    0, 0, 0, 0, 0, 0, changes.heartbeat_interval_s * offline_factor
                ),
            ),
            else_=d.offline_deadline,
        )
    state = _returning_state(
        conn,
        update(devices)
        .where(devices.c.device_id == device_id)
        .values(**values, version=devices.c.version + 1),
    )
    if state is None:
        raise UnknownDevice(f"no device {device_id!r}")
    if changes.enabled is not None:
        announce(conn, device_id)
    if before:
        liveness.record_changes(conn, before, [state])
    return state


def authenticate(conn: Connection, device_id: str, token: str) -> Verdict:
    """MQTT CONNECT: is this the device's current token, and may the device connect?"""
    row = conn.execute(
        select(devices.c.token_hash, devices.c.enabled).where(devices.c.device_id == device_id)
    ).first()
    if not token_matches(token, row.token_hash if row else None):
        return Verdict.UNKNOWN_DEVICE if row is None else Verdict.BAD_TOKEN
    return Verdict.OK if row.enabled else Verdict.DISABLED


def token_hashes(cursor) -> list[str]:
    """Every device's token hash, on a DB-API cursor (the api's LISTEN connection)."""
    cursor.execute("SELECT token_hash FROM devices WHERE token_hash IS NOT NULL")
    return [digest for (digest,) in cursor.fetchall()]


def token_hash_of(cursor, device_id: str) -> str | None:
    """A device's token hash now, on a DB-API cursor (after its credentials changed)."""
    cursor.execute("SELECT token_hash FROM devices WHERE device_id = %s", (device_id,))
    row = cursor.fetchone()
    return row[0] if row else None


def identify(conn: Connection, digest: str) -> Identity | None:
    """HTTP: the device a bearer token belongs to, looked up by the token's hash
    (`credentials.token_hash`), if any."""
    row = conn.execute(
        select(devices.c.device_id, devices.c.enabled).where(devices.c.token_hash == digest)
    ).first()
    return Identity(row.device_id, row.enabled) if row else None
