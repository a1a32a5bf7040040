"""The vocabulary: push kinds, alert statuses, case types, and the Alert and Push records.

Every module that names a push kind or an alert status takes it from here.  The
enums are ``str`` subclasses: a member equals its value (``PushKind.EXPAND ==
"expand"``), so the strings stored in the log and in JSON compare with them, and
formatting one gives its value.  The records are what the engine keeps and hands out:
:class:`Alert` (persisted as JSON in the recipient log) and :class:`Push` (one
message to the dispatchers).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..geo import iso_utc
from .schedule import RadiusSchedule

if TYPE_CHECKING:   # annotations only: the log imports this module without pyarrow or the kernels
    import pyarrow as pa

    from ..spatial.audience import Audience
    from .stats import AlertRecord
    from ..spatial.store import DeviceStore

__all__ = ["PushKind", "AlertStatus", "RING_KINDS", "FOLLOW_UP_KINDS", "KINDS", "COUNTED_STATUSES",
           "CaseType", "Alert", "Push", "Index"]


class _Word(str, enum.Enum):
    """A word of the vocabulary: equal to, and formatted as, its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class PushKind(_Word):
    """What a push is.  Rings reach devices not notified before; follow-ups reach exactly those."""

    ALERT = "alert"            # the first ring
    EXPAND = "expand"          # a wider ring, as the radius grows with time
    TOPUP = "topup"            # devices that moved into the current ring after a location refresh
    UPDATE = "update"          # new details, to everyone notified
    CLOSURE = "closure"        # the person was found (or not), to everyone notified
    RETRACTION = "retraction"  # the alert was withdrawn, to everyone notified


class AlertStatus(_Word):
    """Where an alert is in its life."""

    PENDING = "pending"        # reported, waiting for approval
    OPEN = "open"              # published: rings go out
    CLOSED = "closed"
    RETRACTED = "retracted"
    HELD = "held"              # possibly a duplicate of another alert, until an officer decides
    MERGED = "merged"          # confirmed a duplicate


#: Kinds that reach devices never notified for the alert (the log checks they overlap none).
RING_KINDS = tuple(k.value for k in (PushKind.ALERT, PushKind.EXPAND, PushKind.TOPUP))
#: Kinds that reach exactly the devices notified so far.
FOLLOW_UP_KINDS = tuple(k.value for k in (PushKind.UPDATE, PushKind.CLOSURE, PushKind.RETRACTION))
KINDS = RING_KINDS + FOLLOW_UP_KINDS
#: The statuses the statistics count (held and merged duplicates are not alerts of their own).
COUNTED_STATUSES = tuple(s.value for s in (AlertStatus.PENDING, AlertStatus.OPEN, AlertStatus.CLOSED,
                                           AlertStatus.RETRACTED))

@runtime_checkable
class Index(Protocol):
    """What the engine asks of an index: :class:`~geotarget.SpatialIndex` on one machine and
    :class:`~geotarget.spatial.cluster.ShardedIndex` over Ray both answer it, exactly alike."""

    #: The device store whose keys the answers are (ids, apps, last seen, generation, lineage).
    store: "DeviceStore"

    def within(self, lat, lon, radius_km, seen_since=None, apps=None) -> Audience:
        """Devices within ``radius_km`` of (lat, lon)."""

    def count(self, lat, lon, radius_km, seen_since=None, apps=None) -> int:
        """``len(within(...))``."""

    def within_polygon(self, polygon_or_division, seen_since=None, apps=None) -> Audience:
        """Devices inside a polygon or a division."""

    def changed_within(self, circles, notified) -> list:
        """Per circle, the keys this generation changed inside it, minus that circle's ``notified``."""


_TIME_FIELDS = ("missing_since", "reported_at", "published_at", "closed_at", "expires_at", "expired_at")


