"""AlertEngine: the alert lifecycle on top of the index, the log and the authority.

Life of an alert
----------------
``report`` (an officer whose jurisdiction covers the division) -> ``approve``
where policy requires it -> ``tick(now)`` pushes the first ring at the radius
the schedule gives for ``now - missing_since`` -> later ticks push only the
*new* devices of each wider ring -> ``refresh(new_index, now)`` tops up devices
that moved into the current circle -> ``update`` / ``close`` / ``retract`` go to
exactly the union of everyone notified so far.

Exactly-once rings
------------------
Every push's audience is ``within(radius) - notified``, where ``notified`` is
the union of all logged ``alert``/``expand``/``topup`` audiences.  The audience,
the alert's new state and an audit entry are written in ONE fsynced SQLite
transaction *before* the push is returned, so a crash can lose nothing that a
caller saw.  Pushes form an outbox: a reopened engine offers every logged but
unacknowledged push again on its first ``tick``, under the same ``push_id``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from pyroaring import AbstractBitMap

from . import _kernels, _refresh_kernels
from .audience import Audience
from .authority import Authority
from .cap import render_push
from .errors import AlertStateError, InvalidInputError, UnknownAlertError
from .geo import check_aware, check_point, epoch_seconds
from .index import changed_device_points, populate
from .log import PushRecord, RecipientLog
from .schedule import RadiusSchedule
from .stats import AlertRecord, check_outcome, compute

#: Kinds whose audience is new devices only (update, closure, retraction go to everyone notified).
RING_KINDS = ("alert", "expand", "topup")
DEFAULT_SENDER = "tuanyuan@mps.gov.cn"
#: Changed devices per box when re-targeting a refresh (see ``_delta_points``).
_DELTA_BLOCK = 1024


def _iso(t: _dt.datetime | None) -> str | None:
    return t.astimezone(_dt.timezone.utc).isoformat() if t is not None else None


def _from_iso(s: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(s) if s is not None else None


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
    status: str = "pending"          # pending | open | closed | retracted
    published_at: _dt.datetime | None = None
    approved_by: str | None = None
    outcome: str | None = None
    closed_at: _dt.datetime | None = None
    closed_by: str | None = None
    radius_km: float = 0.0           # radius of the last ring pushed
    next_seq: int = 0
    pushes: int = 0
    reached: int = 0                 # devices notified so far (size of the closure audience)

    @property
    def id(self) -> str:
        return self.alert_id

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("missing_since", "reported_at", "published_at", "closed_at"):
            d[k] = _iso(d[k])
        return d

    @classmethod
    def from_record(cls, d: dict) -> "Alert":
        d = dict(d)
        for k in ("missing_since", "reported_at", "published_at", "closed_at"):
            d[k] = _from_iso(d[k])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Push:
    """One message to the dispatchers.  ``push_id`` is their idempotency key."""

    alert_id: str
    seq: int
    kind: str
    radius_km: float
    push_id: str
    audience: Audience
    cap_xml: str
    created_at: _dt.datetime
    #: Wall time this process spent on the push (``query_ms``, ``log_ms``); empty on a replay.
    timings: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.audience)

    @property
    def batches(self) -> dict[str, pa.Table]:
        """Per-app batches: ``{app: Table(device_id, key)}``, in key order (``Audience.by_app``)."""
        return self.audience.by_app()


class AlertEngine:
    """The alert lifecycle.  Thread-safe: dispatchers may call ``tick``/``ack`` concurrently."""

    def __init__(self, index, log: RecipientLog, authority: Authority,
                 schedule: RadiusSchedule | None = None, *, sender: str = DEFAULT_SENDER,
                 max_location_age: _dt.timedelta | None = None, workers: int = 2):
        self.index = index
        self.log = log
        self.authority = authority
        self.schedule = schedule or RadiusSchedule.default()
        self.sender = sender
        if max_location_age is not None and max_location_age <= _dt.timedelta(0):
            raise InvalidInputError(f"max_location_age must be positive, got {max_location_age}")
        self.max_location_age = max_location_age
        self.workers = max(1, int(workers))
        self._lock = threading.RLock()
        self._alerts: dict[str, Alert] = {a: Alert.from_record(r) for a, r in log.alerts().items()}
        # Outbox: pushes logged by an earlier process and never acknowledged are
        # offered again on the first tick of this one.
        self._replay: list[PushRecord] | None = log.unacked()

    # -- helpers ------------------------------------------------------------

    def alert(self, alert_id: str) -> Alert:
        try:
            return self._alerts[alert_id]
        except KeyError:
            raise UnknownAlertError(f"unknown alert {alert_id!r}") from None

    def alerts(self) -> list[Alert]:
        return list(self._alerts.values())

    def _schedule_of(self, alert: Alert) -> RadiusSchedule:
        return RadiusSchedule.from_dict(alert.schedule)

    def _audience(self, bm) -> Audience:
        return Audience(store=self.index.store, bitmap=bm)

    def _to_push(self, rec: PushRecord, timings: dict | None = None) -> Push:
        return Push(rec.alert_id, rec.seq, rec.kind, rec.radius_km, rec.push_id,
                    self._audience(rec.audience), rec.meta.get("cap_xml", ""), rec.created_at,
                    timings or {})

    def _query(self, alert: Alert, radius: float, now: _dt.datetime, index=None) -> Audience:
        idx = index or self.index
        seen = now - self.max_location_age if self.max_location_age is not None else None
        return idx.within(alert.lat, alert.lon, radius, seen_since=seen)

    def _references(self, alert: Alert):
        return [(self.sender, r.push_id, r.created_at)
                for r in self.log.pushes(alert.alert_id, audiences=False)]

    def _emit(self, alert: Alert, kind: str, radius: float, audience, now: _dt.datetime,
              actor: str, extra: dict | None = None, query_ms: float | None = None) -> Push:
        """Log the push (with the alert's new state and an audit entry) durably, then return it."""
        t0 = time.perf_counter()
        bm = audience.bitmap() if isinstance(audience, Audience) else audience
        seq = alert.next_seq
        push_id = f"{alert.alert_id}.{seq}"
        details = alert.details
        cap_xml = render_push(
            identifier=push_id, sender=self.sender, sent=now, kind=kind, lat=alert.lat, lon=alert.lon,
            radius_km=radius, references=self._references(alert) if seq else (),
            headline=str(details.get("headline", "")), description=str(details.get("description", "")),
            instruction=str(details.get("instruction", "")), area_desc=str(details.get("area", "")),
            outcome=alert.outcome if kind == "closure" else None)
        updated = dataclasses.replace(alert, next_seq=seq + 1, pushes=alert.pushes + 1)
        if kind in RING_KINDS:
            updated.radius_km = radius
            updated.reached = alert.reached + len(bm)
        meta = {"cap_xml": cap_xml, "actor": actor}
        if extra:
            meta.update(extra)
        with self.log.transaction():
            rec = self.log.append_push(push_id=push_id, alert_id=alert.alert_id, seq=seq, kind=kind,
                                       radius_km=radius, created_at=now, audience=bm, meta=meta)
            self.log.save_alert(alert.alert_id, updated.to_record())
            self.log.audit(kind, actor=actor, alert_id=alert.alert_id, radius_km=radius,
                           count=len(bm), at=now, detail={"push_id": push_id})
        self._alerts[alert.alert_id] = updated
        timings = {"log_ms": (time.perf_counter() - t0) * 1e3}
        if query_ms is not None:
            timings["query_ms"] = query_ms
        return self._to_push(rec, timings)

    def _save(self, alert: Alert, action: str, actor: str, now: _dt.datetime, detail: dict | None = None):
        with self.log.transaction():
            self.log.save_alert(alert.alert_id, alert.to_record())
            self.log.audit(action, actor=actor, alert_id=alert.alert_id, radius_km=alert.radius_km or None,
                           count=alert.reached, at=now, detail=detail)
        self._alerts[alert.alert_id] = alert

    # -- lifecycle ------------------------------------------------------------

    def report(self, officer_id: str, *, lat: float, lon: float, missing_since: _dt.datetime,
               division: str, details: dict | None = None, now: _dt.datetime | None = None,
               schedule: RadiusSchedule | None = None) -> Alert:
        """Register a missing child.  Published at once unless policy requires approval."""
        now = check_aware(now, "now") if now is not None else _dt.datetime.now(_dt.timezone.utc)
        missing_since = check_aware(missing_since, "missing_since")
        if missing_since > now:
            raise InvalidInputError(
                f"missing_since={missing_since.isoformat()} is in the future (now={now.isoformat()})")
        clat, clon = check_point(lat, lon)
        if details is not None and not isinstance(details, dict):
            raise InvalidInputError(f"details must be a dict, got {type(details).__name__}")
        with self._lock:
            officer = self.authority.check_report(officer_id, division)
            sched = schedule or self.schedule
            # Sequential per log, so an id is never reused even across restarts.
            alert_id = f"GT-{division}-{now:%Y%m%d}-{len(self._alerts) + 1:06d}"
            alert = Alert(alert_id=alert_id, reporter=officer.officer_id, division=division, lat=clat, lon=clon,
                          missing_since=missing_since, reported_at=now, details=dict(details or {}),
                          schedule=sched.to_dict())
            if not self.authority.needs_approval(officer):
                alert.status = "open"
                alert.published_at = now
            self._save(alert, "report", officer.officer_id, now,
                       {"lat": clat, "lon": clon, "division": division, "status": alert.status,
                        "missing_since": _iso(missing_since)})
            return alert

    def approve(self, alert_id: str, officer_id: str, now: _dt.datetime | None = None) -> Alert:
        now = check_aware(now, "now") if now is not None else _dt.datetime.now(_dt.timezone.utc)
        with self._lock:
            alert = self.alert(alert_id)
            if alert.status != "pending":
                raise AlertStateError(f"alert {alert_id} is {alert.status}, not pending approval")
            officer = self.authority.check_approve(officer_id, alert.reporter, alert.division)
            updated = dataclasses.replace(alert, status="open", published_at=now, approved_by=officer.officer_id)
            self._save(updated, "approve", officer.officer_id, now)
            return updated

    def tick(self, now: _dt.datetime) -> list[Push]:
        """Pushes due at ``now``: replayed outbox (first call only), first rings, expansions."""
        now = check_aware(now, "now")
        with self._lock:
            out: list[Push] = []
            if self._replay is not None:
                out.extend(self._to_push(r) for r in self._replay)
                self._replay = None
            for alert in list(self._alerts.values()):
                if alert.status != "open":
                    continue
                if now < alert.missing_since:
                    continue
                radius = self._schedule_of(alert).radius_at(alert.missing_since, now)
                if alert.next_seq == 0:
                    t0 = time.perf_counter()
                    aud = self._query(alert, radius, now)
                    out.append(self._emit(alert, "alert", radius, aud, now, "engine",
                                          query_ms=(time.perf_counter() - t0) * 1e3))
                elif radius > alert.radius_km:
                    out.extend(self._ring(alert, "expand", radius, now, self.index))
            return out

    def _ring(self, alert: Alert, kind: str, radius: float, now: _dt.datetime, index,
              audience: Audience | None = None, query_ms: float | None = None,
              new: AbstractBitMap | None = None) -> list[Push]:
        """One ring push: ``audience`` (queried if None) minus the devices already notified.

        ``new`` is a ring already computed without the notified devices (the
        refresh's top-ups); the log checks that it overlaps none of them.
        """
        t0 = time.perf_counter()
        if new is None:
            aud = audience if audience is not None else self._query(alert, radius, now, index)
            new = aud.bitmap() - self.log.notified(alert.alert_id)
        query_ms = (query_ms or 0.0) + (time.perf_counter() - t0) * 1e3
        if len(new) == 0:
            # Nothing to send, but the ring is done: remember the radius so the
            # next tick does not ask again, and keep the decision in the audit.
            updated = dataclasses.replace(alert, radius_km=max(radius, alert.radius_km))
            self._save(updated, f"{kind}-empty", "engine", now, {"radius_km": radius})
            return []
        return [self._emit(alert, kind, radius, new, now, "engine", query_ms=query_ms)]

    def ack(self, push_id: str) -> bool:
        """The dispatcher has handed the push on; it will not be offered again."""
        with self._lock:
            newly = self.log.ack(push_id)
            if newly:
                rec = self.log.push(push_id)
                self.log.audit("ack", actor="dispatcher", alert_id=rec.alert_id, radius_km=rec.radius_km,
                               count=rec.count, detail={"push_id": push_id})
            return newly

    def _follow(self, alert: Alert, kind: str, officer_id: str, now: _dt.datetime) -> Push:
        return self._emit(alert, kind, alert.radius_km, self.log.notified(alert.alert_id), now, officer_id)

    def update(self, alert_id: str, officer_id: str, details: dict, now: _dt.datetime | None = None) -> Push:
        """New details, to everyone notified so far."""
        now = check_aware(now, "now") if now is not None else _dt.datetime.now(_dt.timezone.utc)
        if not isinstance(details, dict) or not details:
            raise InvalidInputError(f"details must be a non-empty dict, got {details!r}")
        with self._lock:
            alert = self.alert(alert_id)
            self.authority.check_act(officer_id, alert.division, "update")
            if alert.status != "open":
                raise AlertStateError(f"alert {alert_id} is {alert.status}; only open alerts take updates")
            alert = dataclasses.replace(alert, details={**alert.details, **details})
            return self._follow(alert, "update", officer_id, now)

    def close(self, alert_id: str, officer_id: str, outcome: str, now: _dt.datetime | None = None) -> Push:
        """The child is found (or the search ends): closure to exactly everyone notified."""
        now = check_aware(now, "now") if now is not None else _dt.datetime.now(_dt.timezone.utc)
        outcome = check_outcome(outcome)
        with self._lock:
            alert = self.alert(alert_id)
            self.authority.check_act(officer_id, alert.division, "close")
            if alert.status == "closed":
                if alert.outcome != outcome:
                    raise AlertStateError(
                        f"alert {alert_id} is already closed with outcome {alert.outcome!r}, not {outcome!r}")
                closure = [r for r in self.log.pushes(alert_id) if r.kind == "closure"]
                return self._to_push(closure[-1])
            if alert.status != "open":
                raise AlertStateError(f"alert {alert_id} is {alert.status}; only open alerts can be closed")
            alert = dataclasses.replace(alert, status="closed", outcome=outcome, closed_at=now,
                                        closed_by=officer_id)
            return self._follow(alert, "closure", officer_id, now)

    def retract(self, alert_id: str, officer_id: str, reason: str = "", now: _dt.datetime | None = None):
        """The report was erroneous or false.  Not an outcome; not counted in statistics."""
        now = check_aware(now, "now") if now is not None else _dt.datetime.now(_dt.timezone.utc)
        with self._lock:
            alert = self.alert(alert_id)
            self.authority.check_act(officer_id, alert.division, "retract")
            if alert.status not in ("pending", "open"):
                raise AlertStateError(f"alert {alert_id} is {alert.status}; it cannot be retracted")
            details = {**alert.details, "retraction_reason": str(reason)}
            alert = dataclasses.replace(alert, status="retracted", closed_at=now, closed_by=officer_id,
                                        details=details)
            if alert.next_seq == 0:
                self._save(alert, "retract", officer_id, now, {"reason": str(reason)})
                return None
            return self._follow(alert, "retraction", officer_id, now)

    def refresh(self, new_index, now: _dt.datetime) -> list[Push]:
        """Switch to a newer index generation and top up every open alert.

        The open alerts are re-targeted as a batch over ``workers`` threads (the
        kernels release the GIL).  Each alert gets one push: ``expand`` if its
        radius grew meanwhile (a full ring query), else ``topup``, with only
        devices never notified for it.

        When the new generation says which keys it changed since the current
        one (``store.changed_keys``), a top-up tests only those devices: a
        device whose record did not change was already inside or outside the
        same circle, and its age only grows, so it cannot be new to the ring.
        """
        now = check_aware(now, "now")
        if new_index.store.generation < self.index.store.generation or len(new_index.store) < len(self.index.store):
            raise InvalidInputError(
                f"new_index is generation {new_index.store.generation} with {len(new_index.store)} devices; "
                f"it must not be older than the current generation {self.index.store.generation}")
        with self._lock:
            store = new_index.store
            delta = None
            if (getattr(store, "changed_keys", None) is not None
                    and store.parent_generation == self.index.store.generation):
                delta = self._delta_points(new_index)
            self.index = new_index
            todo = []
            for alert in self._alerts.values():
                if alert.status != "open" or alert.next_seq == 0 or now < alert.missing_since:
                    continue
                radius = max(self._schedule_of(alert).radius_at(alert.missing_since, now), alert.radius_km)
                todo.append((alert, radius))

            # Top-ups against the changed devices: every open alert in one pass
            # over both cores, with each alert's notified devices skipped inside
            # the kernel, so only the devices new to an alert come out.
            topups = [ar for ar in todo if delta is not None and ar[1] <= ar[0].radius_km]
            fresh: dict[str, tuple[AbstractBitMap, float]] = {}
            if topups:
                t0 = time.perf_counter()
                skips = [_refresh_kernels.bitmap_ranges(self.log.notified(a.alert_id).serialize()) for a, _ in topups]
                skip_offsets = np.zeros(len(skips) + 1, dtype=np.int64)
                np.cumsum([len(x) for x in skips], out=skip_offsets[1:])
                circles = np.array([(a.lat, a.lon, r) for a, r in topups], dtype=np.float64)
                keys, offsets = _refresh_kernels.circles_new_points(
                    delta[0], delta[1], _DELTA_BLOCK, delta[2], delta[3], circles,
                    np.ascontiguousarray(np.concatenate(skips)), skip_offsets)
                cutoff = (epoch_seconds(now - self.max_location_age)
                          if self.max_location_age is not None else None)
                q_ms = (time.perf_counter() - t0) * 1e3 / len(topups)
                for c, (alert, _) in enumerate(topups):
                    k = keys[offsets[c]:offsets[c + 1]]
                    if cutoff is not None:
                        k = k[store.last_seen_s[k] >= cutoff]
                    fresh[alert.alert_id] = (Audience.from_keys(k, store).bitmap(), q_ms)

            def target(ar):
                alert, radius = ar
                t0 = time.perf_counter()
                aud = self._query(alert, radius, now, new_index)
                aud.bitmap()  # roaring build in the worker thread too
                return aud, (time.perf_counter() - t0) * 1e3

            rings = [ar for ar in todo if ar[0].alert_id not in fresh]
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                auds = dict(zip((a.alert_id for a, _ in rings), pool.map(target, rings)))
            out: list[Push] = []
            for alert, radius in todo:
                kind = "expand" if radius > alert.radius_km else "topup"
                current = self._alerts[alert.alert_id]
                if alert.alert_id in fresh:
                    new, q_ms = fresh[alert.alert_id]
                    out.extend(self._ring(current, kind, radius, now, new_index, query_ms=q_ms, new=new))
                else:
                    aud, q_ms = auds[alert.alert_id]
                    out.extend(self._ring(current, kind, radius, now, new_index, aud, q_ms))
            return out

    @staticmethod
    def _delta_points(index):
        """The devices a generation changed: unit vectors (keyed), block boxes, latitudes, longitudes.

        The index build keeps them (``index.delta_points``, ``index.delta_latlon``);
        otherwise they are computed from the store's coordinates.  Changed keys
        come in key order, which is spatial order within each ingest batch, so
        blocks of consecutive changed devices are compact and a circle skips
        most of them by their box.
        """
        store = index.store
        keys = np.ascontiguousarray(store.changed_keys, dtype=np.uint32)
        pts = getattr(index, "delta_points", None)
        ll = getattr(index, "delta_latlon", None)
        if pts is not None and ll is not None:
            pts, ll = populate(pts), populate(ll)   # read in place, from the page cache
        # a stale file (keys other than the store's) is recomputed, never trusted
        if (pts is None or ll is None or ll.shape != (2, keys.shape[0])
                or not _kernels.same_keys(pts, keys)):
            pts, ll = changed_device_points(store.lat, store.lon, keys)
        return pts, _refresh_kernels.block_bounds(pts, _DELTA_BLOCK), ll[0], ll[1]

    # -- reading ------------------------------------------------------------

    def pushes(self, alert_id: str) -> list[Push]:
        self.alert(alert_id)
        return [self._to_push(r) for r in self.log.pushes(alert_id)]

    def notified(self, alert_id: str) -> Audience:
        self.alert(alert_id)
        return self._audience(self.log.notified(alert_id))

    def stats(self, since=None, until=None, division=None) -> dict[str, Any]:
        """Published, found, not found, open, recovery rate, outcomes, pushes, devices reached."""
        if since is not None:
            since = check_aware(since, "since")
        if until is not None:
            until = check_aware(until, "until")
        records = [AlertRecord(alert_id=a.alert_id, division=a.division, published_at=a.published_at,
                               status=a.status, outcome=a.outcome, closed_at=a.closed_at,
                               pushes=a.pushes, devices_reached=a.reached)
                   for a in self._alerts.values()]
        return compute(records, since=since, until=until, division=division)

    def verify(self) -> None:
        """Check every logged push and the audit hash chain (CorruptFileError if not intact)."""
        self.log.verify()
