"""Outcomes and the recovery statistics the platform publishes.

The outcome categories are the ones the seed reports itemise (drowned,
killed, runaway, rescued from trafficking, lost, visiting friends, accident,
other, not found).  "Found" means closed with any outcome except
``not_found``; the recovery rate is found / published, so an alert still open
counts against it, exactly as the published figures do (1,274 of 1,317 =
96.74 %).  A retracted alert was a false or erroneous report: it is neither
published nor an outcome, and only shows up in its own ``retracted`` count
and in the push/device totals (its pushes did go out).

:data:`SEED_FIGURES` keeps the seeds' own numbers as data so a test can
check that :func:`compute` reproduces them to the hundredth of a percent.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

from .authority import division_covers, province_of, validate_division
from ..errors import InvalidInputError
from ..geo import check_aware
from .model import COUNTED_STATUSES, AlertStatus

__all__ = ["OUTCOMES", "FOUND_OUTCOMES", "STATUSES", "check_outcome", "AlertRecord",
           "compute", "check_case_type", "recovery_rate", "SeedFigure", "SEED_FIGURES", "seed_records",
           "log_records"]

OUTCOMES = ("rescued_trafficking", "runaway", "lost", "drowned", "killed", "accident",
            "visiting_friends", "other", "not_found")
FOUND_OUTCOMES = tuple(o for o in OUTCOMES if o != "not_found")
STATUSES = COUNTED_STATUSES
#: Statuses of alerts that went out as an alert (retracted ones are excluded on purpose).
_PUBLISHED = frozenset({"open", "closed"})


def check_outcome(outcome: str) -> str:
    """Return ``outcome`` if it is one of :data:`OUTCOMES`, else raise listing them."""
    if not isinstance(outcome, str) or outcome not in OUTCOMES:
        raise InvalidInputError(f"outcome={outcome!r} must be one of {', '.join(OUTCOMES)}")
    return outcome


def check_case_type(case_type: str, known=None) -> str:
    """Return ``case_type`` if it is a non-empty name (one of ``known`` when given), else raise."""
    if not isinstance(case_type, str) or not case_type or (known is not None and case_type not in known):
        allowed = f"one of {', '.join(known)}" if known is not None else "a non-empty string"
        raise InvalidInputError(f"case_type={case_type!r} must be {allowed}")
    return case_type


def recovery_rate(found: int, published: int) -> float:
    """found / published; 0.0 when nothing was published (no alert, nothing unrecovered)."""
    return found / published if published else 0.0


@dataclass(frozen=True)
class AlertRecord:
    """What the statistics need to know about one alert; no locations, no audiences."""

    alert_id: str
    division: str
    published_at: _dt.datetime | None
    status: str
    outcome: str | None = None
    closed_at: _dt.datetime | None = None
    pushes: int = 0
    devices_reached: int = 0
    case_type: str = "child"

    def __post_init__(self) -> None:
        if not isinstance(self.alert_id, str) or not self.alert_id:
            raise InvalidInputError(f"alert_id={self.alert_id!r} must be a non-empty string")
        check_case_type(self.case_type)
        validate_division(self.division)
        if self.status not in STATUSES:
            raise InvalidInputError(
                f"alert {self.alert_id}: status={self.status!r} must be one of {', '.join(STATUSES)}")
        if self.published_at is not None:
            check_aware(self.published_at, "published_at")
        elif self.status in _PUBLISHED:
            raise InvalidInputError(
                f"alert {self.alert_id}: status={self.status!r} needs published_at")
        if self.status == "closed":
            check_outcome(self.outcome)
        elif self.outcome is not None:
            raise InvalidInputError(
                f"alert {self.alert_id}: outcome={self.outcome!r} given but status={self.status!r}; "
                "only closed alerts have an outcome")
        if self.closed_at is not None:
            check_aware(self.closed_at, "closed_at")
        for name in ("pushes", "devices_reached"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInputError(
                    f"alert {self.alert_id}: {name}={v!r} must be a non-negative integer")

    @property
    def found(self) -> bool:
        return self.status == "closed" and self.outcome != "not_found"


def _blank() -> dict:
    return {"published": 0, "found": 0, "not_found": 0, "open": 0, "retracted": 0}


def _group_under(divisions, division: str | None, code: str) -> str:
    """The division directly under ``division`` (the province for None or the ministry) holding ``code``."""
    if code not in divisions:
        return province_of(code)    # a code the registry does not know: grouped by its digits
    chain = divisions.lineage(code)
    if division is None or division == "000000" or division not in chain:
        return chain[0]
    i = chain.index(division)
    return chain[i + 1] if i + 1 < len(chain) else division


def log_records(log) -> Iterable[AlertRecord]:
    """The statistics records of every alert in a recipient log (drills and duplicates left out),
    ready for :func:`compute`."""
    from .engine import Alert  # the engine imports this module

    for rec in log.alerts().values():
        r = Alert.from_record(rec).stats_record()
        if r is not None:
            yield r


def compute(records: Iterable[AlertRecord], since: _dt.datetime | None = None,
            until: _dt.datetime | None = None, division: str | None = None, divisions=None,
            case_type: str | None = None, case_types=None) -> dict:
    """Aggregate statistics over alerts published in ``[since, until)`` within ``division``.

    ``by_division`` has one row per province; with a registry of real places
    (``divisions``, a :class:`~geotarget.spatial.divisions.Divisions`) it has one row
    per division directly under ``division`` (the provinces when there is
    none), each with its ``name`` (``浙江省 杭州市``), so a province's figures
    break down by city and a city's by county.

    The period is read on ``published_at``.  With no bound at all every record
    counts, including alerts never published (pending, or retracted before
    approval); with any bound only records published inside it count.
    ``found + not_found + open == published`` always holds.

    ``by_case_type`` gives the same figures (with ``recovery_rate`` and
    ``recovery_rate_pct``) per case type, with a row for every name in
    ``case_types`` (the settings' case types) even when it has no alert;
    ``case_type`` keeps only that type's alerts (it must be one of
    ``case_types`` when those are given).
    """
    lo = None if since is None else check_aware(since, "since")
    hi = None if until is None else check_aware(until, "until")
    if lo is not None and hi is not None and hi < lo:
        raise InvalidInputError(
            f"until={until.isoformat()} is before since={since.isoformat()}")
    if division is not None:
        validate_division(division)
    known = None if case_types is None else tuple(case_types)
    if case_type is not None:
        check_case_type(case_type, known)
    bounded = lo is not None or hi is not None

    totals = _blank()
    totals["pending"] = 0
    by_outcome = dict.fromkeys(OUTCOMES, 0)
    by_division: dict[str, dict] = {}
    by_case: dict[str, dict] = {}
    for name in known or ():
        if case_type is None or name == case_type:
            by_case[name] = {**_blank(), "pending": 0}
    pushes = devices = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, AlertRecord):
            raise InvalidInputError(f"records[{i}] = {rec!r} is not an AlertRecord")
        if division is not None and not division_covers(division, rec.division):
            continue
        if case_type is not None and rec.case_type != case_type:
            continue
        if bounded:
            if rec.published_at is None:
                continue
            at = rec.published_at.astimezone(_dt.timezone.utc)
            if (lo is not None and at < lo) or (hi is not None and at >= hi):
                continue
        pushes += rec.pushes
        devices += rec.devices_reached
        crow = by_case.get(rec.case_type)
        if crow is None:
            crow = by_case[rec.case_type] = {**_blank(), "pending": 0}
        if rec.status == AlertStatus.PENDING:
            totals["pending"] += 1
            crow["pending"] += 1
            continue
        group = (province_of(rec.division) if divisions is None
                 else _group_under(divisions, division, rec.division))
        row = by_division.get(group)
        if row is None:
            row = by_division[group] = _blank()
            if divisions is not None:
                row["name"] = divisions.full_name(group) if group in divisions else ""
        if rec.status == AlertStatus.RETRACTED:
            key = "retracted"
        else:
            totals["published"] += 1
            row["published"] += 1
            crow["published"] += 1
            if rec.status == AlertStatus.OPEN:
                key = "open"
            else:
                by_outcome[rec.outcome] += 1
                key = "not_found" if rec.outcome == "not_found" else "found"
        totals[key] += 1
        row[key] += 1
        crow[key] += 1
    for crow in by_case.values():
        r = recovery_rate(crow["found"], crow["published"])
        crow["recovery_rate"] = r
        crow["recovery_rate_pct"] = round(100.0 * r, 2)

    rate = recovery_rate(totals["found"], totals["published"])
    return {
        **totals,
        "recovery_rate": rate,
        "recovery_rate_pct": round(100.0 * rate, 2),
        "by_outcome": by_outcome,
        "pushes": pushes,
        "devices_reached": devices,
        "by_division": {k: by_division[k] for k in sorted(by_division)},
        "by_case_type": by_case,
    }


# ---------------------------------------------------------------------------
# the seeds' own figures
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedFigure:
    """A published figure: totals as of a date, and the outcome breakdown if given."""

    as_of: _dt.date
    published: int
    found: int
    recovery_rate_pct: float
    by_outcome: Mapping[str, int] | None
    sources: tuple[str, ...]
    note: str = ""


def _outcomes(**counts: int) -> Mapping[str, int]:
    full = dict.fromkeys(OUTCOMES, 0)
    full.update(counts)
    return MappingProxyType(full)


SEED_FIGURES: tuple[SeedFigure, ...] = (
    SeedFigure(
        as_of=_dt.date(2016, 11, 16), published=286, found=260, recovery_rate_pct=90.91,
        by_outcome=_outcomes(rescued_trafficking=18, runaway=152, lost=27, drowned=32,
                             killed=20, other=11, not_found=26),
        sources=("001_bd5ba050eb83841b.txt",),
        note="Six months after launch (Gongyi Shibao).  The article itemises the 260 found; "
             "not_found = 286 - 260 = 26 is derived.  'other' covers kidnapping and family "
             "disputes; accident and visiting friends are not itemised (0)."),
    SeedFigure(
        as_of=_dt.date(2017, 5, 15), published=1317, found=1274, recovery_rate_pct=96.74,
        by_outcome=_outcomes(drowned=75, killed=29, runaway=750, rescued_trafficking=40,
                             lost=192, visiting_friends=67, accident=7, other=114,
                             not_found=43),
        sources=("004_72cf8098543868e9.txt", "003_d6c6008af58cd8c7.txt"),
        note="One year after launch; breakdown from seed 004, totals confirmed by "
             "China Daily (seed 003)."),
    SeedFigure(
        as_of=_dt.date(2018, 3, 15), published=2767, found=2694, recovery_rate_pct=97.36,
        by_outcome=None, sources=("000_3849eb6340421262.txt",),
        note="Totals only (Huaxi Dushibao); no outcome breakdown was published."),
)


def seed_records(fig: SeedFigure, division: str = "000000",
                 published_at: _dt.datetime | None = None) -> list[AlertRecord]:
    """Synthetic closed-alert records that reproduce ``fig``'s breakdown, for tests and demos."""
    if fig.by_outcome is None:
        raise InvalidInputError(
            f"seed figure of {fig.as_of} has no outcome breakdown to build records from")
    if published_at is None:
        published_at = _dt.datetime.combine(fig.as_of, _dt.time(), _dt.timezone.utc)
    out = []
    for outcome in OUTCOMES:
        for j in range(fig.by_outcome[outcome]):
            out.append(AlertRecord(f"seed-{fig.as_of:%Y%m%d}-{outcome}-{j}", division,
                                   published_at, "closed", outcome, published_at))
    return out
