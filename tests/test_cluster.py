"""ShardedIndex on a local Ray: same keys as SpatialIndex, same engine lifecycle, faults, bad input."""
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import geotarget as gt  # noqa: E402
from geotarget.spatial.cluster import (MANIFEST, ShardedIndex, ShardServer, ShardUnavailableError,  # noqa: E402
                               boxes_touching, kd_partition)
from geotarget.errors import CorruptFileError, InvalidInputError  # noqa: E402
from geotarget.geo import HALF_CIRCUMFERENCE_KM, unit_vectors  # noqa: E402
from geotarget.spatial.index import within_reference  # noqa: E402

pytestmark = pytest.mark.ray

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HZ = (30.27, 120.15)  # Hangzhou
#: Few CPUs per actor, so that every index of this file can be alive at once on 2 cores.
CPUS = 0.1
#: Clusters that break naive partitions: both poles, both sides of the antimeridian, a megacity.
CLUSTERS = [(31.23, 121.47, 0.5), (89.6, 40.0, 0.3), (-89.5, -100.0, 0.4), (0.5, 179.95, 0.2),
            (-20.0, -179.9, 0.3), (64.1, -21.9, 1.0)]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One private local Ray for the whole file (2 CPUs, no dashboard, a small object store).

    Ray puts the driver's working directory first on its workers' ``sys.path``.
    Started from a source checkout, workers would import the uncompiled source
    tree instead of the installed package, so Ray starts from a scratch directory.
    """
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-cwd"))
    # ... and workers get the directory of the package this process imported
    # (site-packages after `pip install .`, the checkout after an in-place build).
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(gt.__file__)))
    pythonpath = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
                 logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        yield
        ray.shutdown()
    finally:
        os.chdir(cwd)


def globe_and_clusters(n_uniform=20_000, n_cluster=4_000, seed=0):
    rng = np.random.default_rng(seed)
    lat = [np.degrees(np.arcsin(rng.uniform(-1, 1, n_uniform)))]
    lon = [rng.uniform(-180, 180, n_uniform)]
    for clat, clon, spread in CLUSTERS:
        lat.append(np.clip(clat + rng.normal(0, spread, n_cluster), -90, 90))
        lon.append((clon + rng.normal(0, spread, n_cluster) + 180) % 360 - 180)
    lat, lon = np.concatenate(lat), np.concatenate(lon)
    n = lat.shape[0]
    return gt.DeviceStore.from_arrays(
        np.arange(n, dtype=np.uint64) * 7919 + 11, lat, lon, app=rng.choice(["amap", "alipay", "qq"], n),
        last_seen=int(T0.timestamp()) - rng.integers(0, 7 * 86400, n))


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    store = globe_and_clusters()
    single = gt.SpatialIndex.build(store)
    sharded = ShardedIndex.build(store, shards=4, directory=tmp_path_factory.mktemp("world"),
                                 address="local", actor_cpus=CPUS)
    yield single, sharded
    sharded.close()


def circles(rng, n):
    """Centres over the globe, on the clusters, on the antimeridian and the poles; r in [0, 5000] km."""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            c = (float(np.degrees(np.arcsin(rng.uniform(-1, 1)))), float(rng.uniform(-180, 180)))
        elif kind == 1:
            clat, clon, spread = CLUSTERS[rng.integers(len(CLUSTERS))]
            c = (float(np.clip(clat + rng.normal(0, spread), -90, 90)), float(clon))
        elif kind == 2:
            c = (float(rng.uniform(-70, 70)), float(rng.choice([180.0, -180.0, 179.99, -179.99])))
        elif kind == 3:
            c = (float(rng.choice([90.0, -90.0, 89.9, -89.95])), float(rng.uniform(-180, 180)))
        else:
            c = (31.23, 121.47)
        r = float(rng.choice([0.0, rng.uniform(0, 50), rng.uniform(0, 5000)]))
        out.append((*c, r))
    return out


# -- equivalence ---------------------------------------------------------------

def test_200_circles_same_keys_and_ids_as_spatial_index(world):
    single, sharded = world
    shard_of = np.empty(len(single.store), dtype=np.int64)
    for i, s in enumerate(sharded.info()):
        shard_of[np.load(os.path.join(s["path"], "global_keys.npy"))] = s["shard"]
    rng = np.random.default_rng(42)
    pruned = 0
    for i, (lat, lon, r) in enumerate(circles(rng, 200)):
        ref = single.within(lat, lon, r)
        got = sharded.within(lat, lon, r)
        np.testing.assert_array_equal(got.keys(), ref.keys(), err_msg=f"({lat}, {lon}, {r})")
        if i % 10 == 0:  # and the float64 NumPy scan itself
            np.testing.assert_array_equal(got.keys(), within_reference(single.store, lat, lon, r))
        np.testing.assert_array_equal(got.device_ids(), ref.device_ids())
        assert sharded.count(lat, lon, r) == len(ref)
        asked = set(sharded.shards_for(lat, lon, r).tolist())
        assert set(shard_of[ref.keys()].tolist()) <= asked  # pruning never skips a shard with an answer
        pruned += len(asked) < sharded.shards
    assert pruned > 50  # small circles really ask fewer shards


def test_polygons_same_keys_as_spatial_index(world):
    from shapely.geometry import Polygon, box

    single, sharded = world
    polygons = [box(120.0, 30.0, 123.0, 32.5),                                    # around Shanghai
                Polygon([(100, -10), (150, 10), (110, 45), (100, -10)]),           # across clusters
                box(-180, -90, 180, 90),                                           # everything
                box(10.0, 10.0, 10.001, 10.001)]                                   # (almost) nothing
    for poly in polygons:
        ref = single.within_polygon(poly)
        got = sharded.within_polygon(poly)
        np.testing.assert_array_equal(got.keys(), ref.keys(), err_msg=str(poly.bounds))
        np.testing.assert_array_equal(got.device_ids(), ref.device_ids())
    seen = single.store.last_seen_s.max() - 3 * 86400
    since = dt.datetime.fromtimestamp(int(seen), dt.timezone.utc)
    np.testing.assert_array_equal(sharded.within_polygon(polygons[1], seen_since=since, apps="qq").keys(),
                                  single.within_polygon(polygons[1], seen_since=since, apps="qq").keys())
    with pytest.raises(gt.InvalidInputError, match="polygon_or_division"):
        sharded.within_polygon("not a polygon")


@pytest.mark.parametrize("seen_hours, apps", [(24, None), (None, "qq"), (72, ["amap", "alipay"])])
def test_filters_match(world, seen_hours, apps):
    single, sharded = world
    seen = T0 - dt.timedelta(hours=seen_hours) if seen_hours else None
    for lat, lon, r in [(31.23, 121.47, 300.0), (0.0, 180.0, 4000.0), (-90.0, 0.0, 2500.0)]:
        ref = single.within(lat, lon, r, seen_since=seen, apps=apps)
        got = sharded.within(lat, lon, r, seen_since=seen, apps=apps)
        assert len(ref) > 0
        np.testing.assert_array_equal(got.keys(), ref.keys())
        assert got.counts_by_app() == ref.counts_by_app()
        assert sharded.count(lat, lon, r, seen_since=seen, apps=apps) == len(ref)


@pytest.mark.parametrize("r", [HALF_CIRCUMFERENCE_KM, 1e9, HALF_CIRCUMFERENCE_KM - 1.0, 0.0])
def test_whole_sphere_and_zero_radius(world, r):
    single, sharded = world
    lat, lon = float(single.store.lat[123]), float(single.store.lon[123])
    np.testing.assert_array_equal(sharded.within(lat, lon, r).keys(), single.within(lat, lon, r).keys())
    assert 123 in set(sharded.within(lat, lon, r).keys().tolist())
    if r >= HALF_CIRCUMFERENCE_KM:
        assert len(sharded.shards_for(lat, lon, r)) == sharded.shards


def test_by_app_and_set_algebra_resolve_on_full_store(world):
    single, sharded = world
    a, b = sharded.within(31.23, 121.47, 200), single.within(31.23, 121.47, 200)
    ta, tb = a.by_app(), b.by_app()
    assert ta.keys() == tb.keys() and all(ta[k].equals(tb[k]) for k in ta)
    ring_a = sharded.within(31.23, 121.47, 2000) - a
    ring_b = single.within(31.23, 121.47, 2000) - b
    assert ring_a == ring_b and len(ring_a) > 0


# -- partition and pruning (plain NumPy) -----------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_kd_partition_balanced_disjoint_complete(k):
    rng = np.random.default_rng(k)
    xyz = unit_vectors(rng.uniform(-90, 90, 10_001), rng.uniform(-180, 180, 10_001))
    parts = kd_partition(xyz, k)
    sizes = [p.shape[0] for p in parts]
    assert len(parts) == k and max(sizes) - min(sizes) <= 3
    allrows = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(allrows), np.arange(10_001))
    assert all((np.diff(p) > 0).all() for p in parts)


def test_boxes_touching_is_conservative_at_the_box_edge():
    # A box holding exactly one point, and circles whose edge passes through it.
    lat, lon = 45.0, 10.0
    p = unit_vectors(lat, lon)
    lo, hi = (p - 1e-9)[None, :], (p + 1e-9)[None, :]
    for d_km in (0.0, 1.0, 100.0, 5000.0):
        clat = lat + np.degrees(d_km / gt.EARTH_RADIUS_KM)
        r = float(gt.haversine_km(clat, lon, lat, lon))
        assert boxes_touching(lo, hi, clat, lon, r).tolist() == [0]
        assert boxes_touching(lo, hi, clat, lon, max(0.0, r - 1.0)).tolist() == ([] if d_km else [0])


# -- persistence -------------------------------------------------------------------

def test_layout_manifest_and_open(world):
    single, sharded = world
    m = json.loads((sharded.directory / MANIFEST).read_text())
    assert m["n"] == len(single.store) and sum(s["n"] for s in m["shards"]) == m["n"]
    assert m["generation"] == single.store.generation
    for s in m["shards"]:
        d = sharded.directory / s["path"]
        assert (d / "index.json").exists() and (d / "store.arrow").exists() and (d / "global_keys.npy").exists()
        assert s["n"] == sharded.info()[m["shards"].index(s)]["n"]
    assert (sharded.directory / "full" / "store.arrow").exists()


def test_corrupt_manifest_is_rejected_before_any_actor(tmp_path):
    with pytest.raises(CorruptFileError, match="no shards.json"):
        ShardedIndex.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptFileError):
        ShardedIndex.open(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "geotarget.sharded", "version": 1, "generation": 1,
                                                 "n": 5, "full": "full", "shards": [{"path": "s", "n": 4,
                                                                                    "lo": [0, 0, 0],
                                                                                    "hi": [1, 1, 1]}]}))
    with pytest.raises(CorruptFileError, match="hold 4 devices"):
        ShardedIndex.open(tmp_path)


def test_shard_server_refuses_another_generation(world):
    _, sharded = world
    path = sharded.info()[0]["path"]
    n = sharded.info()[0]["n"]
    ShardServer(path, 0, sharded.generation, n, len(sharded))  # the right one opens (plain Python, no Ray)
    with pytest.raises(CorruptFileError, match="generation"):
        ShardServer(path, 0, sharded.generation + 1, n, len(sharded))


@pytest.mark.parametrize("name", ["global_keys.npy", "leaf_global_keys.npy"])
def test_shard_server_rejects_out_of_range_keys(world, tmp_path, name):
    import shutil
    _, sharded = world
    info = sharded.info()[2]
    d = tmp_path / "shard"
    shutil.copytree(info["path"], d)
    keys = np.load(d / name)
    keys[len(keys) // 2] = len(sharded)  # one past the last global key
    np.save(d / name, keys)
    with pytest.raises(CorruptFileError, match=name):
        ShardServer(str(d), 2, sharded.generation, info["n"], len(sharded))


# -- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("args, kw", [
    ((float("nan"), 0.0, 10.0), {}),
    ((0.0, float("inf"), 10.0), {}),
    ((91.0, 0.0, 10.0), {}),
    ((0.0, 0.0, -1.0), {}),
    ((0.0, 0.0, float("nan")), {}),
    ((0.0, 0.0, 10.0), {"seen_since": dt.datetime(2026, 1, 1)}),
    ((0.0, 0.0, 10.0), {"apps": ["no-such-app"]}),
])
def test_bad_input_raises_before_any_remote_call(world, args, kw):
    _, sharded = world
    before = sum(s["served"] for s in sharded.info())
    for call in (sharded.within, sharded.count):
        with pytest.raises(InvalidInputError):
            call(*args, **kw)
    assert sum(s["served"] for s in sharded.info()) == before


def test_bad_build_arguments_and_timeout(world, tmp_path):
    single, _ = world
    for kw in ({"shards": 0}, {"shards": 2.5}, {"leaf_size": 0}):
        with pytest.raises(InvalidInputError):
            ShardedIndex.build(single.store, directory=tmp_path / "x", **{"shards": 2, **kw})
    with pytest.raises(InvalidInputError, match="store"):
        ShardedIndex.build(single, shards=2, directory=tmp_path / "y")
    for kw in ({"timeout": 0}, {"actor_cpus": -0.5}, {"task_retries": -1}, {"start_timeout": float("inf")}):
        with pytest.raises(InvalidInputError, match=next(iter(kw))):
            ShardedIndex.build(single.store, shards=2, directory=tmp_path / "z", **kw)
        assert not (tmp_path / "z").exists()  # rejected before any work
    _, sharded = world
    for bad in (0, -1.0, float("nan"), "soon"):
        with pytest.raises(InvalidInputError, match="timeout"):
            sharded.timeout = bad
    assert sharded.timeout == 30.0


# -- faults ------------------------------------------------------------------------

def _pid(sharded, shard):
    return {s["shard"]: s["pid"] for s in sharded.info()}[shard]


def test_kill_an_actor_during_queries(world):
    single, sharded = world
    lat, lon, r = 0.0, 180.0, 9000.0  # reaches every shard
    assert len(sharded.shards_for(lat, lon, r)) == sharded.shards
    ref = single.within(lat, lon, r).keys()
    victim = int(sharded.shards_for(31.23, 121.47, 0.0)[0])
    old_pid = _pid(sharded, victim)
    results, errors, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set() or len(results) < 5:
            try:
                results.append(sharded.within(lat, lon, r).keys())
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                errors.append(exc)
                return

    t = threading.Thread(target=hammer)
    t.start()
    while not results and t.is_alive():
        threading.Event().wait(0.005)
    ray.kill(sharded.actors[victim], no_restart=False)
    n_before = len(results)
    while len(results) < n_before + 3 and t.is_alive():  # queries that ran into the dead actor
        threading.Event().wait(0.01)
    stop.set()
    t.join(60)
    assert not errors
    assert all(np.array_equal(k, ref) for k in results)
    assert _pid(sharded, victim) != old_pid  # it really died and came back, re-opening its files


def test_restart_reopens_rebuilds_nothing(world):
    single, sharded = world
    d = sharded.directory
    files = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    old_pid = _pid(sharded, 1)
    ray.kill(sharded.actors[1], no_restart=False)
    np.testing.assert_array_equal(sharded.within(89.0, 40.0, 3000).keys(), single.within(89.0, 40.0, 3000).keys())
    assert _pid(sharded, 1) != old_pid
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} == files


def test_open_from_disk_then_lose_shards(world):
    """Open saved shards; a shard gone for good, or too slow, raises ShardUnavailableError."""
    single, sharded = world
    with ShardedIndex.open(sharded.directory, actor_cpus=CPUS, timeout=30) as idx:
        assert idx.store.path is not None and idx.generation == single.store.generation  # memory-mapped
        for lat, lon, r in [(31.23, 121.47, 500.0), (89.9, 0.0, 1000.0), (0.0, -180.0, 3000.0)]:
            np.testing.assert_array_equal(idx.within(lat, lon, r).keys(), single.within(lat, lon, r).keys())
        victim = int(idx.shards_for(*CLUSTERS[0][:2], 0.0)[0])
        ray.kill(idx.actors[victim], no_restart=True)
        deadline = time.monotonic() + 30
        with pytest.raises(ShardUnavailableError, match="gone"):
            while time.monotonic() < deadline:  # ray.kill is asynchronous: the actor may answer once more
                idx.within(*CLUSTERS[0][:2], 100.0)
        # a circle that needs no dead shard is still answered
        spared = [(*c[:2], 10.0) for c in CLUSTERS if victim not in idx.shards_for(c[0], c[1], 10.0).tolist()]
        assert spared
        for lat, lon, r in spared:
            np.testing.assert_array_equal(idx.within(lat, lon, r).keys(), single.within(lat, lon, r).keys())
        # a restarting shard that does not answer in time: an error, not a hang
        other = next(i for i in range(idx.shards) if i != victim)
        target = next(c for c in CLUSTERS if other in idx.shards_for(c[0], c[1], 1.0).tolist())
        ray.kill(idx.actors[other], no_restart=False)
        idx.timeout = 1e-9  # ray.wait rounds to 0 ms: a remote answer is rarely there yet
        deadline = time.monotonic() + 30
        with pytest.raises(ShardUnavailableError, match="did not answer within"):
            while time.monotonic() < deadline:  # ray.kill is asynchronous: the actor may answer once more
                idx.within(target[0], target[1], 1.0)
        idx.timeout = 30.0
        np.testing.assert_array_equal(idx.within(target[0], target[1], 1.0).keys(),
                                      single.within(target[0], target[1], 1.0).keys())
    with pytest.raises(ShardUnavailableError, match="closed"):
        idx.within(0, 0, 10)


# -- the engine on a sharded index ---------------------------------------------------

OFFICERS = [gt.Officer("county-1", level="county", division="330102"),
            gt.Officer("city-1", level="city", division="330100")]


def hz_store(n=12_000, seed=0):
    rng = np.random.default_rng(seed)
    d_km = rng.uniform(0, 700, n)
    bearing = rng.uniform(0, 2 * np.pi, n)
    lat = HZ[0] + (d_km / 111.2) * np.cos(bearing)
    lon = HZ[1] + (d_km / (111.2 * np.cos(np.radians(HZ[0])))) * np.sin(bearing)
    return gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) * 13 + 5, lat, lon,
                                      app=rng.choice(["amap", "alipay", "weibo"], n),
                                      last_seen=T0 - dt.timedelta(hours=1))


def moved_store(store, seed=1, new=400):
    rng = np.random.default_rng(seed)
    k = rng.choice(len(store), len(store) // 10, replace=False)
    ids = np.concatenate([store.device_id[k], np.arange(new, dtype=np.uint64) + 10**12])
    m = len(ids)
    return store.with_updates(ids, HZ[0] + rng.uniform(-2, 2, m), HZ[1] + rng.uniform(-2, 2, m),
                              last_seen=T0 + dt.timedelta(hours=2), app=rng.choice(["amap", "qq"], m))


@pytest.fixture(scope="module")
def hz(ray_session, tmp_path_factory):
    """Two generations, each as a SpatialIndex and as a ShardedIndex (3 shards, then 2)."""
    s1 = hz_store()
    s2 = moved_store(s1)
    d = tmp_path_factory.mktemp("hz")
    with ShardedIndex.build(s1, shards=3, directory=d / "gen1", actor_cpus=CPUS) as sh1, \
            ShardedIndex.build(s2, shards=2, directory=d / "gen2", actor_cpus=CPUS) as sh2:
        yield gt.SpatialIndex.build(s1), gt.SpatialIndex.build(s2), sh1, sh2


def lifecycle(index1, index2, path):
    """Report, approve, tick through every ring, refresh with moved devices, update, close."""
    eng = gt.AlertEngine(index1, log=gt.RecipientLog(path), authority=gt.Authority(OFFICERS),
                         max_location_age=dt.timedelta(days=2))
    alert = eng.report("county-1", lat=HZ[0], lon=HZ[1], division="330102", missing_since=T0,
                       now=T0 + dt.timedelta(minutes=10), details={"headline": "Missing boy, 5"})
    # Chun'an county, 100 km from the first alert and inside Hangzhou (330100)
    other = eng.report("city-1", lat=29.6, lon=119.0, division="330100", missing_since=T0,
                       now=T0 + dt.timedelta(minutes=15))
    pushes = list(eng.tick(T0 + dt.timedelta(minutes=15)))
    eng.approve(alert.id, "city-1", now=T0 + dt.timedelta(minutes=20))
    for minutes in (20, 50, 61, 125, 125, 181):
        pushes += eng.tick(T0 + dt.timedelta(minutes=minutes))
    pushes += eng.refresh(index2, T0 + dt.timedelta(hours=3, minutes=2))
    pushes += eng.tick(T0 + dt.timedelta(hours=3, minutes=5))
    pushes.append(eng.update(other.id, "city-1", {"description": "red coat"}, now=T0 + dt.timedelta(hours=4)))
    pushes.append(eng.close(alert.id, "city-1", outcome="lost", now=T0 + dt.timedelta(hours=5)))
    pushes.append(eng.close(other.id, "city-1", outcome="runaway", now=T0 + dt.timedelta(hours=5)))
    # Ids carry each log's random instance id: compare them without it.
    same = eng.log.instance_id
    return [(p.alert_id.replace(same, ""), p.kind, p.radius_km, p.push_id.replace(same, ""),
             p.audience.keys().tolist()) for p in pushes]


def test_alert_lifecycle_on_shards_equals_single_machine(hz, tmp_path):
    single1, single2, sh1, sh2 = hz
    ref = lifecycle(single1, single2, tmp_path / "single")
    got = lifecycle(sh1, sh2, tmp_path / "sharded")
    kinds = [k for _, k, *_ in ref]
    assert {"alert", "expand", "topup", "update", "closure"} <= set(kinds)
    assert [p[:4] for p in got] == [p[:4] for p in ref]
    for g, r in zip(got, ref):
        assert g[4] == r[4], f"push {r[3]} ({r[1]}) differs"


class _KillOnFirstQuery:
    """An index that kills one of its shard actors the moment the engine first queries it."""

    def __init__(self, inner, victim):
        import copy
        self.inner, self.victim, self.killed = inner, victim, False
        # Without the generation's changed keys the engine re-targets every alert
        # with a full query through the shards, which is what this test kills.
        self.store = copy.copy(inner.store)
        self.store.changed_keys = None

    def within(self, *a, **kw):
        if not self.killed:
            self.killed = True
            ray.kill(self.inner.actors[self.victim], no_restart=False)
        return self.inner.within(*a, **kw)

    # the rest of the engine's index interface (geotarget.alerts.model.Index), unchanged
    def count(self, *a, **kw):
        return self.inner.count(*a, **kw)

    def within_polygon(self, *a, **kw):
        return self.inner.within_polygon(*a, **kw)

    def changed_within(self, *a, **kw):
        return self.inner.changed_within(*a, **kw)


def test_kill_an_actor_during_refresh(hz, tmp_path):
    single1, single2, sh1, sh2 = hz
    ref = lifecycle(single1, single2, tmp_path / "single")
    victim = int(sh2.shards_for(*HZ, 0.0)[0])
    old_pid = _pid(sh2, victim)
    wrapped = _KillOnFirstQuery(sh2, victim)
    got = lifecycle(sh1, wrapped, tmp_path / "sharded")
    assert wrapped.killed and _pid(sh2, victim) != old_pid
    assert got == ref


def test_concurrent_queries_from_threads(hz):
    """As in engine.refresh: queries from a thread pool, each fanned out to its shards."""
    _, single2, _, sh2 = hz
    before = {s["shard"]: s["served"] for s in sh2.info()}
    centres = [(HZ[0] + dy, HZ[1] + dx) for dy in (-3, 0, 3) for dx in (-3, 0, 3)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: sh2.within(c[0], c[1], 300).keys(), centres * 4))
    for c, k in zip(centres * 4, got):
        np.testing.assert_array_equal(k, single2.within(c[0], c[1], 300).keys())
    after = {s["shard"]: s["served"] for s in sh2.info()}
    assert all(after[i] > before[i] for i in after)


# -- packaging -----------------------------------------------------------------------

def test_core_does_not_import_ray():
    code = "import sys, geotarget, geotarget.alerts.engine; assert 'ray' not in sys.modules, 'ray imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(gt.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})
