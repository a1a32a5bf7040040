"""Child of the store/index crash test: replace a directory's store, then its index, forever.

Two populations of different lineages take turns, so a stale index next to
the other store would answer for the wrong devices if it ever opened.
"""
import sys
from pathlib import Path

import geotarget as gt

from _integrity_world import population


def main():
    d = Path(sys.argv[1])
    pairs = []
    for seed in (1, 2):
        store = population(seed)
        pairs.append((store, gt.SpatialIndex.build(store)))
    pairs[0][1].save(d)
    print("ready", flush=True)
    i = 1
    while True:
        store, index = pairs[i % 2]
        store.save(d)
        index.save(d)
        i += 1


if __name__ == "__main__":
    main()
