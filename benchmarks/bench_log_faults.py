"""What the fault protections cost per push, in one process, on one disk.

For a push of a small spatial audience (10,000 keys in 20 runs), the engine's
whole durable step is timed: one transaction with ``append_push``, the alert's
state, an audit entry and the log's clock (what ``AlertEngine._emit`` writes),
fsynced at commit.  Variants, interleaved round by round so that disk noise
falls on all of them alike:

* ``unkeyed``: the log as shipped without a key;
* ``keyed``: with a MAC key (an HMAC-SHA256 and a ``macs`` row per record);
* ``checkpoint``: unkeyed, plus ``PRAGMA wal_checkpoint`` after every commit,
  the alternative to detecting a main file copied without its WAL on open
  (not what the log does; measured to show what it would cost).

Also timed: opening and closing a log (the owner mark costs a commit and a
checkpoint at open).  Prints medians and p90 in ms.

Usage: ``python benchmarks/bench_log_faults.py [--dir DIR] [--pushes N] [--rounds R]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time

from pyroaring import BitMap

import _paths  # noqa: F401  (finds geotarget: in-place build or installed)
from geotarget.alerts.log import RecipientLog

UTC = dt.timezone.utc
KEY = b"benchmark key of thirty-two bytes"


def ring(seq: int) -> BitMap:
    bm = BitMap()
    base = seq * 1_000_000
    for r in range(20):
        bm.add_range(base + r * 10_000, base + r * 10_000 + 500)
    return bm


def one_push(log: RecipientLog, alert: str, seq: int, checkpoint: bool) -> float:
    t0 = time.perf_counter()
    now = dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(seconds=seq)
    with log.transaction():
        log.append_push(push_id=f"{alert}.{seq}", alert_id=alert, seq=seq, kind="alert" if seq == 0 else "expand",
                        radius_km=100.0 + seq, created_at=now, audience=ring(seq), meta={"cap_xml": "x" * 3000})
        log.save_alert(alert, {"next_seq": seq + 1})
        log.audit("expand", actor="engine", alert_id=alert, radius_km=100.0 + seq, count=10_000, at=now)
        log.set_meta_value("clock", now.isoformat())
    if checkpoint:
        log._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--pushes", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_log_faults_")
    variants = {"unkeyed": (None, False), "keyed": (KEY, False), "checkpoint": (None, True)}
    times: dict[str, list[float]] = {v: [] for v in variants}
    opens: list[float] = []
    for r in range(args.rounds):
        for name, (key, checkpoint) in variants.items():
            path = os.path.join(root, f"{name}-{r}.sqlite")
            with RecipientLog(path, key=key) as log:
                for seq in range(args.pushes):
                    times[name].append(one_push(log, "A", seq, checkpoint))
            t0 = time.perf_counter()
            RecipientLog(path, key=key).close()
            opens.append((time.perf_counter() - t0) * 1e3)

    def q(xs, p):
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]

    print(f"{'variant':<11} {'pushes':>7} {'median ms':>10} {'p90 ms':>8}  (10,000 recipients, 20 runs)")
    for name, xs in times.items():
        print(f"{name:<11} {len(xs):>7} {statistics.median(xs):>10.2f} {q(xs, 0.9):>8.2f}")
    print(f"open+close  {len(opens):>7} {statistics.median(opens):>10.2f} {q(opens, 0.9):>8.2f}")


if __name__ == "__main__":
    main()
