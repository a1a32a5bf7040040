"""Divisions at scale: registry load, point location, and a whole province as the area (issue 14).

    python benchmarks/bench_divisions.py                  # 20 M devices, Zhejiang
    python benchmarks/bench_divisions.py --devices 2M     # quicker
    python benchmarks/bench_divisions.py --division 440000 --json out.json
    python benchmarks/bench_divisions.py --index DIR       # an index already on disk (e.g. the 400 M
                                                           # one benchmarks/scale.py leaves in DIR/g1)

Measures, in one process:

* registry load: ``Divisions.china()`` in a fresh interpreter (names and
  levels only; polygons load on first use), and the first ``locate`` (which
  loads the 34 province polygons);
* point location: ``divs.locate(lat, lon)`` on 2,000 seeded devices (warm);
* the province as the area: ``index.within_polygon(division)`` (subtree
  boxes first, shapely at the border), against the peer every user would
  write, one ``shapely.contains_xy`` over every stored coordinate (prepared
  polygon), with its count, the ratio and whether the answers are identical;
  also with the dispatch path's freshness filter (seen in the last 24 h).

Timing: ``time.perf_counter``, one warm-up, then the best and the median of
``--repeat`` runs.  A mismatch prints ``!!! MISMATCH`` and exits with 1.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time

import numpy as np

import _paths  # noqa: F401  (finds geotarget: in-place build or installed)
import geotarget as gt  # noqa: E402
from geotarget.spatial import population  # noqa: E402
from geotarget.spatial._polygon import within_polygon_reference  # noqa: E402
from geotarget.cli import parse_count  # noqa: E402
from geotarget.geo import epoch_seconds  # noqa: E402


def timed(fn, repeat):
    fn()
    ts = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return out, min(ts) * 1e3, statistics.median(ts) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="20M", type=parse_count)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--division", default="330000", help="the area (default Zhejiang, 330000)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None, help="write raw numbers here")
    ap.add_argument("--index", default=None, metavar="DIR",
                    help="open this saved index (memory-mapped) instead of generating --devices")
    args = ap.parse_args(argv)
    res: dict = {"devices": args.devices, "division": args.division}

    # -- registry ------------------------------------------------------------------------------
    code = ("import time; t = time.perf_counter(); import geotarget as gt; t1 = time.perf_counter(); "
            "d = gt.Divisions.china(); t2 = time.perf_counter(); d.locate(30.25, 120.17); "
            "t3 = time.perf_counter(); print((t2 - t1) * 1e3, (t3 - t2) * 1e3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(_paths.ROOT)).stdout.split()
    res["registry_load_ms"], res["first_locate_ms"] = float(out[0]), float(out[1])
    divs = gt.Divisions.china()
    division = divs[args.division]
    print(f"registry: Divisions.china() {res['registry_load_ms']:.1f} ms ({len(divs):,} divisions, "
          f"fresh process); first locate {res['first_locate_ms']:.0f} ms (loads the province polygons)")

    # -- population and index ------------------------------------------------------------------
    if args.index:
        t = time.perf_counter()
        index = gt.SpatialIndex.open(args.index)
        index.verify()   # once, as the engine does before its first push: not part of the query times
        store = index.store
        res["devices"] = len(store)
        res["open_and_verify_s"] = time.perf_counter() - t
        print(f"index {args.index}: {len(store):,} devices, opened and verified in "
              f"{res['open_and_verify_s']:.1f} s")
    else:
        t = time.perf_counter()
        store = population.population(args.devices, seed=args.seed)
        res["population_s"] = time.perf_counter() - t
        t = time.perf_counter()
        index = gt.SpatialIndex.build(store)
        res["build_s"] = time.perf_counter() - t
        print(f"population {args.devices:,} devices on land in {res['population_s']:.1f} s; "
              f"index build {res['build_s']:.1f} s")

    # -- point location ------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    pick = rng.integers(0, len(store), 2000)
    pts = list(zip(store.lat[pick].tolist(), store.lon[pick].tolist()))
    t = time.perf_counter()
    for la, lo in pts:
        divs.locate(la, lo)   # loads the polygons of the cities and counties these reach
    res["locate_cold_us"] = (time.perf_counter() - t) / len(pts) * 1e6
    t = time.perf_counter()
    found = [divs.locate(la, lo) for la, lo in pts]
    res["locate_us"] = (time.perf_counter() - t) / len(pts) * 1e6
    res["locate_found"] = sum(f is not None for f in found)
    print(f"locate: {res['locate_us']:.0f} us per point warm, {res['locate_cold_us']:.0f} us while loading "
          f"polygons ({res['locate_found']} of {len(pts)} seeded devices in a division)")

    # -- the province as the area --------------------------------------------------------------
    bad = False
    now = population.DEFAULT_NOW
    for label, seen in (("all devices", None), ("seen in 24 h", now - dt.timedelta(hours=24))):
        aud, best, med = timed(lambda: index.within_polygon(division, seen_since=seen), args.repeat)
        (keys_t), kbest, kmed = timed(lambda: index.within_polygon(division, seen_since=seen).keys(),
                                      args.repeat)
        ref, rbest, rmed = timed(lambda: within_polygon_reference(
            store, division.polygon, None if seen is None else epoch_seconds(seen)), max(1, args.repeat // 2))
        same = np.array_equal(aud.keys(), ref)
        bad |= not same
        row = {"count": len(aud), "within_polygon_ms": best, "within_polygon_median_ms": med,
               "with_sorted_keys_ms": kbest, "shapely_contains_xy_ms": rbest,
               "ratio": rbest / best, "identical": bool(same)}
        res[label] = row
        print(f"{args.division} {divs.full_name(args.division)}, {label}: {len(aud):,} devices; "
              f"within_polygon {best:.1f} ms (median {med:.1f}), with sorted keys {kbest:.1f} ms; "
              f"shapely.contains_xy over all {rbest:.0f} ms = {rbest / best:.1f}x; "
              + ("identical" if same else "!!! MISMATCH"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
