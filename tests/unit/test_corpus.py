"""The regression corpus (tests/corpus/*.json), replayed on every run: every input that ever
broke something goes through the bridge's conversion, the HTTP ingest parse and the worker's
decoding, and ends as it should (a stored message or a dead letter with its reason).

The same inputs cross the real services too: tests/integration/test_boundary_services.py
(worker, bridge) and tests/e2e/test_hostile_neighbour.py (MQTT and HTTP through the whole stack).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hostile import corpus, corpus_bytes, corpus_headers

from gateway.contract.conversion import Forward, Reject, convert, heartbeat_from
from gateway.contract.messages import Source, read_dead_letter, read_work
from gateway.contract.reasons import InputError, Reason
from gateway.contract.topics import mqtt_topic

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


def names(kind: str) -> list:
    return [pytest.param(entry, id=entry["name"]) for entry in corpus(kind)]


def test_every_entry_says_what_it_broke() -> None:
    for kind in ("payloads", "topics", "work", "dead_letters"):
        for entry in corpus(kind):
            assert entry["name"] and entry["broke"], entry
            assert ("reason" in entry) != entry.get("stored", False), entry
            if "reason" in entry:
                Reason(entry["reason"])


@pytest.mark.parametrize("entry", names("payloads"))
def test_payloads_through_the_bridge_and_http_ingest(entry: dict) -> None:
    body = corpus_bytes(entry)
    outcome = convert("devices.corpus-1.heartbeat", body, T0)
    try:
        over_http = heartbeat_from("corpus-1", body, Source.HTTP, T0)
    except InputError as error:
        over_http = error
    if entry.get("stored"):
        assert isinstance(outcome, Forward), outcome
        assert not isinstance(over_http, InputError), over_http
    else:
        assert isinstance(outcome, Reject), outcome
        assert outcome.rejection.reason == entry["reason"]
        assert outcome.rejection.device_id == "corpus-1"
        assert isinstance(over_http, InputError) and over_http.reason == entry["reason"]


@pytest.mark.parametrize("entry", names("topics"))
def test_topics_through_the_bridge(entry: dict) -> None:
    topic = corpus_bytes(entry, "topic").replace(b"{device}", b"corpus-1")
    routing_key = mqtt_topic(topic.decode("utf-8", "surrogateescape"))  # as the frames decode
    outcome = convert(routing_key, b"{}", T0)
    assert isinstance(outcome, Reject), outcome
    assert outcome.rejection.reason == entry["reason"]
    assert outcome.rejection.device_id == "corpus-1"


@pytest.mark.parametrize("entry", names("work"))
def test_work_messages_through_the_worker_decoding(entry: dict) -> None:
    good, bad = read_work(corpus_bytes(entry))
    assert good == []
    assert [r.reason for r in bad] == [entry["reason"]]
    assert bad[0].payload == corpus_bytes(entry)


@pytest.mark.parametrize("entry", names("dead_letters"))
def test_dead_letters_through_the_worker_decoding(entry: dict) -> None:
    rejection = read_dead_letter(corpus_headers(entry), corpus_bytes(entry))
    assert rejection.reason == entry["reason"]
    assert rejection.payload == corpus_bytes(entry)
    assert "\x00" not in rejection.detail
