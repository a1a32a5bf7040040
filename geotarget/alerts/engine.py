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

Faults short of a crash
-----------------------
A push that was logged but not handed to the caller (the call that logged it
failed afterwards, or a later alert of the same ``tick`` failed) stays in an
in-process outbox and is offered by the next ``tick``.  ``tick`` and
``refresh`` never raise because of one alert: they return a :class:`TickResult`
(a list of pushes) whose ``errors`` name each failed alert.  A failure of the
environment (``OSError``: a full disk, an I/O error) leaves the alert as it was,
to be tried again on the next tick; any other failure is the alert's own
(a record no message can be made of) and quarantines it, with an audit entry,
until an officer updates or retracts it.  Healthy alerts keep being pushed.

Ids, clocks and officers
------------------------
Alert ids are ``GT-<division>-<date>-<log instance id>-<number>``: the number
comes from the log's persistent counter and the instance id is random per log,
so no id (and no CAP identifier, ``<alert id>.<seq>``) is handed out twice, by
this log or by another.  One engine owns a log at a time.  ``now`` may not run
backwards by more than :data:`CLOCK_TOLERANCE` against the latest time the log
has recorded; an approval may not precede its report, nor a closure the alert's
first push.  The officers registry is bound to the log by its digest: an engine
given a different registry is refused, and a change is an audited action of a
ministry-level officer (:func:`register_officers`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pyroaring import AbstractBitMap, BitMap

from .._text import check_details, check_text
from ..spatial.audience import Audience
from .authority import Authority
from .cap import render_push
from ..errors import (AlertStateError, CorruptFileError, GeotargetError, InvalidInputError, LeaseLostError,
                     LineageError, RateLimitError, UnauthorizedError, UnknownAlertError)
from ..geo import check_aware, check_int, check_point, epoch_seconds, haversine_km, iso_utc, now_or_clock
from .log import PushRecord, RecipientLog, check_wait
from .model import RING_KINDS, Alert, AlertStatus, Index, Push, PushKind
from .photos import Photo, PhotoStore, load_photo, photo_uri
from .schedule import RadiusSchedule
from .settings import Settings
from .signing import CapSigner
from .stats import check_outcome, compute

#: Kinds whose audience is new devices only (update, closure, retraction go to everyone notified).
DEFAULT_SENDER = "tuanyuan@mps.gov.cn"
#: How far ``now`` may lag the latest time the log recorded.  Hosts kept by NTP
#: agree within milliseconds; two minutes absorbs a badly synchronised dispatch
#: host, while a backdated report or closure (minutes to years) is refused.
CLOCK_TOLERANCE = _dt.timedelta(minutes=2)
#: Longest reason text of a retraction (it goes into the CAP description).
_REASON_MAX_CHARS = 1000


def officers_digest(authority: Authority) -> str:
    """SHA-256 of the registry's canonical JSON (officers sorted by id, and the policy)."""
    doc = authority.to_dict()
    doc["officers"] = sorted(doc["officers"], key=lambda o: o["officer_id"])
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def register_officers(log: RecipientLog, authority: Authority, officer_id: str,
                      now: _dt.datetime | None = None) -> str:
    """Register ``authority`` as the log's officers registry; returns its digest.

    The first registration of a log may be made by any ministry-level officer
    of the new registry; a change must be made by a ministry-level officer of
    the registry registered now, as ``authority`` alone cannot vouch for itself.
    Both are audited with the old and new digests.
    """
    if not isinstance(log, RecipientLog):
        raise InvalidInputError(f"log must be a RecipientLog, got {type(log).__name__}")
    if not isinstance(authority, Authority):
        raise InvalidInputError(f"authority must be an Authority, got {type(authority).__name__}")
    if not isinstance(officer_id, str) or not officer_id:
        raise InvalidInputError(f"officer_id must be a non-empty string, got {officer_id!r}")
    now = now_or_clock(now)
    new = officers_digest(authority)
    old = log.meta_value("officers_digest")
    if old is None:
        acting = authority.officer(officer_id)
    else:
        current = log.meta_value("officers")
        acting = Authority.from_dict(json.loads(current)).officer(officer_id) if current else None
        if acting is None:
            raise UnauthorizedError("the log's registered officers are unknown; cannot authorise a change")
    if acting.level != "ministry":
        raise UnauthorizedError(f"officer {acting.officer_id} ({acting.level}) may not change the officers "
                                f"registry; only a ministry-level officer may")
    if new == old:
        return new
    with log.transaction():
        log.set_meta_value("officers_digest", new)
        log.set_meta_value("officers", json.dumps(authority.to_dict(), sort_keys=True, ensure_ascii=False))
        log.audit("officers-register" if old is None else "officers-change", actor=acting.officer_id,
                  at=now, count=len(authority), detail={"old_digest": old, "new_digest": new})
    return new


def record_outputs(log: RecipientLog, push_id: str, files, actor: str = "cli") -> None:
    """Note in the log's audit that files holding a push's recipients were written, so that
    retention can remove them with the log's own copy of the audience."""
    files = [str(f) for f in files]
    rec = log.push(push_id)
    log.audit("output", actor=actor, alert_id=rec.alert_id, count=rec.count,
              detail={"push_id": push_id, "files": files})


def default_photo_dir(log: RecipientLog):
    """Where an engine keeps photos unless the settings name a ``[photos] dir``: next to the log."""
    return str(log.path) + ".photos"


def purge_expired(log: RecipientLog, retention_days: float, now: _dt.datetime | None = None,
                  actor: str = "retention", photo_dir=None) -> dict:
    """Apply the retention setting: for every alert closed or retracted more than
    ``retention_days`` ago, drop its logged audiences and delete every output file
    recorded for it (:func:`record_outputs`) and its photos (in ``photo_dir``,
    default :func:`default_photo_dir`; a photo another alert still within
    retention also carries is kept).  All are audited.

    An alert with unacknowledged pushes is kept (its audiences are still owed to a
    dispatcher) and listed under ``waiting``.  Returns ``{"purged": {alert_id:
    audiences dropped}, "files": [deleted paths], "waiting": [alert ids]}``.
    """
    if (isinstance(retention_days, bool) or not isinstance(retention_days, (int, float))
            or not retention_days >= 0 or retention_days == float("inf")):
        raise InvalidInputError(f"retention_days must be a finite number of days >= 0, got {retention_days!r}")
    now = now_or_clock(now)
    cutoff = now - _dt.timedelta(days=retention_days)
    photos = PhotoStore(default_photo_dir(log) if photo_dir is None else photo_dir)
    result: dict[str, Any] = {"purged": {}, "files": [], "waiting": []}
    records = log.alerts()

    def expired(rec) -> bool:
        closed = rec.get("closed_at")
        closed_at = _dt.datetime.fromisoformat(closed) if closed is not None else None
        return (rec.get("status") in (AlertStatus.CLOSED, AlertStatus.RETRACTED)
                and closed_at is not None and closed_at <= cutoff)
    def photos_of(rec) -> list:   # the current ones and those an update replaced (earlier CAPs show them)
        return list(rec.get("photos", [])) + list(rec.get("photos_before", []))
    kept = {p.get("digest") for rec in records.values() if not expired(rec) for p in photos_of(rec)}
    for alert_id, rec in records.items():
        if not expired(rec):
            continue
        pushes = log.pushes(alert_id, audiences=False)
        if any(not p.acked for p in pushes):
            result["waiting"].append(alert_id)
            continue
        if pushes and not all(p.purged for p in pushes):
            result["purged"][alert_id] = log.purge_audiences(alert_id, actor=actor)
        files = [f for e in log.audit_entries(alert_id) if e["action"] == "output"
                 for f in (e["detail"] or {}).get("files", [])]
        gone = []
        for f in files:
            try:
                os.unlink(f)
                gone.append(f)
            except FileNotFoundError:
                pass
        if gone:
            log.audit("purge_outputs", actor=actor, alert_id=alert_id, count=len(gone), at=now,
                      detail={"files": gone})
            result["files"].extend(gone)
        gone = []
        for i, d in enumerate(photos_of(rec)):
            photo = Photo.from_dict(d, f"alert {alert_id} photos[{i}]")
            if photo.digest not in kept and photos.delete(photo):
                gone.append(str(photos.path(photo)))
        if gone:
            log.audit("purge_photos", actor=actor, alert_id=alert_id, count=len(gone), at=now,
                      detail={"files": gone})
            result["files"].extend(gone)
    return result


@dataclasses.dataclass(frozen=True)
class AlertFailure:
    """One alert that ``tick`` or ``refresh`` could not push."""

    alert_id: str
    error: str                 # the exception's type and message
    quarantined: bool          # False: an environment fault (OSError); retried next tick
    exception: BaseException = dataclasses.field(compare=False, repr=False)


class TickResult(list):
    """The pushes of a ``tick`` or ``refresh`` (a list) and ``errors``: the alerts that failed."""

    def __init__(self, pushes=(), errors=()):
        super().__init__(pushes)
        self.errors: list[AlertFailure] = list(errors)
        #: True when ``now`` lagged the log's clock, so only the outbox was offered.
        self.stale = False
        #: What retention removed (see :func:`purge_expired`), when the engine has a retention setting.
        self.purged: dict | None = None

    def __repr__(self) -> str:
        return f"TickResult({list.__repr__(self)}, errors={self.errors!r})"


#: Detail keys that become CAP text; every other detail goes out as a CAP <parameter>.
_TEXT_DETAILS = ("headline", "description", "instruction", "area", "retraction_reason", "translations")


def _cap_texts(kind: str, details: dict, languages: tuple[str, ...] = ("zh-CN",)) -> dict:
    """The CAP text of a push of ``kind`` from the alert's details.

    Rings and updates carry the alert's description and instruction ("look
    out, call 110").  A closure or a retraction must not repeat them: CAP
    writes what happened and what to do now, and a retraction carries its
    reason.  Details without a text field of their own (age, clothing, ...)
    reach receivers as ``<parameter>`` pairs, named after the detail.

    The first of ``languages`` carries the officer's own text; each further
    language gets an ``<info>`` of its own, with the texts given under
    ``details["translations"][language]`` (the same field names) where there
    are any, and geotarget's own wording otherwise.
    """
    texts = {"headline": str(details.get("headline", "")), "area_desc": str(details.get("area", "")),
             "language": languages[0]}
    if kind == PushKind.RETRACTION:
        texts["description"] = str(details.get("retraction_reason", ""))
    elif kind != PushKind.CLOSURE:
        texts["description"] = str(details.get("description", ""))
        texts["instruction"] = str(details.get("instruction", ""))
    params = {}
    for key, value in details.items():
        if key in _TEXT_DETAILS or value is None:
            continue
        name = f"detail_{key}" if key in ("kind", "outcome") else str(key)
        params[name] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                                       sort_keys=True)
    texts["parameters"] = params
    given = details.get("translations") or {}
    if not isinstance(given, dict) or not all(isinstance(t, dict) for t in given.values()):
        raise ValueError("translations must map a language tag to a dict of texts")
    translations = {}
    for lang in languages[1:]:
        t = given.get(lang, {})
        unknown = set(t) - {"headline", "description", "instruction", "area"}
        if unknown:
            raise ValueError(f"translations[{lang!r}] has unknown field(s) {sorted(unknown)}")
        keep = ("headline", "area") if kind in (PushKind.CLOSURE, PushKind.RETRACTION) else (
            "headline", "description", "instruction", "area")
        translations[lang] = {("area_desc" if k == "area" else k): t[k] for k in keep if k in t}
    texts["translations"] = translations
    return texts


