"""What every verb shares: exit codes, argument types, output, and opening stores, logs and engines."""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..errors import InvalidInputError
from ..geo import now_or_clock

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_CHECK_FAILED = 0, 1, 2, 3


_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; our 2 means "refused", so usage errors exit 1."""

    def error(self, message):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_count(text: str) -> int:
    """``20M``, ``2e6``, ``500k``, ``1_000_000``, ``1.5M`` -> int (exact, >= 1)."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = 1
    if s and s[-1] in _SUFFIXES:
        mult = _SUFFIXES[s[-1]]
        s = s[:-1]
    try:
        value = Decimal(s) * mult
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 20M, 2e6 or 500k") from None
    if not value.is_finite() or value != value.to_integral_value() or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(value)


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def positive_int(text: str) -> int:
    v = nonneg_int(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return v


def positive_float(text: str) -> float:
    v = nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return v


def nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def parse_time(text: str | None, name: str) -> _dt.datetime | None:
    """An aware datetime from ISO 8601; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        t = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInputError(f"{name}={text!r} is not an ISO 8601 time such as "
                                "2026-11-23T08:10:00+08:00") from None
    if t.tzinfo is None:
        raise InvalidInputError(f"{name}={text!r} has no UTC offset; add one, e.g. +08:00 or Z")
    return t


def now_of(args) -> _dt.datetime:
    return now_or_clock(parse_time(getattr(args, "now", None), "--now"), "--now")


def iso_or_none(t) -> str | None:
    return t.isoformat() if isinstance(t, _dt.datetime) else t


def parse_apps(text: str | None):
    if text is None:
        return None
    apps = [a.strip() for a in text.split(",") if a.strip()]
    if not apps:
        raise InvalidInputError(f"--apps={text!r} names no app")
    return apps


def write_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_line(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def to_ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def load_officers(path) -> "Authority":  # noqa: F821 - imported lazily
    """An :class:`~geotarget.alerts.authority.Authority` from a JSON or CSV officers file (see module doc)."""
    from ..alerts.authority import Authority, Officer

    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"--officers {str(p)!r}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"--officers {str(p)!r} is not UTF-8 text: {exc}") from None
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        need = {"officer_id", "level", "division"}
        header = set(rows[0]) if rows else set()
        if not rows or not need <= header:
            raise InvalidInputError(
                f"--officers {str(p)!r}: a CSV needs a header officer_id,level,division[,name] and rows")
        officers = []
        for i, r in enumerate(rows, start=2):
            if None in r:
                raise InvalidInputError(f"--officers {str(p)!r} line {i}: more fields than the header")
            extra = set(r) - need - {"name"}
            if extra:
                raise InvalidInputError(f"--officers {str(p)!r}: unknown column(s) {sorted(extra)}")
            try:
                officers.append(Officer((r["officer_id"] or "").strip(), (r["level"] or "").strip(),
                                        (r["division"] or "").strip(), (r.get("name") or "").strip()))
            except InvalidInputError as exc:
                raise InvalidInputError(f"--officers {str(p)!r} line {i}: {exc}") from None
        return Authority(officers)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"--officers {str(p)!r} is not valid JSON ({exc}); "
                                "use a .csv name for CSV") from None
    if isinstance(doc, list):
        doc = {"officers": doc}
    try:
        return Authority.from_dict(doc)
    except InvalidInputError as exc:
        raise InvalidInputError(f"--officers {str(p)!r}: {exc}") from None


def open_index(path):
    from ..spatial.index import SpatialIndex

    p = Path(path)
    if not p.is_dir():
        raise InvalidInputError(f"--index {str(p)!r}: no such directory")
    return SpatialIndex.open(p)


def open_log(path, create: bool = False, args=None, standby: bool = False):
    """The log at ``path``; ``standby``: a PostgreSQL log is opened without its lease (reads, or a
    node that waits to lead), so it works beside the engine that leads it."""
    from ..alerts._pglog import is_url
    from ..alerts.log import FILENAME, RecipientLog

    if is_url(path):  # a PostgreSQL log: created in the database on first open
        lease = getattr(args, "lease", None)
        return RecipientLog(path, standby=standby, **({"lease": lease} if lease is not None else {}))
    p = Path(path)
    if not create and not p.exists():
        raise InvalidInputError(f"--log {str(p)!r}: no recipient log there")
    target = p / FILENAME if p.is_dir() else p
    existed = target.exists()
    log = RecipientLog(p)
    if args is not None and not existed:
        args.created_log = log.path
    return log


def open_engine(args, officers_required: bool, standby: bool = False):
    from ..alerts.authority import Authority
    from ..alerts.engine import AlertEngine

    if officers_required and not args.officers:
        raise InvalidInputError(f"alert {args.action} needs --officers FILE (who may act)")
    authority = load_officers(args.officers) if args.officers else Authority([])
    settings = load_settings(args)
    age = settings.max_location_age
    if getattr(args, "max_location_age", None) is not None:
        age = _dt.timedelta(hours=args.max_location_age) if args.max_location_age > 0 else None
    signer = settings.signer()
    retention = getattr(args, "retention_days", None)
    if retention is None and settings.retention is not None:
        retention = settings.retention.total_seconds() / 86400
    index = open_index(args.index)
    log = open_log(args.log, create=args.action in ("report", "serve"), args=args, standby=standby)
    try:
        return AlertEngine(index, log=log, authority=authority, settings=settings,
                           max_location_age=age, signer=signer, retention_days=retention)
    except BaseException:
        close_log(log, args)
        raise


def close_log(log, args, failed: bool = True) -> None:
    """Close the log; one this command created and then refused to use is removed again."""
    created = getattr(args, "created_log", None)
    empty = failed and created is not None and not log.alerts()
    log.close()
    if empty:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(created)


def load_settings(args):
    from ..alerts.settings import Settings
    return Settings.load(getattr(args, "config", None))


def place_names(code: str) -> str:
    """The names of a division code, or "" for a code the registry does not hold (an old log)."""
    from ..spatial.divisions import Divisions
    divs = Divisions.china()
    return "全国" if code == "000000" else (divs.full_name(code) if code in divs else "")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
