"""SpatialIndex: edge-case table, exactness at scale, read-only, persistence, bad input."""
import datetime as dt
import mmap

import numpy as np
import pytest

import geotarget as gt
from geotarget.errors import CorruptFileError, InvalidInputError
from geotarget.geo import HALF_CIRCUMFERENCE_KM, haversine_km
from geotarget.spatial.index import within_reference

UTC = dt.timezone.utc


def _store(lat, lon, **kw):
    lat = np.asarray(lat, dtype=np.float64)
    return gt.DeviceStore.from_arrays(np.arange(len(lat), dtype=np.uint64) + 100, lat, lon, **kw)


def _uniform(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


EDGE_CASES = [
    # name, lat, lon, centre, radius
    ("north pole centre", *_uniform(3000, 1), (90.0, 0.0), 1500.0),
    ("south pole centre", *_uniform(3000, 2), (-90.0, 123.0), 2500.0),
    ("antimeridian +180", *_uniform(3000, 3), (10.0, 180.0), 800.0),
    ("antimeridian -180", *_uniform(3000, 4), (-10.0, -180.0), 800.0),
    ("points on the antimeridian", np.linspace(-80, 80, 500), np.where(np.arange(500) % 2, 180.0, -180.0),
     (0.0, 179.9), 3000.0),
    ("points at both poles", np.r_[np.full(50, 90.0), np.full(50, -90.0)], np.linspace(-180, 180, 100),
     (89.0, 17.0), 200.0),
    ("r = 0 on a device", *np.array([[31.23, 121.47], [31.23, 121.47], [31.2300001, 121.47]]).T,
     (31.23, 121.47), 0.0),
    ("r = 0 nowhere", *_uniform(500, 5), (12.0, 34.0), 0.0),
    ("r = half circumference", *_uniform(2000, 6), (45.0, 45.0), HALF_CIRCUMFERENCE_KM),
    ("r > half circumference", *_uniform(2000, 7), (45.0, 45.0), 1e9),
    ("antipode just inside", *_uniform(2000, 8), (0.0, 0.0), HALF_CIRCUMFERENCE_KM - 1.0),
    ("empty store", np.empty(0), np.empty(0), (0.0, 0.0), 100.0),
    ("single point inside", np.array([1.0]), np.array([1.0]), (1.0, 1.5), 100.0),
    ("single point outside", np.array([1.0]), np.array([1.0]), (1.0, 3.0), 100.0),
    ("all identical", np.full(1000, 36.06), np.full(1000, 103.83), (36.06, 103.83), 0.0),
    ("all identical, circle just short", np.full(1000, 36.06), np.full(1000, 103.83), (36.0, 103.83),
     haversine_km(36.0, 103.83, 36.06, 103.83) * (1 - 1e-12)),
]


@pytest.mark.parametrize("name,lat,lon,centre,r", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
@pytest.mark.parametrize("leaf", [1, 32])
def test_edge_cases(name, lat, lon, centre, r, leaf):
    store = _store(lat, lon)
    index = gt.SpatialIndex.build(store, leaf_size=leaf)
    got = index.within(*centre, r)
    ref = within_reference(store, *centre, r)
    np.testing.assert_array_equal(got.keys(), ref)
    assert len(got) == len(ref) == index.count(*centre, r)


def test_clustered_population_matches_scan_everywhere():
    """Many circles over a clustered 300 k population, both directions (test_in_ball / test_found_all)."""
    rng = np.random.default_rng(11)
    n = 300_000
    centres = np.array([[31.23, 121.47], [36.06, 103.83], [33.5, 88.5], [-33.9, 151.2], [64.1, -21.9]])
    k = rng.integers(0, len(centres), n)
    lat = np.clip(centres[k, 0] + rng.normal(0, 1, n) * rng.exponential(0.5, n), -90, 90)
    lon = (centres[k, 1] + rng.normal(0, 1, n) * rng.exponential(0.5, n) + 180) % 360 - 180
    store = _store(lat, lon)
    index = gt.SpatialIndex.build(store)
    for clat, clon in centres:
        for r in (0.5, 10, 100, 200, 300, 500, 5000):
            d = haversine_km(clat, clon, store.lat, store.lon)
            got = index.within(clat, clon, r).keys()
            assert np.all(d[got] <= r)                                      # everything returned is in the ball
            np.testing.assert_array_equal(got, np.flatnonzero(d <= r))      # nothing inside was missed


@pytest.mark.parametrize("layout", ["non-contiguous", "float32", "lists", "big-endian"])
def test_input_layouts(layout):
    lat, lon = _uniform(2000, 9)
    if layout == "non-contiguous":
        both = np.stack([lat, lon], axis=1)
        a_lat, a_lon = both[:, 0], both[:, 1]
        assert not a_lat.flags.c_contiguous
    elif layout == "float32":
        a_lat, a_lon = lat.astype(np.float32), lon.astype(np.float32)
    elif layout == "lists":
        a_lat, a_lon = lat.tolist(), lon.tolist()
    else:
        a_lat, a_lon = lat.astype(">f8"), lon.astype(">f8")
    store = _store(a_lat, a_lon)
    index = gt.SpatialIndex.build(store)
    ref_store = _store(np.asarray(a_lat, dtype=np.float64), np.asarray(a_lon, dtype=np.float64))
    for r in (100, 2000):
        np.testing.assert_array_equal(index.within(20, 30, r).device_ids(),
                                      np.sort(ref_store.device_id[within_reference(ref_store, 20, 30, r)]))


def test_filters_seen_since_and_apps():
    lat, lon = _uniform(5000, 10)
    rng = np.random.default_rng(10)
    seen = rng.integers(1_700_000_000, 1_700_100_000, len(lat))
    app = rng.choice(["amap", "weibo", "alipay"], len(lat))
    store = _store(lat, lon, app=app, last_seen=seen)
    index = gt.SpatialIndex.build(store)
    cutoff = dt.datetime.fromtimestamp(1_700_050_000, UTC)
    for apps in (None, ["amap"], ("weibo", "alipay")):
        for since in (None, cutoff):
            got = index.within(0, 0, 6000, seen_since=since, apps=apps)
            ref = within_reference(store, 0, 0, 6000, seen_since=since, apps=apps)
            np.testing.assert_array_equal(got.keys(), ref)
            assert index.count(0, 0, 6000, seen_since=since, apps=apps) == len(ref)


def test_audience_materialisations_agree():
    lat, lon = _uniform(20_000, 12)
    app = np.where(np.arange(len(lat)) % 3 == 0, "amap", "weibo")
    store = _store(lat, lon, app=app)
    index = gt.SpatialIndex.build(store)
    aud = index.within(10, 10, 3000)
    keys = aud.keys()
    assert keys.dtype == np.uint32 and np.all(np.diff(keys.astype(np.int64)) > 0)
    ids = aud.device_ids()
    assert ids.dtype == np.uint64 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, np.sort(store.device_id[keys]))
    batches = aud.by_app(sort=True)
    assert sum(t.num_rows for t in batches.values()) == len(aud)
    for name, t in batches.items():
        k = t.column("key").to_numpy()
        assert np.all(store.app_codes[k] == store.app_names.index(name))
        np.testing.assert_array_equal(t.column("device_id").to_numpy(), store.device_id[k])
        assert np.all(np.diff(t.column("device_id").to_numpy()) > 0), "each app's table is in id order"
    np.testing.assert_array_equal(np.sort(np.concatenate([t.column("key").to_numpy() for t in batches.values()])),
                                  keys)
    assert aud.counts_by_app() == {n: t.num_rows for n, t in batches.items()}
    assert index.within(10, 10, 0.0).by_app() == {}


def test_audience_set_algebra_is_ring_difference():
    lat, lon = _uniform(20_000, 13)
    store = _store(lat, lon)
    index = gt.SpatialIndex.build(store)
    inner, outer = index.within(0, 0, 1000), index.within(0, 0, 2000)
    ring = outer - inner
    assert set(ring.keys().tolist()) == set(outer.keys().tolist()) - set(inner.keys().tolist())
    assert (ring | inner) == outer
    assert len(ring & inner) == 0
    assert all(int(k) in outer for k in inner.keys()[:50])


def test_built_index_is_read_only(tmp_path):
    lat, lon = _uniform(1000, 14)
    index = gt.SpatialIndex.build(_store(lat, lon))
    for arr in (index.points, index.keys, index.bounds, index.seen, index.app):
        with pytest.raises(ValueError):
            arr[0] = 0
    for arr in (index.store.lat, index.store.lon, index.store.device_id):
        with pytest.raises(ValueError):
            arr[0] = 0
    index.save(tmp_path / "idx")
    opened = gt.SpatialIndex.open(tmp_path / "idx")
    with pytest.raises(ValueError):
        opened.points[0] = opened.points[1]
    with pytest.raises(ValueError):
        opened.store.lat[0] = 1.0


def test_huge_page_build_arrays_give_the_same_index(tmp_path, monkeypatch):
    """Large builds back their arrays by transparent huge pages; force that path on a small store."""
    import geotarget.spatial.index as gi
    lat, lon = _uniform(20_000, 16)
    store = _store(lat, lon)
    plain = gt.SpatialIndex.build(store)
    monkeypatch.setattr(gi, "_HUGE_MIN_BYTES", 0)
    huge = gt.SpatialIndex.build(store)
    assert isinstance(huge.points.base, mmap.mmap) or isinstance(getattr(huge.points.base, "obj", None), mmap.mmap)
    for name in ("points", "keys", "bounds", "seen", "app", "seen_bounds"):
        np.testing.assert_array_equal(getattr(huge, name), getattr(plain, name))
        with pytest.raises(ValueError):
            getattr(huge, name)[0] = getattr(huge, name)[1]
    for r in (0, 10, 1000, 20_000):
        np.testing.assert_array_equal(huge.within(5, 5, r).keys(), within_reference(store, 5, 5, r))
    huge.save(tmp_path / "idx")
    np.testing.assert_array_equal(gt.SpatialIndex.open(tmp_path / "idx").points, plain.points)


def test_index_of_a_new_generation_keeps_the_changed_devices_points(tmp_path):
    """What a refresh re-targets: unit vectors of exactly the changed keys, saved and reopened."""
    lat, lon = _uniform(3000, 17)
    g1 = _store(lat, lon)
    assert gt.SpatialIndex.build(g1).delta_points is None
    rng = np.random.default_rng(17)
    movers = rng.choice(3000, 300, replace=False)
    ids = np.r_[g1.device_id[movers], np.arange(10**6, 10**6 + 50, dtype=np.uint64)]
    g2 = g1.with_updates(ids, rng.uniform(-60, 60, ids.size), rng.uniform(-180, 180, ids.size))
    index = gt.SpatialIndex.build(g2)
    d = index.delta_points
    np.testing.assert_array_equal(d["key"], g2.changed_keys)
    ref = np.empty(len(d), dtype=d.dtype)
    from geotarget import _kernels
    k = np.asarray(g2.changed_keys)
    _kernels.fill_points(np.ascontiguousarray(g2.lat[k]), np.ascontiguousarray(g2.lon[k]), ref, k)
    np.testing.assert_array_equal(d, ref)
    np.testing.assert_array_equal(index.delta_latlon, np.stack([g2.lat[k], g2.lon[k]]))
    with pytest.raises(ValueError):
        d[0] = d[1]
    index.save(tmp_path / "g2")
    opened = gt.SpatialIndex.open(tmp_path / "g2")
    np.testing.assert_array_equal(opened.delta_points, d)
    np.testing.assert_array_equal(opened.delta_latlon, index.delta_latlon)
    (tmp_path / "g2" / "delta_latlon.npy").unlink()
    with pytest.raises(CorruptFileError):
        gt.SpatialIndex.open(tmp_path / "g2")


def test_rows_are_keys_for_a_first_generation_and_materialise_the_same(tmp_path):
    """The ingest puts rows in leaf order, so the build moves nothing and the
    audience writes row ranges; an index told to read ``keys`` gives the same."""
    lat, lon = _uniform(30_000, 21)
    store = _store(lat, lon, app=np.where(np.arange(30_000) % 4, "amap", "weibo"))
    index = gt.SpatialIndex.build(store)
    assert index.keys_are_rows
    np.testing.assert_array_equal(index.keys, np.arange(len(store)))
    reading = gt.SpatialIndex(store, index.points, index.keys, index.bounds, index.depth, index.seen,
                              index.app, index.leaf_size, keys_are_rows=False)
    for centre, r in (((10, 10), 3000), ((-80, 170), 900), ((0, 0), 0.0), ((45, 45), 20_000)):
        a, b = index.within(*centre, r), reading.within(*centre, r)
        buf_a, buf_b = np.zeros(len(store), np.uint32), np.zeros(len(store), np.uint32)
        assert a.fill(buf_a) == b.fill(buf_b) == len(a)
        np.testing.assert_array_equal(buf_a, buf_b)
        np.testing.assert_array_equal(a.keys(), within_reference(store, *centre, r))
        np.testing.assert_array_equal(a.keys(), b.keys())
        np.testing.assert_array_equal(a.device_ids(), b.device_ids())
        assert a.bitmap() == b.bitmap()
    index.save(tmp_path / "g1")
    assert gt.SpatialIndex.open(tmp_path / "g1").keys_are_rows


def test_a_new_generation_with_moved_devices_reads_its_keys(tmp_path):
    lat, lon = _uniform(20_000, 22)
    g1 = _store(lat, lon)
    rng = np.random.default_rng(22)
    movers = rng.choice(20_000, 2_000, replace=False)
    ids = np.r_[g1.device_id[movers], np.arange(10**6, 10**6 + 500, dtype=np.uint64)]
    g2 = g1.with_updates(ids, rng.uniform(-60, 60, ids.size), rng.uniform(-180, 180, ids.size))
    index = gt.SpatialIndex.build(g2)
    assert index.keys_are_rows == bool(np.array_equal(index.keys, np.arange(len(g2))))
    assert not index.keys_are_rows
    for centre, r in (((10, 10), 3000), ((30, -100), 5000)):
        np.testing.assert_array_equal(index.within(*centre, r).keys(), within_reference(g2, *centre, r))
    index.save(tmp_path / "g2")
    assert not gt.SpatialIndex.open(tmp_path / "g2").keys_are_rows


def test_bitmap_of_a_large_audience_whose_rows_are_not_keys():
    """From 2^16 keys (and one in 256 of the store) the bitmap comes from a dense bitset
    of the runs' keys; it must be the same set as the keys, whatever their order."""
    from geotarget.spatial.audience import _bitmap_from_keys, _dense
    lat, lon = _uniform(150_000, 23)
    g1 = _store(lat, lon)
    rng = np.random.default_rng(23)
    movers = rng.choice(150_000, 30_000, replace=False)
    g2 = g1.with_updates(g1.device_id[movers], rng.uniform(-60, 60, movers.size), rng.uniform(-180, 180, movers.size))
    index = gt.SpatialIndex.build(g2)
    assert not index.keys_are_rows
    for centre, r in (((10, 10), 12_000), ((0, 0), 25_000)):
        aud = index.within(*centre, r)
        assert _dense(len(aud), len(g2))
        keys = aud.keys()
        np.testing.assert_array_equal(keys, within_reference(g2, *centre, r))
        bm = aud.bitmap()
        assert bm == _bitmap_from_keys(keys) and len(bm) == len(keys)
        np.testing.assert_array_equal(np.asarray(bm.to_array(), np.uint32), keys)
        shuffled = keys[rng.permutation(keys.size)]
        assert _bitmap_from_keys(shuffled) == bm


def test_populate_maps_a_mapped_array_in_place(tmp_path):
    from geotarget.spatial.index import populate
    a = np.arange(100_000, dtype=np.uint32).reshape(50_000, 2)
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert populate(mapped) is mapped
    np.testing.assert_array_equal(mapped, a)
    plain = np.ones(3)
    assert populate(plain) is plain


def test_save_open_round_trip_is_exact(tmp_path):
    lat, lon = _uniform(5000, 15)
    index = gt.SpatialIndex.build(_store(lat, lon, app=np.where(np.arange(5000) % 2, "a", "b")))
    index.save(tmp_path / "idx")
    opened = gt.SpatialIndex.open(tmp_path / "idx")
    for name in ("points", "keys", "bounds", "seen", "app"):
        np.testing.assert_array_equal(getattr(opened, name), getattr(index, name))
    assert isinstance(opened.points, np.memmap)
    for r in (10, 1000, 10000):
        np.testing.assert_array_equal(opened.within(5, 5, r).keys(), index.within(5, 5, r).keys())


@pytest.mark.parametrize("damage", ["missing meta", "bad meta", "bad keys_are_rows", "truncated npy", "wrong shape",
                                    "garbage store"])
def test_corrupt_index_files_raise(tmp_path, damage):
    lat, lon = _uniform(1000, 16)
    d = gt.SpatialIndex.build(_store(lat, lon)).save(tmp_path / "idx")
    if damage == "missing meta":
        (d / "index.json").unlink()
    elif damage == "bad meta":
        (d / "index.json").write_text("{not json")
    elif damage == "bad keys_are_rows":
        import json
        meta = json.loads((d / "index.json").read_text())
        (d / "index.json").write_text(json.dumps({**meta, "keys_are_rows": "yes"}))
    elif damage == "truncated npy":
        data = (d / "points.npy").read_bytes()
        (d / "points.npy").write_bytes(data[: len(data) // 2])
    elif damage == "wrong shape":
        np.save(d / "keys.npy", np.zeros(999, np.uint32))
    else:
        (d / "store.arrow").write_bytes(b"\x00" * 4096)
    with pytest.raises(CorruptFileError):
        gt.SpatialIndex.open(d)


BAD_QUERIES = [
    ("nan lat", (np.nan, 0.0, 10.0), "finite"),
    ("inf lon", (0.0, np.inf, 10.0), "finite"),
    ("lat out of range", (90.5, 0.0, 10.0), "lat"),
    ("lon out of range", (0.0, -180.01, 10.0), "lon"),
    ("negative radius", (0.0, 0.0, -1.0), "radius_km"),
    ("nan radius", (0.0, 0.0, np.nan), "radius_km"),
    ("string radius", (0.0, 0.0, "far"), "radius_km"),
]


@pytest.mark.parametrize("name,args,word", BAD_QUERIES, ids=[b[0] for b in BAD_QUERIES])
def test_bad_queries_raise_typed_errors(name, args, word):
    index = gt.SpatialIndex.build(_store(*_uniform(100, 17)))
    with pytest.raises(InvalidInputError, match=word):
        index.within(*args)
    with pytest.raises(InvalidInputError, match=word):
        index.count(*args)


def test_bad_filters_raise():
    index = gt.SpatialIndex.build(_store(*_uniform(100, 18)))
    with pytest.raises(InvalidInputError, match="naive"):
        index.within(0, 0, 10, seen_since=dt.datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="nosuchapp"):
        index.within(0, 0, 10, apps=["nosuchapp"])
    with pytest.raises(InvalidInputError, match="leaf_size"):
        gt.SpatialIndex.build(index.store, leaf_size=0)


def test_fill_rejects_wrong_buffers():
    index = gt.SpatialIndex.build(_store(*_uniform(1000, 19)))
    aud = index.within(0, 0, 20000)
    with pytest.raises(ValueError):
        aud.fill(np.empty(len(aud) - 1, np.uint32))
    with pytest.raises(TypeError):
        aud.fill(np.empty(len(aud), np.int64))


def test_changed_within_is_the_changed_devices_in_each_circle_minus_the_notified():
    """The refresh's re-targeting, as an index method: exact against a float64 scan of the changed devices."""
    from pyroaring import BitMap
    rng = np.random.default_rng(11)
    n = 6000
    store = gt.DeviceStore.from_arrays(np.arange(1, n + 1, dtype=np.uint64), 30.27 + rng.normal(0, 1.5, n),
                                       120.15 + rng.normal(0, 1.5, n))
    moved = rng.choice(n, 1500, replace=False).astype(np.uint64) + 1
    new_ids = np.arange(n + 1, n + 501, dtype=np.uint64)
    ids = np.concatenate([moved, new_ids])
    store2 = store.with_updates(ids, 30.27 + rng.normal(0, 1.5, ids.size), 120.15 + rng.normal(0, 1.5, ids.size))
    index2 = gt.SpatialIndex.build(store2)
    changed = np.asarray(store2.changed_keys, dtype=np.int64)
    assert changed.size == ids.size
    circles = [(30.27, 120.15, 100.0), (31.0, 121.0, 50.0), (29.5, 119.0, 250.0), (10.0, 10.0, 5.0)]
    rows = [np.sort(changed[haversine_km(la, lo, store2.lat[changed], store2.lon[changed]) <= r])
            for la, lo, r in circles]
    notified = [BitMap(), BitMap(rows[1][::2].tolist()), BitMap(rows[2][:10].tolist() + [0, 1, 2]), BitMap()]
    got = index2.changed_within(circles, notified)
    assert len(got) == 4 and rows[0].size > 0 and rows[2].size > rows[0].size
    for g, want, skip in zip(got, rows, notified):
        expect = np.array([k for k in want if k not in skip], dtype=np.int64)
        np.testing.assert_array_equal(np.sort(g.astype(np.int64)), expect)
    assert got[3].size == 0
    assert index2.changed_within([], []) == []
    with pytest.raises(gt.InvalidInputError, match="no changed devices"):
        gt.SpatialIndex.build(store).changed_within(circles[:1], notified[:1])
    with pytest.raises(gt.InvalidInputError, match="circles\\[0\\] radius_km"):
        index2.changed_within([(30.0, 120.0, -1.0)], [BitMap()])
