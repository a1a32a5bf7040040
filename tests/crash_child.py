"""Child process for the engine crash tests: runs a lifecycle and reports only what was returned.

Usage: crash_child.py LOG_PATH SEED
Prints ``push <push_id> <kind> <count> <sha1 of sorted keys>`` after a push was
returned, and ``acked <push_id>`` after ack() returned.  The parent kills it
with SIGKILL at a random instant.
"""
import datetime as dt
import hashlib
import sys

import numpy as np

import geotarget as gt

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
OFFICERS = [gt.Officer("city-1", level="city", division="330100"),
            gt.Officer("mps", level="ministry", division="000000")]


_CHAIN: dict = {}   # (seed, gen) -> store: later generations grow from the same objects, so each
                    # descends from the one before (a rebuilt chain would be a fork: other uids)


def world(seed: int, gen: int):
    n = 4000
    have = [g for (s, g) in _CHAIN if s == seed and g <= gen]
    if have:
        start = max(have)
        store = _CHAIN[(seed, start)]
    else:
        rng = np.random.default_rng(seed)
        lat = 30.27 + rng.uniform(-5, 5, n)
        lon = 120.15 + rng.uniform(-5, 5, n)
        store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) + 1, lat, lon, lineage=f"crash-{seed}")
        start = 0
        _CHAIN[(seed, 0)] = store
    for g in range(start, gen):
        r = np.random.default_rng(seed * 1000 + g)
        ids = np.concatenate([r.choice(n, 300, replace=False) + 1, np.arange(50) + 10**9 + g * 100]).astype(np.uint64)
        store = store.with_updates(ids, 30.27 + r.uniform(-2, 2, 350), 120.15 + r.uniform(-2, 2, 350))
        _CHAIN[(seed, g + 1)] = store
    return gt.SpatialIndex.build(store)


def digest(push) -> str:
    return hashlib.sha1(push.audience.keys().tobytes()).hexdigest()


def main():
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    eng = gt.AlertEngine(world(seed, 0), log=gt.RecipientLog(path), authority=gt.Authority(OFFICERS))
    centres = [(30.27, 120.15), (29.6, 119.0), (30.05, 119.95)]  # inside Hangzhou (330100)
    alerts = [eng.report("city-1", lat=la, lon=lo, division="330100", missing_since=T0, now=T0).id
              for la, lo in centres]
    now = T0
    for step in range(40):
        now += dt.timedelta(minutes=int(rng.integers(5, 40)))
        if step in (8, 16):
            pushes = eng.refresh(world(seed, 1 + step // 8), now)
        else:
            pushes = eng.tick(now)
        for p in pushes:
            print(f"push {p.push_id} {p.kind} {len(p)} {digest(p)}", flush=True)
            if rng.random() < 0.6:
                eng.ack(p.push_id)
                print(f"acked {p.push_id}", flush=True)
    for a in alerts:
        p = eng.close(a, "mps", outcome="lost", now=now)
        print(f"push {p.push_id} {p.kind} {len(p)} {digest(p)}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
