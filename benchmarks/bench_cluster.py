"""What a query costs when the index is sharded over Ray actors, against the single index.

One process, one private local Ray (2 CPUs, no dashboard, a 512 MB object
store), the synthetic national population (``geotarget.spatial.population``):

1. build the single :class:`SpatialIndex`, and the :class:`ShardedIndex`
   (partition + per-shard build + save, then actor start); close it and time
   :meth:`ShardedIndex.open` (actors memory-map the saved shards);
2. at dense Shanghai 100 and 500 km, time for both indexes
   ``within(...).device_ids()`` (sorted uint64), ``within(...).fill(buf)``
   (keys into a reused buffer) and ``count``; every sharded answer is checked
   key for key against the single index (exit status 1 on any difference);
3. to split the sharded time into work and overhead: the shards' own work
   (the same :class:`ShardServer` code in this process, one OpenMP thread as
   in a Ray actor, no Ray), the fan-out alone (submit, actor work, result into
   the object store, ``ray.get``), the merge (``np.concatenate``), and the
   bare round trip of a no-op actor call, to one actor and to all of them.

Usage::

    python benchmarks/bench_cluster.py                  # 20 M devices, 4 shards (a few minutes)
    python benchmarks/bench_cluster.py --devices 2M     # quick
    python benchmarks/bench_cluster.py --json out.json --shards 8
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

try:  # installed with scikit-learn (the "bench" extra)
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    def threadpool_limits(*_a, **_k):
        return contextlib.nullcontext()

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _paths  # noqa: E402,F401  (finds geotarget: in-place build or installed)
from compare import CENTRES, best_of, load_average, parse_count, rss_bytes  # noqa: E402

from geotarget.spatial.index import SpatialIndex  # noqa: E402
from geotarget.spatial.population import population  # noqa: E402

RADII_KM = (100.0, 500.0)
OBJECT_STORE = 512 * 2**20


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=parse_count, default=20_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of repeats per measurement")
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temporary directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray
    from geotarget.spatial.cluster import ShardedIndex, ShardServer

    report = {"devices": args.devices, "shards": args.shards, "python": platform.python_version(),
              "ray": ray.__version__, "cpus": os.cpu_count(), "load_before": load_average()}
    workdir = args.dir or tempfile.mkdtemp(prefix="gt-shards-")
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             object_store_memory=OBJECT_STORE, logging_level="WARNING", log_to_driver=False)
    sharded = None
    try:
        t0 = time.perf_counter()
        store = population(args.devices, seed=0)
        report["population_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = SpatialIndex.build(store)
        report["single_build_s"] = time.perf_counter() - t0
        gc.collect()

        t0 = time.perf_counter()
        sharded = ShardedIndex.build(store, shards=args.shards, directory=workdir)
        report["sharded_build_s"] = time.perf_counter() - t0
        sharded.close()
        t0 = time.perf_counter()
        sharded = ShardedIndex.open(workdir)
        report["sharded_open_s"] = time.perf_counter() - t0
        report["actor_cpus"] = sharded.actor_cpus
        report["shard_sizes"] = sharded.shard_sizes.tolist()
        print(f"{args.devices:,} devices, {args.shards} shards: population {report['population_s']:.1f} s, "
              f"single build {report['single_build_s']:.1f} s, sharded build {report['sharded_build_s']:.1f} s "
              f"(incl. actor start), open {report['sharded_open_s']:.1f} s; driver RSS {rss_bytes() / 2**30:.1f} GiB")

        infos = sharded.info()
        servers = {s["shard"]: ShardServer(s["path"], s["shard"], sharded.generation, s["n"], len(sharded))
                   for s in infos}
        buf = np.empty(len(store), dtype=np.uint32)
        budget = args.budget
        rows, ok = [], True
        lat, lon = CENTRES["dense"]
        for r in RADII_KM:
            ref = single.within(lat, lon, r)
            got = sharded.within(lat, lon, r)
            same = np.array_equal(got.keys(), ref.keys()) and sharded.count(lat, lon, r) == len(ref)
            ok &= same
            asked = sharded.shards_for(lat, lon, r).tolist()
            # The shards' own work: the same ShardServer code, here, one after another,
            # on one OpenMP thread as Ray gives an actor with a fraction of a CPU.
            with threadpool_limits(1, user_api="openmp"):
                local = {i: best_of(lambda i=i: servers[i].within(lat, lon, r, None, None), budget_s=budget / 2)
                         for i in asked}
            qargs = sharded._args(lat, lon, r, None, None)
            fanout = best_of(lambda: sharded._fanout("within", qargs), budget_s=budget)
            parts = sharded._fanout("within", qargs)
            merge = best_of(lambda p=parts: np.concatenate(p), budget_s=budget / 2)
            del parts
            row = {
                "query": f"dense {r:g} km", "devices": len(ref), "shards_asked": asked, "same_keys": bool(same),
                "single_ids": best_of(lambda: single.within(lat, lon, r).device_ids(), budget_s=budget),
                "sharded_ids": best_of(lambda: sharded.within(lat, lon, r).device_ids(), budget_s=budget),
                "single_fill": best_of(lambda: single.within(lat, lon, r).fill(buf), budget_s=budget),
                "sharded_fill": best_of(lambda: sharded.within(lat, lon, r).fill(buf), budget_s=budget),
                "single_count": best_of(lambda: single.count(lat, lon, r), budget_s=budget),
                "sharded_count": best_of(lambda: sharded.count(lat, lon, r), budget_s=budget),
                "shard_work_max": max(v["median_s"] for v in local.values()),
                "shard_work_sum": sum(v["median_s"] for v in local.values()),
                "fanout": fanout, "merge": merge,
            }
            for v in row.values():
                if isinstance(v, dict):
                    v.pop("result", None)
            rows.append(row)

        actors = [a for a in sharded.actors if a is not None]
        rt_one = best_of(lambda: ray.get(actors[0].info.remote(), timeout=30), budget_s=budget)
        rt_all = best_of(lambda: ray.get([a.info.remote() for a in actors], timeout=30), budget_s=budget)
        for d in (rt_one, rt_all):
            d.pop("result", None)
        report.update(queries=rows, roundtrip_one=rt_one, roundtrip_all=rt_all, load_after=load_average())

        print(f"\nmedian ms (best) at Shanghai {lat} N {lon} E; sharded answers equal the single index: {ok}\n")
        print("| query | devices | shards asked | measure | single | sharded | sharded / single |")
        print("|---|---:|---|---|---:|---:|---:|")
        for row in rows:
            for m in ("ids", "fill", "count"):
                s, h = row[f"single_{m}"], row[f"sharded_{m}"]
                print(f"| {row['query']} | {row['devices']:,} | {row['shards_asked']} | {m} | "
                      f"{ms(s['median_s'])} ({ms(s['best_s'])}) | {ms(h['median_s'])} ({ms(h['best_s'])}) | "
                      f"{h['median_s'] / s['median_s']:.1f} |")
        print("\nwhere the sharded time goes (median ms):\n")
        print("| query | shard work, max (sum) | fan-out via Ray | merge (concatenate) | sharded fill, total |")
        print("|---|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['query']} | {ms(row['shard_work_max'])} ({ms(row['shard_work_sum'])}) | "
                  f"{ms(row['fanout']['median_s'])} | {ms(row['merge']['median_s'])} | "
                  f"{ms(row['sharded_fill']['median_s'])} |")
        print(f"\nno-op actor call round trip: one actor {ms(rt_one['median_s'])} ms, "
              f"all {len(actors)} at once {ms(rt_all['median_s'])} ms; load {report['load_after']}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
        return 0 if ok else 1
    finally:
        if sharded is not None:
            sharded.close()
        ray.shutdown()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
