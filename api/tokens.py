"""Device tokens this api process has checked, kept in memory, so an HTTP heartbeat costs no
database round trip; and a short fingerprint of every device's token, so a token nobody was
given (a stranger guessing, over HTTP or MQTT) is refused without one either.

Only while changes can reach them: every change of a device's credentials (registration,
rotation, enable, disable) is announced with PostgreSQL NOTIFY on commit, and the status
stream's LISTEN connection evicts that device's entries and learns its new token's fingerprint.
While that connection is down both are empty and unused, and every check asks PostgreSQL.
Unknown tokens are never cached as identities.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

from gateway.storage.registry import Identity

#: A safety net only: entries are evicted on change, not by age.
TTL_S = 60.0
MAX_ENTRIES = 100_000


class TokenCache:
    """token hash -> the device it belongs to. Used from the event loop thread only."""

    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[str, tuple[Identity, float]] = {}
        self._by_device: dict[str, set[str]] = {}
        #: Bumped by every eviction: a lookup that started before one must not be cached.
        self.generation = 0
        self.active = False
        #: The first 64 bits of every registered device's token hash (and of replaced ones,
        #: until the next activation): a token whose hash is not here belongs to no device.
        self._known: set[int] = set()

    def may_exist(self, digest: str) -> bool:
        """False only when no device has this token (known for certain while active)."""
        return not self.active or _fingerprint(digest) in self._known

    def get(self, digest: str) -> Identity | None:
        entry = self._entries.get(digest)
        if entry is None or not self.active:
            return None
        identity, expires = entry
        if time.monotonic() > expires:
            self._drop(digest, identity.device_id)
            return None
        return identity

    async def lookup(
        self, digest: str, fetch: Callable[[], Awaitable[Identity | None]]
    ) -> Identity | None:
        """The cached identity, else `fetch()`'s, kept unless credentials changed meanwhile."""
        identity = self.get(digest)
        if identity is not None:
            return identity
        if not self.may_exist(digest):
            return None
        generation = self.generation
        identity = await fetch()
        if identity is not None:
            self.put(digest, identity, generation)
        return identity

    def put(self, digest: str, identity: Identity, generation: int) -> None:
        """Keep what a lookup found, unless credentials changed since it started."""
        if not self.active or generation != self.generation:
            return
        if len(self._entries) >= self._max:
            self._clear()
        self._entries[digest] = (identity, time.monotonic() + self._ttl_s)
        self._by_device.setdefault(identity.device_id, set()).add(digest)

    def evict(self, device_id: str) -> None:
        self.generation += 1
        for digest in self._by_device.pop(device_id, ()):
            self._entries.pop(digest, None)

    def changed(self, device_id: str, digest: str | None) -> None:
        """A device's credentials changed; `digest` is the hash of its token now."""
        self.evict(device_id)
        if digest:
            self._known.add(_fingerprint(digest))

    def activate(self, digests: Iterable[str]) -> None:
        """NOTIFY reaches this process again: start empty, knowing every token there is."""
        self._clear()
        self._known = {_fingerprint(digest) for digest in digests}
        self.active = True

    def deactivate(self) -> None:
        self._clear()
        self._known = set()
        self.active = False

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, digest: str, device_id: str) -> None:
        self._entries.pop(digest, None)
        self._by_device.get(device_id, set()).discard(digest)

    def _clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_device.clear()


def _fingerprint(digest: str) -> int:
    """The first 64 bits of a token hash (hex): a small int per device, not its 64 characters
    (a stranger's token still has one chance in 2^64 of passing, and then meets PostgreSQL)."""
    return int(digest[:16], 16)
