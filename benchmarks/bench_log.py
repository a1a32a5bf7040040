"""Durable logging cost of large pushes in the recipient log.

Prints, for each audience shape, the wall time of ``append_push`` (run-optimise,
serialise, digest, insert, fsync of the WAL, and any checkpoint it triggers),
the stored bytes per recipient, and the time of ``notified()`` over four
pushes of the alert.  Audiences are seeded:

* ``spatial-5M``: 5 M keys in ~3,000 runs, what a 100 km circle over keys
  assigned in spatial order looks like;
* ``range-90M``: ``range(0, 90_000_000)`` with 3,000 random holes, a dense
  500 km circle at 400 M devices;
* ``random-5M``: 5 M keys with no spatial order (the worst case: no runs).

Usage: ``python benchmarks/bench_log.py [--dir DIR | --log postgresql://...] [--repeat N]`` (``--log``:
an empty PostgreSQL database instead of a SQLite file).  The target
(docs/design.md, Targets) is 500 ms or less for logging a 90 M-recipient push durably.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time

import numpy as np
from pyroaring import BitMap

import _paths  # noqa: E402,F401  (finds geotarget: in-place build or installed)
from geotarget.alerts.log import RecipientLog  # noqa: E402

UTC = dt.timezone.utc


def spatial(n_keys: int, n_runs: int, span: int, rng) -> BitMap:
    lengths = rng.multinomial(n_keys - n_runs, np.ones(n_runs) / n_runs) + 1
    gaps = rng.multinomial(span - n_keys, np.ones(n_runs) / n_runs)
    starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    bm = BitMap()
    for s, n in zip(starts.tolist(), lengths.tolist()):
        bm.add_range(s, s + n)
    return bm


def holes(n_keys: int, n_holes: int, rng) -> BitMap:
    bm = BitMap(range(0, n_keys))
    for s in rng.integers(0, n_keys, n_holes).tolist():
        bm.remove_range(s, s + int(rng.integers(1, 2000)))
    return bm


def random_keys(n_keys: int, span: int, rng) -> BitMap:
    bm = BitMap()
    bm.update(rng.choice(span, n_keys, replace=False).astype(np.uint32))
    return bm


def bench(directory: str, repeat: int, url: str | None = None) -> None:
    rng = np.random.default_rng(20260101)
    shapes = {
        "spatial-5M": lambda: spatial(5_000_000, 3_000, 20_000_000, rng),
        "range-90M": lambda: holes(90_000_000, 3_000, rng),
        "random-5M": lambda: random_keys(5_000_000, 400_000_000, rng),
    }
    t0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
    print(f"{'audience':<12} {'recipients':>12} {'append ms':>22} {'B/recipient':>12} "
          f"{'notified(4) ms':>15}")
    with RecipientLog(url or os.path.join(directory, "bench.sqlite")) as log:
        for name, make in shapes.items():
            times, notified_times = [], []
            for r in range(repeat):
                alert = f"{name}-{r}"
                base = make()
                # Three more disjoint rings (shifted copies), as an alert that expands.
                rings = [base] + [base.shift(k * 1_000_000_000) for k in (1, 2, 3)]
                before = log.stats()["audience_bytes"]
                for seq, bm in enumerate(rings):
                    t = time.perf_counter()
                    log.append_push(push_id=f"{alert}/{seq}", alert_id=alert, seq=seq,
                                    kind="alert" if seq == 0 else "expand", radius_km=100.0 * (seq + 1),
                                    created_at=t0, audience=bm, meta={"shape": name})
                    if seq == 0:
                        times.append(time.perf_counter() - t)
                        first_bytes = log.stats()["audience_bytes"] - before
                t = time.perf_counter()
                n = len(log.notified(alert))
                notified_times.append(time.perf_counter() - t)
                assert n == sum(len(b) for b in rings)
            recipients = len(rings[0])
            print(f"{name:<12} {recipients:>12,} "
                  f"{'median %.1f (max %.1f)' % (1e3 * statistics.median(times), 1e3 * max(times)):>22} "
                  f"{first_bytes / recipients:>12.5f} {1e3 * statistics.median(notified_times):>15.1f}")
        print("log:", log.stats())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="directory for the log (default: a temporary one)")
    ap.add_argument("--log", default=None, metavar="URL",
                    help="a postgresql:// URL of an empty database: log there instead of a SQLite file")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.log:
        bench("", args.repeat, args.log)
    elif args.dir:
        bench(args.dir, args.repeat)
    else:
        with tempfile.TemporaryDirectory() as d:
            bench(d, args.repeat)


if __name__ == "__main__":
    main()
