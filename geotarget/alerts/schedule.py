"""Radius schedules: how far an alert reaches as time passes since the child went missing.

A schedule is a step function of ``t = now - missing_since`` (docs/design.md, Radius schedule).  The
anchor is the moment the child went missing, not the moment the alert was
published, so a late report starts at the radius already due.  Steps are
``(bound, radius_km)`` pairs read as "for t <= bound, radius_km"; the first
matching step wins, and past the last bound the schedule holds ``final_km``.
Bounds are inclusive: at exactly t = 1 h the default schedule still says
100 km, and it says 200 km one microsecond later.

Radii never shrink.  The engine relies on that: a push goes only to devices
never notified, so a shrinking circle would mean nothing, and a schedule that
says so is a configuration mistake we refuse up front.

All arithmetic happens in UTC.  Two aware datetimes that share a ``tzinfo``
subtract as wall-clock times in Python, which is an hour off across a DST
change; converting both to UTC first gives elapsed time.
"""
from __future__ import annotations

import bisect
import datetime as _dt
import math
from typing import Any, Sequence

from ..errors import InvalidInputError
from ..geo import HALF_CIRCUMFERENCE_KM, check_aware

__all__ = ["RadiusSchedule"]

_HOUR = _dt.timedelta(hours=1)
#: datetime's resolution: the first representable instant after a bound.
_TICK = _dt.timedelta(microseconds=1)


def _check_radius_value(value: Any, what: str) -> float:
    # bool is an int subclass; True km is a typo, not a radius
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{what} must be a number of km, got {value!r}")
    r = float(value)
    if not math.isfinite(r):
        raise InvalidInputError(f"{what} = {r!r} must be finite")
    if r <= 0.0:
        raise InvalidInputError(f"{what} = {r!r} must be > 0 km")
    if r > HALF_CIRCUMFERENCE_KM:
        raise InvalidInputError(
            f"{what} = {r!r} km exceeds half the Earth's circumference "
            f"({HALF_CIRCUMFERENCE_KM:.3f} km), which already covers the whole planet")
    return r