_HOUR = _dt.timedelta(hours=1)


def _person_name(details: dict) -> str | None:
    """The missing person's name, normalised for comparison (None: no name given)."""
    name = details.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    return " ".join(name.split()).casefold()


#: At most this many photos per report.
_MAX_PHOTOS = 10

#: How long receivers keep showing a closure, a retraction or an update sent after expiry.
_FOLLOW_UP_VALIDITY = _dt.timedelta(hours=24)


def _valid_details(details: dict) -> dict:
    out = {}
    for k, v in details.items():
        try:
            out.update(check_details({k: v}))
        except InvalidInputError:
            pass
    return out


def _check_index(index, name: str) -> None:
    if not isinstance(index, Index):
        raise InvalidInputError(f"{name} must be a SpatialIndex or a ShardedIndex (a geotarget.alerts.model.Index), "
                                f"got {type(index).__name__}")


def _check_schedule(schedule) -> None:
    if schedule is not None and not isinstance(schedule, RadiusSchedule):
        raise InvalidInputError(f"schedule must be a RadiusSchedule, got {type(schedule).__name__} "
                                f"{schedule!r}")


class AlertEngine:
    """The alert lifecycle.  Thread-safe: dispatchers may call ``tick``/``ack`` concurrently."""

    def __init__(self, index, log: RecipientLog, authority: Authority,
                 schedule: RadiusSchedule | None = None, *, sender: str | None = None,
                 max_location_age: _dt.timedelta | None = None, workers: int = 2,
                 retention_days: float | None = None, signer: CapSigner | None = None,
                 settings: Settings | None = None, metrics=None):
        _check_index(index, "index")
        if metrics is not None:
            # imported only here: an engine without metrics needs no prometheus-client
            from .metrics import EngineMetrics
            if not isinstance(metrics, EngineMetrics):
                raise InvalidInputError(f"metrics must be a geotarget.alerts.metrics.EngineMetrics or None, got "
                                        f"{type(metrics).__name__}")
        #: Prometheus series of this engine (:mod:`geotarget.alerts.metrics`), or None.
        self.metrics = metrics
        if retention_days is not None and (isinstance(retention_days, bool)
                                           or not isinstance(retention_days, (int, float))
                                           or not 0 <= retention_days < float("inf")):
            raise InvalidInputError(f"retention_days must be None or a finite number of days >= 0, "
                                    f"got {retention_days!r}")
        #: Days after closure that recipients are kept; each tick purges older ones.
        self.retention_days = retention_days
        if not isinstance(log, RecipientLog):
            raise InvalidInputError(f"log must be a RecipientLog, got {type(log).__name__}")
        if not isinstance(authority, Authority):
            raise InvalidInputError(f"authority must be an Authority, got {type(authority).__name__}")
        _check_schedule(schedule)
        if settings is not None and not isinstance(settings, Settings):
            raise InvalidInputError(f"settings must be a Settings or None, got {type(settings).__name__}")
        # Case types (CAP event, schedule, expiry) and the sender come from the settings.
        self.settings = settings if settings is not None else Settings.default()
        if sender is None:
            sender = self.settings.sender
        if not isinstance(sender, str) or not sender:
            raise InvalidInputError(f"sender must be a non-empty string, got {sender!r}")
        check_text(sender, "sender", 200, False)
        if signer is not None and not isinstance(signer, CapSigner):
            raise InvalidInputError(f"signer must be a CapSigner or None, got {type(signer).__name__}")
        # Every CAP message is signed when a signer is set (docs/design.md, "Signed CAP").
        self.signer = signer
        if max_location_age is not None and not isinstance(max_location_age, _dt.timedelta):
            raise InvalidInputError(f"max_location_age must be a datetime.timedelta, got "
                                    f"{type(max_location_age).__name__}")
        if max_location_age is not None and max_location_age <= _dt.timedelta(0):
            raise InvalidInputError(f"max_location_age must be positive, got {max_location_age}")
        workers = check_int(workers, "workers", 1)
        if len(authority):
            registered = log.meta_value("officers_digest")
            digest = officers_digest(authority)
            if registered is not None and registered != digest:
                raise UnauthorizedError(
                    f"authority: this officers registry (digest {digest[:16]}) is not the one registered "
                    f"in {log.path} ({registered[:16]}); a change is made by a ministry-level officer "
                    f"(geotarget officers register)")
        self.index = index
        self.log = log
        self.authority = authority
        #: Photos of the missing people, content-addressed (docs/operations.md, "Photos").
        self.photos = PhotoStore(self.settings.photo_dir or default_photo_dir(log))
        #: An engine-wide schedule overrides the case types' own (None: each case type's).
        self.schedule = schedule
        self.sender = sender
        self.max_location_age = max_location_age
        self.workers = int(workers)
        self._lock = threading.RLock()
        self._load_state()
        log.claim(self)
        if log.leader and len(authority) and log.meta_value("officers_digest") is None:
            self._register_first(authority)

    def _load_state(self) -> None:
        """Read the alerts, the clock and the outbox from the log (at start, and on taking over)."""
        log = self.log
        with self._counted("log"):   # the log's own records; _bind labels the index's refusals
            self._bind(self.index)
            self._alerts: dict[str, Alert] = {a: Alert.from_record(r) for a, r in log.alerts().items()}
            clock = log.meta_value("clock")
            self._clock = _dt.datetime.fromisoformat(clock) if clock is not None else None
            # Outbox: pushes logged by an earlier process (or the leader before this
            # one) and never acknowledged are offered again on this one's first tick.
            self._replay: list[PushRecord] | None = log.unacked() if log.leader else None
        if self.metrics is not None:
            self.metrics.outbox.set(len(self._replay or ()))
            self._observe_quarantine()
        # ... and pushes logged by this one but never handed to a caller.
        self._stranded: dict[str, PushRecord] = {}

    # -- leadership (several engines on one PostgreSQL log) --------------------

    @property
    def leader(self) -> bool:
        """Whether this engine may act: always on a SQLite log; on PostgreSQL while its log holds
        the lease (docs/design.md, "Several engines, one log")."""
        return self.log.leader

    def take_over(self, timeout: float | None = None, *, poll: float = 0.2) -> bool:
        """A standby engine waits to lead (:meth:`RecipientLog.take_lease`); True once it does.

        On taking over it reads the alerts and the clock afresh, and its first
        :meth:`tick` offers every push the log holds unacknowledged, under the
        push id it was logged with.
        """
        check_wait(timeout, poll)
        with self._lock:
            if self.log.leader:
                return True
            if not self.log.take_lease(timeout, poll=poll):
                return False
            self._load_state()
            if len(self.authority) and self.log.meta_value("officers_digest") is None:
                self._register_first(self.authority)
            return True

    def step_down(self) -> None:
        """Give the lease up: another engine may take over (a planned failover)."""
        with self._lock:
            self.log.step_down()

    @contextlib.contextmanager
    def _leading(self):
        """Hold the engine's lock, as the leader; a standby's action is a :class:`LeaseLostError`."""
        with self._lock:
            if not self.log.leader:
                raise LeaseLostError(f"{self.log.path}: this engine is a standby (it does not hold the "
                                     f"log's lease); only the leader acts: take_over() first")
            yield

    def _follow_log(self) -> None:
        """A standby answers reads from the log as the leader last committed it."""
        if not self.log.leader:
            with self._lock, self._counted("log"):
                self._alerts = {a: Alert.from_record(r) for a, r in self.log.alerts().items()}

    def _register_first(self, authority: Authority) -> None:
        """A log's first registry is the one its first engine brings, recorded and audited."""
        digest = officers_digest(authority)
        with self.log.transaction():
            self.log.set_meta_value("officers_digest", digest)
            self.log.set_meta_value("officers", json.dumps(authority.to_dict(), sort_keys=True,
                                                           ensure_ascii=False))
            self.log.audit("officers-register", actor="engine", count=len(authority),
                           detail={"old_digest": None, "new_digest": digest})

    def shutdown(self) -> None:
        """Let go of the log and close it; the engine cannot be used afterwards."""
        with self._lock:
            self.log.release(self)
            self.log.close()

    # -- integrity ------------------------------------------------------------

    @contextlib.contextmanager
    def _counted(self, check: str):
        """A refusal by an integrity check inside is counted in the metrics (once), then raised."""
        try:
            yield
        except (CorruptFileError, LineageError) as exc:
            if self.metrics is not None:
                self.metrics.verification_failed(exc, check)
            raise

    def _refused(self, exc: GeotargetError, check: str) -> GeotargetError:
        """``exc``, counted as a verification failure; the caller raises it."""
        if self.metrics is not None:
            self.metrics.verification_failed(exc, check)
        return exc

    def _observe_quarantine(self) -> None:
        """Set the quarantine gauge; called where a quarantine is set or lifted (not per save)."""
        if self.metrics is not None:
            self.metrics.quarantined.set(sum(1 for a in self._alerts.values()
                                             if a.quarantine is not None and a.status == AlertStatus.OPEN))

    def _bind(self, index) -> None:
        """Refuse an index the log's keys do not mean, then verify its bytes (before any push).

        The log records the lineage at its first push and the generation of
        every push: an index of another lineage maps the logged keys to other
        devices, and one older than a generation already used lacks devices
        (or moves) the log relies on.
        """
        store = index.store
        lineage = self.log.lineage()
        if lineage is not None and store.lineage != lineage:
            raise self._refused(LineageError(
                f"index: its store is of lineage {store.lineage}, but the recipient log {self.log.path} "
                f"was written against lineage {lineage}; its device keys would name other devices"), "index")
        newest = self.log.max_generation()
        if newest is not None and store.generation < newest:
            raise self._refused(LineageError(
                f"index: its store is generation {store.generation}, older than generation {newest} that "
                f"the recipient log {self.log.path} already used"), "index")
        # an index without verify() of its own (the sharded one) still resolves keys through its store
        with self._counted("index"):
            getattr(index, "verify", store.verify)()

    def _check_keys(self, bm, what: str) -> None:
        """Keys read from the log must lie inside the store: no kernel ever sees one that does not."""
        n = len(self.index.store)
        if len(bm) and bm.max() >= n:
            raise self._refused(CorruptFileError(
                f"{what}: holds device key {bm.max()} but the store has {n} devices; the log and the "
                f"index are not of one store"), "log")

    def _check_chain(self, alert: Alert) -> AbstractBitMap:
        """The devices notified for ``alert``, after checking the log still holds its whole history.

        An update, closure or retraction goes to the union of the logged
        rings: a ring row lost from the log would silently shrink it.  So the
        alert's pushes must be exactly seq 0 .. next_seq - 1 and their rings
        must add up to the ``reached`` count the alert record (checksummed
        apart from the pushes) holds.
        """
        recs = self.log.pushes(alert.alert_id, audiences=False)
        seqs = [r.seq for r in recs]
        where = f"alert {alert.alert_id} in {self.log.path}"
        if seqs != list(range(alert.next_seq)):
            raise CorruptFileError(f"{where}: the log holds pushes with seq {seqs}, but the alert made "
                                   f"{alert.next_seq}; a push row is missing or foreign, nothing was sent")
        ring = sum(r.count for r in recs if r.kind in RING_KINDS)
        notified = self.log.notified(alert.alert_id, frozen=True)
        if ring != alert.reached or len(notified) != alert.reached:
            raise CorruptFileError(f"{where}: the logged rings hold {len(notified)} devices ({ring} "
                                   f"counted), the alert record says {alert.reached}; nothing was sent")
        self._check_keys(notified, where)
        return notified

    # -- helpers ------------------------------------------------------------

    def alert(self, alert_id: str) -> Alert:
        if not isinstance(alert_id, str):
            raise InvalidInputError(f"alert_id must be a string, got {type(alert_id).__name__}")
        self._follow_log()
        try:
            return self._alerts[alert_id]
        except KeyError:
            raise UnknownAlertError(f"unknown alert {alert_id!r}") from None

    def alerts(self) -> list[Alert]:
        self._follow_log()
        return list(self._alerts.values())

    def _schedule_of(self, alert: Alert) -> RadiusSchedule:
        return RadiusSchedule.from_dict(alert.schedule)

    def _audience(self, bm) -> Audience:
        self._check_keys(bm, f"an audience of {self.log.path}")
        return Audience(store=self.index.store, bitmap=bm)

    def _to_push(self, rec: PushRecord, timings: dict | None = None) -> Push:
        return Push(rec.alert_id, rec.seq, rec.kind, rec.radius_km, rec.push_id,
                    self._audience(rec.audience), rec.meta.get("cap_xml", ""), rec.created_at,
                    timings or {}, drill=bool(rec.meta.get("drill", False)),
                    as_if_real=rec.meta.get("as_if_real"))

    def _query(self, alert: Alert, radius: float, now: _dt.datetime, index=None) -> Audience:
        idx = index or self.index
        seen = now - self.max_location_age if self.max_location_age is not None else None
        if alert.division_wide:
            return idx.within_polygon(self.authority.area(alert.division), seen_since=seen)
        return idx.within(alert.lat, alert.lon, radius, seen_since=seen)

    def place(self, alert_id: str) -> str:
        """The names of an alert's division, e.g. ``浙江省 杭州市 上城区 (330102)``: what an approver is shown."""
        return self.authority.place(self.alert(alert_id).division)

    def _references(self, alert: Alert):
        return [(self.sender, r.push_id, r.created_at)
                for r in self.log.pushes(alert.alert_id, audiences=False)]

    def _emit(self, alert: Alert, kind: str, radius: float, audience, now: _dt.datetime,
              actor: str, extra: dict | None = None, query_ms: float | None = None) -> Push:
        """Log the push (with the alert's new state and an audit entry) durably, then return it."""
        t0 = time.perf_counter()
        bm = audience.bitmap() if isinstance(audience, Audience) else audience
        drill_meta = {}
        if alert.drill:
            drill_meta = {"drill": True}
            if kind in RING_KINDS:
                # counted as if real, sent only to the test devices
                drill_meta["as_if_real"] = len(bm)
                bm = bm & self._drill_keys()
        seq = alert.next_seq
        push_id = f"{alert.alert_id}.{seq}"
        details = alert.details
        case = self.settings.case(alert.case_type)
        cap_xml = render_push(
            identifier=push_id, sender=self.sender, sent=now, kind=kind, lat=alert.lat, lon=alert.lon,
            radius_km=radius, references=self._references(alert) if seq else (),
            outcome=alert.outcome if kind == PushKind.CLOSURE else None, signer=self.signer,
            event=case.event, event_code=case.event_code, expires=self._cap_expires(alert, kind, now),
            sender_name=self.settings.sender_name, status="Exercise" if alert.drill else "Actual",
            geocode=alert.division, circle=not alert.division_wide, resources=self._resources(alert),
            **{**_cap_texts(kind, details, self.settings.languages), "area_desc": self._area_desc(alert)})
        updated = dataclasses.replace(alert, next_seq=seq + 1, pushes=alert.pushes + 1)
        if kind in RING_KINDS:
            updated.radius_km = radius
            updated.reached = alert.reached + len(bm)
        meta = {"cap_xml": cap_xml, "actor": actor, **drill_meta}
        if extra:
            meta.update(extra)
        store = self.index.store
        with self.log.transaction():
            self.log.bind_lineage(store.lineage)
            rec = self.log.append_push(push_id=push_id, alert_id=alert.alert_id, seq=seq, kind=kind,
                                       radius_km=radius, created_at=now, audience=bm, meta=meta,
                                       generation=store.generation)
            self.log.save_alert(alert.alert_id, updated.to_record())
            self.log.audit(kind, actor=actor, alert_id=alert.alert_id, radius_km=radius,
                           count=len(bm), at=now, detail={"push_id": push_id})
            self._advance_clock(now)
        self._alerts[alert.alert_id] = updated
        self._settle_clock(now)
        timings = {"log_ms": (time.perf_counter() - t0) * 1e3}
        if query_ms is not None:
            timings["query_ms"] = query_ms
        # Logged: from here on the push is offered until a caller has it.
        self._stranded[rec.push_id] = rec
        push = self._to_push(rec, timings)
        if self.metrics is not None:
            self.metrics.observe_push(push)
        return push

    def _resources(self, alert: Alert) -> list[dict]:
        """The alert's photos as CAP resources, each read back and checked against its digest."""
        out = []
        zh = self.settings.languages[0].lower().startswith("zh")
        for i, d in enumerate(alert.photos):
            photo = Photo.from_dict(d, f"alert {alert.alert_id} photos[{i}]")
            self.photos.read(photo)          # CorruptFileError unless the bytes match the digest
            desc = photo.desc or (f"失踪者照片 {i + 1}" if zh else f"Photo {i + 1} of the missing person")
            out.append({"desc": desc, "mime_type": photo.mime_type, "size": photo.size,
                        "uri": photo_uri(self.settings.photo_base_uri, photo), "digest": photo.digest})
        return out

    def _area_desc(self, alert: Alert) -> str:
        # the division by its names, then the officer's own words for the area
        names = self.authority.names(alert.division)
        extra = str(alert.details.get("area", ""))
        return " ".join(x for x in (names, extra) if x)

    def _offer_stranded(self, out: TickResult) -> None:
        """Add the in-process outbox to ``out`` (each push once)."""
        offered = {p.push_id for p in out}
        for rec in list(self._stranded.values()):
            if rec.push_id in offered:
                continue
            try:
                out.append(self._to_push(rec))
            except Exception as exc:  # noqa: BLE001 - stays in the outbox for the next tick
                out.errors.append(AlertFailure(rec.alert_id, f"{type(exc).__name__}: {exc}", False, exc))

    def _deliver(self, pushes):
        """``pushes`` reach the caller: they leave the in-process outbox."""
        for p in pushes:
            self._stranded.pop(p.push_id, None)
        return pushes

    # -- the clock ------------------------------------------------------------

    def _check_clock(self, now: _dt.datetime) -> None:
        if self._clock is not None and now < self._clock - CLOCK_TOLERANCE:
            raise InvalidInputError(
                f"now={now.isoformat()} is {self._clock - now} before the latest time this log "
                f"recorded ({self._clock.isoformat()}); time may not run backwards by more than "
                f"{CLOCK_TOLERANCE}")

    def _advance_clock(self, now: _dt.datetime) -> None:
        """Inside the action's transaction: the log's clock becomes ``now`` if that is later."""
        if self._clock is None or now > self._clock:
            self.log.set_meta_value("clock", now.astimezone(_dt.timezone.utc).isoformat())

    def _settle_clock(self, now: _dt.datetime) -> None:
        if self._clock is None or now > self._clock:
            self._clock = now

    def _save(self, alert: Alert, action: str, actor: str, now: _dt.datetime, detail: dict | None = None,
              new: bool = False):
        with self.log.transaction():
            self.log.save_alert(alert.alert_id, alert.to_record(), new=new)
            self.log.audit(action, actor=actor, alert_id=alert.alert_id, radius_km=alert.radius_km or None,
                           count=alert.reached, at=now, detail=detail)
            self._advance_clock(now)
        self._alerts[alert.alert_id] = alert
        self._settle_clock(now)

    @staticmethod
    def _cap_expires(alert: Alert, kind: str, now: _dt.datetime) -> _dt.datetime:
        """CAP <expires>: the alert's expiry while it runs; a day after the message otherwise.

        A closure, a retraction or an update sent after the alert expired stays
        on receivers' screens for a day (:data:`_FOLLOW_UP_VALIDITY`).
        """
        if (kind in RING_KINDS + (PushKind.UPDATE,) and alert.expires_at is not None
                and alert.expires_at > now):
            return alert.expires_at
        return now + _FOLLOW_UP_VALIDITY

    def _expire_if_due(self, alert: Alert, now: _dt.datetime) -> bool:
        """True if ``alert`` has expired at ``now``; the first time, the expiry is audited."""
        if not alert.expired(now):
            return False
        if alert.expired_at is None:
            self._save(dataclasses.replace(alert, expired_at=now), "expire", "engine", now,
                       {"expires_at": iso_utc(alert.expires_at)})
        return True

    def _drill_keys(self) -> BitMap:
        """Keys of the settings' test devices in the current store (unknown ids reach nobody)."""
        ids = np.asarray(self.settings.drill_devices, dtype=np.uint64)
        keys = self.index.store.lookup(ids) if ids.size else np.empty(0, dtype=np.int64)
        return BitMap(keys[keys >= 0].astype(np.uint32))

    # -- lifecycle ------------------------------------------------------------

    def report(self, officer_id: str, *, lat: float, lon: float, missing_since: _dt.datetime,
               division: str, details: dict | None = None, now: _dt.datetime | None = None,
               schedule: RadiusSchedule | None = None, case_type: str = "child",
               drill: bool = False, division_wide: bool = False, photos=None) -> Alert:
        """Register a missing person.  Published at once unless policy requires approval.

        The point must lie in ``division`` (within the authority's tolerance).
        ``division_wide=True`` targets the whole division's polygon instead of
        a circle growing by the schedule, like a statewide AMBER alert: one
        ``alert`` push, then top-ups on refresh; its pushes carry radius 0.

        ``case_type`` (``child``, ``elderly``, ``other`` or one the settings add)
        chooses the CAP event, the radius schedule and the expiry.

        ``photos`` is a list of photos of the person, each a file path or a
        ``(bytes, mime_type[, description])`` tuple: JPEG, PNG or WebP (the
        bytes must be one), at most the settings' ``[photos] max_bytes``.
        They are kept in :attr:`photos` and every push's CAP carries each as
        a ``<resource>`` (description, MIME type, size, uri, SHA-1 digest).

        ``drill=True`` runs an exercise: the id starts with ``DRILL-``, every CAP
        message has status ``Exercise`` and says so in its headline, rings go
        only to the settings' test devices (or to nobody) while their counts
        are computed as if real, and statistics never count it.

        A report over the settings' rate limits raises :class:`RateLimitError`
        and logs nothing.  A report close in place and time to a pending or
        open alert about a person of the same name is ``held`` and linked to
        it (``duplicate_of``) until an officer calls :meth:`confirm_distinct`
        or :meth:`confirm_duplicate`; it is never pushed before that.
        """
        now = now_or_clock(now)
        missing_since = check_aware(missing_since, "missing_since")
        if missing_since > now:
            raise InvalidInputError(
                f"missing_since={missing_since.isoformat()} is in the future (now={now.isoformat()})")
        clat, clon = check_point(lat, lon)
        details = check_details(details if details is not None else {})
        _check_schedule(schedule)
        if not isinstance(division, str):
            raise InvalidInputError(f"division must be a 6-digit string, got {type(division).__name__}")
        case = self.settings.case(case_type)
        self._check_cap_texts(details, clat, clon, now)
        if not isinstance(drill, bool):
            raise InvalidInputError(f"drill must be True or False, got {drill!r}")
        if not isinstance(division_wide, bool):
            raise InvalidInputError(f"division_wide={division_wide!r} must be True or False")
        loaded = self._load_photos([] if photos is None else photos)
        with self._leading():
            self._check_clock(now)
            officer = self.authority.check_report(officer_id, division, clat, clon)
            self._check_rate(officer.officer_id, division, now)
            # stored before the alert is logged: a logged alert never lacks its photos
            kept = [self.photos.put(data, mime, desc).to_dict() for data, mime, desc in loaded]
            sched = schedule or self.schedule or case.schedule
            with self.log.transaction():
                # The log's counter only grows and its instance id is random:
                # an id is never handed out twice, by this log or another.
                number = self.log.next_alert_number()
                alert_id = f"GT-{division}-{now:%Y%m%d}-{self.log.instance_id}-{number:06d}"
                if drill:
                    alert_id = "DRILL-" + alert_id
                alert = Alert(alert_id=alert_id, reporter=officer.officer_id, division=division, lat=clat,
                              lon=clon, missing_since=missing_since, reported_at=now, details=details,
                              schedule=sched.to_dict(), case_type=case.name, drill=drill,
                              division_wide=division_wide, photos=kept)
                twin = None if drill else self._possible_duplicate(alert)
                if twin is not None:
                    alert.status = AlertStatus.HELD.value
                    alert.duplicate_of = twin.alert_id
                elif not self.authority.needs_approval(officer):
                    alert.status = AlertStatus.OPEN.value
                    alert.published_at = now
                    alert.expires_at = now + case.expiry
                self._save(alert, "report", officer.officer_id, now,
                           {"lat": clat, "lon": clon, "division": division, "status": alert.status,
                            "missing_since": iso_utc(missing_since), "case_type": case.name,
                            "expires_at": iso_utc(alert.expires_at), "drill": drill,
                            "duplicate_of": alert.duplicate_of, "place": self.authority.place(division),
                            "division_wide": division_wide,
                            "photos": [p["digest"] for p in kept]}, new=True)
            return alert

    def _check_cap_texts(self, details: dict, lat: float, lon: float, now: _dt.datetime) -> None:
        """Render the texts once, as a ring and as a retraction would be, before anything is saved.

        Text that CAP cannot carry is refused at the door (InvalidInputError)
        instead of failing every later tick of the alert.
        """
        for kind in ("alert", "retraction"):
            try:
                texts = _cap_texts(kind, details, self.settings.languages)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"details cannot be written into CAP: {exc}") from None
            render_push(identifier="check", sender=self.sender, sent=now, kind=kind, lat=lat, lon=lon,
                        radius_km=1.0, **texts)

    def _check_rate(self, officer_id: str, division: str, now: _dt.datetime) -> None:
        """Refuse a report over the per-officer or per-division limit of any sliding hour."""
        lim = self.settings.limits
        hour = [a for a in self._alerts.values() if now - _HOUR < a.reported_at <= now]
        for limit, mine, what in ((lim.per_officer_per_hour, lambda a: a.reporter == officer_id,
                                   f"officer {officer_id}"),
                                  (lim.per_division_per_hour, lambda a: a.division == division,
                                   f"division {division}")):
            if limit and sum(1 for a in hour if mine(a)) >= limit:
                raise RateLimitError(f"{what} has reported {limit} alerts in the last hour, the "
                                     f"limit of the settings ([limits]); the report was not logged")

    def _possible_duplicate(self, new: Alert) -> Alert | None:
        """A pending or open alert of the same case type about a person of the same name, nearby."""
        window = self.settings.duplicate_window
        name = _person_name(new.details)
        if not window or name is None:
            return None
        for a in self._alerts.values():
            if (a.status in (AlertStatus.PENDING, AlertStatus.OPEN) and not a.drill
                    and a.case_type == new.case_type
                    and _person_name(a.details) == name
                    and abs(a.missing_since - new.missing_since) <= window
                    and float(haversine_km(a.lat, a.lon, new.lat, new.lon)) <= self.settings.duplicate_km):
                return a
        return None

    def confirm_distinct(self, alert_id: str, officer_id: str, now: _dt.datetime | None = None) -> Alert:
        """A held report is another person after all: it goes on as any report would."""
        now = now_or_clock(now)
        with self._leading():
            self._check_clock(now)
            alert = self._held(alert_id, officer_id)
            updated = dataclasses.replace(alert, status=AlertStatus.PENDING.value)
            if not self.authority.needs_approval(alert.reporter):
                case = self.settings.case(alert.case_type)
                updated = dataclasses.replace(updated, status=AlertStatus.OPEN.value, published_at=now,
                                              expires_at=now + case.expiry)
            self._save(updated, "confirm-distinct", officer_id, now,
                       {"duplicate_of": alert.duplicate_of, "status": updated.status})
            return updated

    def confirm_duplicate(self, alert_id: str, officer_id: str, now: _dt.datetime | None = None) -> Alert:
        """A held report is the same person as the alert it is linked to: it is merged, never pushed."""
        now = now_or_clock(now)
        with self._leading():
            self._check_clock(now)
            alert = self._held(alert_id, officer_id)
            updated = dataclasses.replace(alert, status=AlertStatus.MERGED.value, closed_at=now,
                                          closed_by=officer_id)
            self._save(updated, "confirm-duplicate", officer_id, now, {"duplicate_of": alert.duplicate_of})
            return updated

    def _held(self, alert_id: str, officer_id: str) -> Alert:
        alert = self.alert(alert_id)
        self.authority.check_act(officer_id, alert.division, "confirm")
        if alert.status != AlertStatus.HELD:
            raise AlertStateError(f"alert {alert_id} is {alert.status}, not held as a possible duplicate")
        return alert

    def approve(self, alert_id: str, officer_id: str, now: _dt.datetime | None = None) -> Alert:
        now = now_or_clock(now)
        with self._leading():
            alert = self.alert(alert_id)
            self._check_clock(now)
            if alert.status != AlertStatus.PENDING:
                raise AlertStateError(f"alert {alert_id} is {alert.status}, not pending approval")
            officer = self.authority.check_approve(officer_id, alert.reporter, alert.division)
            if now < alert.reported_at:
                raise InvalidInputError(f"now={now.isoformat()}: an approval may not precede its report "
                                        f"({alert.reported_at.isoformat()})")
            updated = dataclasses.replace(alert, status=AlertStatus.OPEN.value, published_at=now,
                                          approved_by=officer.officer_id,
                                          expires_at=now + self.settings.case(alert.case_type).expiry)
            self._save(updated, "approve", officer.officer_id, now,
                       {"place": self.authority.place(alert.division)})
            return updated

    def renew(self, alert_id: str, officer_id: str, now: _dt.datetime | None = None,
              hours: float | None = None) -> Alert:
        """Extend an open alert's expiry to ``now + hours`` (default: its case type's expiry).

        An expired alert resumes its rings and top-ups from the next tick.
        Only an officer who may act on the alert renews it; the renewal is audited.
        """
        now = now_or_clock(now)
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float))
                                  or not 0 < hours <= 24 * 366):
            raise InvalidInputError(f"hours must be a number in (0, 8784], got {hours!r}")
        with self._leading():
            self._check_clock(now)
            alert = self.alert(alert_id)
            self.authority.check_act(officer_id, alert.division, "renew")
            if alert.status != AlertStatus.OPEN:
                raise AlertStateError(f"alert {alert_id} is {alert.status}; only open alerts can be renewed")
            span = (_dt.timedelta(hours=hours) if hours is not None
                    else self.settings.case(alert.case_type).expiry)
            updated = dataclasses.replace(alert, expires_at=now + span, expired_at=None)
            self._save(updated, "renew", officer_id, now,
                       {"expires_at": iso_utc(updated.expires_at), "was": iso_utc(alert.expires_at)})
            return updated

    def tick(self, now: _dt.datetime) -> TickResult:
        """Pushes due at ``now``: the outbox (replayed after a restart, or left by a failed
        call), first rings, expansions.  Never raises because of one alert: its
        failure is in ``result.errors`` (see the module docstring).

        A ``now`` more than :data:`CLOCK_TOLERANCE` behind the log's clock (a
        dispatcher whose poll arrives late) pushes nothing new: it gets the
        outbox only, and ``result.stale`` is True.
        """
        now = check_aware(now, "now")
        with self._leading():
            out = TickResult()
            try:
                self._check_clock(now)
            except InvalidInputError:
                out.stale = True
            if self._replay is not None:
                out.extend(self._to_push(r) for r in self._replay)
                self._replay = None
            self._offer_stranded(out)
            for alert in list(self._alerts.values()) if not out.stale else ():
                if alert.status != AlertStatus.OPEN or alert.quarantine is not None:
                    continue
                if now < alert.missing_since or self._expire_if_due(alert, now):
                    continue
                if alert.division_wide:
                    if alert.next_seq == 0:   # the area never grows: one alert, then top-ups
                        t0 = time.perf_counter()
                        aud = self._query(alert, 0.0, now)
                        out.append(self._emit(alert, PushKind.ALERT.value, 0.0, aud, now, "engine",
                                              query_ms=(time.perf_counter() - t0) * 1e3))
                    continue
                try:
                    radius = self._schedule_of(alert).radius_at(alert.missing_since, now)
                    if alert.next_seq == 0:
                        t0 = time.perf_counter()
                        aud = self._query(alert, radius, now)
                        out.append(self._emit(alert, PushKind.ALERT.value, radius, aud, now, "engine",
                                              query_ms=(time.perf_counter() - t0) * 1e3))
                    elif radius > alert.radius_km:
                        out.extend(self._ring(alert, PushKind.EXPAND.value, radius, now, self.index))
                except Exception as exc:  # noqa: BLE001 - one alert must not stop the others
                    out.errors.append(self._failed(alert.alert_id, exc, now))
            if self.retention_days is not None and not out.stale:
                try:
                    out.purged = purge_expired(self.log, self.retention_days, now,
                                               photo_dir=self.photos.directory)
                except LeaseLostError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retention must not stop the pushes
                    out.errors.append(AlertFailure("", f"retention: {type(exc).__name__}: {exc}", False, exc))
            return self._deliver(out)

    def _failed(self, alert_id: str, exc: Exception, now: _dt.datetime) -> AlertFailure:
        """Record one alert's failure; quarantine it unless the environment failed.

        A lost lease is no alert's failure: it ends the tick (this engine is deposed).
        """
        if isinstance(exc, LeaseLostError):
            raise exc
        error = f"{type(exc).__name__}: {exc}"
        if self.metrics is not None and isinstance(exc, (CorruptFileError, LineageError)):
            self.metrics.verification_failed(exc, "log")
        transient = isinstance(exc, (OSError, MemoryError))
        if not transient:
            alert = dataclasses.replace(self._alerts[alert_id], quarantine=error[:1000])
            try:
                self._save(alert, "quarantine", "engine", now, {"error": error[:1000]})
            except Exception:  # noqa: BLE001 - the log itself failing: skip it in this process
                self._alerts[alert_id] = alert
            self._observe_quarantine()
        return AlertFailure(alert_id=alert_id, error=error, quarantined=not transient, exception=exc)

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
            new = aud.bitmap() - self.log.notified(alert.alert_id, frozen=True)
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
        with self._leading():
            newly = self.log.ack(push_id)
            if newly:
                if self.metrics is not None:
                    self.metrics.outbox.dec()
                rec = self.log.push(push_id)
                self.log.audit("ack", actor="dispatcher", alert_id=rec.alert_id, radius_km=rec.radius_km,
                               count=rec.count, detail={"push_id": push_id})
            return newly

    def _follow(self, alert: Alert, kind: str, officer_id: str, now: _dt.datetime) -> Push:
        with self._counted("log"):
            push = self._emit(alert, kind, alert.radius_km, self._check_chain(alert), now, officer_id)
        self._observe_quarantine()   # an update or a retraction lifts a quarantine
        return push

    def _load_photos(self, photos) -> list:
        """Photos as given to ``report`` or ``update``, each read and checked: ``(bytes, mime, desc)``."""
        if not isinstance(photos, (list, tuple)):
            raise InvalidInputError(f"photos must be a list of file paths or (bytes, mime_type) tuples, "
                                    f"got {type(photos).__name__}")
        if len(photos) > _MAX_PHOTOS:
            raise InvalidInputError(f"photos: {len(photos)} photos, at most {_MAX_PHOTOS}")
        return [load_photo(p, self.settings.photo_max_bytes, i) for i, p in enumerate(photos)]

    def update(self, alert_id: str, officer_id: str, details: dict | None = None,
               now: _dt.datetime | None = None, *, photos=None) -> Push:
        """New details, new photos, or both, to everyone notified so far.

        ``photos`` (as in :meth:`report`; ``[]`` removes them all) replaces the
        alert's photos: this push's CAP and every later one carry the new ones.
        A replaced photo stays in :attr:`Alert.photos_before` and in the photo
        store, since the CAP messages already sent point at it, and is purged
        with the alert (:func:`purge_expired`).
        """
        now = now_or_clock(now)
        if details is None:
            details = {}
        if not isinstance(details, dict) or (not details and photos is None):
            raise InvalidInputError(f"an update needs new details (a non-empty dict) or photos, got details "
                                    f"{type(details).__name__} {str(details)[:80]!r} and photos={photos!r}")
        details = check_details(details) if details else {}
        loaded = None if photos is None else self._load_photos(photos)
        with self._leading():
            alert = self.alert(alert_id)
            self._check_clock(now)
            self.authority.check_act(officer_id, alert.division, "update")
            if alert.status != AlertStatus.OPEN:
                raise AlertStateError(f"alert {alert_id} is {alert.status}; only open alerts take updates")
            merged = check_details({**alert.details, **details})
            self._check_cap_texts(merged, alert.lat, alert.lon, now)
            changes = {}
            if loaded is not None:
                # stored before the update is logged: a logged alert never lacks its photos
                new = [self.photos.put(data, mime, desc).to_dict() for data, mime, desc in loaded]
                digests = {p["digest"] for p in new}
                earlier: dict = {}   # by digest, first description kept: replaced before, then now
                for p in [*alert.photos_before, *alert.photos]:
                    earlier.setdefault(p["digest"], p)
                changes = {"photos": new, "photos_before": [p for d, p in earlier.items() if d not in digests]}
            # New details are how an officer repairs a quarantined alert.
            alert = dataclasses.replace(alert, details=merged, quarantine=None, **changes)
            return self._deliver([self._follow(alert, PushKind.UPDATE.value, officer_id, now)])[0]

    def close(self, alert_id: str, officer_id: str, outcome: str, now: _dt.datetime | None = None) -> Push:
        """The child is found (or the search ends): closure to exactly everyone notified."""
        now = now_or_clock(now)
        outcome = check_outcome(outcome)
        with self._leading():
            alert = self.alert(alert_id)
            self.authority.check_act(officer_id, alert.division, "close")
            if alert.status == AlertStatus.CLOSED:
                if alert.outcome != outcome:
                    raise AlertStateError(
                        f"alert {alert_id} is already closed with outcome {alert.outcome!r}, not {outcome!r}")
                closure = [r for r in self.log.pushes(alert_id) if r.kind == PushKind.CLOSURE]
                return self._to_push(closure[-1])
            if alert.status != AlertStatus.OPEN:
                raise AlertStateError(f"alert {alert_id} is {alert.status}; only open alerts can be closed")
            self._check_clock(now)
            first = next(iter(self.log.pushes(alert_id, audiences=False)), None)
            if first is not None and now < first.created_at:
                raise InvalidInputError(f"now={now.isoformat()}: a closure may not precede the alert's "
                                        f"first push ({first.created_at.isoformat()})")
            if now < alert.reported_at:
                raise InvalidInputError(f"now={now.isoformat()}: a closure may not precede the report "
                                        f"({alert.reported_at.isoformat()})")
            alert = dataclasses.replace(alert, status=AlertStatus.CLOSED.value, outcome=outcome,
                                        closed_at=now, closed_by=officer_id)
            return self._deliver([self._follow(alert, PushKind.CLOSURE.value, officer_id, now)])[0]

    def retract(self, alert_id: str, officer_id: str, reason: str = "", now: _dt.datetime | None = None):
        """The report was erroneous or false.  Not an outcome; not counted in statistics."""
        now = now_or_clock(now)
        reason = check_text(reason, "reason", _REASON_MAX_CHARS, True)
        with self._leading():
            alert = self.alert(alert_id)
            self._check_clock(now)
            self.authority.check_act(officer_id, alert.division, "retract")
            if alert.status not in (AlertStatus.PENDING, AlertStatus.OPEN):
                raise AlertStateError(f"alert {alert_id} is {alert.status}; it cannot be retracted")
            if now < alert.reported_at:
                raise InvalidInputError(f"now={now.isoformat()}: a retraction may not precede the report "
                                        f"({alert.reported_at.isoformat()})")
            # A quarantined alert may hold text no message can carry: the
            # retraction keeps only the details that pass the checks.
            details = {**_valid_details(alert.details), "retraction_reason": reason}
            alert = dataclasses.replace(alert, status=AlertStatus.RETRACTED.value, closed_at=now,
                                        closed_by=officer_id, details=details)
            if alert.next_seq == 0:
                self._save(alert, "retract", officer_id, now, {"reason": reason})
                self._observe_quarantine()
                return None
            return self._deliver([self._follow(alert, PushKind.RETRACTION.value, officer_id, now)])[0]

    def refresh(self, new_index, now: _dt.datetime) -> list[Push]:
        """Switch to a newer index generation and top up every open alert (a standby only switches).

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
        _check_index(new_index, "new_index")
        new, cur = new_index.store, self.index.store
        if new.lineage != cur.lineage:
            raise self._refused(LineageError(
                f"new_index: its store is of lineage {new.lineage}, not {cur.lineage} (a fresh ingest, "
                f"not a new generation): its keys name other devices"), "index")
        if (new.generation < cur.generation or len(new) < len(cur)
                or (new.generation == cur.generation and new.uid != cur.uid)):
            raise self._refused(LineageError(
                f"new_index is generation {new.generation} with {len(new)} devices; it must be a "
                f"descendant of the current generation {cur.generation} ({len(cur)} devices)"), "index")
        if new.generation > cur.generation and cur.uid not in new.ancestry:
            raise self._refused(LineageError(
                f"new_index: its store (generation {new.generation}) does not descend from the current "
                f"generation {cur.generation} (uid {cur.uid[:12]}...): another branch of the same lineage, "
                f"whose keys may name other devices"), "index")
        with self._lock:
            self._check_clock(now)
            with self._counted("log"):
                self._bind(new_index)
            store = new_index.store
            delta = (store.changed_keys is not None
                     and store.parent_generation == self.index.store.generation)
            self.index = new_index
            if not self.log.leader:
                # A standby follows the generations (it must not lag the log when it takes
                # over); the leader tops the alerts up.
                return TickResult()
            todo = []
            for alert in self._alerts.values():
                if (alert.status != AlertStatus.OPEN or alert.next_seq == 0 or now < alert.missing_since
                        or alert.quarantine is not None):
                    continue
                if self._expire_if_due(alert, now):
                    continue
                radius = (alert.radius_km if alert.division_wide else
                          max(self._schedule_of(alert).radius_at(alert.missing_since, now), alert.radius_km))
                todo.append((alert, radius))

            # Top-ups against the changed devices: every open alert in one pass
            # over both cores, with each alert's notified devices skipped inside
            # the kernel, so only the devices new to an alert come out.
            topups = [ar for ar in todo if delta and ar[1] <= ar[0].radius_km
                      and not ar[0].division_wide]
            fresh: dict[str, tuple[AbstractBitMap, float]] = {}
            if topups:
                t0 = time.perf_counter()
                news = new_index.changed_within([(a.lat, a.lon, r) for a, r in topups],
                                                [self.log.notified(a.alert_id, frozen=True) for a, _ in topups])
                cutoff = (epoch_seconds(now - self.max_location_age)
                          if self.max_location_age is not None else None)
                q_ms = (time.perf_counter() - t0) * 1e3 / len(topups)
                for k, (alert, _) in zip(news, topups):
                    if cutoff is not None:
                        k = k[store.last_seen_s[k] >= cutoff]
                    fresh[alert.alert_id] = (Audience.from_keys(k, store).bitmap(), q_ms)

            def target(ar):
                alert, radius = ar
                t0 = time.perf_counter()
                try:
                    aud = self._query(alert, radius, now, new_index)
                    aud.bitmap()  # roaring build in the worker thread too
                except Exception as exc:  # noqa: BLE001 - reported per alert below
                    return exc, 0.0
                return aud, (time.perf_counter() - t0) * 1e3

            rings = [ar for ar in todo if ar[0].alert_id not in fresh]
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                auds = dict(zip((a.alert_id for a, _ in rings), pool.map(target, rings)))
            out = TickResult()
            for alert, radius in todo:
                kind = PushKind.EXPAND.value if radius > alert.radius_km else PushKind.TOPUP.value
                current = self._alerts[alert.alert_id]
                try:
                    if alert.alert_id in fresh:
                        new, q_ms = fresh[alert.alert_id]
                        out.extend(self._ring(current, kind, radius, now, new_index, query_ms=q_ms, new=new))
                    else:
                        aud, q_ms = auds[alert.alert_id]
                        if isinstance(aud, Exception):
                            raise aud
                        out.extend(self._ring(current, kind, radius, now, new_index, aud, q_ms))
                except Exception as exc:  # noqa: BLE001 - one alert must not stop the others
                    out.errors.append(self._failed(alert.alert_id, exc, now))
            self._offer_stranded(out)
            return self._deliver(out)

    # -- reading ------------------------------------------------------------

    def pushes(self, alert_id: str) -> list[Push]:
        self.alert(alert_id)
        return [self._to_push(r) for r in self.log.pushes(alert_id)]

    def notified(self, alert_id: str) -> Audience:
        self.alert(alert_id)
        return self._audience(self.log.notified(alert_id, frozen=True))

    def stats(self, since=None, until=None, division=None, case_type=None) -> dict[str, Any]:
        """Published, found, not found, open, recovery rate, outcomes, pushes, devices reached.

        ``by_division`` breaks the figures down by the divisions directly under
        ``division`` (the provinces without one), each row with its ``name``;
        ``by_case_type`` by case type (a row for every case type in the
        settings).  ``case_type`` keeps only that type's alerts; a name the
        settings do not define is an :class:`InvalidInputError`.
        """
        if case_type is not None:
            self.settings.case(case_type)
        if division is not None and not isinstance(division, str):
            raise InvalidInputError(f"division must be a 6-digit string, got {type(division).__name__}")
        if since is not None:
            since = check_aware(since, "since")
        if until is not None:
            until = check_aware(until, "until")
        records = [r for r in (a.stats_record() for a in self.alerts()) if r is not None]
        return compute(records, since=since, until=until, division=division,
                       divisions=self.authority.divisions, case_type=case_type,
                       case_types=tuple(self.settings.case_types))

    def verify(self, anchor=None) -> dict:
        """Check every logged push and the audit hash chain (CorruptFileError if not intact)."""
        with self._counted("verify"):
            return self.log.verify(anchor)
