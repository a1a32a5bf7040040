"""Store and index verbs: ``generate``, ``ingest``, ``build``, ``query`` and ``bench``."""
from __future__ import annotations

import csv
import time
from pathlib import Path

from ..errors import InvalidInputError
from ..outputs import largest_first
from ._common import (EXIT_OK, iso_or_none, nonneg_int, open_index, parse_apps, parse_count, parse_time,
                      to_ms, write_json, write_line)


def _store_summary(store, path, seconds: dict) -> dict:
    return {"store": str(path), "devices": len(store), "generation": store.generation,
            "apps": list(store.app_names), "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _held(d: Path) -> list[str]:
    from ..index import INDEX_META
    from ..store import MANIFEST_FILE, STORE_FILE

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
    from ..index import SpatialIndex

    if d.is_dir():
        SpatialIndex.remove(d)
    store.save(d)


def _maybe_build(store, directory, seconds: dict, build: bool):
    if not build:
        return
    from ..index import SpatialIndex

    t0 = time.perf_counter()
    SpatialIndex.build(store).save(directory)
    seconds["index"] = time.perf_counter() - t0


def cmd_generate(args) -> int:
    from ..population import population

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
        write_json(summary)
    else:
        write_line(f"{len(store):,} devices (seed {args.seed}) written to {args.store}/"
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
    from ..store import DeviceStore

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
        store = DeviceStore.open(base_dir).with_updates_from_table(table)
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
        write_json(summary)
    else:
        write_line(f"{len(store):,} devices from {path} written to {args.store}/"
             + (" with its index" if args.build else f"; next: geotarget build --store {args.store}"))
    return EXIT_OK


def cmd_build(args) -> int:
    from ..index import SpatialIndex
    from ..store import DeviceStore

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
        write_json(summary)
    else:
        write_line(f"index of {len(index):,} devices built in {built:.2f} s, saved to {d}/ "
             f"({index.nbytes_with_filters / 2**20:,.1f} MiB)")
    return EXIT_OK


def cmd_query(args) -> int:
    index = open_index(args.index)
    seen = parse_time(args.seen_since, "--seen-since")
    apps = parse_apps(args.apps)
    t0 = time.perf_counter()
    aud = index.within(args.lat, args.lon, args.radius, seen_since=seen, apps=apps)
    q = time.perf_counter() - t0
    by_app = largest_first(aud.counts_by_app())
    result = {"lat": args.lat, "lon": args.lon, "radius_km": args.radius, "seen_since": iso_or_none(seen),
              "apps": apps, "count": len(aud), "by_app": by_app, "query_ms": to_ms(q)}
    if args.out:
        import pyarrow.parquet as pq

        from ..outputs import audience_table

        out = Path(args.out)
        if not out.parent.is_dir():
            raise InvalidInputError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
        pq.write_table(audience_table(index.store, aud.keys()), out)
        result["out"] = str(out)
    if args.json:
        write_json(result)
        return EXIT_OK
    write_line(f"{len(aud):,} devices within {args.radius:g} km of {args.lat:g}, {args.lon:g}"
         + (f", seen since {seen.isoformat()}" if seen else "") + (f", apps {', '.join(apps)}" if apps else "")
         + f"  (query {q * 1e3:.2f} ms)")
    items = list(by_app.items())
    shown = items if len(items) <= 10 else items[:8]
    for app, n in shown:
        write_line(f"  {app:<22}{n:>14,}")
    if len(shown) < len(items):
        rest = items[len(shown):]
        write_line(f"  {f'{len(rest)} other apps':<22}{sum(n for _, n in rest):>14,}   (all in --json)")
    if args.out:
        write_line(f"device ids written to {args.out} (columns device_id, key, app)")
    return EXIT_OK


def cmd_bench(args) -> int:
    import numpy as np

    from ..index import SpatialIndex

    d = Path(args.index)
    if not d.is_dir():
        raise InvalidInputError(f"--index {str(d)!r}: no such directory")
    t0 = time.perf_counter()
    index = SpatialIndex.open(d)
    opened = time.perf_counter() - t0
    if args.city:
        from ..population import city
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
        write_json(doc)
        return EXIT_OK
    write_line(f"{len(index):,} devices in {d}/ (opened in {opened * 1e3:.1f} ms); centre {where}; "
         f"median of {args.repeat} runs")
    write_line(f"{'radius km':>10} {'devices':>13} {'count ms':>10} {'within ms':>10} {'within+fill ms':>15}")
    for r in rows:
        write_line(f"{r['radius_km']:>10g} {r['devices']:>13,} {r['count_ms']:>10.3f} {r['within_ms']:>10.3f} "
             f"{r['within_fill_ms']:>15.3f}")
    write_line("within = runs of the circle; +fill = keys copied into a reused uint32 buffer")
    return EXIT_OK


def add_generate(verb) -> None:
    sp = verb("generate", "a synthetic population over China into a store directory", cmd_generate)
    sp.add_argument("--devices", type=parse_count, required=True, metavar="N")
    sp.add_argument("--seed", type=nonneg_int, default=0)
    sp.add_argument("--store", required=True, metavar="DIR")
    sp.add_argument("--build", action="store_true", help="also build the index")
    sp.add_argument("--force", action="store_true", help="replace a store (and remove its index) already in DIR")


def add_ingest(verb) -> None:
    sp = verb("ingest", "Parquet (or GeoParquet points) or CSV into a store directory", cmd_ingest)
    sp.add_argument("input", metavar="FILE",
                    help="columns device_id, lat, lon (or latitude/longitude), optional app, last_seen")
    sp.add_argument("--store", required=True, metavar="DIR")
    sp.add_argument("--format", choices=("auto", "csv", "parquet"), default="auto")
    sp.add_argument("--base", metavar="DIR",
                    help="write a new generation of this store: the rows are location updates")
    sp.add_argument("--build", action="store_true", help="also build the index")
    sp.add_argument("--force", action="store_true", help="replace a store (and remove its index) already in DIR")


def add_build(verb) -> None:
    sp = verb("build", "build the spatial index of a store directory (written next to it)", cmd_build)
    sp.add_argument("--store", required=True, metavar="DIR")
    sp.add_argument("--force", action="store_true", help="replace an index already in DIR")


def add_query(verb) -> None:
    sp = verb("query", "devices within a circle: counts by app, or device ids to Parquet", cmd_query)
    sp.add_argument("--index", required=True, metavar="DIR")
    sp.add_argument("--lat", type=float, required=True)
    sp.add_argument("--lon", type=float, required=True)
    sp.add_argument("--radius", type=float, required=True, metavar="KM")
    sp.add_argument("--seen-since", metavar="ISO", help="only devices seen at or after this time")
    sp.add_argument("--apps", metavar="A,B", help="only devices of these partner apps")
    sp.add_argument("--out", metavar="FILE.parquet", help="write device_id, key, app")


def add_bench(verb) -> None:
    sp = verb("bench", "time within/count on an index at a few radii (in process)", cmd_bench)
    sp.add_argument("--index", required=True, metavar="DIR")
    sp.add_argument("--lat", type=float, default=31.23, help="default: Shanghai (dense)")
    sp.add_argument("--lon", type=float, default=121.47)
    sp.add_argument("--city", help="centre on a city of the embedded table instead")
    sp.add_argument("--radii", default="100,200,300,500", metavar="KM,KM")
    sp.add_argument("--repeat", type=nonneg_int, default=20)
