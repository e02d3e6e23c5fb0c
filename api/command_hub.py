"""What one api process knows of commands between requests.

`CommandHub` keeps the devices that may have live commands (so a heartbeat's answer costs a
query only for those), the requests waiting for a device's next command, and the dispatcher to
wake. It learns of every change by PostgreSQL NOTIFY (`api.stream`); while it is not listening,
it knows nothing and every heartbeat asks the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from api.dispatcher import Dispatcher
from gateway.contract.commands import LIVE, Command, CommandMessage, CommandStatus
from gateway.storage import command_store
from gateway.storage.engine import short_error

if TYPE_CHECKING:
    from api.context import Context

log = logging.getLogger(__name__)


class CommandHub:
    def __init__(self, dispatcher: Dispatcher | None = None) -> None:
        #: None where nothing publishes commands (an app under test without a broker).
        self.dispatcher = dispatcher
        self._listening = False
        #: Devices that may have live commands, each with a count of the changes seen.
        self._maybe: dict[str, int] = {}
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    # ---- fed by the NOTIFY listener (on the event loop) -----------------------------------

    def activate(self, devices: set[str]) -> None:
        self._maybe = dict.fromkeys(devices, 0)
        self._listening = True

    def deactivate(self) -> None:
        self._listening = False

    def changed(self, payload: str) -> None:
        try:
            change = json.loads(payload)
            device_id, state = change["device_id"], change["status"]
        except (ValueError, KeyError, TypeError):
            return
        if state in LIVE:
            self._maybe[device_id] = self._maybe.get(device_id, 0) + 1
            for waiter in self._waiters.get(device_id, ()):
                waiter.set()
        if state == CommandStatus.PENDING and self.dispatcher is not None:
            self.dispatcher.wake()

    def status_changed(self, payload: str) -> None:
        """A device's status changed: one back online may have commands it never got."""
        try:
            change = json.loads(payload)
            device_id, to_status = change["device_id"], change["to_status"]
        except (ValueError, KeyError, TypeError):
            return
        if to_status == "online" and self.may_have(device_id) and self.dispatcher is not None:
            self.dispatcher.came_online(device_id)

    # ---- used by requests -----------------------------------------------------------------

    def may_have(self, device_id: str) -> bool:
        return not self._listening or device_id in self._maybe

    def seen(self, device_id: str) -> int:
        return self._maybe.get(device_id, -1)

    def none_live(self, device_id: str, seen: int) -> None:
        """The database had no live command for the device as of change `seen`."""
        if self._listening and self._maybe.get(device_id) == seen:
            del self._maybe[device_id]

    @contextlib.contextmanager
    def waiting(self, device_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters[device_id].add(event)
        try:
            yield event
        finally:
            self._waiters[device_id].discard(event)
            if not self._waiters[device_id]:
                del self._waiters[device_id]


async def hand_over(ctx: Context, device_id: str) -> list[CommandMessage]:
    """The live commands of an HTTP device, for its answer (pending ones become `sent`)."""
    hub = ctx.commands
    if not hub.may_have(device_id):
        return []
    seen = hub.seen(device_id)

    def run() -> list[Command]:
        with ctx.engine.begin() as conn:
            return command_store.hand_to_http_device(conn, device_id)

    live = await asyncio.to_thread(run)
    if not live:
        hub.none_live(device_id, seen)
    return [c.wire() for c in live]


async def commands_for_heartbeat(ctx: Context, device_id: str) -> list[CommandMessage]:
    """What a heartbeat's 202 carries. The heartbeat is accepted already: a database away
    costs the device its commands until its next request, never its 202."""
    try:
        return await hand_over(ctx, device_id)
    except SQLAlchemyError as exc:
        log.warning("no commands for %s in its answer: %s", device_id, short_error(exc))
        return []