def _from_iso(s: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(s) if s is not None else None


@dataclasses.dataclass(frozen=True)
class CaseType:
    """A kind of missing person: its CAP event, radius schedule and expiry."""

    name: str
    event: str
    event_code: str
    schedule: RadiusSchedule
    expiry: _dt.timedelta

    def to_dict(self) -> dict:
        d = self.schedule.to_dict()
        return {"event": self.event, "event_code": self.event_code,
                "schedule": [[s / 3600, km] for s, km in d["steps"]],
                "final_km": d["final_km"], "expiry_hours": self.expiry.total_seconds() / 3600}



@dataclasses.dataclass
class Alert:
    """The engine's state of one alert (persisted as JSON in the log)."""

    alert_id: str
    reporter: str
    division: str
    lat: float
    lon: float
    missing_since: _dt.datetime
    reported_at: _dt.datetime
    details: dict
    schedule: dict
    status: str = AlertStatus.PENDING.value   # an AlertStatus
    published_at: _dt.datetime | None = None
    approved_by: str | None = None
    outcome: str | None = None
    closed_at: _dt.datetime | None = None
    closed_by: str | None = None
    radius_km: float = 0.0           # radius of the last ring pushed
    next_seq: int = 0
    pushes: int = 0
    reached: int = 0                 # devices notified so far (size of the closure audience)
    case_type: str = "child"
    drill: bool = False                      # an exercise: CAP status Exercise, test devices only
    duplicate_of: str | None = None          # held: possibly the same person as this alert
    expires_at: _dt.datetime | None = None   # rings stop here unless an officer renews
    expired_at: _dt.datetime | None = None   # when the engine noticed the expiry (audited once)
    #: True: the area is the whole division (its polygon), not a growing circle.
    division_wide: bool = False
    #: Photos (:meth:`geotarget.alerts.photos.Photo.to_dict`); the bytes are in the engine's PhotoStore.
    photos: list = dataclasses.field(default_factory=list)
    #: Photos an update replaced: the CAP messages sent before it point at them, so their files are
    #: kept until the alert is purged.
    photos_before: list = dataclasses.field(default_factory=list)

    quarantine: str | None = None    # why tick skips the alert, until an update or retraction

    def expired(self, now: _dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def stats_record(self) -> "AlertRecord | None":
        """What the statistics count of this alert; None for a drill or a merged or held duplicate."""
        from .stats import AlertRecord   # stats needs nothing of this module's but the statuses

        if self.drill or self.status in (AlertStatus.HELD, AlertStatus.MERGED):
            return None
        return AlertRecord(alert_id=self.alert_id, division=self.division, published_at=self.published_at,
                           status=self.status, outcome=self.outcome, closed_at=self.closed_at,
                           pushes=self.pushes, devices_reached=self.reached, case_type=self.case_type)

    @property
    def id(self) -> str:
        return self.alert_id

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        for k in _TIME_FIELDS:
            d[k] = iso_utc(d[k])
        return d

    @classmethod
    def from_record(cls, d: dict) -> "Alert":
        d = dict(d)
        for k in _TIME_FIELDS:
            d[k] = _from_iso(d.get(k))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Push:
    """One message to the dispatchers.  ``push_id`` is their idempotency key."""

    alert_id: str
    seq: int
    kind: str                        # a PushKind
    radius_km: float
    push_id: str
    audience: Audience
    cap_xml: str
    created_at: _dt.datetime
    #: Wall time this process spent on the push (``query_ms``, ``log_ms``); empty on a replay.
    timings: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    #: An exercise (CAP status ``Exercise``); its audience is the test devices only.
    drill: bool = False
    #: For a drill ring: how many devices a real alert's ring would have reached.
    as_if_real: int | None = None

    def __len__(self) -> int:
        return len(self.audience)

    @functools.cached_property
    def batches(self) -> dict[str, pa.Table]:
        """Per-app batches: ``{app: Table(device_id, key)}`` (``Audience.by_app``), built once."""
        return self.audience.by_app()