class RadiusSchedule:
    """A non-decreasing step function from time-since-missing to radius in km.

    >>> s = RadiusSchedule.default()
    >>> import datetime as dt
    >>> t0 = dt.datetime(2026, 11, 23, 10, tzinfo=dt.timezone.utc)
    >>> s.radius_at(t0, t0 + dt.timedelta(hours=1))
    100.0
    >>> s.radius_at(t0, t0 + dt.timedelta(hours=1, seconds=1))
    200.0
    """

    __slots__ = ("_bounds", "_radii", "_final", "_name")

    def __init__(self, steps: Sequence[tuple[_dt.timedelta, float]], final_km: float,
                 name: str = "custom") -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(f"name must be a non-empty string, got {name!r}")
        try:
            steps = list(steps)
        except TypeError:
            raise InvalidInputError(
                f"steps must be a sequence of (timedelta, km) pairs, got {steps!r}") from None
        bounds: list[_dt.timedelta] = []
        radii: list[float] = []
        for i, step in enumerate(steps):
            try:
                bound, radius = step
            except (TypeError, ValueError):
                raise InvalidInputError(
                    f"steps[{i}] = {step!r} must be a (timedelta, km) pair") from None
            if not isinstance(bound, _dt.timedelta):
                raise InvalidInputError(
                    f"steps[{i}] bound = {bound!r} must be a datetime.timedelta")
            if bound <= _dt.timedelta(0):
                raise InvalidInputError(f"steps[{i}] bound = {bound} must be positive")
            if bounds and bound <= bounds[-1]:
                raise InvalidInputError(
                    f"steps[{i}] bound = {bound} must be greater than the previous "
                    f"bound {bounds[-1]} (bounds strictly increase)")
            r = _check_radius_value(radius, f"steps[{i}] radius")
            if radii and r < radii[-1]:
                raise InvalidInputError(
                    f"steps[{i}] radius = {r!r} km is smaller than the previous "
                    f"{radii[-1]!r} km; radii must not decrease")
            bounds.append(bound)
            radii.append(r)
        final = _check_radius_value(final_km, "final_km")
        if radii and final < radii[-1]:
            raise InvalidInputError(
                f"final_km = {final!r} is smaller than the last step's {radii[-1]!r} km; "
                "radii must not decrease")
        self._bounds = tuple(bounds)
        self._radii = tuple(radii)
        self._final = final
        self._name = name

    # -- presets ----------------------------------------------------------------

    @classmethod
    def default(cls) -> "RadiusSchedule":
        """The Tuanyuan table: 1 h 100 km, 2 h 200 km, 3 h 300 km, then 500 km."""
        return cls([(1 * _HOUR, 100.0), (2 * _HOUR, 200.0), (3 * _HOUR, 300.0)], 500.0,
                   name="default")

    @classmethod
    def elderly(cls) -> "RadiusSchedule":
        """An *example* of a slower schedule, e.g. for a missing elderly person on foot.

        2 h 50 km, 6 h 100 km, 24 h 200 km, then 300 km.  It shows the shape a
        configuration can take; it is not a recommendation or anyone's policy.
        """
        return cls([(2 * _HOUR, 50.0), (6 * _HOUR, 100.0), (24 * _HOUR, 200.0)], 300.0,
                   name="elderly")

    # -- serialisation ----------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-able dict; bounds as seconds so any JSON reader can use them."""
        return {
            "name": self._name,
            "steps": [[b.total_seconds(), r] for b, r in zip(self._bounds, self._radii)],
            "final_km": self._final,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RadiusSchedule":
        """Inverse of :meth:`to_dict`; every value is validated as in the constructor."""
        if not isinstance(d, dict):
            raise InvalidInputError(f"schedule must be a dict, got {type(d).__name__}")
        missing = {"steps", "final_km"} - d.keys()
        if missing:
            raise InvalidInputError(f"schedule dict lacks key(s) {sorted(missing)}: {d!r}")
        unknown = d.keys() - {"name", "steps", "final_km"}
        if unknown:
            raise InvalidInputError(f"schedule dict has unknown key(s) {sorted(unknown)}")
        raw = d["steps"]
        if not isinstance(raw, (list, tuple)):
            raise InvalidInputError(f"steps must be a list of [seconds, km], got {raw!r}")
        steps = []
        for i, step in enumerate(raw):
            if not isinstance(step, (list, tuple)) or len(step) != 2:
                raise InvalidInputError(f"steps[{i}] = {step!r} must be [seconds, km]")
            secs = step[0]
            if isinstance(secs, bool) or not isinstance(secs, (int, float)) \
                    or not math.isfinite(secs):
                raise InvalidInputError(f"steps[{i}] seconds = {secs!r} must be a finite number")
            try:
                bound = _dt.timedelta(seconds=secs)
            except OverflowError:
                raise InvalidInputError(f"steps[{i}] seconds = {secs!r} is out of range") from None
            steps.append((bound, step[1]))
        return cls(steps, d["final_km"], name=d.get("name", "custom"))

    # -- queries ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def steps(self) -> tuple[tuple[_dt.timedelta, float], ...]:
        return tuple(zip(self._bounds, self._radii))

    @property
    def final_km(self) -> float:
        return self._final

    @property
    def radii(self) -> tuple[float, ...]:
        """Every radius the schedule can return, in order, ending with ``final_km``."""
        return self._radii + (self._final,)

    @property
    def max_km(self) -> float:
        return self._final

    def _elapsed(self, missing_since: _dt.datetime, now: _dt.datetime) -> _dt.timedelta:
        ms = check_aware(missing_since, "missing_since")
        nw = check_aware(now, "now")
        if nw < ms:
            raise InvalidInputError(
                f"now={now.isoformat()} is before missing_since={missing_since.isoformat()}; "
                "missing_since cannot be in the future")
        return nw - ms

    def _step(self, t: _dt.timedelta) -> int:
        # first bound >= t: inclusive upper bounds; len(bounds) means "final"
        return bisect.bisect_left(self._bounds, t)

    def radius_at(self, missing_since: _dt.datetime, now: _dt.datetime) -> float:
        """Radius in km due at ``now`` for a child missing since ``missing_since``."""
        i = self._step(self._elapsed(missing_since, now))
        return self._radii[i] if i < len(self._radii) else self._final

    def next_change(self, missing_since: _dt.datetime, now: _dt.datetime) -> _dt.datetime | None:
        """The first instant after ``now`` at which :meth:`radius_at` is larger, in UTC.

        Bounds are inclusive, so the radius grows one microsecond (datetime's
        resolution) after the bound; ticking exactly at the returned instant
        therefore sees the new radius.  Steps that repeat the current radius
        are skipped.  ``None`` once the final radius is reached.
        """
        t = self._elapsed(missing_since, now)
        i = self._step(t)
        n = len(self._radii)
        if i >= n:
            return None
        current = self._radii[i]
        for k in range(i + 1, n + 1):
            r = self._radii[k] if k < n else self._final
            if r > current:
                return check_aware(missing_since) + self._bounds[k - 1] + _TICK
        return None

    # -- value semantics --------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RadiusSchedule):
            return NotImplemented
        return (self._bounds, self._radii, self._final, self._name) == \
            (other._bounds, other._radii, other._final, other._name)

    def __hash__(self) -> int:
        return hash((self._bounds, self._radii, self._final, self._name))

    def __repr__(self) -> str:
        parts = ", ".join(f"<={b}: {r:g} km" for b, r in zip(self._bounds, self._radii))
        sep = ", " if parts else ""
        return f"RadiusSchedule({self._name!r}: {parts}{sep}then {self._final:g} km)"
