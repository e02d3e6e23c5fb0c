"""HTTP heartbeats take one of two paths through the api, and both answer alike.

A device whose token this api process has already checked is served by `FastIngest`, without
FastAPI's routing and dependency solving; everyone else goes through the route, which checks
the token and answers 401 or 403. Here the api runs in-process against the test stack, with a
spy on the route's `context` dependency, so each test knows which path served each request.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi import Request
from support import Device, history, poll
from test_bad_input import PAYLOADS

from api.app import create_app, layered
from api.context import Context, context
from gateway.contract.credentials import token_hash
from gateway.devtools.localstack import LocalStack

pytestmark = pytest.mark.e2e

with warnings.catch_warnings():
    # Starlette's TestClient still works with httpx, which the rest of the suite uses.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


class Api:
    def __init__(self, client: TestClient, routed: list[str], ctx: Context) -> None:
        self.client = client
        #: The paths of the requests the route served (its dependency ran).
        self.routed = routed
        self.ctx = ctx

    def beat(
        self, device: Device, body: bytes = b"{}", *, issued: bool = True, **headers: str
    ) -> httpx.Response:
        # The device was registered through the stack's api process; this one learns of its
        # token by NOTIFY, a moment later (docs/security.md), as a second api process would.
        # `issued=False`: a token nobody was given, never announced.
        digest = token_hash(device.token)
        if issued:
            poll(lambda: self.ctx.tokens.may_exist(digest), what="the new token's NOTIFY")
        return self.client.post(
            f"/api/v1/devices/{device.device_id}/heartbeats",
            content=body,
            headers={**device.auth, "Content-Type": "application/json", **headers},
        )


@pytest.fixture
def inproc(apps: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """The api app in this process, on the test stack (its work goes to the stack's worker)."""
    for key, value in apps.env("api").items():
        if key.startswith("GATEWAY_"):
            monkeypatch.setenv(key, value)
    app = create_app()
    routed: list[str] = []

    async def spied(request: Request) -> Context:
        routed.append(request.url.path)
        return await context(request)

    app.dependency_overrides[context] = spied
    with TestClient(layered(app)) as client:
        ctx: Context = app.state.context
        poll(lambda: ctx.tokens.active, what="the api's token cache to be active")
        yield Api(client, routed, ctx)


def test_a_known_device_skips_the_route_and_its_heartbeats_are_stored(
    inproc: Api, api: httpx.Client, device: Device
) -> None:
    first = inproc.beat(device, b'{"msg_id": "first"}')
    assert first.status_code == 202, first.text
    assert len(inproc.routed) == 1  # the route checked the token, and the cache kept it
    second = inproc.beat(device, b'{"msg_id": "second", "metrics": {"cpu": 3}}')
    again = inproc.beat(device, b'{"msg_id": "second", "metrics": {"cpu": 3}}')
    assert second.status_code == again.status_code == 202
    assert second.json() == again.json()  # a retry gets the same id
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.headers["x-request-id"] and second.headers["x-request-id"] != "-"
    assert second.headers["x-request-id"] != again.headers["x-request-id"]
    given = inproc.beat(device, b'{"msg_id": "third"}', **{"X-Request-ID": "trace-7"})
    assert given.headers["x-request-id"] == "trace-7"
    assert len(inproc.routed) == 1
    stored = poll(
        lambda: (rows := history(api, device.device_id)) and len(rows) == 3 and rows,
        what="the three heartbeats stored",
    )
    assert sorted(h["msg_id"] for h in stored) == ["first", "second", "third"]


def test_bad_payloads_get_the_routes_answers_on_the_short_path(
    inproc: Api, api: httpx.Client, device: Device
) -> None:
    assert inproc.beat(device).status_code == 202
    for case, (body, _, status, words) in PAYLOADS.items():
        response = inproc.beat(device, body)
        assert response.status_code == status, (case, response.text)
        assert words in response.json()["detail"], case
        assert response.headers["x-request-id"], case
    plain = inproc.beat(device, b"hello", **{"Content-Type": "text/plain"})
    assert plain.status_code == 415
    assert "(Content-Type was 'text/plain')" in plain.json()["detail"]
    assert len(inproc.routed) == 1  # none of them went through the route

    def dead_letters() -> list[dict]:
        items = api.get(
            "/api/v1/rejected", params={"device_id": device.device_id, "limit": 100}
        ).json()["items"]
        return items if len(items) == len(PAYLOADS) + 1 else []

    dead = poll(dead_letters, what="a dead letter for each refused body")
    assert sorted(d["reason"] for d in dead) == sorted(
        [reason for _, reason, *_ in PAYLOADS.values()] + ["not_json"]
    )


def test_other_tokens_go_through_the_route(
    inproc: Api, api: httpx.Client, register: Callable[..., Device]
) -> None:
    owner, other = register(), register()
    assert inproc.beat(owner).status_code == 202
    assert inproc.beat(other).status_code == 202
    before = len(inproc.routed)

    borrowed = inproc.beat(Device(owner.device_id, other.token))
    assert borrowed.status_code == 403
    assert "may not send heartbeats" in borrowed.json()["detail"]
    assert inproc.beat(Device(owner.device_id, "not-a-token"), issued=False).status_code == 401
    missing = inproc.client.post(f"/api/v1/devices/{owner.device_id}/heartbeats", json={})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert len(inproc.routed) == before + 3

    # Disabled elsewhere (another api process): the NOTIFY evicts the cached token here.
    assert api.patch(f"/api/v1/devices/{owner.device_id}", json={"enabled": False}).is_success
    disabled = poll(
        lambda: (r := inproc.beat(owner)).status_code == 403 and r,
        what="the disabled device refused",
    )
    assert "disabled" in disabled.json()["detail"]
    assert inproc.routed[-1] == f"/api/v1/devices/{owner.device_id}/heartbeats"
