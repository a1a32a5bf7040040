"""Child process for the store crash test: writes generation 2 of a store to disk.

Usage: store_crash_child.py WORKDIR
Opens WORKDIR/g1, prints ``start`` once the update batch is made, then writes
WORKDIR/g2 in small chunks (so a kill lands mid-write) and prints ``done``.
The parent kills it with SIGKILL at a random instant.
"""
import sys
from pathlib import Path

import numpy as np

import geotarget as gt


def batch(store):
    rng = np.random.default_rng(5)
    up = np.concatenate([rng.choice(store.device_id, 20_000, replace=False),
                         np.arange(3000, dtype=np.uint64) + 10**15])
    rng.shuffle(up)
    return up, rng.uniform(-60, 60, len(up)), rng.uniform(-170, 170, len(up)), np.full(len(up), 1_760_000_000)


def main():
    wd = Path(sys.argv[1])
    g1 = gt.DeviceStore.open(wd / "g1")
    ids, lat, lon, seen = batch(g1)
    print("start", flush=True)
    g1._with_updates_to_disk(wd / "g2", ids, lat, lon, seen, None, None, chunk_rows=300)
    print("done", flush=True)


if __name__ == "__main__":
    main()
