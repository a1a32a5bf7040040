"""Who may report, approve and act on an alert.

Jurisdictions are 6-digit administrative division codes (GB/T 2260): two
digits of province, two of prefecture-level city, two of county.  Trailing
``00`` pairs mean "the whole of the level above", so the code itself tells
the level and coverage is a prefix test:

=========  ==========  ==========================================
level      code        covers
=========  ==========  ==========================================
ministry   ``000000``  everything
province   ``XX0000``  every code starting ``XX``
city       ``XXYY00``  every code starting ``XXYY``
county     ``XXYYZZ``  itself only
=========  ==========  ==========================================

Municipalities fit without special cases: Shanghai is ``310000``, its
districts (``310101``) are counties under the city-level prefix ``3101``.
Counties directly administered by a province use ``YY = 90`` in real codes
(``429004``); the districts of Hong Kong and Macau sit directly under the
region with ``YY = 00`` (``810001``), so that pattern is well-formed too, and
the registry of real divisions (below) decides whether a code exists.

The ~6,000 officers of the real system are held in one dict; every check is
a dict lookup plus string slicing.  Checks raise and never mutate, so a
refused action changes nothing.

Real places
-----------
Codes are checked against a :class:`~geotarget.spatial.divisions.Divisions` registry
(China's by default): an officer or an alert in a code the registry does not
hold is refused, and a report's point must lie in the alert's division (which
lies in the reporter's), or within ``tolerance_km`` of it so that a child last
seen across a street on the border can still be reported.  The distance is
the haversine distance from the point to the nearest point of the division's
polygon (see :meth:`Divisions.distance_km`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..errors import InvalidInputError, UnauthorizedError, UnknownDivisionError, UnknownOfficerError

__all__ = ["LEVELS", "ACTIONS", "DEFAULT_TOLERANCE_KM", "Officer", "ApprovalPolicy", "Authority",
           "division_covers", "division_level", "validate_division", "province_of"]

LEVELS = ("ministry", "province", "city", "county")
#: Lower rank = more senior; "strictly superior" compares ranks.
_RANK = {lvl: i for i, lvl in enumerate(LEVELS)}
#: What check_act guards; reporting and approving have their own checks.
ACTIONS = ("update", "close", "retract", "renew", "confirm")
_SIX_DIGITS = re.compile(r"[0-9]{6}")
#: How far outside its division a report's point may lie (km).  Amap's
#: polygons are simplified to tens of metres; 3 km covers them and a report
#: taken at a border checkpoint, yet no neighbouring county's centre.
DEFAULT_TOLERANCE_KM = 3.0


def validate_division(code: str) -> str:
    """Return ``code`` if it is a well-formed 6-digit division code, else raise.

    Well-formed: ASCII digits only, and the level pattern holds (``000000``,
    ``XX0000``, ``XXYY00`` or ``XXYYZZ`` with ``XX`` non-zero).  Whether the
    code names a real division is the registry's question (:class:`Authority`).
    Integers are refused: ``010000`` would silently lose its leading zero.
    """
    if not isinstance(code, str):
        raise InvalidInputError(
            f"division={code!r} must be a 6-digit string, not {type(code).__name__}")
    if not _SIX_DIGITS.fullmatch(code):
        raise InvalidInputError(f"division={code!r} must be exactly 6 ASCII digits")
    if code != "000000":
        if code[:2] == "00":
            raise InvalidInputError(
                f"division={code!r}: province digits '00' are only valid in '000000' (ministry)")
    return code


def division_level(code: str) -> str:
    """The level a division code names: ``ministry``, ``province``, ``city`` or ``county``."""
    validate_division(code)
    if code == "000000":
        return "ministry"
    if code[2:] == "0000":
        return "province"
    if code[4:] == "00":
        return "city"
    return "county"


def _prefix(code: str) -> str:
    # the digits a covered code must start with; "" for the ministry
    if code == "000000":
        return ""
    if code[2:] == "0000":
        return code[:2]
    if code[4:] == "00":
        return code[:4]
    return code


def division_covers(outer: str, inner: str) -> bool:
    """Whether jurisdiction ``outer`` contains division ``inner`` (a division covers itself)."""
    validate_division(outer)
    validate_division(inner)
    return inner.startswith(_prefix(outer))


def province_of(code: str) -> str:
    """The province-level code (``XX0000``) containing ``code``; ``000000`` for the ministry."""
    validate_division(code)
    return "000000" if code == "000000" else code[:2] + "0000"


def _check_level(level: object, what: str = "level") -> str:
    if not isinstance(level, str) or level not in _RANK:
        raise InvalidInputError(f"{what}={level!r} must be one of {', '.join(LEVELS)}")
    return level  # type: ignore[return-value]


@dataclass(frozen=True)
class Officer:
    """An officer with publishing rights: an id, a level and the jurisdiction at that level."""

    officer_id: str
    level: str
    division: str
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.officer_id, str) or not self.officer_id \
                or self.officer_id != self.officer_id.strip():
            raise InvalidInputError(
                f"officer_id={self.officer_id!r} must be a non-empty string "
                "without surrounding whitespace")
        _check_level(self.level)
        actual = division_level(self.division)
        if actual != self.level:
            raise InvalidInputError(
                f"officer {self.officer_id}: division={self.division!r} is a {actual} code, "
                f"but level={self.level!r}")
        if not isinstance(self.name, str):
            raise InvalidInputError(f"officer {self.officer_id}: name={self.name!r} must be a string")

    @property
    def rank(self) -> int:
        """0 for the ministry up to 3 for a county; smaller is more senior."""
        return _RANK[self.level]

    def to_dict(self) -> dict:
        return {"officer_id": self.officer_id, "level": self.level,
                "division": self.division, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Officer":
        if not isinstance(d, dict):
            raise InvalidInputError(f"officer must be a dict, got {type(d).__name__}")
        unknown = d.keys() - {"officer_id", "level", "division", "name"}
        if unknown:
            raise InvalidInputError(f"officer dict has unknown key(s) {sorted(unknown)}")
        try:
            return cls(d["officer_id"], d["level"], d["division"], d.get("name", ""))
        except KeyError as exc:
            raise InvalidInputError(f"officer dict lacks key {exc.args[0]!r}: {d!r}") from None


def _level_set(value: Iterable[str], what: str) -> frozenset[str]:
    if isinstance(value, str):
        # frozenset("county") would be a set of letters
        raise InvalidInputError(f"{what} must be a collection of levels, got the string {value!r}")
    try:
        levels = frozenset(value)
    except TypeError:
        raise InvalidInputError(f"{what} must be a collection of levels, got {value!r}") from None
    for lvl in levels:
        _check_level(lvl, f"{what} level")
    return levels


def _in_order(levels: frozenset[str]) -> list[str]:
    return [lvl for lvl in LEVELS if lvl in levels]


@dataclass(frozen=True)
class ApprovalPolicy:
    """Which levels' reports wait for approval, and which levels may approve.

    The default follows the design: county reports need a superior officer
    whose jurisdiction covers the alert.  Approval always also requires a
    strictly superior level, so ``approver_levels`` only narrows that.
    """

    needs_approval: frozenset[str] = field(default_factory=lambda: frozenset({"county"}))
    approver_levels: frozenset[str] = field(
        default_factory=lambda: frozenset({"city", "province", "ministry"}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_approval", _level_set(self.needs_approval, "needs_approval"))
        object.__setattr__(self, "approver_levels",
                           _level_set(self.approver_levels, "approver_levels"))
        for lvl in self.needs_approval:
            if not any(_RANK[a] < _RANK[lvl] for a in self.approver_levels):
                # such reports could never be published
                raise InvalidInputError(
                    f"needs_approval includes {lvl!r} but no approver level "
                    f"{_in_order(self.approver_levels)} is superior to it")

    def to_dict(self) -> dict:
        return {"needs_approval": _in_order(self.needs_approval),
                "approver_levels": _in_order(self.approver_levels)}

    @classmethod
    def from_dict(cls, d: dict) -> "ApprovalPolicy":
        if not isinstance(d, dict):
            raise InvalidInputError(f"policy must be a dict, got {type(d).__name__}")
        unknown = d.keys() - {"needs_approval", "approver_levels"}
        if unknown:
            raise InvalidInputError(f"policy dict has unknown key(s) {sorted(unknown)}")
        kwargs = {k: d[k] for k in ("needs_approval", "approver_levels") if k in d}
        return cls(**kwargs)


class Authority:
    """The registry of officers and the rules they act under."""

    __slots__ = ("_officers", "_policy", "_divisions", "_tolerance_km")

    def __init__(self, officers: Iterable[Officer], policy: ApprovalPolicy | None = None, *,
                 divisions=None, tolerance_km: float = DEFAULT_TOLERANCE_KM) -> None:
        if policy is None:
            policy = ApprovalPolicy()
        elif not isinstance(policy, ApprovalPolicy):
            raise InvalidInputError(f"policy must be an ApprovalPolicy, got {type(policy).__name__}")
        table: dict[str, Officer] = {}
        try:
            items = iter(officers)
        except TypeError:
            raise InvalidInputError(f"officers must be an iterable of Officer, got {officers!r}") from None
        for i, off in enumerate(items):
            if not isinstance(off, Officer):
                raise InvalidInputError(f"officers[{i}] = {off!r} is not an Officer")
            if off.officer_id in table:
                raise InvalidInputError(f"officers[{i}]: duplicate officer_id {off.officer_id!r}")
            table[off.officer_id] = off
        self._officers = table
        self._policy = policy
        self._init_divisions(divisions, tolerance_km)

    @property
    def policy(self) -> ApprovalPolicy:
        return self._policy

    # -- real places ---------------------------------------------------------------

    def _init_divisions(self, divisions, tolerance_km) -> None:
        from ..spatial.divisions import Divisions
        if divisions is None:
            divisions = Divisions.china()
        elif not isinstance(divisions, Divisions):
            raise InvalidInputError(f"divisions must be a Divisions registry, got {type(divisions).__name__}")
        try:
            tol = float(tolerance_km)
        except (TypeError, ValueError):
            raise InvalidInputError(f"tolerance_km={tolerance_km!r} must be a number") from None
        if not (0.0 <= tol <= 100.0):
            raise InvalidInputError(f"tolerance_km={tolerance_km!r} must be in [0, 100] km")
        for off in self._officers.values():
            if off.division != "000000" and off.division not in divisions:
                raise UnknownDivisionError(
                    f"officer {off.officer_id}: division {off.division!r} is not a known division")
        self._divisions = divisions
        self._tolerance_km = tol

    @property
    def divisions(self):
        """The registry of divisions officers and alerts are checked against."""
        return self._divisions

    @property
    def tolerance_km(self) -> float:
        return self._tolerance_km

    def _known(self, division: str) -> str:
        validate_division(division)
        if division != "000000" and division not in self._divisions:
            raise UnknownDivisionError(f"division {division!r} is not a known division")
        return division

    def place(self, division: str) -> str:
        """The division's names, e.g. ``浙江省 杭州市 上城区 (330102)``; the ministry's code names China."""
        return f"{self.names(division)} ({division})"

    def names(self, division: str) -> str:
        """The division's names alone, e.g. ``浙江省 杭州市 上城区``; ``全国`` (the whole country) for ``000000``."""
        if self._known(division) == "000000":
            return "全国"
        return self._divisions.full_name(division)

    def area(self, division: str):
        """The polygon of a division; the country's outline for ``000000``."""
        if self._known(division) == "000000":
            return self._divisions.country
        return self._divisions.polygon(division)

    def distance_km(self, division: str, lat, lon) -> float:
        """How far (lat, lon) lies outside ``division`` (0 inside); see :meth:`Divisions.distance_km`."""
        if self._known(division) == "000000":
            from ..spatial.divisions import distance_to_km
            return distance_to_km(self._divisions.country, lat, lon)
        return self._divisions.distance_km(division, lat, lon)

    def officer(self, officer_id: str) -> Officer:
        try:
            return self._officers[officer_id]
        except (KeyError, TypeError):  # TypeError: unhashable id
            raise UnknownOfficerError(f"unknown officer_id {officer_id!r}") from None

    def _covering(self, officer_id: str, division: str, doing: str) -> Officer:
        off = self.officer(officer_id)
        validate_division(division)
        if not division.startswith(_prefix(off.division)):
            raise UnauthorizedError(
                f"officer {off.officer_id} ({off.level} {off.division}) may not {doing} "
                f"an alert in division {division}: outside their jurisdiction")
        return off

    def check_report(self, officer_id: str, division: str, lat=None, lon=None) -> Officer:
        """The reporting officer, if ``division`` is a known division within their jurisdiction.

        With a point (``lat``, ``lon``), it must lie in ``division`` or within
        ``tolerance_km`` of it.
        """
        off = self._covering(officer_id, self._known(division), "report")
        if lat is not None or lon is not None:
            d = self.distance_km(division, lat, lon)
            if d > self._tolerance_km:
                raise UnauthorizedError(
                    f"officer {off.officer_id} may not report a point at ({lat}, {lon}) in "
                    f"{self.place(division)}: it lies {d:.1f} km outside that division "
                    f"(tolerance {self._tolerance_km:g} km)")
        return off

    def needs_approval(self, officer: Officer | str) -> bool:
        """Whether a report by this officer waits for approval before it is sent."""
        if not isinstance(officer, Officer):
            officer = self.officer(officer)
        return officer.level in self._policy.needs_approval

    def check_approve(self, approver_id: str, reporter_id: str, division: str) -> Officer:
        """The approver, if they may approve ``reporter_id``'s report in ``division``."""
        approver = self.officer(approver_id)
        reporter = self.officer(reporter_id)
        validate_division(division)
        if approver.officer_id == reporter.officer_id:
            raise UnauthorizedError(
                f"officer {approver.officer_id} may not approve their own report")
        if approver.level not in self._policy.approver_levels:
            raise UnauthorizedError(
                f"officer {approver.officer_id} is at level {approver.level!r}, which may not "
                f"approve (approver levels: {', '.join(_in_order(self._policy.approver_levels))})")
        if approver.rank >= reporter.rank:
            raise UnauthorizedError(
                f"officer {approver.officer_id} ({approver.level}) is not superior to the "
                f"reporter {reporter.officer_id} ({reporter.level})")
        return self._covering(approver_id, division, "approve")

    def check_act(self, officer_id: str, division: str, action: str) -> Officer:
        """The officer, if they may take ``action`` (one of :data:`ACTIONS`) on an alert in ``division``."""
        if action not in ACTIONS:
            raise InvalidInputError(f"action={action!r} must be one of {', '.join(ACTIONS)}")
        return self._covering(officer_id, division, action)

    # -- collection protocol ------------------------------------------------------

    def __len__(self) -> int:
        return len(self._officers)

    def __contains__(self, officer_id: object) -> bool:
        try:
            return officer_id in self._officers
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Officer]:
        return iter(self._officers.values())

    def __repr__(self) -> str:
        return f"Authority({len(self)} officers, {self._policy})"

    # -- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"policy": self._policy.to_dict(),
                "officers": [o.to_dict() for o in self._officers.values()]}

    @classmethod
    def from_dict(cls, d: dict, *, divisions=None, tolerance_km: float = DEFAULT_TOLERANCE_KM) -> "Authority":
        if not isinstance(d, dict) or "officers" not in d:
            raise InvalidInputError("authority dict must have an 'officers' list")
        officers = d["officers"]
        if not isinstance(officers, list):
            raise InvalidInputError(f"officers must be a list, got {type(officers).__name__}")
        policy = ApprovalPolicy.from_dict(d["policy"]) if "policy" in d else None
        return cls((Officer.from_dict(o) for o in officers), policy, divisions=divisions,
                   tolerance_km=tolerance_km)
