"""Status changes as they happen: PostgreSQL NOTIFY in, Server-Sent Events out.

One LISTEN connection per api process (a thread) feeds every connected client through a
bounded queue of its own. Ingest never waits for a client: a client too slow to keep up is
told so (`event: overflow`) and disconnected; it reconnects and reads what it missed from
`GET /devices/{id}/events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import threading
from collections.abc import Callable

import psycopg2
import psycopg2.extensions
from sqlalchemy.engine import URL

from api.command_hub import CommandHub
from api.tokens import TokenCache
from gateway.runtime.retry import Backoff
from gateway.storage import command_store, liveness, registry

log = logging.getLogger(__name__)
Connection = psycopg2.extensions.connection

CLIENT_QUEUE = 1000
#: The last frame a client that fell behind gets.
OVERFLOW = "event: overflow\ndata: {}\n\n"


class StatusStream:
    """Also delivers credential changes to `tokens` (the api's token cache), which it keeps
    active exactly while it is listening."""

    def __init__(
        self, url: URL, tokens: TokenCache | None = None, commands: CommandHub | None = None
    ) -> None:
        self._tokens = tokens
        self._commands = commands
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._clients: set[asyncio.Queue] = set()
        #: The clients that asked for command events too.
        self._command_clients: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, name="status-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for queue in list(self._clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def subscribe(self, *, commands: bool = False) -> asyncio.Queue:
        """A client's queue; with `commands`, it also gets `event: command` frames."""
        queue: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE)
        self._clients.add(queue)
        if commands:
            self._command_clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._clients.discard(queue)
        self._command_clients.discard(queue)

    def _publish(self, payload: str, event: str = "status") -> None:
        """Frame the event once, then hand the same frame to every client."""
        frame = f"id: {json.loads(payload)['id']}\nevent: {event}\ndata: {payload}\n\n"
        clients = self._clients if event == "status" else self._command_clients
        for queue in list(clients):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:  # a slow client: tell it, drop it, never wait for it
                self.unsubscribe(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(OVERFLOW)

    def _deliver(
        self, conn: psycopg2.extensions.connection, note: psycopg2.extensions.Notify
    ) -> None:
        if note.channel == registry.CREDENTIALS_CHANNEL:
            if self._tokens is not None:
                with conn.cursor() as cursor:
                    digest = registry.token_hash_of(cursor, note.payload)
                self._on_loop(self._tokens.changed, note.payload, digest)
        elif note.channel == command_store.CHANNEL:
            self._on_loop(self._publish, note.payload, "command")
            if self._commands is not None:
                self._on_loop(self._commands.changed, note.payload)
        else:
            self._on_loop(self._publish, note.payload)
            if self._commands is not None:
                self._on_loop(self._commands.status_changed, note.payload)

    def _activate_tokens(self, conn: Connection) -> None:
        """Listening: from now on every credential change reaches the token cache, so it may
        start, knowing every token that exists."""
        if self._tokens is not None:
            with conn.cursor() as cursor:
                digests = registry.token_hashes(cursor)
            self._on_loop(self._tokens.activate, digests)

    def _deactivate_tokens(self) -> None:
        if self._tokens is not None:
            self._on_loop(self._tokens.deactivate)
        if self._commands is not None:
            self._on_loop(self._commands.deactivate)

    def _activate_commands(self, conn: Connection) -> None:
        """Listening: from now on every command change reaches the hub."""
        if self._commands is not None:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT DISTINCT device_id FROM commands"
                    " WHERE status IN ('pending', 'sent') AND expires_at > now()"
                )
                live = {row[0] for row in cursor.fetchall()}
            self._on_loop(self._commands.activate, live)

    def _on_loop(self, callback: Callable[..., None], *args: object) -> None:
        """Run `callback` on the api's event loop; nothing once that loop has closed (the
        thread notices `stop` within a second, and may get one more notification first)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _listen(self) -> None:
        backoff = Backoff(0.5, 5.0)
        while not self._stop.is_set():
            try:
                conn = psycopg2.connect(self._dsn, connect_timeout=5)
            except psycopg2.Error as exc:
                log.warning("status stream cannot reach PostgreSQL (%s); retrying", exc)
                self._stop.wait(backoff.next())
                continue
            try:
                conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
                conn.cursor().execute(f"LISTEN {liveness.CHANNEL}")
                conn.cursor().execute(f"LISTEN {registry.CREDENTIALS_CHANNEL}")
                conn.cursor().execute(f"LISTEN {command_store.CHANNEL}")
                backoff.reset()
                self._activate_tokens(conn)
                self._activate_commands(conn)
                while not self._stop.is_set():
                    if select.select([conn], [], [], 1.0)[0]:
                        conn.poll()
                        while conn.notifies:
                            self._deliver(conn, conn.notifies.pop(0))
            except (psycopg2.Error, OSError) as exc:
                log.warning("status stream lost PostgreSQL (%s); reconnecting", exc)
            finally:
                self._deactivate_tokens()
                with contextlib.suppress(psycopg2.Error):
                    conn.close()
