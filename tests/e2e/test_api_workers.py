"""An api of several processes (`GATEWAY_API_WORKERS`) behind one port reports its metrics as one
service: every scrape, whichever process answers it, counts the heartbeats all of them took
(prometheus_client's multiprocess mode), and the folder it used is gone once the api stops."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from support import Device, poll

from gateway.devtools.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
HEARTBEATS = 40

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def received(text: str) -> float:
    found = re.search(
        r'^gateway_heartbeats_received_messages_total\{source="http"\} (\S+)$', text, re.M
    )
    return float(found[1]) if found else 0.0


def test_every_scrape_counts_the_heartbeats_of_every_process(
    apps: LocalStack, device: Device, tmp_path: Path
) -> None:
    port, internal = free_port(), free_port()
    env = {
        **apps.env("api"),
        "GATEWAY_API_PORT": str(port),
        "GATEWAY_API_INTERNAL_PORT": str(internal),
        "GATEWAY_API_TLS_PORT": "0",
        "GATEWAY_API_WORKERS": "2",
        "TMPDIR": str(tmp_path),
    }
    log = (tmp_path / "api.log").open("w")
    api = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "gateway-api")], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _ready(url), timeout=60, what="the two-process api ready")
        for n in range(HEARTBEATS):
            # A new connection each time, so the kernel spreads them over both processes.
            with httpx.Client(base_url=url, timeout=10) as client:
                answer = client.post(
                    f"/api/v1/devices/{device.device_id}/heartbeats",
                    json={"msg_id": f"m-{n}", "metrics": {"n": n}},
                    headers=device.auth,
                )
                assert answer.status_code == 202, answer.text
        scrapes = []
        for _ in range(10):
            with httpx.Client(base_url=url, timeout=10) as client:
                text = client.get("/metrics").text
                scrapes.append(received(text))
        assert scrapes == [HEARTBEATS] * len(scrapes), scrapes
        folders = list(tmp_path.glob("gateway-metrics-*"))
        assert len(folders) == 1 and len(list(folders[0].glob("*.db"))) >= 2, folders
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
        log.close()
    assert not list(tmp_path.glob("gateway-metrics-*")), "the metrics folder outlived the api"


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
