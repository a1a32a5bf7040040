"""The dispatch path: fresh devices in a new ring, to every partner app's batch (issue 13).

    python benchmarks/dispatch.py                    # 20 M devices (BallTree's build takes minutes)
    python benchmarks/dispatch.py --devices 2M       # quicker
    python benchmarks/dispatch.py --json out.json --load-repeat 50

What a dispatcher runs, measured in one process on one seeded population:

1. **Batches**, dense 100 and 500 km around Shanghai, devices seen in the last
   24 h: geotarget ``index.within(..., seen_since=).by_app()`` against
   scikit-learn ``BallTree.query_radius`` + a NumPy freshness filter + a
   stable argsort by app (one id array per app).  Every app's set of device
   ids is checked equal; best of k, same run.
2. **The ring**: an ``AlertEngine`` with ``max_location_age=24 h`` publishes
   an alert at 300 km, then ``tick()`` expands it to 500 km.  The tick's wall
   time (query, bitmap, difference, durable log) plus ``push.batches`` is the
   time from ``tick()`` to every app's batch of the new ring.  Each stage is
   then timed apart on the same data (query, bitmap, difference with the
   logged audience, batches; the log's time is the engine's own ``log_ms``),
   and BallTree + NumPy runs the same ring (500 km fresh minus the devices
   notified at 300 km, grouped by app), with identical answers checked.
3. **Under load**: the ring's in-memory path (query, bitmap, difference,
   batches) repeated, idle and then with one CPU-bound process beside it
   (started here, stopped here), as p50 / p99.
4. **The floor**: copying the batches' bytes (12 B per recipient: id and
   key) with ``np.copyto`` into reused buffers, in the same run, for every
   batch measure (what the bytes to be written cost on this machine).

The machine may be shared: every comparison is a ratio measured in the same
run, and the report says how loaded the machine was (load average).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import _paths  # noqa: F401  (finds geotarget: in-place build or installed)
import geotarget as gt  # noqa: E402
from geotarget.spatial import population  # noqa: E402
from geotarget.cli import parse_count  # noqa: E402
from geotarget.geo import EARTH_RADIUS_KM  # noqa: E402

UTC = dt.timezone.utc
AGE = dt.timedelta(hours=24)
#: Clock of the run; generated last-seen times lie in the 3 days before DEFAULT_NOW.
NOW = population.DEFAULT_NOW
#: Ratio geotarget must reach over BallTree + NumPy (docs/design.md, Targets).
TARGET_RATIO = 10.0


def best_of(fn, repeat: int, warmup: int = 1):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), times, out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def id_sets(batches: dict) -> dict:
    """{app: sorted device ids} of geotarget batches (pyarrow tables) or peer batches (arrays)."""
    out = {}
    for app, b in batches.items():
        ids = b.column("device_id").to_numpy() if hasattr(b, "column") else np.asarray(b)
        if len(ids):
            out[app] = np.sort(ids)
    return out


def same_batches(a: dict, b: dict) -> bool:
    a, b = id_sets(a), id_sets(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class Peer:
    """BallTree (haversine) + NumPy on the same path."""

    def __init__(self, store):
        from sklearn.neighbors import BallTree
        self.store = store
        self.seen = np.asarray(store.last_seen_s)
        self.codes = np.asarray(store.app_codes).view(np.uint8)
        self.ids = np.asarray(store.device_id)
        self.tree = BallTree(np.radians(np.c_[store.lat, store.lon]), metric="haversine")

    def fresh(self, lat, lon, r, cut):
        ind = self.tree.query_radius(np.radians([[lat, lon]]), r / EARTH_RADIUS_KM)[0]
        return ind[self.seen[ind] >= cut]

    def batches(self, rows) -> dict:
        codes = self.codes[rows]
        order = np.argsort(codes, kind="stable")
        rows = rows[order]
        ends = np.cumsum(np.bincount(codes, minlength=256))
        parts = np.split(self.ids[rows], ends[:-1])
        return {self.store.app_names[c]: p for c, p in enumerate(parts) if len(p)}


def seconds(cut: dt.datetime) -> int:
    return int(cut.timestamp())


def ring_engine(index, workdir, lat, lon, adcode):
    """An engine whose alert has had its 300 km push; returns (engine, alert id, time of the 500 km tick)."""
    log = gt.RecipientLog(os.path.join(workdir, f"log-{time.monotonic_ns()}.sqlite"))
    eng = gt.AlertEngine(index, log=log, authority=gt.Authority([gt.Officer("MPS-1", level="ministry",
                                                                            division="000000")]),
                         max_location_age=AGE)
    missing = NOW - dt.timedelta(hours=2, minutes=30)
    alert = eng.report("MPS-1", lat=lat, lon=lon, division=adcode, missing_since=missing, now=NOW)
    for p in eng.tick(NOW):
        eng.ack(p.push_id)
    return eng, alert.id, missing + dt.timedelta(hours=3, minutes=1)


def ring_path(index, workdir, lat, lon, adcode) -> dict:
    """tick() to every app's batch of a new 500 km ring, then each stage apart on the same data."""
    eng, alert_id, t_ring = ring_engine(index, workdir, lat, lon, adcode)
    (pushes, tick_s) = timed(lambda: eng.tick(t_ring))
    (push,) = pushes
    batches, batches_s = timed(lambda: push.batches)
    out = {"radius_km": push.radius_km, "recipients": len(push), "tick_s": tick_s, "batches_s": batches_s,
           "tick_to_batches_s": tick_s + batches_s, "engine_query_ms": push.timings.get("query_ms"),
           "engine_log_ms": push.timings.get("log_ms"), "apps": len(batches)}
    # the same stages apart; the log holds this push now, so subtract the 300 km push's audience alone
    cut = t_ring - AGE
    first = eng.log.pushes(alert_id)[0].audience
    aud, q_s = timed(lambda: index.within(lat, lon, push.radius_km, seen_since=cut))
    bm, bm_s = timed(aud.bitmap)
    new, d_s = timed(lambda: bm - first)
    ring = gt.Audience(store=index.store, bitmap=new)
    b2, b_s = timed(ring.by_app)
    if len(new) != len(push) or not same_batches(b2, batches):
        raise AssertionError("the stages apart disagree with the engine's push")
    out.update({"query_s": q_s, "bitmap_s": bm_s, "difference_s": d_s, "batches_apart_s": b_s,
                "log_s": (push.timings.get("log_ms") or 0.0) / 1e3, "cut": seconds(cut),
                "first_push": len(first), "fresh_500km": len(aud)})
    return out, eng, alert_id, batches, first, t_ring


