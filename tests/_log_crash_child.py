"""Child process for the recipient-log crash tests: appends and acks until it is killed.

Usage: ``python _log_crash_child.py LOG_PATH ROUND``.  Every audience is a
pure function of (alert, seq), so the parent knows exactly what each logged
push must hold.  A line goes to stdout (flushed) only after the call it
reports has returned, i.e. after the log said it was durable:
``ready``, ``push <push_id>``, ``acked <push_id>``.
"""
import datetime as dt
import os
import sys

import numpy as np
from pyroaring import BitMap

ALERTS = ("K0", "K1", "K2")
T0 = dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)


def kind_of(seq: int) -> str:
    return "alert" if seq == 0 else ("update" if seq % 4 == 3 else "expand")


def ring(alert: str, seq: int) -> BitMap:
    """The new devices of ring ``seq``: disjoint from every other ring by construction."""
    a = ALERTS.index(alert)
    rng = np.random.default_rng([a, seq])
    base = (a << 30) + (seq << 20)
    bm = BitMap()
    if seq % 3 == 1:
        # no spatial order: an array-container bitmap of a few hundred KB, many WAL pages
        bm.update((base + rng.choice(1 << 20, 20_000, replace=False)).astype(np.uint32))
    else:
        for start in np.sort(rng.choice(1 << 20, 40, replace=False)).tolist():
            bm.add_range(base + start, base + min(start + int(rng.integers(1, 30_000)), 1 << 20))
    return bm


def audience(alert: str, seq: int) -> BitMap:
    if kind_of(seq) == "update":
        return BitMap.union(BitMap(), *(ring(alert, s) for s in range(seq) if kind_of(s) != "update"))
    return ring(alert, seq)


def args(alert: str, seq: int) -> dict:
    return dict(push_id=f"{alert}.{seq}", alert_id=alert, seq=seq, kind=kind_of(seq),
                radius_km=100.0 * (seq + 1), created_at=T0 + dt.timedelta(minutes=seq),
                audience=audience(alert, seq), meta={"seq": seq, "cap_xml": f"<x>{alert}.{seq}</x>"})


def _import_log():
    """geotarget.alerts.log without the package __init__ (which pulls in pyarrow and the index):
    a kill round is dominated by interpreter start-up, and the log needs none of it."""
    import importlib
    import types
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "geotarget")
    pkg = types.ModuleType("geotarget")
    pkg.__path__ = [root]
    sys.modules.setdefault("geotarget", pkg)
    return importlib.import_module("geotarget.alerts.log")


def main(path: str, round_no: int) -> None:
    RecipientLog = _import_log().RecipientLog
    log = RecipientLog(path)
    next_seq = dict.fromkeys(ALERTS, 0)
    for rec in log.pushes(audiences=False):
        next_seq[rec.alert_id] = rec.seq + 1
    print("ready", flush=True)
    step = 0
    while True:
        alert = ALERTS[(step + round_no) % len(ALERTS)]
        seq = next_seq[alert]
        if step % 5 == 4:
            # grouped, as the engine does: push + alert state + audit in one commit
            with log.transaction():
                log.append_push(**args(alert, seq))
                log.save_alert(alert, {"next_seq": seq + 1})
                log.audit(kind_of(seq), actor="crash-child", alert_id=alert, count=len(audience(alert, seq)))
        else:
            log.append_push(**args(alert, seq))
            if seq == 0:
                log.save_alert(alert, {"next_seq": 1})
        print(f"push {alert}.{seq}", flush=True)
        next_seq[alert] = seq + 1
        if seq % 3 == 0:
            log.ack(f"{alert}.{seq}")
            print(f"acked {alert}.{seq}", flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
