"""Dead letters: kept with the reason, queried by device, reason and time, replayed once fixed."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text
from support import Device, history, mqtt_session, poll, publish_acked

from gateway.localstack import LocalStack

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(__file__).parent.parent / ".venv" / "bin" / "gateway")


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
    assert after["unstorable"]["replayed_at"] is not None
    assert after["not_json"]["replayed_at"] is None
    again = gateway("replay")
    assert "replayed 0, still invalid 1" in again.stdout
    assert "garbage" in gateway("list").stdout
