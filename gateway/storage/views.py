"""What operators are shown: the response models of the reads in `gateway.storage.reads`, built
from rows and device states, and documented in the api's OpenAPI schema.

Every list is keyset-paginated: the cursor is opaque to clients (base64 of the last row's sort
key), so page 1,000 costs what page 1 costs.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from gateway.contract.messages import DeviceStatus
from gateway.contract.payload import StoredMetricValue
from gateway.storage.mirror import DeviceState
from gateway.storage.quality import LinkQuality

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    #: Pass as `cursor` to get the next page; null on the last page.
    next_cursor: str | None = None


class LatestHeartbeat(BaseModel):
    id: uuid.UUID
    received_at: datetime
    seq: int | None
    ts: datetime | None
    source: str | None
    metrics: dict[str, StoredMetricValue]


class DeviceView(BaseModel):
    """A device as operators see it: its status now, when it was seen, what it last said."""

    device_id: str
    status: DeviceStatus
    heartbeat_interval_s: int
    first_seen: datetime | None
    last_seen: datetime | None
    metrics: dict[str, StoredMetricValue]
    latest_heartbeat: LatestHeartbeat | None
    #: When the status last changed, and why: heartbeat, status_message, last_will, timeout.
    status_changed_at: datetime | None
    status_reason: str | None
    #: Online until this time unless heard from (last_seen + factor x interval).
    offline_deadline: datetime | None
    enabled: bool
    registered_at: datetime | None
    link_quality: LinkQuality | None = None

    @classmethod
    def of(cls, state: DeviceState, now: datetime, link: LinkQuality | None = None) -> DeviceView:
        latest = None
        if state.last_heartbeat_id is not None and state.last_seen is not None:
            latest = LatestHeartbeat(
                id=state.last_heartbeat_id,
                received_at=state.last_seen,
                seq=state.last_seq,
                ts=state.last_device_ts,
                source=state.last_source,
                metrics=state.last_metrics,
            )
        return cls(
            device_id=state.device_id,
            status=state.status_at(now),
            heartbeat_interval_s=state.heartbeat_interval_s,
            first_seen=state.first_seen,
            last_seen=state.last_seen,
            metrics=state.last_metrics,
            latest_heartbeat=latest,
            status_changed_at=state.status_changed_at,
            status_reason=state.status_reason,
            offline_deadline=state.offline_deadline if state.status == "online" else None,
            enabled=state.enabled,
            registered_at=state.registered_at,
            link_quality=link,
        )


class HeartbeatRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    device_id: str
    msg_id: str
    seq: int | None
    ts: datetime | None
    received_at: datetime
    stored_at: datetime
    source: str
    metrics: dict[str, StoredMetricValue]


class RejectedRecord(BaseModel):
    id: uuid.UUID
    received_at: datetime
    stored_at: datetime
    reason: str
    detail: str
    source: str
    device_id: str | None
    topic: str | None
    size: int
    #: The raw payload as text, or `base64:...` when it is not UTF-8.
    payload: str
    replayed_at: datetime | None


class OfflineDevice(BaseModel):
    device_id: str
    since: datetime | None
    reason: str | None
    last_seen: datetime | None


class Fleet(BaseModel):
    """Counts by status, and the devices that went offline most recently."""

    total: int
    online: int
    offline: int
    never_seen: int
    recently_offline: list[OfflineDevice]


Aggregate = Literal["avg", "min", "max", "count", "last"]


class MetricPoint(BaseModel):
    #: Start of the bucket.
    t: datetime
    value: StoredMetricValue | None


class MetricSeries(BaseModel):
    """Time buckets computed in PostgreSQL (`date_bin`); buckets without data are absent."""

    device_id: str
    bucket: str
    agg: Aggregate
    since: datetime
    until: datetime
    series: dict[str, list[MetricPoint]]