def in_memory_ring(index, lat, lon, r, cut, first):
    """The ring's path without the durable log: query, bitmap, difference, batches."""
    aud = index.within(lat, lon, r, seen_since=cut)
    return gt.Audience(store=index.store, bitmap=aud.bitmap() - first).by_app()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def percentiles(times) -> dict:
    return {"p50_s": float(np.percentile(times, 50)), "p99_s": float(np.percentile(times, 99)),
            "min_s": float(min(times)), "n": len(times)}


def under_load(fn, repeat: int) -> dict:
    """p50/p99 of ``fn`` idle, then with one CPU-bound process (started and stopped here, by pid)."""
    _, idle, _ = best_of(fn, repeat, warmup=2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        _, loaded, _ = best_of(fn, repeat, warmup=2)
    finally:
        hog.kill()
        hog.wait()
    i, lo = percentiles(idle), percentiles(loaded)
    return {"idle": i, "loaded": lo, "p99_loaded_over_p50_idle": lo["p99_s"] / i["p50_s"]}


def copy_floor(n_recipients: int, repeat: int) -> float:
    """Best time to write ``n_recipients`` batches' bytes (uint64 id + uint32 key) into reused buffers."""
    src_i, dst_i = np.ones(n_recipients, np.uint64), np.empty(n_recipients, np.uint64)
    src_k, dst_k = np.ones(n_recipients, np.uint32), np.empty(n_recipients, np.uint32)

    def copy():
        np.copyto(dst_i, src_i)
        np.copyto(dst_k, src_k)

    return best_of(copy, repeat)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="20M", type=parse_count)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=7, help="best of this many, per query")
    ap.add_argument("--load-repeat", type=int, default=40, help="ring repetitions idle and under load")
    ap.add_argument("--no-peer", action="store_true", help="skip BallTree (its build is slow)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write raw numbers here")
    args = ap.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="gt-dispatch-")
    os.makedirs(work, exist_ok=True)
    res = {"devices": args.devices, "seed": args.seed, "load_before": loadavg(), "nproc": os.cpu_count()}

    store, res["generate_s"] = timed(lambda: population.population(args.devices, seed=args.seed))
    index, res["build_s"] = timed(lambda: gt.SpatialIndex.build(store))
    c = population.city("Shanghai")
    lat, lon = c["lat"], c["lon"]
    peer = None
    if not args.no_peer:
        peer, res["balltree_build_s"] = timed(lambda: Peer(store))
    cut = NOW - AGE
    ok = True

    res["batches"] = {}
    for r in (100.0, 500.0):
        g_best, _, g = best_of(lambda: index.within(lat, lon, r, seen_since=cut).by_app(), args.repeat)
        row = {"recipients": sum(t.num_rows for t in g.values()), "geotarget_s": g_best,
               "count_s": best_of(lambda: index.count(lat, lon, r, seen_since=cut), args.repeat)[0]}
        row["floor_s"] = copy_floor(row["recipients"], args.repeat)
        if peer is not None:
            p_best, _, p = best_of(lambda: peer.batches(peer.fresh(lat, lon, r, seconds(cut))), args.repeat)
            row.update({"balltree_s": p_best, "ratio": p_best / g_best, "identical": same_batches(g, p)})
            ok &= row["identical"]
        res["batches"][f"{int(r)}km"] = row

    ring, eng, alert_id, batches, first, t_ring = ring_path(index, work, lat, lon, c["adcode"])
    res["ring"] = ring
    ring_cut = t_ring - AGE
    if peer is not None:
        notified = np.zeros(len(store), dtype=bool)

        def peer_ring():
            rows = peer.fresh(lat, lon, ring["radius_km"], seconds(ring_cut))
            return peer.batches(rows[~notified[rows]])

        notified[peer.fresh(lat, lon, 300.0, seconds(NOW - AGE))] = True
        if notified.sum() != ring["first_push"]:
            raise AssertionError("BallTree's 300 km push differs from the engine's")
        p_best, _, p = best_of(peer_ring, args.repeat)
        g_best, _, g = best_of(lambda: in_memory_ring(index, lat, lon, ring["radius_km"], ring_cut, first),
                               args.repeat)
        ring.update({"balltree_ring_s": p_best, "geotarget_ring_s": g_best, "ring_ratio": p_best / g_best,
                     "ring_identical": same_batches(batches, p) and same_batches(g, p)})
        ok &= ring["ring_identical"]
    res["load"] = under_load(lambda: in_memory_ring(index, lat, lon, ring["radius_km"], ring_cut, first),
                             args.load_repeat)
    res["floor_batches_copy_s"] = copy_floor(ring["recipients"], args.repeat)
    res["load_after"] = loadavg()

    print(f"# Dispatch path, {args.devices:,} devices, {c['name_en']} ({lat:.2f}, {lon:.2f}), "
          f"devices seen in the last 24 h; load average before {res['load_before']}, after {res['load_after']}")
    print()
    print("| per-app batches | recipients | geotarget | BallTree + NumPy | × | identical | count | copy floor |")
    print("|---|---|---|---|---|---|---|---|")
    for q, row in res["batches"].items():
        print(f"| dense {q} | {row['recipients']:,} | {row['geotarget_s'] * 1e3:.2f} ms | "
              f"{row.get('balltree_s', float('nan')) * 1e3:.1f} ms | {row.get('ratio', float('nan')):.1f} | "
              f"{row.get('identical', '-')} | {row['count_s'] * 1e3:.3f} ms | {row['floor_s'] * 1e3:.2f} ms |")
    print()
    print(f"Ring {ring['first_push']:,} -> {ring['radius_km']:g} km, {ring['recipients']:,} new recipients "
          f"in {ring['apps']} apps:")
    print(f"- tick() {ring['tick_s'] * 1e3:.1f} ms (engine: query+bitmap+difference "
          f"{ring['engine_query_ms']:.1f} ms, durable log {ring['engine_log_ms']:.1f} ms), "
          f"batches {ring['batches_s'] * 1e3:.1f} ms: tick to every batch {ring['tick_to_batches_s'] * 1e3:.1f} ms")
    print(f"- apart: query {ring['query_s'] * 1e3:.2f} ms, bitmap {ring['bitmap_s'] * 1e3:.2f} ms, difference "
          f"{ring['difference_s'] * 1e3:.2f} ms, log {ring['log_s'] * 1e3:.1f} ms, batches "
          f"{ring['batches_apart_s'] * 1e3:.2f} ms")
    if "ring_ratio" in ring:
        print(f"- without the log: geotarget {ring['geotarget_ring_s'] * 1e3:.2f} ms, BallTree + NumPy "
              f"{ring['balltree_ring_s'] * 1e3:.1f} ms ({ring['ring_ratio']:.1f}×), identical: "
              f"{ring['ring_identical']}")
    ld = res["load"]
    print(f"- under load ({ld['idle']['n']} rings each): idle p50 {ld['idle']['p50_s'] * 1e3:.2f} ms, "
          f"p99 {ld['idle']['p99_s'] * 1e3:.2f} ms; one CPU-bound process beside it p50 "
          f"{ld['loaded']['p50_s'] * 1e3:.2f} ms, p99 {ld['loaded']['p99_s'] * 1e3:.2f} ms "
          f"(p99 loaded / p50 idle = {ld['p99_loaded_over_p50_idle']:.2f}, target <= 3)")
    print(f"- floor: copying the batches' bytes (12 B a recipient) {res['floor_batches_copy_s'] * 1e3:.2f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    if not ok:
        print("MISMATCH: geotarget and BallTree + NumPy disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
