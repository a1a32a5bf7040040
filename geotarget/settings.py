"""Operator settings: one TOML file, read with :mod:`tomllib`, over documented defaults.

The defaults are the TOML text :data:`DEFAULTS` below; a settings file names
only what it changes.  Both the library (:meth:`Settings.load`, then
``AlertEngine(..., settings=...)``) and the CLI (``--config FILE``,
``geotarget config show``) read the same file, so what the operator reviews
is what runs.

A settings file is untrusted input like every other file: an unknown table
or key, a value of the wrong type, a schedule that shrinks or a case type
without an event all end in :class:`~geotarget.errors.InvalidInputError`
naming the key, before anything is pushed.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .authority import ApprovalPolicy
from .errors import InvalidInputError
from .geo import check_int
from .model import CaseType
from .schedule import RadiusSchedule

__all__ = ["Settings", "CaseType", "RateLimits", "DEFAULTS", "CASE_TYPES"]

#: The documented defaults.  Every key a settings file may set appears here.
DEFAULTS = """\
# geotarget settings.  A settings file sets only what it changes; everything
# else keeps the value shown here.  `geotarget config show --config FILE`
# prints the settings in force.

[sender]
# CAP <sender>: the platform's identifier (no spaces, commas, '<' or '&').
id = "tuanyuan@mps.gov.cn"
# CAP <senderName>: the name receivers show.
name = "公安部儿童失踪信息紧急发布平台"
# PEM files of the key and certificate that sign every CAP message (XML-DSig).
# Empty: messages go out unsigned.  Relative paths are read from the
# settings file's directory.
signing_key = ""
signing_cert = ""

[dispatch]
# Only devices whose location was seen within this many hours receive a ring
# (0: no freshness filter).
max_location_age_hours = 24
# The languages of every CAP message, one <info> block each, in this order.
languages = ["zh-CN"]

[retention]
# Days after an alert's closure until its recipient sets are purged (0: keep).
days_after_closure = 180

[approval]
# Levels whose reports wait for approval, and the levels that may approve
# (always a strictly superior officer whose jurisdiction covers the alert).
needs_approval = ["county"]
approver_levels = ["city", "province", "ministry"]

[limits]
# Reports accepted per officer, and per division code, in any sliding hour
# (0: no limit).  A report over a limit is refused and nothing is logged.
reports_per_officer_per_hour = 10
reports_per_division_per_hour = 30

[duplicates]
# A report this close in place (km between the two centres) and time (hours
# between the two missing_since) to a pending or open alert of the same case
# type, about a person of the same name (details "name"), is held and linked
# to that alert until an officer confirms it is another person.  It is never
# pushed twice.  hours = 0 turns the check off.
distance_km = 5.0
hours = 24

[photos]
# Photos of the missing person travel in every CAP message as <resource>:
# <uri> is base_uri + "/" + "<sha1>.<ext>" (the web server publishing the
# photo directory).  Allowed: image/jpeg, image/png, image/webp, each at most
# max_bytes.  dir: where the engine keeps them (content-addressed, 0600);
# empty: "<log file>.photos" next to the recipient log.  Relative paths are
# read from the settings file's directory.  Retention deletes an alert's
# photos with its recipient sets.
base_uri = "https://tuanyuan.mps.gov.cn/photos"
max_bytes = 5242880
dir = ""

[drill]
# Device ids (integers) that receive drill alerts.  Empty: drills reach
# nobody; their counts are still computed as if they were real.
test_devices = []

# One table per case type: the CAP event and its SAME code, the radius
# schedule (hours since missing -> km, then final_km) and how long after
# publication the alert expires unless an officer renews it.
[case.child]
event = "Child Abduction Emergency"
event_code = "CAE"
schedule = [[1, 100], [2, 200], [3, 300]]
final_km = 500
expiry_hours = 72

[case.elderly]
event = "Missing and Endangered Person"
event_code = "MEP"
schedule = [[2, 50], [6, 100], [24, 200]]
final_km = 300
expiry_hours = 72

