"""Alert lifecycle at 20 M devices: four ring pushes, then the closure (issue 3's benchmark).

    python benchmarks/bench_lifecycle.py                 # 20 M devices, Shanghai
    python benchmarks/bench_lifecycle.py --devices 2M    # quicker
    python benchmarks/bench_lifecycle.py --log postgresql://.../db --repeat 5   # SQLite vs PostgreSQL

Reports, per push: recipients, query ms, durable log ms (audience -> roaring,
SQLite WAL commit with fsync), and the log's bytes per recipient; then the
closure's time and size.  The engine logs each push before returning it, so
"log ms" is the durability cost a dispatcher waits for.

With ``--log URL`` the same lifecycle also runs on that PostgreSQL database (a
fresh schema per run, ``synchronous_commit=on``), alternating with SQLite on the
same index, ``--repeat`` times each; the table shows medians per backend.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time

import _paths  # noqa: F401  (finds geotarget: in-place build or installed)
import geotarget as gt  # noqa: E402
from geotarget import population  # noqa: E402
from geotarget.cli import parse_count  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="20M", type=parse_count)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--city", default="Shanghai")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write raw numbers here")
    ap.add_argument("--log", default=None, metavar="URL",
                    help="also run on this PostgreSQL database (each run in a new schema)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per backend (medians are shown)")
    args = ap.parse_args(argv)

    utc = dt.timezone.utc
    work = args.workdir or tempfile.mkdtemp(prefix="gt-lifecycle-")
    os.makedirs(work, exist_ok=True)
    t = time.perf_counter()
    store = population.population(args.devices, seed=args.seed)
    t_pop = time.perf_counter() - t
    t = time.perf_counter()
    index = gt.SpatialIndex.build(store)
    t_build = time.perf_counter() - t
    c = population.city(args.city)
    officers = [gt.Officer("MPS-1", level="ministry", division="000000")]
    t0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=utc)
    runs = []   # (backend, rows, log bytes, log stats)
    for i in range(args.repeat):
        for backend in ("sqlite", "postgresql") if args.log else ("sqlite",):
            if backend == "sqlite":
                where = os.path.join(work, f"log{i}.sqlite")
            else:
                where = _fresh_schema(args.log, f"lifecycle_{os.getpid()}_{i}")
            log = gt.RecipientLog(where)
            eng = gt.AlertEngine(index, log=log, authority=gt.Authority(officers))
            rows = _lifecycle(eng, c, t0)
            stats = log.stats()
            size = stats["bytes_on_disk"]
            runs.append((backend, rows, size, stats))
            log.close()

    print(f"# Alert lifecycle, {args.devices:,} devices, {c['name_en']} ({c['lat']:.2f}, {c['lon']:.2f})")
    print(f"population {t_pop:.1f} s, index build {t_build:.2f} s; {args.repeat} run(s) per backend, medians\n")
    backends = sorted({b for b, *_ in runs}, reverse=True)
    print("| push | radius km | recipients | query ms | " + " | ".join(
        f"{b} log ms | {b} call ms" for b in backends) + " |")
    print("|---|---:|---:|---:|" + "---:|---:|" * len(backends))
    for j, r in enumerate(runs[0][1]):
        cells = []
        for b in backends:
            rs = [rows[j] for bb, rows, *_ in runs if bb == b]
            cells += [f"{statistics.median(x['log_ms'] for x in rs):.1f}",
                      f"{statistics.median(x['tick_ms'] for x in rs):.1f}"]
        q = statistics.median(rows[j]["query_ms"] for _, rows, *_ in runs)
        print(f"| {r['kind']} | {r['radius_km']:g} | {r['recipients']:,} | {q:.1f} | " + " | ".join(cells) + " |")
    for b, rows, size, stats in runs[:len(backends)]:
        recipients = sum(r["recipients"] for r in rows)
        print(f"\n{b}: log {size:,} bytes for {recipients:,} logged recipients "
              f"= {size / max(recipients, 1):.5f} bytes per recipient; log stats: {json.dumps(stats, default=str)}")
    rows = runs[0][1]
    size = runs[0][2]
    recipients = sum(r["recipients"] for r in rows)
    biggest = max(rows[:-1], key=lambda r: r["recipients"])
    print(f"largest ring ({runs[0][0]}, first run): {biggest['recipients']:,} recipients logged durably in "
          f"{biggest['log_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"devices": args.devices, "city": c["name_en"], "build_s": t_build, "pushes": rows,
                       "log_bytes": size, "bytes_per_recipient": size / max(recipients, 1),
                       "runs": [{"backend": b, "pushes": rs, "log_bytes": sz} for b, rs, sz, _ in runs]},
                      fh, indent=2)
    return 0


def _lifecycle(eng, c, t0) -> list[dict]:
    """Four rings (100, 200, 300, 500 km) and the closure; per push its sizes and times."""
    alert = eng.report("MPS-1", lat=c["lat"], lon=c["lon"], division=c["adcode"], missing_since=t0, now=t0)
    rows = []
    for minutes in (30, 90, 150, 210):
        t = time.perf_counter()
        pushes = eng.tick(t0 + dt.timedelta(minutes=minutes))
        wall = (time.perf_counter() - t) * 1e3
        for p in pushes:
            rows.append({"kind": p.kind, "radius_km": p.radius_km, "recipients": len(p),
                         "query_ms": round(p.timings.get("query_ms", 0.0), 2),
                         "log_ms": round(p.timings["log_ms"], 2), "tick_ms": round(wall, 2)})
            eng.ack(p.push_id)
    t = time.perf_counter()
    closure = eng.close(alert.id, "MPS-1", outcome="lost", now=t0 + dt.timedelta(hours=4))
    close_ms = (time.perf_counter() - t) * 1e3
    rows.append({"kind": "closure", "radius_km": closure.radius_km, "recipients": len(closure),
                 "query_ms": 0.0, "log_ms": round(closure.timings["log_ms"], 2), "tick_ms": round(close_ms, 2)})
    return rows


def _fresh_schema(url: str, name: str) -> str:
    """``url`` with a new, empty schema ``name`` first on its search path (created here)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{name}"


if __name__ == "__main__":
    sys.exit(main())
