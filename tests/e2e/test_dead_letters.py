"""Dead letters: kept with the reason, queried by device, reason and time, replayed once fixed."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text
from support import Device, history, mqtt_session, poll, publish_acked

from gateway.contract.messages import Rejection, Source
from gateway.contract.reasons import InputError, Reason
from gateway.devtools.localstack import LocalStack
from gateway.storage import writes

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "gateway")


def publish_raw(stack: LocalStack, device: Device, bodies: list[bytes]) -> None:
    """Publish raw bodies as the device, each acknowledged by the broker (QoS 1)."""
    with mqtt_session(stack.ports.mqtt, device) as client:
        for body in bodies:
            assert publish_acked(client, f"devices/{device.device_id}/heartbeat", body)


def dead(api: httpx.Client, **params) -> dict:
    response = api.get("/api/v1/rejected", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_rejected_filters_and_pages(apps, api, device: Device) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    publish_raw(apps, device, [b"not json", b"[1]", b"still not json", b"{bad", b'"x"'])
    poll(lambda: len(dead(api, device_id=device.device_id)["items"]) == 5, what="5 dead letters")
    by_reason = dead(api, device_id=device.device_id, reason="not_an_object")["items"]
    assert sorted(d["payload"] for d in by_reason) == ['"x"', "[1]"]
    pages, cursor = [], None
    while True:
        page = dead(
            api, device_id=device.device_id, limit=2, **({"cursor": cursor} if cursor else {})
        )
        pages.append([d["id"] for d in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert len({i for p in pages for i in p}) == 5
    assert (
        dead(
            api,
            device_id=device.device_id,
            since=(datetime.now(UTC) + timedelta(minutes=1)).isoformat(),
        )["items"]
        == []
    )
    window = dead(
        api,
        device_id=device.device_id,
        since=started.isoformat(),
        until=(datetime.now(UTC) + timedelta(seconds=1)).isoformat(),
    )
    assert len(window["items"]) == 5


def test_replay_puts_fixed_entries_back_and_marks_them(
    apps: LocalStack, api, device: Device, engine: Engine
) -> None:
    constraint = f"test_refuse_{device.device_id.replace('-', '_')}"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"ALTER TABLE heartbeats ADD CONSTRAINT {constraint} "
                f"CHECK (device_id <> '{device.device_id}') NOT VALID"
            )
        )
    try:
        publish_raw(apps, device, [b'{"msg_id": "r-1", "seq": 1}', b"garbage"])
        entries = poll(
            lambda: len(d := dead(api, device_id=device.device_id)["items"]) == 2 and d,
            what="2 dead letters",
        )
        assert sorted(e["reason"] for e in entries) == ["not_json", "unstorable"]
        env = apps.env("api")

        def gateway(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [GATEWAY, "rejected", *args, "--device", device.device_id],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        dry = gateway("replay", "--dry-run")
        assert "1 would be replayed, 1 still invalid" in dry.stdout, dry.stdout + dry.stderr
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE heartbeats DROP CONSTRAINT {constraint}"))
    # The cause is fixed: replay.
    done = gateway("replay")
    assert "replayed 1, still invalid 1" in done.stdout, done.stdout + done.stderr
    stored = poll(
        lambda: history(api, device.device_id),
        what="the replayed heartbeat stored",
    )
    assert [h["msg_id"] for h in stored] == ["r-1"]
    after = {e["reason"]: e for e in dead(api, device_id=device.device_id)["items"]}
    # Stored with the time the bridge received it, which its dead letter kept.
    (unstorable,) = [e for e in entries if e["reason"] == "unstorable"]
    assert at(stored[0]["received_at"]) == at(unstorable["received_at"])
    assert at(unstorable["received_at"]) < at(after["unstorable"]["replayed_at"])
    assert after["unstorable"]["replayed_at"] is not None
    assert after["not_json"]["replayed_at"] is None
    again = gateway("replay")
    assert "replayed 0, still invalid 1" in again.stdout
    assert "garbage" in gateway("list").stdout


def at(text_: str) -> datetime:
    return datetime.fromisoformat(text_)


def test_replay_keeps_the_original_receive_time(
    apps: LocalStack, api, device: Device, engine: Engine
) -> None:
    """Dead letters of both transports, received hours ago and valid today (as if an older
    version had refused them): replayed, each is stored with its own receive time, source and
    bytes, not the replay's."""
    hours_ago = datetime.now(UTC).replace(microsecond=123456) - timedelta(hours=5)
    letters = [
        Rejection.of(
            InputError(Reason.INVALID_FIELD, "refused by an older version"),
            b'{"msg_id": "old-mqtt", "seq": 1, "cpu": 1.5}',
            Source.MQTT,
            device_id=device.device_id,
            topic=f"devices/{device.device_id}/heartbeat",
            received_at=hours_ago,
        ),
        Rejection.of(
            InputError(Reason.INVALID_FIELD, "refused by an older version"),
            b'{"msg_id": "old-http", "seq": 2, "cpu": 2.5}',
            Source.HTTP,
            device_id=device.device_id,
            topic=f"/api/v1/devices/{device.device_id}/heartbeats",
            received_at=hours_ago + timedelta(minutes=1),
        ),
    ]
    with engine.begin() as conn:
        assert writes.write_rejections(conn, letters).kept == 2
    done = subprocess.run(
        [GATEWAY, "rejected", "replay", "--device", device.device_id],
        env=apps.env("api"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "replayed 2, still invalid 0" in done.stdout, done.stdout + done.stderr
    stored = poll(
        lambda: len(h := history(api, device.device_id)) == 2 and h,
        what="the replayed heartbeats stored",
    )
    got = {h["msg_id"]: (at(h["received_at"]), h["source"], h["metrics"]) for h in stored}
    assert got == {
        "old-mqtt": (hours_ago, "mqtt", {"cpu": 1.5}),
        "old-http": (hours_ago + timedelta(minutes=1), "http", {"cpu": 2.5}),
    }
