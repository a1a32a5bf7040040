"""The ``geotarget`` command line: thin verbs over the library.

Verbs
-----
``demo``                  the whole job end to end on a national population (no arguments needed)
``generate``              a synthetic population into a store directory
``ingest``                Parquet or CSV into a store directory
``build``                 the spatial index of a store directory (written next to the store)
``query``                 devices within a circle: counts by app, or ids to Parquet
``alert report|approve|tick|refresh|update|close|retract|show``   the alert lifecycle on a log
``stats``                 published, found, recovery rate, outcomes
``audit verify|list|anchor``  check the log and its hash-chained audit trail; list the trail;
                          print the chain head for an outside witness
``log backup``            copy a recipient log, WAL included, with SQLite's online backup
``officers register``     register (or change) the officers registry of a log: a ministry officer
``alert purge``           apply the retention setting: drop closed alerts' recipients and outputs
``bench``                 in-process timings of within/count on an index
``map``                   the map PNG of any alert in a log
``divisions``             China's administrative divisions by code, name or point

A store and its index share one directory (``--store DIR`` where it is
written, ``--index DIR`` where it is read).

Officers file (``--officers``)
------------------------------
JSON, either a list of officers or an object with ``officers`` and an
optional approval ``policy``::

    [{"officer_id": "C-330102", "level": "county", "division": "330102", "name": "..."},
     {"officer_id": "S-330100", "level": "city", "division": "330100"}]

    {"officers": [...], "policy": {"needs_approval": ["county"],
                                    "approver_levels": ["city", "province", "ministry"]}}

or CSV with a header ``officer_id,level,division[,name]``.  Levels are
ministry, province, city, county; a division is a 6-digit code
(``000000`` ministry, ``330000`` province, ``330100`` city, ``330102``
county), kept as text (write ``000000``, not ``0``).

Conventions
-----------
* ``--json`` on every verb whose output machines read; JSON goes to stdout.
* Exit codes: 0 ok; 1 usage error (the command line cannot be parsed: unknown
  verb or option, a missing or malformed argument); 2 refused or invalid
  input (any :class:`~geotarget.errors.GeotargetError`, or a file that cannot
  be read), with one line on stderr and never a traceback; 3 the demo's
  self-check failed.
* Times are ISO 8601 with an offset (``2026-11-23T08:10:00+08:00`` or
  ``...Z``); a time without one is refused, as in the library.
* Progress bars (tqdm) go to stderr when it is a terminal, never otherwise
  (``GEOTARGET_PROGRESS=0/1`` overrides).
* Every file and directory a verb creates is private (0600 / 0700): stores,
  indexes, logs and per-push outputs hold device locations or ids.
* A keyed log needs its MAC key in ``GEOTARGET_LOG_KEY`` or a file named by
  ``GEOTARGET_LOG_KEY_FILE``; without it the log is read and verified unkeyed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Sequence

from .errors import GeotargetError, InvalidInputError

__all__ = ["main", "build_parser", "parse_count", "load_officers"]

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_CHECK_FAILED = 0, 1, 2, 3
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


# ---------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
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


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def _when(text: str | None, name: str) -> _dt.datetime | None:
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


def _now(args) -> _dt.datetime:
    t = _when(getattr(args, "now", None), "--now")
    return t if t is not None else _dt.datetime.now(_dt.timezone.utc)


def _iso(t) -> str | None:
    return t.isoformat() if isinstance(t, _dt.datetime) else t


def _apps(text: str | None):
    if text is None:
        return None
    apps = [a.strip() for a in text.split(",") if a.strip()]
    if not apps:
        raise InvalidInputError(f"--apps={text!r} names no app")
    return apps


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


# ---------------------------------------------------------------------------
# opening things
# ---------------------------------------------------------------------------

def load_officers(path) -> "Authority":  # noqa: F821 - imported lazily
    """An :class:`~geotarget.authority.Authority` from a JSON or CSV officers file (see module doc)."""
    from .authority import Authority, Officer

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


def _open_index(path):
    from .index import SpatialIndex

    p = Path(path)
    if not p.is_dir():
        raise InvalidInputError(f"--index {str(p)!r}: no such directory")
    return SpatialIndex.open(p)


def _open_log(path, create: bool = False, args=None):
    from ._pglog import is_url
    from .log import FILENAME, RecipientLog

    if is_url(path):  # a PostgreSQL log: created in the database on first open
        return RecipientLog(path)
    p = Path(path)
    if not create and not p.exists():
        raise InvalidInputError(f"--log {str(p)!r}: no recipient log there")
    target = p / FILENAME if p.is_dir() else p
    existed = target.exists()
    log = RecipientLog(p)
    if args is not None and not existed:
        args.created_log = log.path
    return log


def _engine(args, officers_required: bool):
    from .authority import Authority
    from .engine import AlertEngine

    if officers_required and not args.officers:
        raise InvalidInputError(f"alert {args.action} needs --officers FILE (who may act)")
    authority = load_officers(args.officers) if args.officers else Authority([])
    settings = _settings(args)
    age = settings.max_location_age
    if getattr(args, "max_location_age", None) is not None:
        age = _dt.timedelta(hours=args.max_location_age) if args.max_location_age > 0 else None
    signer = settings.signer()
    retention = getattr(args, "retention_days", None)
    if retention is None and settings.retention is not None:
        retention = settings.retention.total_seconds() / 86400
    index = _open_index(args.index)
    log = _open_log(args.log, create=args.action == "report", args=args)
    try:
        return AlertEngine(index, log=log, authority=authority, settings=settings,
                           max_location_age=age, signer=signer, retention_days=retention)
    except BaseException:
        _close_log(log, args)
        raise


def _close_log(log, args, failed: bool = True) -> None:
    """Close the log; one this command created and then refused to use is removed again."""
    created = getattr(args, "created_log", None)
    empty = failed and created is not None and not log.alerts()
    log.close()
    if empty:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(created)


def _settings(args):
    from .settings import Settings
    return Settings.load(getattr(args, "config", None))


def cmd_config(args) -> int:
    settings = _settings(args)
    if args.json:
        _emit_json(settings.to_dict())
    else:
        sys.stdout.write(settings.to_toml())
    return EXIT_OK


# ---------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demo import format_report, report_json, run_demo

    echo = None if args.json else (lambda s: (_out(s), sys.stdout.flush()))
    result = run_demo(devices=args.devices, seed=args.seed, city=args.city, workdir=args.workdir,
                      draw_map=not args.no_map, echo=echo)
    if args.json:
        sys.stdout.write(report_json(result) + "\n")
    else:
        _out()
        _out(format_report(result))
    return EXIT_OK if result["check"]["ok"] else EXIT_CHECK_FAILED


def _store_summary(store, path, seconds: dict) -> dict:
    return {"store": str(path), "devices": len(store), "generation": store.generation,
            "apps": list(store.app_names), "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _held(d: Path) -> list[str]:
    from .index import INDEX_META
    from .store import MANIFEST_FILE, STORE_FILE

    return [what for what, names in (("a store", (STORE_FILE, MANIFEST_FILE)), ("an index", (INDEX_META,)))
            if any((d / nm).exists() for nm in names)]


def _check_store_dir(path, force: bool = False) -> Path:
    """Refuse an output directory that cannot be one, before any long work starts.

    A directory that already holds a store or an index is refused unless
    ``force``: a new store next to an old index is how an index came to
    answer for devices it was not built from.
    """
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise InvalidInputError(f"--store {str(d)!r} exists and is not a directory")
    if not d.parent.is_dir():
        raise InvalidInputError(f"--store {str(d)!r}: directory {str(d.parent)!r} does not exist")
    held = _held(d) if d.is_dir() else []
    if held and not force:
        raise InvalidInputError(f"--store {str(d)!r} already holds {' and '.join(held)}; pass --force to "
                                f"replace the store (its index is removed with it)")
    return d


def _replace_store(store, d: Path) -> None:
    """Save ``store`` into ``d``, removing any index there first.

    The index goes before the store is touched, and the store's own save
    replaces its manifest last: at no instant does ``d`` hold an index and a
    store that open together but do not belong together.
    """
    from .index import SpatialIndex

    if d.is_dir():
        SpatialIndex.remove(d)
    store.save(d)


def _maybe_build(store, directory, seconds: dict, build: bool):
    if not build:
        return
    from .index import SpatialIndex

    t0 = time.perf_counter()
    SpatialIndex.build(store).save(directory)
    seconds["index"] = time.perf_counter() - t0


def cmd_generate(args) -> int:
    from .population import population

    d = _check_store_dir(args.store, args.force)
    seconds = {}
    t0 = time.perf_counter()
    store = population(args.devices, seed=args.seed)
    seconds["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _replace_store(store, d)
    seconds["save"] = time.perf_counter() - t0
    _maybe_build(store, args.store, seconds, args.build)
    summary = _store_summary(store, args.store, seconds)
    summary["indexed"] = bool(args.build)
    if args.json:
        _emit_json(summary)
    else:
        _out(f"{len(store):,} devices (seed {args.seed}) written to {args.store}/"
             + (" with its index" if args.build else f"; next: geotarget build --store {args.store}"))
    return EXIT_OK


def _read_table(path: Path, fmt: str):
    import pyarrow as pa

    if not path.is_file():
        raise InvalidInputError(f"input {str(path)!r}: no such file")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = "csv" if suffix in (".csv", ".gz", ".txt") else "parquet" if suffix in (".parquet", ".pq", ".geoparquet") else ""
        if not fmt:
            raise InvalidInputError(f"input {str(path)!r}: cannot tell the format from the name; "
                                    "pass --format csv or --format parquet")
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise InvalidInputError(f"input {str(path)!r} is not readable Parquet: {exc}") from None
    import pyarrow.csv as pacsv
    try:
        header = _csv_header(path)
        types = {name: pa.uint64() for name in header if name.lower() in ("device_id", "id")}
        types.update({name: pa.float64() for name in header
                      if name.lower() in ("lat", "lon", "lng", "latitude", "longitude")})
        types.update({name: pa.string() for name in header if name.lower() == "app"})
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(f"input {str(path)!r} is not readable CSV: {exc}") from None


def _csv_header(path: Path) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
        row = next(csv.reader(fh), None)
    if not row:
        raise InvalidInputError(f"input {str(path)!r} is empty; a CSV needs a header line")
    return [c.strip() for c in row]


def cmd_ingest(args) -> int:
    from .store import DeviceStore

    path = Path(args.input)
    d = _check_store_dir(args.store, args.force)
    seconds = {}
    t0 = time.perf_counter()
    table = _read_table(path, args.format)
    for name, typ in zip(table.column_names, table.schema.types):
        import pyarrow as pa

        if name.lower() == "last_seen" and pa.types.is_timestamp(typ) and typ.tz is None:
            # As in the library: a time without an offset is ambiguous, never read as UTC.
            raise InvalidInputError(f"input {str(path)!r}: column {name!r} holds times without a UTC "
                                    f"offset (e.g. 2026-11-23 08:00:00); write them with one "
                                    f"(+08:00 or Z), or as epoch seconds")
    if args.base:
        # a new generation of an existing store: known devices keep their keys,
        # so recipient logs written against the base stay meaningful
        base_dir = Path(args.base)
        if not base_dir.is_dir():
            raise InvalidInputError(f"--base {str(base_dir)!r}: no such directory")
        if base_dir.resolve() == Path(args.store).resolve():
            raise InvalidInputError("--store must differ from --base: the base generation keeps serving")
        base = DeviceStore.open(base_dir)
        cols = {name.lower(): name for name in table.column_names}

        def col(*names, required=True):
            for nm in names:
                if nm in cols:
                    return table.column(cols[nm])
            if required:
                raise InvalidInputError(f"input {str(path)!r} has no {names[0]} column; "
                                        f"columns are {table.column_names}")
            return None

        store = base.with_updates(col("device_id", "id").to_numpy(),
                                  col("lat", "latitude").to_numpy(), col("lon", "lng", "longitude").to_numpy(),
                                  last_seen=col("last_seen", required=False), app=col("app", required=False))
    else:
        store = DeviceStore.from_table(table)
    seconds["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _replace_store(store, d)
    seconds["save"] = time.perf_counter() - t0
    _maybe_build(store, args.store, seconds, args.build)
    summary = _store_summary(store, args.store, seconds)
    summary["input"] = str(path)
    summary["indexed"] = bool(args.build)
    if args.json:
        _emit_json(summary)
    else:
        _out(f"{len(store):,} devices from {path} written to {args.store}/"
             + (" with its index" if args.build else f"; next: geotarget build --store {args.store}"))
    return EXIT_OK


def cmd_build(args) -> int:
    from .index import SpatialIndex
    from .store import DeviceStore

    d = Path(args.store)
    if not d.is_dir():
        raise InvalidInputError(f"--store {str(d)!r}: no such directory")
    if "an index" in _held(d) and not args.force:
        raise InvalidInputError(f"--store {str(d)!r} already holds an index; pass --force to rebuild it")
    store = DeviceStore.open(d)
    t0 = time.perf_counter()
    index = SpatialIndex.build(store)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.save(d)
    saved = time.perf_counter() - t0
    summary = {"index": str(d), "devices": len(index), "depth": index.depth,
               "generation": index.generation, "build_s": round(built, 3), "save_s": round(saved, 3),
               "bytes": index.nbytes_with_filters}
    if args.json:
        _emit_json(summary)
    else:
        _out(f"index of {len(index):,} devices built in {built:.2f} s, saved to {d}/ "
             f"({index.nbytes_with_filters / 2**20:,.1f} MiB)")
    return EXIT_OK


def cmd_query(args) -> int:
    index = _open_index(args.index)
    seen = _when(args.seen_since, "--seen-since")
    apps = _apps(args.apps)
    t0 = time.perf_counter()
    aud = index.within(args.lat, args.lon, args.radius, seen_since=seen, apps=apps)
    q = time.perf_counter() - t0
    by_app = dict(sorted(aud.counts_by_app().items(), key=lambda kv: (-kv[1], kv[0])))
    result = {"lat": args.lat, "lon": args.lon, "radius_km": args.radius, "seen_since": _iso(seen),
              "apps": apps, "count": len(aud), "by_app": by_app, "query_ms": _ms(q)}
    if args.out:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(args.out)
        if not out.parent.is_dir():
            raise InvalidInputError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
        store = index.store
        keys = aud.keys()
        codes = np.asarray(store.app_codes)[keys]
        table = pa.table({
            "device_id": pa.array(np.asarray(store.device_id)[keys], type=pa.uint64()),
            "key": pa.array(keys, type=pa.uint32()),
            "app": pa.DictionaryArray.from_arrays(pa.array(codes, type=pa.int8()),
                                                  pa.array(list(store.app_names), type=pa.string())),
        })
        pq.write_table(table, out)
        result["out"] = str(out)
    if args.json:
        _emit_json(result)
        return EXIT_OK
    _out(f"{len(aud):,} devices within {args.radius:g} km of {args.lat:g}, {args.lon:g}"
         + (f", seen since {seen.isoformat()}" if seen else "") + (f", apps {', '.join(apps)}" if apps else "")
         + f"  (query {q * 1e3:.2f} ms)")
    items = list(by_app.items())
    shown = items if len(items) <= 10 else items[:8]
    for app, n in shown:
        _out(f"  {app:<22}{n:>14,}")
    if len(shown) < len(items):
        rest = items[len(shown):]
        _out(f"  {f'{len(rest)} other apps':<22}{sum(n for _, n in rest):>14,}   (all in --json)")
    if args.out:
        _out(f"device ids written to {args.out} (columns device_id, key, app)")
    return EXIT_OK


# -- alert -----------------------------------------------------------------

def _push_doc(p, store=None, replayed=False, files=None) -> dict:
    doc = {"push_id": p.push_id, "alert_id": p.alert_id, "seq": p.seq, "kind": p.kind,
           "radius_km": p.radius_km, "recipients": len(p), "created_at": _iso(p.created_at),
           "replayed": replayed}
    doc["by_app"] = dict(sorted(p.audience.counts_by_app().items(), key=lambda kv: (-kv[1], kv[0])))
    if files:
        doc.update(files)
    return doc


def _hand_off(engine, pushes, args, replay_ids=()) -> list[dict]:
    """Write CAP and per-push batches to ``--out``, acknowledge with ``--ack``; describe each push."""
    docs = []
    out = Path(args.out) if getattr(args, "out", None) else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for p in pushes:
        files = {}
        if out is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cap = out / f"{p.push_id}.xml"
            cap.write_text(p.cap_xml, encoding="utf-8")
            tables = []
            for app, t in p.batches.items():
                tables.append(t.append_column("app", pa.array([app] * t.num_rows, type=pa.string())))
            batch = pa.concat_tables(tables) if tables else pa.table(
                {"device_id": pa.array([], pa.uint64()), "key": pa.array([], pa.uint32()),
                 "app": pa.array([], pa.string())})
            pq.write_table(batch, out / f"{p.push_id}.parquet")
            files = {"cap_file": str(cap), "batches_file": str(out / f"{p.push_id}.parquet")}
            from .engine import record_outputs

            record_outputs(engine.log, p.push_id, [os.path.abspath(f) for f in files.values()])
        acked = bool(getattr(args, "ack", False))
        if acked:
            engine.ack(p.push_id)
        doc = _push_doc(p, replayed=p.push_id in replay_ids, files=files)
        doc["acked"] = acked
        docs.append(doc)
    return docs


def _print_pushes(docs: list[dict]) -> None:
    if not docs:
        _out("no push due")
        return
    for d in docs:
        top = " · ".join(f"{a} {n:,}" for a, n in list(d["by_app"].items())[:3])
        flag = "  [offered again: logged, never acknowledged]" if d.get("replayed") else ""
        _out(f"push {d['push_id']}  {d['kind']:<10} {d['radius_km']:>6g} km {d['recipients']:>12,} devices"
             f"  ({top}){flag}")
        if d.get("cap_file"):
            _out(f"  CAP {d['cap_file']}   batches {d['batches_file']}")
    acked = sum(1 for d in docs if d.get("acked"))
    if acked:
        _out(f"{acked} push{'es' if acked != 1 else ''} acknowledged")
    else:
        _out("not acknowledged: they will be offered again (same push_id) until "
             "acknowledged with --ack")


def cmd_alert(args) -> int:
    action = args.action
    if action == "show":
        return _alert_show(args)
    if action == "purge":
        return _alert_purge(args)
    engine = _engine(args, officers_required=action in ("report", "approve", "update", "close", "retract",
                                                         "renew", "confirm"))
    try:
        code = _alert_action(engine, args, action)
    except BaseException:
        _close_log(engine.log, args, failed=True)
        raise
    _close_log(engine.log, args, failed=False)
    return code


def _alert_purge(args) -> int:
    from .engine import purge_expired

    log = _open_log(args.log)
    try:
        photo_dir = _settings(args).photo_dir
        result = purge_expired(log, args.retention_days, _now(args),
                               photo_dir=None if photo_dir is None else str(photo_dir))
    finally:
        log.close()
    if args.json:
        _emit_json(result)
        return EXIT_OK
    for aid, n in result["purged"].items():
        _out(f"alert {aid}: {n} audience(s) dropped")
    for f in result["files"]:
        _out(f"removed {f}")
    for aid in result["waiting"]:
        _out(f"alert {aid}: kept, it has unacknowledged pushes")
    if not any(result.values()):
        _out(f"nothing closed more than {args.retention_days:g} days ago holds recipients")
    return EXIT_OK


def _alert_action(engine, args, action) -> int:
    now = _now(args)
    if action == "report":
        details = _details(args)
        officer = engine.authority.officer(args.officer)
        division = args.division or officer.division
        alert = engine.report(args.officer, lat=args.lat, lon=args.lon,
                              missing_since=_when(args.missing_since, "--missing-since"),
                              division=division, details=details, now=now,
                              case_type=args.case_type, drill=args.drill,
                              division_wide=bool(getattr(args, "division_wide", False)),
                              photos=list(args.photo or []))
        doc = {"alert_id": alert.id, "status": alert.status, "division": alert.division,
               "place": engine.authority.names(alert.division),
               "reporter": alert.reporter, "reported_at": _iso(alert.reported_at),
               "case_type": alert.case_type, "drill": alert.drill,
               "expires_at": _iso(alert.expires_at), "duplicate_of": alert.duplicate_of,
               "photos": [p["digest"] for p in alert.photos]}
        if args.json:
            _emit_json(doc)
        else:
            state = {"pending": "pending approval", "open": "published",
                     "held": f"HELD as a possible duplicate of {alert.duplicate_of}: an officer "
                             f"confirms with 'alert confirm --distinct' or '--duplicate'"}
            _out(("DRILL (exercise, not a real alert): " if alert.drill else "")
                 + f"{alert.case_type} alert {alert.id} reported by {alert.reporter} in "
                 f"{engine.place(alert.id)}: {state.get(alert.status, alert.status)}")
        return EXIT_OK
    if action in ("renew", "confirm"):
        if action == "renew":
            alert = engine.renew(args.alert_id, args.officer, now=now, hours=args.hours)
        elif args.distinct:
            alert = engine.confirm_distinct(args.alert_id, args.officer, now=now)
        else:
            alert = engine.confirm_duplicate(args.alert_id, args.officer, now=now)
        doc = {"alert_id": alert.id, "status": alert.status, "expires_at": _iso(alert.expires_at),
               "duplicate_of": alert.duplicate_of}
        if args.json:
            _emit_json(doc)
        else:
            _out(f"alert {alert.id}: {alert.status}"
                 + (f", expires {alert.expires_at.isoformat()}" if alert.expires_at else ""))
        return EXIT_OK
    if action == "approve":
        alert = engine.approve(args.alert_id, args.officer, now=now)
        doc = {"alert_id": alert.id, "status": alert.status, "approved_by": alert.approved_by,
               "division": alert.division, "place": engine.authority.names(alert.division),
               "lat": alert.lat, "lon": alert.lon, "published_at": _iso(alert.published_at)}
        if args.json:
            _emit_json(doc)
        else:
            _out(f"alert {alert.id} in {engine.place(alert.id)} (last seen {alert.lat:.5f}, "
                 f"{alert.lon:.5f}) approved by {alert.approved_by}: published at "
                 f"{alert.published_at.isoformat()}")
        return EXIT_OK
    replay_ids = {r.push_id for r in engine.log.unacked()} if action in ("tick", "refresh") else set()
    if action == "tick":
        pushes = engine.tick(now)
    elif action == "refresh":
        # the engine was opened on --index; refreshing onto the same generation
        # tops every open alert up with devices now inside and never notified
        pushes = engine.tick(now)
        topups = engine.refresh(engine.index, now)
        pushes.extend(topups)
        pushes.errors.extend(topups.errors)
    elif action == "update":
        details = _details(args)
        if not details:
            raise InvalidInputError("alert update needs --headline, --description, --instruction "
                                    "or --details")
        pushes = [engine.update(args.alert_id, args.officer, details, now=now)]
    elif action == "close":
        pushes = [engine.close(args.alert_id, args.officer, outcome=args.outcome, now=now)]
    else:  # retract
        p = engine.retract(args.alert_id, args.officer, reason=args.reason or "", now=now)
        pushes = [p] if p is not None else []
    docs = _hand_off(engine, pushes, args, replay_ids)
    if args.json:
        _emit_json({"pushes": docs})
    else:
        if action == "retract" and not pushes:
            _out(f"alert {args.alert_id} retracted before anything went out: nothing to send")
        else:
            _print_pushes(docs)
        for f in getattr(pushes, "errors", ()):
            sys.stderr.write(f"geotarget: alert {f.alert_id}: {f.error}"
                             + (" (quarantined until updated or retracted)\n" if f.quarantined
                                else " (tried again on the next tick)\n"))
    return EXIT_OK


def _details(args) -> dict:
    details = {}
    if args.details:
        try:
            details = json.loads(args.details)
        except ValueError as exc:
            raise InvalidInputError(f"--details is not valid JSON: {exc}") from None
        if not isinstance(details, dict):
            raise InvalidInputError(f"--details must be a JSON object, got {args.details!r}")
    for key in ("headline", "description", "instruction"):
        if getattr(args, key):
            details[key] = getattr(args, key)
    return details


def _alert_show(args) -> int:
    import numpy as np

    log = _open_log(args.log)
    try:
        if not args.alert_id:
            rows = []
            for aid, rec in log.alerts().items():
                rows.append({"alert_id": aid, "status": rec.get("status"), "division": rec.get("division"),
                             "radius_km": rec.get("radius_km"), "reached": rec.get("reached"),
                             "pushes": rec.get("pushes"), "outcome": rec.get("outcome")})
            if args.json:
                _emit_json({"alerts": rows})
            else:
                if not rows:
                    _out("no alerts in this log")
                for r in rows:
                    _out(f"{r['alert_id']}  {r['status']:<9} {r['division']}  {r['radius_km'] or 0:>5g} km "
                         f"{r['reached'] or 0:>12,} devices  {r['pushes'] or 0} pushes"
                         + (f"  outcome {r['outcome']}" if r["outcome"] else ""))
            return EXIT_OK
        rec = log.alert(args.alert_id)
        store = _open_index(args.index).store if args.index else None
        pushes = log.pushes(args.alert_id, audiences=store is not None)
        prows = []
        for p in pushes:
            row = {"push_id": p.push_id, "seq": p.seq, "kind": p.kind, "radius_km": p.radius_km,
                   "recipients": p.count, "created_at": _iso(p.created_at), "acked": p.acked,
                   "purged": p.purged}
            if store is not None and p.audience is not None:
                keys = np.frombuffer(p.audience.to_array(), dtype=np.uint32) if len(p.audience) else \
                    np.empty(0, np.uint32)
                if keys.size and int(keys[-1]) >= len(store):
                    raise InvalidInputError(
                        f"--index {args.index!r} has {len(store):,} devices but push {p.push_id} holds "
                        f"key {int(keys[-1])}; use the index generation the alert ran on (or a later one)")
                counts = np.bincount(np.asarray(store.app_codes)[keys].astype(np.int64) & 0xFF,
                                     minlength=len(store.app_names))
                row["by_app"] = {store.app_names[i]: int(c) for i, c in
                                 sorted(enumerate(counts), key=lambda ic: -ic[1]) if c}
            prows.append(row)
        doc = {"alert": rec, "pushes": prows}
        if args.json:
            _emit_json(doc)
            return EXIT_OK
        _out(f"alert {rec['alert_id']}  status {rec['status']}"
             + (f" (outcome {rec['outcome']})" if rec.get("outcome") else ""))
        _out(f"  centre {rec['lat']:.5f}, {rec['lon']:.5f}   division {rec['division']} "
             f"{_place_names(rec['division'])}" + ("  (the whole division)" if rec.get("division_wide") else "")
             + "   "
             f"reporter {rec['reporter']}" + (f"   approved by {rec['approved_by']}" if rec.get("approved_by") else ""))
        _out(f"  missing since {rec['missing_since']}   published {rec.get('published_at') or '-'}"
             + (f"   closed {rec['closed_at']} by {rec['closed_by']}" if rec.get("closed_at") else ""))
        _out(f"  radius {rec.get('radius_km') or 0:g} km   reached {rec.get('reached') or 0:,} devices   "
             f"{rec.get('pushes') or 0} pushes")
        for k, v in (rec.get("details") or {}).items():
            _out(f"  {k}: {v}")
        if prows:
            _out(f"  {'seq':>3} {'kind':<10} {'km':>6} {'recipients':>12}  {'acked':<5}  created_at"
                 + ("   top apps" if store is not None else ""))
        for r in prows:
            top = ""
            if "by_app" in r:
                top = "   " + ", ".join(f"{a} {n:,}" for a, n in list(r["by_app"].items())[:3])
            _out(f"  {r['seq']:>3} {r['kind']:<10} {r['radius_km']:>6g} {r['recipients']:>12,}  "
                 f"{'yes' if r['acked'] else 'no':<5}  {r['created_at']}{top}")
        return EXIT_OK
    finally:
        log.close()


# -- stats, audit, bench, map ------------------------------------------------

def _records(log):
    from .engine import Alert

    for rec in log.alerts().values():
        r = Alert.from_record(rec).stats_record()
        if r is not None:
            yield r


def cmd_stats(args) -> int:
    from .stats import compute

    settings = _settings(args)
    if args.case_type is not None:
        settings.case(args.case_type)
    log = _open_log(args.log)
    try:
        from .divisions import Divisions
        s = compute(list(_records(log)), since=_when(args.since, "--since"),
                    until=_when(args.until, "--until"), division=args.division,
                    divisions=Divisions.china(), case_type=args.case_type,
                    case_types=tuple(settings.case_types))
    finally:
        log.close()
    if args.json:
        _emit_json(s)
        return EXIT_OK
    _out(f"{'published':>10} {'found':>7} {'not found':>10} {'open':>6} {'retracted':>10} {'pending':>8}"
         f"  recovery rate")
    _out(f"{s['published']:>10,} {s['found']:>7,} {s['not_found']:>10,} {s['open']:>6,} "
         f"{s['retracted']:>10,} {s['pending']:>8,}  {s['recovery_rate_pct']:.2f} % (found / published)")
    outcomes = [(k, v) for k, v in s["by_outcome"].items() if v]
    if outcomes:
        _out("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in outcomes))
    _out(f"pushes {s['pushes']:,}, devices reached {s['devices_reached']:,}")
    for div, row in s["by_division"].items():
        _out(f"  {div} {row.get('name', '')}  published {row['published']:,}  found {row['found']:,}  "
             f"not found {row['not_found']:,}  open {row['open']:,}  retracted {row['retracted']:,}")
    for name, row in s["by_case_type"].items():
        _out(f"  case type {name}: published {row['published']:,}  found {row['found']:,}  "
             f"not found {row['not_found']:,}  open {row['open']:,}  retracted {row['retracted']:,}  "
             f"recovery rate {row['recovery_rate_pct']:.2f} %")
    return EXIT_OK


def _cmd_log_copy(args) -> int:
    from ._pglog import display, is_url

    log = _open_log(args.src)
    try:
        dst = log.copy_to(args.dst)  # verifies the copy: verify() anchored at SRC's head, and every row
        pushes = log.stats()["pushes"]
        keyed, authenticated = log.keyed, log.authenticated
    finally:
        log.close()
    src = display(args.src) if is_url(args.src) else str(args.src)
    doc = {"ok": True, "src": src, "dst": dst, "pushes": pushes, "keyed": keyed,
           "authenticated": authenticated}
    if args.json:
        _emit_json(doc)
    else:
        _out(f"copied {src} to {dst}: {pushes} pushes, every row compared, verified"
             + ("" if authenticated else " (unkeyed)" if not keyed
                else " (keyed log, MACs not checked: no key set)"))
    return EXIT_OK


def cmd_log(args) -> int:
    if args.log_action == "copy":
        return _cmd_log_copy(args)
    log = _open_log(args.src)
    try:
        dst = log.backup(args.dst)
    finally:
        log.close()
    from .log import RecipientLog

    with RecipientLog(dst) as copy:
        checked = copy.verify()
        pushes = copy.stats()["pushes"]
    doc = {"ok": True, "src": str(args.src), "dst": dst, "pushes": pushes, **checked}
    if args.json:
        _emit_json(doc)
    else:
        _out(f"backed up {args.src} to {dst}: {pushes} pushes, verified"
             + ("" if checked["authenticated"] else " (unkeyed)" if not checked["keyed"]
                else " (keyed log, MACs not checked: no key set)"))
    return EXIT_OK


def cmd_officers(args) -> int:
    from .engine import register_officers

    authority = load_officers(args.officers)
    log = _open_log(args.log)
    try:
        digest = register_officers(log, authority, args.officer, _now(args))
    finally:
        log.close()
    if args.json:
        _emit_json({"ok": True, "digest": digest, "officers": len(authority)})
    else:
        _out(f"officers registry of {args.log}: {len(authority)} officers, digest {digest[:16]}")
    return EXIT_OK


def _key_note(checked: dict) -> str:
    if checked["authenticated"]:
        return "keyed MACs checked"
    if checked["keyed"]:
        return "UNKEYED CHECK ONLY: this log is keyed but no key is set (GEOTARGET_LOG_KEY[_FILE])"
    return "unkeyed log: checksums and chains only, no MACs"


def cmd_audit(args) -> int:
    log = _open_log(args.log)
    try:
        if args.audit_action == "anchor":
            a = log.anchor()
            if args.json:
                _emit_json({"count": a["count"], "head": a["head"], "anchor": a["text"]})
            else:
                _out(a["text"])
            return EXIT_OK
        if args.audit_action == "verify":
            t0 = time.perf_counter()
            checked = log.verify(args.anchor)
            seconds = time.perf_counter() - t0
            sizes = log.stats()
            entries = log.audit_entries()
            doc = {"ok": True, "log": str(log.path), "pushes": sizes["pushes"], "alerts": sizes["alerts"],
                   "audit_entries": len(entries), "head": entries[-1]["hash"] if entries else None,
                   "seconds": round(seconds, 3), **checked}
            if args.json:
                _emit_json(doc)
            else:
                _out(f"OK {log.path}: {doc['pushes']} pushes (checksums, chain, audiences, delivery rules) "
                     f"and {doc['audit_entries']} audit entries verified"
                     + (f"; chain head {doc['head'][:16]}" if doc["head"] else "")
                     + f"; {_key_note(checked)}" + ("; anchor extended" if checked["anchored"] else ""))
            return EXIT_OK
        entries = log.audit_entries(args.alert) if args.alert else log.audit_entries()
        if args.json:
            _emit_json({"entries": entries})
            return EXIT_OK
        for e in entries:
            radius = f"{e['radius_km']:g} km" if e["radius_km"] is not None else ""
            count = f"{e['count']:,}" if e["count"] is not None else ""
            _out(f"{e['seq']:>5} {e['at'][:19]} {e['actor']:<12} {e['action']:<12} "
                 f"{e['alert_id'] or '-':<26} {radius:>7} {count:>11}  {e['hash'][:10]}")
        return EXIT_OK
    finally:
        log.close()


def cmd_bench(args) -> int:
    import numpy as np

    from .index import SpatialIndex

    d = Path(args.index)
    if not d.is_dir():
        raise InvalidInputError(f"--index {str(d)!r}: no such directory")
    t0 = time.perf_counter()
    index = SpatialIndex.open(d)
    opened = time.perf_counter() - t0
    if args.city:
        from .population import city
        c = city(args.city)
        lat, lon, where = c["lat"], c["lon"], c["name_en"]
    else:
        lat, lon = args.lat, args.lon
        where = f"{lat:g}, {lon:g}"
    try:
        radii = [float(r) for r in args.radii.split(",") if r.strip()]
    except ValueError:
        raise InvalidInputError(f"--radii={args.radii!r} must be comma-separated numbers of km") from None
    if not radii:
        raise InvalidInputError(f"--radii={args.radii!r} names no radius")
    buf = np.empty(len(index), dtype=np.uint32)

    def timeit(fn):
        fn()  # warm: page in the memory map
        best = []
        for _ in range(args.repeat):
            s = time.perf_counter()
            fn()
            best.append(time.perf_counter() - s)
        return float(np.median(best)) * 1e3, float(np.min(best)) * 1e3

    rows = []
    for r in radii:
        n = index.count(lat, lon, r)
        c_med, c_min = timeit(lambda: index.count(lat, lon, r))
        w_med, w_min = timeit(lambda: index.within(lat, lon, r))
        f_med, f_min = timeit(lambda: index.within(lat, lon, r).fill(buf))
        rows.append({"radius_km": r, "devices": n, "count_ms": round(c_med, 4),
                     "within_ms": round(w_med, 4), "within_fill_ms": round(f_med, 4),
                     "count_min_ms": round(c_min, 4), "within_min_ms": round(w_min, 4),
                     "within_fill_min_ms": round(f_min, 4)})
    doc = {"index": str(d), "devices": len(index), "centre": {"lat": lat, "lon": lon, "name": where},
           "open_ms": round(opened * 1e3, 3), "repeat": args.repeat, "rows": rows}
    if args.json:
        _emit_json(doc)
        return EXIT_OK
    _out(f"{len(index):,} devices in {d}/ (opened in {opened * 1e3:.1f} ms); centre {where}; "
         f"median of {args.repeat} runs")
    _out(f"{'radius km':>10} {'devices':>13} {'count ms':>10} {'within ms':>10} {'within+fill ms':>15}")
    for r in rows:
        _out(f"{r['radius_km']:>10g} {r['devices']:>13,} {r['count_ms']:>10.3f} {r['within_ms']:>10.3f} "
             f"{r['within_fill_ms']:>15.3f}")
    _out("within = runs of the circle; +fill = keys copied into a reused uint32 buffer")
    return EXIT_OK


def cmd_map(args) -> int:
    from .maps import draw_alert_map

    index = _open_index(args.index)
    log = _open_log(args.log)
    try:
        rec = log.alert(args.alert)
        pushes = log.pushes(args.alert, audiences=False)
    finally:
        log.close()
    out = Path(args.out) if args.out else Path(f"{args.alert}.png")
    t0 = time.perf_counter()
    path = draw_alert_map(index, rec, pushes, out)
    seconds = time.perf_counter() - t0
    if args.json:
        _emit_json({"map": str(path), "alert_id": args.alert, "pushes": len(pushes), "seconds": round(seconds, 3)})
    else:
        _out(f"map of {args.alert} ({len(pushes)} pushes) written to {path}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------

_EPILOG = """\
a store and its index share one directory: --store DIR writes it, --index DIR reads it.