[case.other]
event = "Missing and Endangered Person"
event_code = "MEP"
schedule = [[1, 100], [2, 200], [3, 300]]
final_km = 500
expiry_hours = 72
"""

#: The case types every deployment has; a settings file may add more.
CASE_TYPES = ("child", "elderly", "other")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SAME = re.compile(r"[A-Z]{3}")


@dataclasses.dataclass(frozen=True)
class RateLimits:
    """Reports per officer and per division in any sliding hour; 0 means no limit."""

    per_officer_per_hour: int = 10
    per_division_per_hour: int = 30


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings in force.  Build with :meth:`load` (or :meth:`default`)."""

    sender: str
    sender_name: str
    signing_key: Path | None
    signing_cert: Path | None
    max_location_age: _dt.timedelta | None
    languages: tuple[str, ...]
    retention: _dt.timedelta | None
    approval: ApprovalPolicy
    limits: RateLimits
    duplicate_km: float
    duplicate_window: _dt.timedelta
    case_types: Mapping[str, CaseType]
    drill_devices: tuple[int, ...] = ()
    source: str = "defaults"
    photo_base_uri: str = "https://tuanyuan.mps.gov.cn/photos"
    photo_max_bytes: int = 5 * 1024 * 1024
    photo_dir: Path | None = None

    @classmethod
    def default(cls) -> "Settings":
        return cls._from_doc(tomllib.loads(DEFAULTS), "defaults", None)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Settings":
        """The defaults, overlaid with the TOML file at ``path`` (None: the defaults alone)."""
        if path is None:
            return cls.default()
        try:
            p = Path(os.fspath(path))
        except TypeError:
            raise InvalidInputError(f"path must be a str or os.PathLike, got {path!r}") from None
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"settings file {str(p)!r}: cannot read: {exc}") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"settings file {str(p)!r} is not valid TOML: {exc}") from None
        merged = _overlay(tomllib.loads(DEFAULTS), doc, str(p), "")
        return cls._from_doc(merged, str(p), p.parent)

    def case(self, name: str) -> CaseType:
        """The case type ``name``; an unknown name is an :class:`InvalidInputError`."""
        if not isinstance(name, str) or name not in self.case_types:
            raise InvalidInputError(f"case_type={name!r} must be one of {', '.join(self.case_types)}")
        return self.case_types[name]

    def signer(self):
        """A :class:`~geotarget.signing.CapSigner` from ``signing_key``/``signing_cert``, or None."""
        if self.signing_key is None:
            return None
        from .signing import CapSigner
        return CapSigner(self.signing_key, self.signing_cert)

    def to_dict(self) -> dict:
        """The settings as the TOML document that would reproduce them."""
        hours = (lambda td: 0 if td is None else td.total_seconds() / 3600)
        return {
            "sender": {"id": self.sender, "name": self.sender_name,
                       "signing_key": str(self.signing_key or ""),
                       "signing_cert": str(self.signing_cert or "")},
            "dispatch": {"max_location_age_hours": hours(self.max_location_age),
                         "languages": list(self.languages)},
            "retention": {"days_after_closure": 0 if self.retention is None else self.retention.days},
            "approval": self.approval.to_dict(),
            "limits": {"reports_per_officer_per_hour": self.limits.per_officer_per_hour,
                       "reports_per_division_per_hour": self.limits.per_division_per_hour},
            "duplicates": {"distance_km": self.duplicate_km, "hours": hours(self.duplicate_window)},
            "photos": {"base_uri": self.photo_base_uri, "max_bytes": self.photo_max_bytes,
                       "dir": str(self.photo_dir or "")},
            "drill": {"test_devices": list(self.drill_devices)},
            "case": {name: c.to_dict() for name, c in self.case_types.items()},
        }

    def to_toml(self) -> str:
        import tomli_w
        return f"# settings in force (from {self.source})\n" + tomli_w.dumps(self.to_dict())

    # -- parsing --------------------------------------------------------------

    @classmethod
    def _from_doc(cls, doc: dict, source: str, base: Path | None) -> "Settings":
        s, d, r, a, lim, dup = (doc[k] for k in ("sender", "dispatch", "retention", "approval",
                                                   "limits", "duplicates"))
        for table in ("sender", "dispatch", "retention", "approval", "limits", "duplicates", "drill",
                      "photos", "case"):
            if not isinstance(doc[table], dict):
                raise InvalidInputError(f"{source}: [{table}] must be a table")
        sender = _string(s["id"], "sender.id")
        if re.search(r"[\s,<&]", sender):
            raise InvalidInputError(f"sender.id={sender!r}: CAP forbids spaces, commas, '<' and '&'")
        key, cert = (_path(s[k], f"sender.{k}", base) for k in ("signing_key", "signing_cert"))
        if (key is None) != (cert is None):
            raise InvalidInputError("sender.signing_key and sender.signing_cert go together: "
                                    "set both or neither")
        languages = d["languages"]
        if not isinstance(languages, list) or not languages:
            raise InvalidInputError(f"dispatch.languages must be a non-empty list, got {languages!r}")
        for i, lang in enumerate(languages):
            if not isinstance(lang, str) or not re.fullmatch(r"[a-zA-Z]{1,8}(-[a-zA-Z0-9]{1,8})*", lang):
                raise InvalidInputError(f"dispatch.languages[{i}]={lang!r} is not a language tag")
        if len(set(languages)) != len(languages):
            raise InvalidInputError(f"dispatch.languages repeats a language: {languages!r}")
        age = _hours(d["max_location_age_hours"], "dispatch.max_location_age_hours", zero_ok=True)
        days = _count(r["days_after_closure"], "retention.days_after_closure")
        try:
            approval = ApprovalPolicy.from_dict(dict(a))
        except InvalidInputError as exc:
            raise InvalidInputError(f"approval: {exc}") from None
        limits = RateLimits(_count(lim["reports_per_officer_per_hour"], "limits.reports_per_officer_per_hour"),
                            _count(lim["reports_per_division_per_hour"], "limits.reports_per_division_per_hour"))
        dup_km = _number(dup["distance_km"], "duplicates.distance_km")
        dup_h = _hours(dup["hours"], "duplicates.hours", zero_ok=True)
        cases = doc["case"]
        missing = [c for c in CASE_TYPES if c not in cases]
        if missing:
            raise InvalidInputError(f"case types {missing} are missing")
        case_types = {name: _case(name, body) for name, body in cases.items()}
        devices = doc["drill"]["test_devices"]
        if not isinstance(devices, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in devices):
            raise InvalidInputError(f"drill.test_devices must be a list of device ids (integers in "
                                    f"[0, 2**64)), got {devices!r}")
        ph = doc["photos"]
        base_uri = _string(ph["base_uri"], "photos.base_uri")
        import urllib.parse
        parts = urllib.parse.urlsplit(base_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or re.search(r"[\s<>&\"']", base_uri):
            raise InvalidInputError(f"photos.base_uri={base_uri!r} must be an absolute http(s) URL "
                                    "without spaces, quotes, '<', '>' or '&'")
        max_bytes = _count(ph["max_bytes"], "photos.max_bytes")
        if not 0 < max_bytes <= 100 * 1024 * 1024:
            raise InvalidInputError(f"photos.max_bytes={max_bytes} must be in 1 .. 104857600 (100 MB)")
        return cls(photo_base_uri=base_uri, photo_max_bytes=max_bytes,
                   photo_dir=_path(ph["dir"], "photos.dir", base),
                   sender=sender, sender_name=_string(s["name"], "sender.name", empty_ok=True),
                   signing_key=key, signing_cert=cert, max_location_age=age,
                   languages=tuple(languages),
                   retention=None if days == 0 else _dt.timedelta(days=days), approval=approval,
                   limits=limits, duplicate_km=dup_km,
                   duplicate_window=dup_h or _dt.timedelta(0), case_types=case_types,
                   drill_devices=tuple(sorted(set(devices))), source=source)


_CASE_KEYS = ("event", "event_code", "schedule", "final_km", "expiry_hours")


def _overlay(base: dict, over: dict, source: str, where: str) -> dict:
    """``base`` with ``over``'s values; keys ``base`` does not have are refused (except new cases)."""
    out = dict(base)
    for key, value in over.items():
        path = f"{where}{key}"
        if where == "case." and key not in base:
            if not isinstance(value, dict):
                raise InvalidInputError(f"{source}: [{path}] must be a table")
            unknown = set(value) - set(_CASE_KEYS)
            missing = set(_CASE_KEYS) - set(value)
            if unknown or missing:
                raise InvalidInputError(f"{source}: [{path}] needs exactly the keys "
                                        f"{', '.join(_CASE_KEYS)} (unknown {sorted(unknown)}, "
                                        f"missing {sorted(missing)})")
            out[key] = value
            continue
        if key not in base:
            known = ", ".join(sorted(base))
            raise InvalidInputError(f"{source}: unknown setting {path!r} (known here: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InvalidInputError(f"{source}: {path!r} must be a table")
            out[key] = _overlay(base[key], value, source, path + ".")
        else:
            out[key] = value
    return out


def _string(v: Any, name: str, empty_ok: bool = False) -> str:
    if not isinstance(v, str) or (not v and not empty_ok):
        raise InvalidInputError(f"{name} must be a{'' if empty_ok else ' non-empty'} string, got {v!r}")
    if any(ord(c) < 0x20 and c not in "\t\n" for c in v):
        raise InvalidInputError(f"{name}={v!r} contains a control character")
    return v


def _number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise InvalidInputError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _count(v: Any, name: str) -> int:
    return check_int(v, name, 0)


def _hours(v: Any, name: str, zero_ok: bool = False) -> _dt.timedelta | None:
    h = _number(v, name)
    if h == 0:
        if zero_ok:
            return None
        raise InvalidInputError(f"{name} must be > 0")
    if h > 24 * 366 * 10:
        raise InvalidInputError(f"{name}={v!r} is more than ten years")
    return _dt.timedelta(hours=h)


def _path(v: Any, name: str, base: Path | None) -> Path | None:
    v = _string(v, name, empty_ok=True)
    if not v:
        return None
    p = Path(v).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _case(name: str, body: Any) -> CaseType:
    if not _NAME.fullmatch(name):
        raise InvalidInputError(f"case type name {name!r} must be lower-case letters, digits, '_'")
    where = f"case.{name}"
    event = _string(body["event"], f"{where}.event")
    code = body["event_code"]
    if not isinstance(code, str) or not _SAME.fullmatch(code):
        raise InvalidInputError(f"{where}.event_code={code!r} must be a three-letter SAME code")
    steps = body["schedule"]
    if not isinstance(steps, list):
        raise InvalidInputError(f"{where}.schedule must be a list of [hours, km], got {steps!r}")
    pairs = []
    for i, step in enumerate(steps):
        if not isinstance(step, list) or len(step) != 2:
            raise InvalidInputError(f"{where}.schedule[{i}]={step!r} must be [hours, km]")
        pairs.append((_hours(step[0], f"{where}.schedule[{i}] hours"), step[1]))
    try:
        schedule = RadiusSchedule(pairs, body["final_km"], name=name)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    return CaseType(name, event, code, schedule, _hours(body["expiry_hours"], f"{where}.expiry_hours"))
