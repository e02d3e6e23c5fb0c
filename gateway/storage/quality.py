"""Link quality: what tells a flaky modem from a dead device.

Over a window (the last hour): heartbeats received against heartbeats expected from the
device's own `seq` (gaps are losses; a counter that goes back means the device restarted),
the median time between arrivals, and the clock skew (receive time minus the device's `ts`).
"""

from __future__ import annotations

import itertools
import statistics
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import Connection, select

from gateway.storage.partitions import stored_since
from gateway.storage.schema import heartbeats

WINDOW = timedelta(hours=1)


class LinkQuality(BaseModel):
    window_s: int
    received: int
    #: From `seq`: heartbeats the device sent in the window (null without `seq`).
    expected: int | None
    loss_pct: float | None
    median_interval_s: float | None
    #: Receive time minus device time, median; positive when the device clock is behind.
    clock_skew_s: float | None


def compute(
    rows: list[tuple[int | None, datetime | None, datetime]], window: timedelta
) -> LinkQuality:
    """`rows`: (seq, device_ts, received_at) in arrival order."""
    received = len(rows)
    arrivals = [r[2] for r in rows]
    intervals = [(b - a).total_seconds() for a, b in itertools.pairwise(arrivals)]
    skews = [(at - ts).total_seconds() for _, ts, at in rows if ts is not None]
    runs = _runs([seq for seq, _, _ in rows if seq is not None])
    expected = sum(max(run) - min(run) + 1 for run in runs) if runs else None
    loss = None
    if expected:
        counted = sum(len(set(run)) for run in runs)
        loss = round(max(0.0, 1 - counted / expected) * 100, 2)
    return LinkQuality(
        window_s=int(window.total_seconds()),
        received=received,
        expected=expected,
        loss_pct=loss,
        median_interval_s=round(statistics.median(intervals), 3) if intervals else None,
        clock_skew_s=round(statistics.median(skews), 3) if skews else None,
    )


def _runs(seqs: list[int]) -> list[list[int]]:
    """Split the counter, in arrival order, into runs: where it goes back, the device restarted."""
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and seq > runs[-1][-1]:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    return runs


def link_quality(conn: Connection, device_id: str, now: datetime) -> LinkQuality:
    h = heartbeats.c
    rows = conn.execute(
        select(h.seq, h.device_ts, h.received_at)
        .where(
            h.device_id == device_id,
            h.received_at >= now - WINDOW,
            h.received_at <= now,
            *stored_since(now - WINDOW),
        )
        .order_by(h.received_at)
    ).all()
    return compute([tuple(r) for r in rows], WINDOW)