officers file (--officers), JSON:
  [{"officer_id": "C-330102", "level": "county", "division": "330102"},
   {"officer_id": "S-330100", "level": "city", "division": "330100"}]
or {"officers": [...], "policy": {"needs_approval": ["county"]}}, or CSV with the
header officer_id,level,division[,name]. Levels: ministry, province, city, county;
divisions are 6-digit codes kept as text (000000, 330000, 330100, 330102).

times are ISO 8601 with an offset: 2026-11-23T08:10:00+08:00 or ...Z.
exit codes: 0 ok, 1 usage error, 2 refused or invalid input (one line on stderr),
3 the demo's self-check failed.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="geotarget",
                description="Geospatial targeting for missing-child alerts. Start with: geotarget demo",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"geotarget {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name, help_, func, json_=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        if json_:
            sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return sp

    sp = verb("demo", "run the whole job end to end on a synthetic national population", cmd_demo)
    sp.add_argument("--devices", type=parse_count, default=20_000_000, metavar="N",
                    help="population size: 20M, 2e6, 500k ... (default 20M)")
    sp.add_argument("--seed", type=_nonneg_int, default=0)
    sp.add_argument("--city", default="Hangzhou", help="where the child goes missing (default Hangzhou)")
    sp.add_argument("--workdir", default="geotarget_demo", metavar="DIR",
                    help="where the files go (default ./geotarget_demo/)")
    sp.add_argument("--no-map", action="store_true", help="skip the map PNG")

    sp = verb("generate", "a synthetic population over China into a store directory", cmd_generate)
    sp.add_argument("--devices", type=parse_count, required=True, metavar="N")
    sp.add_argument("--seed", type=_nonneg_int, default=0)
    sp.add_argument("--store", required=True, metavar="DIR")
    sp.add_argument("--build", action="store_true", help="also build the index")
    sp.add_argument("--force", action="store_true", help="replace a store (and remove its index) already in DIR")

    sp = verb("ingest", "Parquet (or GeoParquet points) or CSV into a store directory", cmd_ingest)
    sp.add_argument("input", metavar="FILE",
                    help="columns device_id, lat, lon (or latitude/longitude), optional app, last_seen")
    sp.add_argument("--store", required=True, metavar="DIR")
    sp.add_argument("--format", choices=("auto", "csv", "parquet"), default="auto")
    sp.add_argument("--base", metavar="DIR",
                    help="write a new generation of this store: the rows are location updates")
    sp.add_argument("--build", action="store_true", help="also build the index")
    sp.add_argument("--force", action="store_true", help="replace a store (and remove its index) already in DIR")

    sp = verb("build", "build the spatial index of a store directory (written next to it)", cmd_build)
    sp.add_argument("--store", required=True, metavar="DIR")
    sp.add_argument("--force", action="store_true", help="replace an index already in DIR")

    sp = verb("query", "devices within a circle: counts by app, or device ids to Parquet", cmd_query)
    sp.add_argument("--index", required=True, metavar="DIR")
    sp.add_argument("--lat", type=float, required=True)
    sp.add_argument("--lon", type=float, required=True)
    sp.add_argument("--radius", type=float, required=True, metavar="KM")
    sp.add_argument("--seen-since", metavar="ISO", help="only devices seen at or after this time")
    sp.add_argument("--apps", metavar="A,B", help="only devices of these partner apps")
    sp.add_argument("--out", metavar="FILE.parquet", help="write device_id, key, app")

    sp = verb("alert", "the alert lifecycle on a recipient log", cmd_alert, json_=False)
    asub = sp.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name, help_, index=True, officers=True, alert_id=True, officer=True, now=True):
        ap = asub.add_parser(name, help=help_, description=help_)
        ap.add_argument("--log", required=True, metavar="LOG",
                        help="recipient log (SQLite file, or a postgresql:// URL)")
        if index:
            ap.add_argument("--index", required=True, metavar="DIR")
        if officers:
            ap.add_argument("--officers", metavar="FILE", help="officers JSON or CSV (see geotarget --help)")
        if alert_id:
            ap.add_argument("alert_id", metavar="ALERT_ID")
        if officer:
            ap.add_argument("--officer", required=True, metavar="ID", help="the acting officer")
        if now:
            ap.add_argument("--now", metavar="ISO", help="the time of the action (default: the clock)")
        if index:
            ap.add_argument("--config", metavar="FILE", help="settings TOML (see 'geotarget config show')")
            ap.add_argument("--max-location-age", type=_nonneg_float, metavar="HOURS",
                            help="only devices seen this recently get rings (0: all; default: settings)")
        ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return ap

    def handoff(ap):
        ap.add_argument("--out", metavar="DIR", help="write <push_id>.xml (CAP) and <push_id>.parquet")
        ap.add_argument("--ack", action="store_true",
                        help="acknowledge the pushes (handed on); otherwise they are offered again")

    def texts(ap):
        ap.add_argument("--headline")
        ap.add_argument("--description")
        ap.add_argument("--instruction")
        ap.add_argument("--details", metavar="JSON", help="more details as a JSON object")

    ap = action("report", "report a missing child (published at once unless approval is needed)",
                alert_id=False)
    ap.add_argument("--lat", type=float, required=True)
    ap.add_argument("--lon", type=float, required=True)
    ap.add_argument("--missing-since", required=True, metavar="ISO")
    ap.add_argument("--division", metavar="CODE", help="6-digit division (default: the officer's)")
    ap.add_argument("--case-type", default="child", metavar="TYPE",
                    help="child (default), elderly, other, or a type the settings add")
    ap.add_argument("--drill", action="store_true",
                    help="an exercise: CAP status Exercise, test devices only, never in statistics")
    ap.add_argument("--division-wide", action="store_true",
                    help="target the whole division's area instead of a growing circle")
    ap.add_argument("--photo", action="append", metavar="PATH",
                    help="a photo of the person (.jpg, .png or .webp; repeatable); every CAP carries it")
    texts(ap)
    action("approve", "approve a pending report")
    for ap in (action("tick", "send what is due: first rings, expansions, the unacknowledged outbox",
                      alert_id=False, officer=False),
               action("refresh", "top up open alerts with devices now inside (after a new --index "
                      "generation)", alert_id=False, officer=False)):
        handoff(ap)
        ap.add_argument("--retention-days", type=_nonneg_float, metavar="DAYS",
                        help="also apply the retention setting (see alert purge)")
    ap = action("update", "new details, to everyone notified so far")
    texts(ap)
    handoff(ap)
    ap = action("close", "the child is found (or the search ends): closure to everyone notified")
    ap.add_argument("--outcome", required=True, metavar="OUTCOME",
                    help="rescued_trafficking, runaway, lost, drowned, killed, accident, "
                         "visiting_friends, other, not_found")
    handoff(ap)
    ap = action("retract", "withdraw an erroneous or false report")
    ap.add_argument("--reason", default="")
    handoff(ap)
    ap = action("renew", "extend an open alert's expiry (an expired alert resumes its rings)")
    ap.add_argument("--hours", type=_nonneg_float, metavar="H", help="default: the case type's expiry")
    ap = action("confirm", "decide a report held as a possible duplicate")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--distinct", action="store_true", help="another person: it goes on")
    which.add_argument("--duplicate", action="store_true", help="the same person: merged, never sent")
    ap = action("show", "an alert's state and pushes (all alerts without ALERT_ID)", index=False,
                officers=False, alert_id=False, officer=False, now=False)
    ap.add_argument("alert_id", metavar="ALERT_ID", nargs="?")
    ap.add_argument("--index", metavar="DIR", help="also split each push by app")
    ap = action("purge", "retention: drop the recipients of alerts closed more than DAYS ago, and every "
                "output file written for them", index=False, officers=False, alert_id=False, officer=False)
    ap.add_argument("--retention-days", type=_nonneg_float, required=True, metavar="DAYS")
    ap.add_argument("--config", metavar="FILE", help="settings TOML (its [photos] dir; default: next to the log)")

    sp = verb("config", "the settings in force (defaults overlaid with --config FILE), as TOML", cmd_config)
    csub = sp.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    cp = csub.add_parser("show", help="print the settings in force")
    cp.add_argument("--config", metavar="FILE", help="settings TOML (default: the built-in defaults)")
    cp.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    sp = verb("stats", "published, found, not found, open, recovery rate, outcomes", cmd_stats)
    sp.add_argument("--log", required=True, metavar="LOG")
    sp.add_argument("--since", metavar="ISO")
    sp.add_argument("--until", metavar="ISO")
    sp.add_argument("--division", metavar="CODE", help="only alerts within this division")
    sp.add_argument("--case-type", metavar="NAME", help="only alerts of this case type (child, elderly, ...)")
    sp.add_argument("--config", metavar="FILE", help="settings TOML naming the case types (default: built-in)")

    sp = verb("audit", "check the recipient log and its audit trail, or list the trail", cmd_audit,
              json_=False)
    aud = sp.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    ap = aud.add_parser("verify", help="check every push, audience, delivery rule and the hash chain")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--anchor", metavar="COUNT:HEAD",
                    help="a head printed earlier by audit anchor: entries cut off since are detected")
    ap.add_argument("--json", action="store_true")
    ap = aud.add_parser("anchor", help="the audit chain's head (count and hash), for an outside witness")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--json", action="store_true")
    ap = aud.add_parser("list", help="the audit trail, oldest first")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--alert", metavar="ALERT_ID")
    ap.add_argument("--json", action="store_true")

    sp = verb("log", "recipient log files", cmd_log, json_=False)
    lsub = sp.add_subparsers(dest="log_action", required=True, metavar="ACTION")
    ap = lsub.add_parser("backup", help="copy a log (WAL included) with SQLite's online backup")
    ap.add_argument("src", metavar="SRC", help="the recipient log")
    ap.add_argument("dst", metavar="DST", help="a new file (never overwritten)")
    ap.add_argument("--json", action="store_true")
    ap = lsub.add_parser("copy", help="copy a log to another backend (SQLite file <-> postgresql:// URL), "
                                      "then verify the copy row by row")
    ap.add_argument("src", metavar="SRC", help="the recipient log (a file or a postgresql:// URL)")
    ap.add_argument("dst", metavar="DST", help="a new file, or a postgresql:// database holding no log")
    ap.add_argument("--json", action="store_true")

    sp = verb("officers", "the officers registry bound to a log", cmd_officers, json_=False)
    osub = sp.add_subparsers(dest="officers_action", required=True, metavar="ACTION")
    ap = osub.add_parser("register", help="register or change a log's officers registry (ministry officer)")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--officers", required=True, metavar="FILE")
    ap.add_argument("--officer", required=True, metavar="ID",
                    help="a ministry-level officer of the registry registered now (of FILE the first time)")
    ap.add_argument("--now", metavar="ISO")
    ap.add_argument("--json", action="store_true")

    sp = verb("bench", "time within/count on an index at a few radii (in process)", cmd_bench)
    sp.add_argument("--index", required=True, metavar="DIR")
    sp.add_argument("--lat", type=float, default=31.23, help="default: Shanghai (dense)")
    sp.add_argument("--lon", type=float, default=121.47)
    sp.add_argument("--city", help="centre on a city of the embedded table instead")
    sp.add_argument("--radii", default="100,200,300,500", metavar="KM,KM")
    sp.add_argument("--repeat", type=_nonneg_int, default=20)

    _divisions_parser(verb)

    sp = verb("map", "draw the map PNG of an alert in a recipient log", cmd_map)
    sp.add_argument("--log", required=True, metavar="LOG")
    sp.add_argument("--index", required=True, metavar="DIR")
    sp.add_argument("--alert", required=True, metavar="ALERT_ID")
    sp.add_argument("--out", metavar="PNG", help="default: <ALERT_ID>.png")
    return p


