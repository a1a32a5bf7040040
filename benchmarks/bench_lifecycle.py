"""Alert lifecycle at 20 M devices: four ring pushes, then the closure (issue 3's benchmark).

    python benchmarks/bench_lifecycle.py                 # 20 M devices, Shanghai
    python benchmarks/bench_lifecycle.py --devices 2M    # quicker

Reports, per push: recipients, query ms, durable log ms (audience -> roaring,
SQLite WAL commit with fsync), and the log's bytes per recipient; then the
closure's time and size.  The engine logs each push before returning it, so
"log ms" is the durability cost a dispatcher waits for.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
    log = gt.RecipientLog(os.path.join(work, "log.sqlite"))
    eng = gt.AlertEngine(index, log=log, authority=gt.Authority(officers))
    t0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=utc)
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
    stats = log.stats()
    size = os.path.getsize(log.path)
    recipients = sum(r["recipients"] for r in rows)

    print(f"# Alert lifecycle, {args.devices:,} devices, {c['name_en']} ({c['lat']:.2f}, {c['lon']:.2f})")
    print(f"population {t_pop:.1f} s, index build {t_build:.2f} s\n")
    print("| push | radius km | recipients | query ms | log ms (durable) | call ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['radius_km']:g} | {r['recipients']:,} | {r['query_ms']:.1f} | "
              f"{r['log_ms']:.1f} | {r['tick_ms']:.1f} |")
    print(f"\nlog file {size:,} bytes for {recipients:,} logged recipients "
          f"= {size / max(recipients, 1):.5f} bytes per recipient; log stats: {json.dumps(stats, default=str)}")
    biggest = max(rows[:-1], key=lambda r: r["recipients"])
    print(f"largest ring: {biggest['recipients']:,} recipients logged durably in {biggest['log_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"devices": args.devices, "city": c["name_en"], "build_s": t_build, "pushes": rows,
                       "log_bytes": size, "bytes_per_recipient": size / max(recipients, 1)}, fh, indent=2)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
