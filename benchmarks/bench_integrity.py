"""What the integrity chain costs: save, open, full verification, and the query path.

Two modes, each printing one JSON object:

* ``files``: a synthetic population of ``--devices`` is indexed and saved
  into ``--workdir``; then ``SpatialIndex.open`` (best and median of 7),
  ``verify()`` of a fresh open with the files in the page cache (best of 3),
  and ``verify()`` after ``posix_fadvise(DONTNEED)`` evicted the directory's
  files from the page cache (read from disk; best of 2).  Throughput is the
  bytes under a digest (store and index files) over the time.
* ``query-ab``: the integrity chain's only change to the query path is one
  test in ``SpatialIndex._args`` (has this index been verified?).  This
  mode times the queries with ``_args`` as it is and with the same method
  minus that test (``_args_before``, which calls the same
  ``SpatialIndex._query_args``), interleaved in
  one process, 30 rounds of 10 calls each, so the machine's load hits both
  alike; it prints the median ratio after / before.
* ``query``: the query path on an index built in memory from the same
  population: ``within(...).fill(buf)`` and ``count`` at the dense centre
  (Shanghai) at 100 and 500 km, and the dispatch filter (seen in the last
  24 h) at 500 km.  Best and median of ``--reps`` calls after one warm-up.
  Run it from this checkout and from an export of the commit before the
  integrity chain, alternately, to compare the two in the same machine state
  (``docs/performance.md``, "Integrity", has the exact commands).

Usage::

    python benchmarks/bench_integrity.py files --devices 20M --workdir /tmp/gt-integrity
    python benchmarks/bench_integrity.py query --devices 20M --reps 40
    python benchmarks/bench_integrity.py query-ab --devices 20M
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import _paths  # noqa: F401  (finds geotarget: in-place build or installed)
import geotarget as gt  # noqa: E402
from geotarget.cli import parse_count  # noqa: E402
from geotarget.spatial.population import population  # noqa: E402

SHANGHAI = (31.23, 121.47)
NOW = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone.utc)


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _summary(ts: list[float], scale: float = 1e3) -> dict:
    return {"best": round(min(ts) * scale, 4), "median": round(statistics.median(ts) * scale, 4), "n": len(ts)}


def _evict(d: Path) -> None:
    """Drop this directory's files from the page cache (only ours: no global drop_caches)."""
    for p in d.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def mode_files(a) -> dict:
    d = Path(a.workdir)
    t0 = time.perf_counter()
    store = population(a.devices, seed=0)
    gen_s = time.perf_counter() - t0
    index = gt.SpatialIndex.build(store)
    t0 = time.perf_counter()
    index.save(d)
    save_s = time.perf_counter() - t0
    del index, store
    files = {p.name: p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix in (".arrow", ".npy")}
    nbytes = sum(files.values())
    opens = _times(lambda: gt.SpatialIndex.open(d), 7)

    def verify_fresh():
        idx = gt.SpatialIndex.open(d)
        t0 = time.perf_counter()
        idx.verify()
        return time.perf_counter() - t0

    warm = [verify_fresh() for _ in range(3)]
    cold = []
    for _ in range(2):
        _evict(d)
        cold.append(verify_fresh())
    return {"mode": "files", "devices": a.devices, "generate_s": round(gen_s, 2), "save_s": round(save_s, 2),
            "bytes_verified": nbytes, "files": files, "open_ms": _summary(opens),
            "verify_warm_s": _summary(warm, 1), "verify_warm_GBps": round(nbytes / min(warm) / 1e9, 2),
            "verify_cold_s": _summary(cold, 1), "verify_cold_GBps": round(nbytes / min(cold) / 1e9, 2)}


def mode_query(a) -> dict:
    store = population(a.devices, seed=0)
    index = gt.SpatialIndex.build(store)
    buf = np.empty(len(index), dtype=np.uint32)
    seen = NOW - dt.timedelta(hours=24)
    cases = {
        "fill_100km": lambda: index.within(*SHANGHAI, 100.0).fill(buf),
        "fill_500km": lambda: index.within(*SHANGHAI, 500.0).fill(buf),
        "count_500km": lambda: index.count(*SHANGHAI, 500.0),
        "fill_500km_seen24h": lambda: index.within(*SHANGHAI, 500.0, seen_since=seen).fill(buf),
    }
    out = {"mode": "query", "devices": a.devices, "geotarget": str(Path(gt.__file__).parent), "ms": {}}
    for name, fn in cases.items():
        fn()
        out["ms"][name] = _summary(_times(fn, a.reps))
    return out


def _args_before(self, lat, lon, radius_km, seen_since, apps):
    """``SpatialIndex._args`` minus the verified test: the library's own argument checks.

    Both variants make the same one call to ``SpatialIndex._query_args``, so
    the only difference timed is the test itself.
    """
    return self._query_args(lat, lon, radius_km, seen_since, apps)


def mode_query_ab(a) -> dict:
    cls = gt.SpatialIndex
    after = cls._args
    index = cls.build(population(a.devices, seed=0))
    buf = np.empty(len(index), dtype=np.uint32)
    cases = {"count_500km": lambda: index.count(*SHANGHAI, 500.0),
             "fill_500km": lambda: index.within(*SHANGHAI, 500.0).fill(buf),
             "fill_100km": lambda: index.within(*SHANGHAI, 100.0).fill(buf)}
    out = {"mode": "query-ab", "devices": a.devices, "ms": {}}
    try:
        for name, fn in cases.items():
            t = {"before": [], "after": []}
            for rnd in range(30):
                order = (("before", _args_before), ("after", after))
                for which, method in (order if rnd % 2 == 0 else order[::-1]):
                    cls._args = method
                    fn()
                    t[which] += _times(fn, 10)
            out["ms"][name] = {w: _summary(v) for w, v in t.items()}
            out["ms"][name]["median_ratio_after_over_before"] = round(
                statistics.median(t["after"]) / statistics.median(t["before"]), 4)
    finally:
        cls._args = after
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("files", "query", "query-ab"))
    p.add_argument("--devices", type=parse_count, default=20_000_000)
    p.add_argument("--workdir", default="/tmp/gt-integrity-bench")
    p.add_argument("--reps", type=int, default=40)
    a = p.parse_args(argv)
    res = {"files": mode_files, "query": mode_query, "query-ab": mode_query_ab}[a.mode](a)
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
