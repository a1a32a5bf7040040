"""geotarget against its peers, in one process, on the same synthetic devices.

Peers (each optional: a missing library is skipped with a message):

* scikit-learn ``BallTree`` with the haversine metric on radians,
  ``query_radius`` (radius ``r / R``), ``count_only=True`` for counts;
* scipy ``cKDTree`` on float64 unit vectors, ``query_ball_point`` at the
  chord ``2 sin(r / 2R)`` with ``return_sorted=False`` (a Python list), and
  ``return_length=True`` for counts;
* NumPy brute force: float64 ``geotarget.haversine_km`` and ``np.flatnonzero``
  (``np.count_nonzero`` for counts);
* numba brute force: the same float64 haversine formula compiled with
  ``@njit(parallel=True, cache=True)``, one pass marking rows inside the
  circle (``prange`` over the rows), then ``np.flatnonzero``; counts sum the
  marks.  It is what a competent hand-written parallel scan achieves, the
  strongest index-free peer (compiled once per machine, outside the timing);
* geotarget: ``SpatialIndex.build``, ``index.within(...)`` then ``fill`` into a
  reused uint32 buffer, or ``device_ids()`` (sorted uint64), and ``index.count``.

Every query is also checked: each peer's set of device ids must equal
geotarget's ``device_ids()``.  The only tolerated difference is a device whose
reference distance lies within 1e-6 km of the radius (docs/design.md, Distance); any other
mismatch is printed loudly and the script exits with status 1.

The floor: for every query the script also times writing the answer's
uint64 ids into a reused buffer (``np.copyto``, on one thread and on two
threads over halves; the faster counts), which is less than any engine that
hands back ids can do.  A target whose time budget is below this floor cannot
be met on the machine by any implementation; the targets table shows both.

Timing: one warm-up call, then repeated calls until both a minimum count and
a time budget are reached; the table shows the best time, the JSON also the
median.  Ratios are peer time / geotarget time (above 1: geotarget is faster).

Memory per device: geotarget reports ``index.nbytes / n`` (float32 unit
vectors, uint32 keys, node boxes: what docs/design.md, Targets, calls serving memory) and,
like the peers, the growth of the process's resident set (``/proc/self/statm``)
from before the peer's input array is made to after its tree is built, so the
peer's copy of the coordinates is counted, as geotarget's unit vectors are.

Usage::

    python benchmarks/compare.py                 # 20 M devices (about 5 minutes)
    python benchmarks/compare.py --devices 2M    # a quick run
    python benchmarks/compare.py --json out.json --peers balltree,brute
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

import _paths  # noqa: E402,F401  (finds geotarget: in-place build or installed)
from geotarget.cli import parse_count  # noqa: E402
import geotarget  # noqa: E402
from geotarget import _kernels  # noqa: E402
from geotarget.geo import EARTH_RADIUS_KM, haversine_km, unit_vectors  # noqa: E402
from geotarget.spatial.index import SpatialIndex  # noqa: E402
from geotarget.spatial.population import generate_arrays  # noqa: E402
from geotarget.spatial.store import DeviceStore  # noqa: E402

#: The centres of docs/design.md, Targets.
CENTRES = {
    "dense": (31.23, 121.47),    # Shanghai
    "medium": (36.06, 103.83),   # Lanzhou
    "rural": (33.5, 88.5),       # the Chang Tang
}
RADII_KM = (100.0, 500.0)
#: docs/design.md, Distance: the only allowed disagreement with the float64 reference.
TIE_KM = 1e-6
PEERS = ("balltree", "ckdtree", "brute", "numba")
TARGETS = {
    "ids_vs_balltree": 20.0,    # device_ids() at least 20x faster, dense 100 and 500 km
    "ids_vs_ckdtree": 100.0,    # and at least 100x faster than cKDTree
    "count_ms": 0.2,            # count in 0.2 ms or less
    "build_s": 3.0,             # build in 3 s or less at 20 M
    "build_at": 20_000_000,
}


# ---------------------------------------------------------------------------
# helpers shared with test_bench_core.py
# ---------------------------------------------------------------------------

def chord(radius_km: float) -> float:
    """Straight-line distance on the unit sphere for a great-circle radius."""
    return 2.0 * math.sin(min(radius_km / EARTH_RADIUS_KM, math.pi) / 2.0)


def unit_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(unit_vectors(lat, lon))


def rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: report nothing rather than a wrong number
        return 0


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def write_floor(ids: np.ndarray, budget_s: float) -> dict:
    """Best time to write ``ids`` into a reused buffer: one np.copyto, or two threads over halves."""
    from concurrent.futures import ThreadPoolExecutor
    out = np.empty_like(ids)
    half = ids.shape[0] // 2
    one = best_of(lambda: np.copyto(out, ids), min_reps=20, budget_s=budget_s / 2)
    with ThreadPoolExecutor(2) as pool:
        def two():
            for f in [pool.submit(np.copyto, out[:half], ids[:half]), pool.submit(np.copyto, out[half:], ids[half:])]:
                f.result()
        both = best_of(two, min_reps=20, budget_s=budget_s / 2)
    return {"best_s": min(one["best_s"], both["best_s"]), "one_thread_s": one["best_s"],
            "two_threads_s": both["best_s"]}


def best_of(fn, min_reps: int = 5, budget_s: float = 1.0, max_reps: int = 500) -> dict:
    """Warm up once, then time calls until ``min_reps`` and ``budget_s`` are both reached."""
    result = fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return {"best_s": min(times), "median_s": statistics.median(times), "reps": len(times), "result": result}


# ---------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------

class Geotarget:
    name = "geotarget"

    def __init__(self, cols):
        t0 = time.perf_counter()
        self.store = DeviceStore.from_arrays(cols["device_id"], cols["lat"], cols["lon"],
                                             last_seen=cols["last_seen"])
        self.ingest_s = time.perf_counter() - t0
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        self.index = SpatialIndex.build(self.store)
        self.build_s = time.perf_counter() - t0
        gc.collect()
        self.rss_delta = rss_bytes() - rss0
        self.buf = np.empty(len(self.store), dtype=np.uint32)

    def fill(self, lat, lon, r):
        return self.index.within(lat, lon, r).fill(self.buf)

    def device_ids(self, lat, lon, r):
        return self.index.within(lat, lon, r).device_ids()

    def count(self, lat, lon, r):
        return self.index.count(lat, lon, r)


class BallTreePeer:
    name = "balltree"
    label = "scikit-learn BallTree (haversine)"

    def __init__(self, cols):
        from sklearn.neighbors import BallTree
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        rad = np.radians(np.column_stack([cols["lat"], cols["lon"]]))
        self.tree = BallTree(rad, metric="haversine")
        self.build_s = time.perf_counter() - t0
        del rad  # BallTree keeps its own copy
        gc.collect()
        self.rss_delta = rss_bytes() - rss0

    def ids(self, lat, lon, r):
        return self.tree.query_radius(np.radians([[lat, lon]]), r / EARTH_RADIUS_KM)[0]

    def count(self, lat, lon, r):
        return int(self.tree.query_radius(np.radians([[lat, lon]]), r / EARTH_RADIUS_KM, count_only=True)[0])


class CKDTreePeer:
    name = "ckdtree"
    label = "scipy cKDTree (unit vectors)"

    def __init__(self, cols):
        from scipy.spatial import cKDTree
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        self.tree = cKDTree(unit_xyz(cols["lat"], cols["lon"]))
        self.build_s = time.perf_counter() - t0
        gc.collect()
        self.rss_delta = rss_bytes() - rss0

    def ids(self, lat, lon, r):
        return self.tree.query_ball_point(unit_xyz(np.array([lat]), np.array([lon]))[0], chord(r),
                                          return_sorted=False)

    def count(self, lat, lon, r):
        return int(self.tree.query_ball_point(unit_xyz(np.array([lat]), np.array([lon]))[0], chord(r),
                                              return_length=True))


class BrutePeer:
    name = "brute"
    label = "NumPy brute force (float64 haversine)"

    def __init__(self, cols):
        self.lat, self.lon = cols["lat"], cols["lon"]
        self.build_s = 0.0
        self.rss_delta = self.lat.nbytes + self.lon.nbytes  # it scans the coordinates as they are

    def ids(self, lat, lon, r):
        return np.flatnonzero(haversine_km(lat, lon, self.lat, self.lon) <= r)

    def count(self, lat, lon, r):
        return int(np.count_nonzero(haversine_km(lat, lon, self.lat, self.lon) <= r))


_NUMBA_SCAN = None


def _numba_scan():
    """The compiled scan (built on first use, cached on disk by numba)."""
    global _NUMBA_SCAN
    if _NUMBA_SCAN is None:
        from numba import njit, prange

        @njit(parallel=True, cache=True)
        def inside(lat0, lon0, r_km, lat, lon, radius_km, out):
            # The float64 haversine of geotarget.geo.haversine_km, term by term.
            d2r = math.pi / 180.0
            p1 = lat0 * d2r
            c1 = math.cos(p1)
            for i in prange(lat.shape[0]):
                s1 = math.sin((lat[i] - lat0) * d2r * 0.5)
                s2 = math.sin((lon[i] - lon0) * d2r * 0.5)
                a = s1 * s1 + c1 * math.cos(lat[i] * d2r) * s2 * s2
                if a > 1.0:
                    a = 1.0
                out[i] = 2.0 * radius_km * math.asin(math.sqrt(a)) <= r_km
            return out

        _NUMBA_SCAN = inside
    return _NUMBA_SCAN


class NumbaPeer:
    name = "numba"
    label = "numba brute force (parallel float64 haversine)"

    def __init__(self, cols):
        self.lat, self.lon = cols["lat"], cols["lon"]
        self.scan = _numba_scan()
        self.mask = np.empty(self.lat.shape[0], dtype=np.bool_)
        t0 = time.perf_counter()
        self.scan(0.0, 0.0, 1.0, self.lat[:1], self.lon[:1], EARTH_RADIUS_KM, self.mask[:1])  # compile or load
        self.compile_s = time.perf_counter() - t0
        self.build_s = 0.0
        self.rss_delta = self.lat.nbytes + self.lon.nbytes + self.mask.nbytes

    def ids(self, lat, lon, r):
        return np.flatnonzero(self.scan(lat, lon, r, self.lat, self.lon, EARTH_RADIUS_KM, self.mask))

    def count(self, lat, lon, r):
        return int(np.count_nonzero(self.scan(lat, lon, r, self.lat, self.lon, EARTH_RADIUS_KM, self.mask)))


PEER_CLASSES = {"balltree": BallTreePeer, "ckdtree": CKDTreePeer, "brute": BrutePeer, "numba": NumbaPeer}
PEER_MODULES = {"balltree": "sklearn", "ckdtree": "scipy", "brute": "numpy", "numba": "numba"}


def make_peer(name: str, cols):
    """The peer, or None (with a message) when its library is missing."""
    try:
        __import__(PEER_MODULES[name])
    except ImportError as exc:
        print(f"[skip] {name}: {exc}", file=sys.stderr)
        return None
    return PEER_CLASSES[name](cols)


def check_same(peer_name: str, rows, expected_ids: np.ndarray, cols, lat, lon, r) -> dict:
    """Compare a peer's rows (indices into ``cols``) with geotarget's sorted ids."""
    got = np.sort(cols["device_id"][np.asarray(rows, dtype=np.int64)])
    extra = np.setdiff1d(got, expected_ids, assume_unique=True)
    missing = np.setdiff1d(expected_ids, got, assume_unique=True)
    out = {"peer": peer_name, "equal": bool(extra.size == 0 and missing.size == 0),
           "extra": int(extra.size), "missing": int(missing.size), "ties": 0, "bad": 0}
    if not out["equal"]:
        diff = np.concatenate([extra, missing])
        order = np.argsort(cols["device_id"])
        rows_diff = order[np.searchsorted(cols["device_id"], diff, sorter=order)]
        d = haversine_km(lat, lon, cols["lat"][rows_diff], cols["lon"][rows_diff])
        ties = np.abs(d - r) <= TIE_KM
        out["ties"] = int(ties.sum())
        out["bad"] = int((~ties).sum())
        if out["bad"]:
            out["examples"] = [{"device_id": int(i), "distance_km": float(x)}
                               for i, x in zip(diff[~ties][:5], d[~ties][:5])]
    return out


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def run(n: int, seed: int = 0, peers=PEERS, budget_s: float = 1.0, log=print) -> dict:
    res = {"devices": n, "seed": seed, "python": platform.python_version(), "numpy": np.__version__,
           "geotarget": geotarget.__version__, "cpus": os.cpu_count(), "openmp_threads": _kernels.max_threads(),
           "load_average_start": load_average(), "build": {}, "queries": [], "checks": [], "skipped": []}
    t0 = time.perf_counter()
    cols = generate_arrays(n, seed=seed)
    res["generate_s"] = time.perf_counter() - t0
    log(f"generated {n:,} devices in {res['generate_s']:.1f} s (geotarget.spatial.population, seed {seed})")

    gt = Geotarget(cols)
    res["build"]["geotarget"] = {"build_s": gt.build_s, "ingest_s": gt.ingest_s,
                                 "bytes_per_device": gt.index.nbytes / n,
                                 "bytes_per_device_with_filters": gt.index.nbytes_with_filters / n,
                                 "rss_bytes_per_device": gt.rss_delta / n}
    log(f"geotarget: ingest {gt.ingest_s:.2f} s, index build {gt.build_s:.2f} s, "
        f"{gt.index.nbytes / n:.1f} B/device")

    engines = {}
    for name in peers:
        t0 = time.perf_counter()
        peer = make_peer(name, cols)
        if peer is None:
            res["skipped"].append(name)
            continue
        engines[name] = peer
        res["build"][name] = {"build_s": peer.build_s, "rss_bytes_per_device": peer.rss_delta / n}
        log(f"{name}: build {peer.build_s:.2f} s, {peer.rss_delta / n:.1f} B/device (RSS delta)")

    for centre, (lat, lon) in CENTRES.items():
        for r in RADII_KM:
            q = {"centre": centre, "lat": lat, "lon": lon, "radius_km": r}
            fill = best_of(lambda: gt.fill(lat, lon, r), min_reps=20, budget_s=budget_s)
            ids = best_of(lambda: gt.device_ids(lat, lon, r), min_reps=10, budget_s=budget_s)
            cnt = best_of(lambda: gt.count(lat, lon, r), min_reps=50, budget_s=budget_s / 2)
            expected = ids.pop("result")
            q["recipients"] = int(expected.shape[0])
            q["write_floor"] = write_floor(expected, budget_s)
            fill_n = fill.pop("result")
            count_n = cnt.pop("result")
            q["geotarget"] = {"fill": fill, "device_ids": ids, "count": cnt}
            ok = fill_n == count_n == expected.shape[0]
            keys_ok = np.array_equal(np.sort(gt.buf[:fill_n]), gt.index.within(lat, lon, r).keys())
            res["checks"].append({"centre": centre, "radius_km": r, "peer": "geotarget(fill/count)",
                                  "equal": bool(ok and keys_ok), "bad": 0 if ok and keys_ok else 1})
            for name, peer in engines.items():
                slow = name != "balltree"
                t_ids = best_of(lambda: peer.ids(lat, lon, r), min_reps=3 if slow else 10,
                                budget_s=budget_s if not slow else 0.0)
                t_cnt = best_of(lambda: peer.count(lat, lon, r), min_reps=3 if slow else 10,
                                budget_s=budget_s if not slow else 0.0)
                rows = t_ids.pop("result")
                peer_count = t_cnt.pop("result")
                chk = check_same(name, rows, expected, cols, lat, lon, r)
                chk.update(centre=centre, radius_km=r, count=peer_count)
                if peer_count != len(rows):
                    chk["bad"] += 1
                    chk["equal"] = False
                res["checks"].append(chk)
                q[name] = {"ids": t_ids, "count": t_cnt}
            res["queries"].append(q)
            log(f"  {centre:6s} {r:5.0f} km: {q['recipients']:>11,} devices, "
                f"geotarget ids {ids['best_s'] * 1e3:.2f} ms, count {cnt['best_s'] * 1e3:.3f} ms")
    res["load_average_end"] = load_average()
    res["targets"] = evaluate_targets(res)
    res["ok"] = all(c["bad"] == 0 for c in res["checks"])
    return res


def _q(res, centre, r):
    for q in res["queries"]:
        if q["centre"] == centre and q["radius_km"] == r:
            return q
    return None


def evaluate_targets(res) -> list:
    out = []
    for peer, key, label in (("balltree", "ids_vs_balltree", "BallTree"), ("ckdtree", "ids_vs_ckdtree", "cKDTree")):
        for r in RADII_KM:
            q = _q(res, "dense", r)
            need = TARGETS[key]
            if q is None or peer not in q:
                out.append({"target": f"ids >= {need:g}x faster than {label}, dense {r:g} km",
                            "value": None, "met": None})
                continue
            ratio = q[peer]["ids"]["best_s"] / q["geotarget"]["device_ids"]["best_s"]
            vs_fill = q[peer]["ids"]["best_s"] / q["geotarget"]["fill"]["best_s"]
            budget = q[peer]["ids"]["best_s"] / need
            floor = q["write_floor"]["best_s"]
            out.append({"target": f"ids >= {need:g}x faster than {label}, dense {r:g} km",
                        "value": (f"{ratio:.1f}x (fill: {vs_fill:.0f}x); budget {_ms(budget)} ms, "
                                  f"writing the ids alone {_ms(floor)} ms"),
                        "met": ratio >= need, "budget_s": budget, "floor_s": floor,
                        "feasible": floor <= budget})
    worst = max(q["geotarget"]["count"]["best_s"] for q in res["queries"]) * 1e3
    out.append({"target": f"count <= {TARGETS['count_ms']} ms (worst of all queries)",
                "value": f"{worst:.3f} ms", "met": worst <= TARGETS["count_ms"]})
    b = res["build"]["geotarget"]["build_s"]
    at = res["devices"] >= TARGETS["build_at"]
    out.append({"target": f"index build <= {TARGETS['build_s']:g} s at 20 M",
                "value": f"{b:.2f} s" + ("" if at else f" (at {res['devices']:,}: not the target size)"),
                "met": (b <= TARGETS["build_s"]) if at else None})
    return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def _ms(s):
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.1f}" if s < 1 else f"{s * 1e3:,.0f}"


def markdown(res) -> str:
    n = res["devices"]
    peers = [p for p in PEERS if p in res["build"]]
    labels = {p: PEER_CLASSES[p].label for p in peers}
    lines = [f"### geotarget vs peers: {n:,} devices (seed {res['seed']}), one process", ""]
    lines += [f"Python {res['python']}, NumPy {res['numpy']}, {res['cpus']} CPUs, "
              f"{res['openmp_threads']} OpenMP threads; load average {res['load_average_start']} at start, "
              f"{res['load_average_end']} at end; population generated in {res['generate_s']:.1f} s.", ""]
    lines += ["| engine | build (s) | bytes / device | how memory was measured |", "|---|---:|---:|---|"]
    g = res["build"]["geotarget"]
    lines.append(f"| geotarget `SpatialIndex.build` | {g['build_s']:.2f} | {g['bytes_per_device']:.1f} "
                 f"({g['rss_bytes_per_device']:.1f} RSS) | `index.nbytes / n` (positions, index, keys); "
                 f"RSS delta incl. seen/app filters |")
    lines.append(f"| geotarget `DeviceStore.from_arrays` (ingest) | {g['ingest_s']:.2f} | – | validation, "
                 f"duplicate check, spatial key order |")
    for p in peers:
        b = res["build"][p]
        how = ("its own lat/lon float64 arrays (no index)" if p == "brute"
               else "its own lat/lon float64 arrays and a bool mask (no index)" if p == "numba"
               else "RSS delta over input array + build (tree and its copy of the points)")
        lines.append(f"| {labels[p]} | {b['build_s']:.2f} | {b['rss_bytes_per_device']:.1f} | {how} |")
    lines.append("")

    head = "| centre | r (km) | devices | geotarget fill (ms) | geotarget device_ids (ms) | write floor (ms) |"
    sep = "|---|---:|---:|---:|---:|---:|"
    for p in peers:
        head += f" {p} ids (ms) | × |"
        sep += "---:|---:|"
    lines += ["**Ids** (× = peer time / geotarget `device_ids()` time; best of k; write floor = copying the "
              "answer's uint64 ids into a reused buffer)", "", head, sep]
    for q in res["queries"]:
        gi = q["geotarget"]["device_ids"]["best_s"]
        row = (f"| {q['centre']} | {q['radius_km']:.0f} | {q['recipients']:,} | "
               f"{_ms(q['geotarget']['fill']['best_s'])} | {_ms(gi)} | {_ms(q['write_floor']['best_s'])} |")
        for p in peers:
            t = q[p]["ids"]["best_s"]
            row += f" {_ms(t)} | {t / gi:,.0f}× |"
        lines.append(row)
    lines.append("")
    head = "| centre | r (km) | geotarget count (ms) |"
    sep = "|---|---:|---:|"
    for p in peers:
        head += f" {p} count (ms) | × |"
        sep += "---:|---:|"
    lines += ["**Counts** (× = peer time / geotarget `count()` time)", "", head, sep]
    for q in res["queries"]:
        gc_ = q["geotarget"]["count"]["best_s"]
        row = f"| {q['centre']} | {q['radius_km']:.0f} | {_ms(gc_)} |"
        for p in peers:
            t = q[p]["count"]["best_s"]
            row += f" {_ms(t)} | {t / gc_:,.0f}× |"
        lines.append(row)
    lines += ["", "**Targets** (docs/design.md, Targets)", "", "| target | measured | |", "|---|---:|---|"]
    for t in res["targets"]:
        mark = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        if t["met"] is False and t.get("feasible") is False:
            mark += " (budget below the write floor: not reachable on this machine)"
        lines.append(f"| {t['target']} | {t['value'] if t['value'] is not None else '–'} | {mark} |")
    n_checks = len(res["checks"])
    ties = sum(c.get("ties", 0) for c in res["checks"])
    bad = [c for c in res["checks"] if c["bad"]]
    lines += ["", f"Correctness: {n_checks} result sets compared with geotarget's `device_ids()`; "
              f"{'all equal' if not bad else f'{len(bad)} MISMATCHED'}"
              f"{f' ({ties} boundary ties within 1e-6 km, allowed)' if ties else ''}."]
    if res["skipped"]:
        lines.append(f"Skipped peers (library missing): {', '.join(res['skipped'])}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=parse_count, default=20_000_000, help="number of devices (20M, 2M, 500k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeated timing per fast measurement")
    ap.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    args = ap.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    t0 = time.perf_counter()
    res = run(args.devices, seed=args.seed, peers=peers, budget_s=args.budget,
              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    res["total_s"] = time.perf_counter() - t0
    print(markdown(res))
    print(f"\nWhole run: {res['total_s']:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    if not res["ok"]:
        print("\n!!! MISMATCH: a peer's result set differs from geotarget's beyond the 1e-6 km tie band !!!",
              file=sys.stderr)
        for c in res["checks"]:
            if c["bad"]:
                print(f"!!! {c}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
