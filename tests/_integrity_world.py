"""Small on-disk worlds for the integrity and tamper tests: store generations, indexes and a log.

Every generation here has the same number of devices and of changed keys, so
a file swapped in from another generation or lineage has the right size and
shape: only its content can give it away.
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np

import geotarget as gt

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HZ = (30.27, 120.15)  # Hangzhou
N = 3000
MOVED = 300
OFFICERS = [gt.Officer("city-1", level="city", division="330100"),
            gt.Officer("mps", level="ministry", division="000000")]
#: Circles probed after damage: dense, ring-sized and one that takes in everyone.
CIRCLES = [(HZ[0], HZ[1], 100.0), (HZ[0], HZ[1], 300.0), (31.23, 121.47, 50.0), (HZ[0], HZ[1], 20_015.0)]


def population(seed: int, n: int = N, lineage: str | None = None) -> gt.DeviceStore:
    rng = np.random.default_rng(seed)
    d_km = rng.uniform(0, 700, n)
    bearing = rng.uniform(0, 2 * np.pi, n)
    lat = HZ[0] + (d_km / 111.2) * np.cos(bearing)
    lon = HZ[1] + (d_km / (111.2 * np.cos(np.radians(HZ[0])))) * np.sin(bearing)
    ids = np.arange(n, dtype=np.uint64) * 13 + 5 + seed
    app = rng.choice(["amap", "alipay", "weibo"], n)
    return gt.DeviceStore.from_arrays(ids, lat, lon, app=app, last_seen=T0 - dt.timedelta(hours=1),
                                      lineage=lineage)


def moved(store: gt.DeviceStore, seed: int) -> gt.DeviceStore:
    """The next generation: MOVED known devices move to within 150 km of Hangzhou (no new devices)."""
    rng = np.random.default_rng(1000 + seed)
    k = rng.choice(len(store), MOVED, replace=False)
    d_km = rng.uniform(0, 150, MOVED)
    bearing = rng.uniform(0, 2 * np.pi, MOVED)
    lat = HZ[0] + (d_km / 111.2) * np.cos(bearing)
    lon = HZ[1] + (d_km / (111.2 * np.cos(np.radians(HZ[0])))) * np.sin(bearing)
    return store.with_updates(store.device_id[k], lat, lon, last_seen=T0)


def save_generations(root: Path, seed: int, count: int = 3) -> list[Path]:
    """Directories g1..g<count> of one lineage, each a store with its index."""
    dirs = []
    store = population(seed)
    for g in range(1, count + 1):
        if g > 1:
            store = moved(store, seed * 10 + g)
        d = root / f"g{g}"
        gt.SpatialIndex.build(store).save(d)
        dirs.append(d)
    return dirs


def engine(index, log_path) -> gt.AlertEngine:
    log = gt.RecipientLog(log_path)
    try:
        return gt.AlertEngine(index, log=log, authority=gt.Authority(OFFICERS))
    except BaseException:
        log.close()   # a refused engine must not keep the log's lock
        raise


def run_alert(g1: Path, g2: Path, log_path: Path) -> str:
    """One alert through two generations: alert (100 km), expand (200), refresh top-up, expand (300)."""
    eng = engine(gt.SpatialIndex.open(g1), log_path)
    alert = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
    kinds = [p.kind for p in eng.tick(T0 + dt.timedelta(minutes=30))]
    kinds += [p.kind for p in eng.tick(T0 + dt.timedelta(minutes=90))]
    kinds += [p.kind for p in eng.refresh(gt.SpatialIndex.open(g2), T0 + dt.timedelta(minutes=100))]
    kinds += [p.kind for p in eng.tick(T0 + dt.timedelta(minutes=150))]
    assert kinds == ["alert", "expand", "topup", "expand"], kinds
    eng.log.close()
    return alert.alert_id


def close_ids(index_dir: Path, log_path: Path, alert_id: str) -> np.ndarray:
    """Device ids of the closure, from an index opened from ``index_dir`` (the operator's path)."""
    eng = engine(gt.SpatialIndex.open(index_dir), log_path)
    try:
        push = eng.close(alert_id, "mps", outcome="lost", now=T0 + dt.timedelta(hours=5))
        return push.audience.device_ids()
    finally:
        eng.log.close()


def query_ids(index_dir: Path) -> list[np.ndarray]:
    idx = gt.SpatialIndex.open(index_dir)
    return [idx.within(la, lo, r).device_ids() for la, lo, r in CIRCLES]


def reference_ids(store: gt.DeviceStore, circles=CIRCLES) -> list[np.ndarray]:
    """What a float64 NumPy haversine scan over the store selects (the contract)."""
    from geotarget.geo import haversine_km
    return [np.sort(store.device_id[haversine_km(la, lo, store.lat, store.lon) <= r]) for la, lo, r in circles]


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
