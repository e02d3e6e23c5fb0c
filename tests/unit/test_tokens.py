"""The api's cache of checked device tokens: evictions win every race."""

from __future__ import annotations

from api.tokens import TokenCache
from gateway.storage.registry import Identity

PUMP = Identity("pump-7", True)


def active() -> TokenCache:
    cache = TokenCache()
    cache.activate([])
    return cache


def test_a_checked_token_is_kept_until_its_device_changes() -> None:
    cache = active()
    cache.put("h1", PUMP, cache.generation)
    cache.put("h2", Identity("fan-1", True), cache.generation)
    assert cache.get("h1") == PUMP
    cache.evict("pump-7")
    assert cache.get("h1") is None
    assert cache.get("h2") is not None


def test_a_lookup_that_started_before_an_eviction_is_not_kept() -> None:
    cache = active()
    started = cache.generation
    cache.evict("pump-7")  # the rotation's NOTIFY arrives while the lookup is in flight
    cache.put("h1", PUMP, started)
    assert cache.get("h1") is None


def test_unused_while_evictions_cannot_arrive() -> None:
    cache = TokenCache()
    cache.put("h1", PUMP, cache.generation)
    assert cache.get("h1") is None
    cache.activate([])
    cache.put("h1", PUMP, cache.generation)
    cache.deactivate()  # the LISTEN connection dropped: forget everything
    assert len(cache) == 0 and cache.get("h1") is None


def test_entries_expire_and_the_size_is_bounded() -> None:
    cache = TokenCache(ttl_s=-1.0, max_entries=2)
    cache.activate([])
    cache.put("h1", PUMP, cache.generation)
    assert cache.get("h1") is None  # expired
    for n in range(5):
        cache.put(f"k{n}", Identity(f"d{n}", True), cache.generation)
    assert len(cache) <= 2