def cmd_divisions(args) -> int:
    """Look a division up by code, by name or by point (China's registry)."""
    from .divisions import Divisions
    divs = Divisions.china()
    if args.point is not None:
        lat, lon = _parse_point(args.point)
        d = divs.locate(lat, lon)
        codes = [d.code] if d is not None else []
        if d is None and not args.json:
            _out(f"({lat}, {lon}) lies in no division of China")
    elif args.query is None:
        codes = divs.children(None)
    elif args.query.isdigit():
        divs[args.query]   # unknown codes are refused, never guessed
        codes = [args.query]
    else:
        codes = divs.find(args.query)
        if not codes:
            from .errors import UnknownDivisionError
            raise UnknownDivisionError(f"no division is named like {args.query!r}")
    rows = [{"code": c, "name": divs.name(c), "level": divs.level(c), "parent": divs.parent(c),
             "place": divs.full_name(c), "children": len(divs.children(c))} for c in codes]
    if args.json:
        _emit_json(rows)
        return EXIT_OK
    for r in rows:
        _out(f"{r['code']}  {r['level']:<8} {r['place']}"
             + (f"   ({r['children']} divisions under it)" if r["children"] else ""))
    return EXIT_OK


def _place_names(code: str) -> str:
    """The names of a division code, or "" for a code the registry does not hold (an old log)."""
    from .divisions import Divisions
    divs = Divisions.china()
    return "全国" if code == "000000" else (divs.full_name(code) if code in divs else "")


def _parse_point(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidInputError(f"--point={text!r} must be LAT,LON (e.g. 30.25,120.17)") from None


def _divisions_parser(verb) -> None:
    sp = verb("divisions", "look up China's administrative divisions by code, name or point", cmd_divisions)
    sp.add_argument("query", nargs="?", help="a 6-digit code or a name (part of one); none: the provinces")
    sp.add_argument("--point", metavar="LAT,LON", help="the finest division containing this point")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; return the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (1)
        return int(exc.code or 0)
    try:
        from ._fs import private_files

        with private_files():
            return int(args.func(args) or 0)
    except GeotargetError as exc:
        sys.stderr.write(f"geotarget: error: {_one_line(exc)}\n")
        return EXIT_REFUSED
    except BrokenPipeError:
        # the reader went away (``| head``): not a failure of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        # a file the user named cannot be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        sys.stderr.write(f"geotarget: error: {where}{exc.strerror or _one_line(exc)}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        sys.stderr.write("geotarget: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
