"""DeviceStore: ingest, generations, Arrow/Parquet I/O, bad input (one test per error)."""
import datetime as dt
import errno
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import geotarget as gt
from geotarget.errors import CorruptFileError, InvalidInputError

UTC = dt.timezone.utc


def _arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n, dtype=np.uint64) * 1_000_003 + 7)
    return ids, rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)


def _by_id(store):
    return {int(i): k for k, i in enumerate(store.device_id)}


def test_from_arrays_keeps_every_value():
    ids, lat, lon = _arrays(1000)
    seen = np.arange(1000) + 1_700_000_000
    app = np.where(np.arange(1000) % 2, "amap", "weibo")
    s = gt.DeviceStore.from_arrays(ids, lat, lon, app=app, last_seen=seen)
    keys = s.lookup(ids)
    assert sorted(keys.tolist()) == list(range(1000))
    np.testing.assert_array_equal(s.device_id[keys], ids)
    np.testing.assert_array_equal(s.lat[keys], lat)
    np.testing.assert_array_equal(s.lon[keys], lon)
    np.testing.assert_array_equal(s.last_seen_s[keys], seen)
    assert [s.app_names[c] for c in s.app_codes[keys]] == app.tolist()


def test_keys_are_assigned_in_spatial_order():
    """Close devices get close keys, so a query's keys form few long runs."""
    ids, lat, lon = _arrays(50_000, 1)
    s = gt.DeviceStore.from_arrays(ids, lat, lon)
    aud = gt.SpatialIndex.build(s).within(0, 0, 4000)
    keys = aud.keys().astype(np.int64)
    runs = 1 + int(np.count_nonzero(np.diff(keys) != 1))
    assert runs < len(keys) / 10


def test_save_open_and_generations_are_bit_exact(tmp_path):
    ids, lat, lon = _arrays(2000, 2)
    s1 = gt.DeviceStore.from_arrays(ids, lat, lon, app="amap", last_seen=np.full(2000, 1_700_000_000))
    s1.save(tmp_path / "g1")
    o1 = gt.DeviceStore.open(tmp_path / "g1")
    for col in ("device_id", "lat", "lon", "app_codes", "last_seen_s"):
        np.testing.assert_array_equal(getattr(o1, col), getattr(s1, col))
        assert getattr(o1, col).dtype == getattr(s1, col).dtype
    assert o1.app_names == s1.app_names and o1.generation == 1
    # a new generation: 500 moved, 300 new
    rng = np.random.default_rng(3)
    moved = rng.choice(ids, 500, replace=False)
    new = np.arange(300, dtype=np.uint64) + 10**12
    up_ids = np.concatenate([moved, new])
    up_lat, up_lon = rng.uniform(-50, 50, 800), rng.uniform(-170, 170, 800)
    s2 = o1.with_updates(up_ids, up_lat, up_lon, last_seen=np.full(800, 1_760_000_000), app="weibo")
    assert s2.generation == 2 and len(s2) == 2300
    # old keys unchanged, new keys appended
    np.testing.assert_array_equal(s2.device_id[:2000], s1.device_id)
    np.testing.assert_array_equal(s2.lookup(ids), s1.lookup(ids))
    assert sorted(s2.lookup(new).tolist()) == list(range(2000, 2300))
    k = s2.lookup(up_ids)
    np.testing.assert_array_equal(s2.lat[k], up_lat)
    np.testing.assert_array_equal(s2.lon[k], up_lon)
    untouched = np.setdiff1d(np.arange(2000), s1.lookup(moved))
    np.testing.assert_array_equal(s2.lat[untouched], s1.lat[untouched])
    # the old generation still serves, unchanged
    np.testing.assert_array_equal(o1.lat, s1.lat)
    s2.save(tmp_path / "g2")
    o2 = gt.DeviceStore.open(tmp_path / "g2")
    assert o2.generation == 2
    np.testing.assert_array_equal(o2.lat, s2.lat)
    np.testing.assert_array_equal(o2.device_id, s2.device_id)


def test_open_is_memory_mapped(tmp_path):
    ids, lat, lon = _arrays(100_000, 4)
    gt.DeviceStore.from_arrays(ids, lat, lon).save(tmp_path)
    s = gt.DeviceStore.open(tmp_path)
    assert pa.total_allocated_bytes() < 1_000_000  # nothing was copied into Arrow's pool
    assert not s.lat.flags.owndata and not s.lat.flags.writeable


def test_parquet_plain_and_geoparquet(tmp_path):
    ids, lat, lon = _arrays(500, 5)
    pq.write_table(pa.table({"device_id": ids, "lat": lat, "lon": lon,
                             "app": np.where(np.arange(500) % 2, "qq", "didi")}), tmp_path / "plain.parquet")
    s = gt.DeviceStore.from_parquet(tmp_path / "plain.parquet")
    k = s.lookup(ids)
    np.testing.assert_array_equal(s.lat[k], lat)
    # GeoParquet with WKB points (little endian): byte order, type=1, x=lon, y=lat
    wkb = [b"\x01" + (1).to_bytes(4, "little") + np.array([x, y], "<f8").tobytes() for x, y in zip(lon, lat)]
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Point"]}}}
    t = pa.table({"device_id": ids, "geometry": pa.array(wkb, pa.binary())})
    t = t.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(t, tmp_path / "geo.parquet")
    g = gt.DeviceStore.from_parquet(tmp_path / "geo.parquet")
    kg = g.lookup(ids)
    np.testing.assert_array_equal(g.lat[kg], lat)
    np.testing.assert_array_equal(g.lon[kg], lon)


BAD_BATCHES = [
    ("nan lat", dict(lat=[0.0, np.nan, 1.0]), r"lat\[1\]"),
    ("inf lon", dict(lon=[0.0, 1.0, -np.inf]), r"lon\[2\]"),
    ("lat > 90", dict(lat=[0.0, 1.0, 90.0001]), r"lat\[2\].*outside"),
    ("lon < -180", dict(lon=[-180.5, 1.0, 2.0]), r"lon\[0\].*outside"),
    ("duplicate ids", dict(device_id=[5, 6, 5]), r"device_id\[2\].*duplicate"),
    ("negative id", dict(device_id=[5, -6, 7]), r"device_id\[1\]"),
    ("length mismatch", dict(lon=[0.0, 1.0]), r"rows"),
    ("2-D lat", dict(lat=[[0.0], [1.0], [2.0]]), r"1-D"),
    ("naive last_seen", dict(last_seen=dt.datetime(2026, 1, 1)), r"naive"),
    ("last_seen length", dict(last_seen=np.array([1, 2])), r"last_seen"),
    ("app length", dict(app=["a", "b"]), r"app"),
    ("float ids", dict(device_id=[1.5, 2.0, 3.0]), r"device_id"),
]


@pytest.mark.parametrize("name,override,msg", BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_bad_batches_raise_and_ingest_nothing(name, override, msg):
    cols = dict(device_id=[5, 6, 7], lat=[0.0, 1.0, 2.0], lon=[0.0, 1.0, 2.0])
    cols.update(override)
    with pytest.raises(InvalidInputError, match=msg):
        gt.DeviceStore.from_arrays(**cols)
    base = gt.DeviceStore.from_arrays([1, 2, 3], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    before = (base.lat.copy(), len(base))
    if name not in ("naive last_seen",):
        with pytest.raises(InvalidInputError, match=msg):
            base.with_updates(cols["device_id"], cols["lat"], cols["lon"],
                              last_seen=cols.get("last_seen"), app=cols.get("app"))
    np.testing.assert_array_equal(base.lat, before[0])
    assert len(base) == before[1]


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "foreign arrow"])
def test_corrupt_store_files_raise(tmp_path, damage):
    ids, lat, lon = _arrays(100, 6)
    gt.DeviceStore.from_arrays(ids, lat, lon).save(tmp_path)
    f = tmp_path / "store.arrow"
    if damage == "missing":
        f.unlink()
    elif damage == "garbage":
        f.write_bytes(b"PAR1" + b"\x07" * 1000)
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    else:
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("x", pa.int64())])) as w:
            w.write_table(pa.table({"x": [1, 2, 3]}))
    with pytest.raises(CorruptFileError):
        gt.DeviceStore.open(tmp_path)


class StoreGenerations(RuleBasedStateMachine):
    """Store generations against a dict model: id -> (lat, lon); keys never change."""

    def __init__(self):
        super().__init__()
        self.store = gt.DeviceStore.from_arrays([1, 2, 3], [0.0, 10.0, 20.0], [0.0, 10.0, 20.0])
        self.model = {1: (0.0, 0.0), 2: (10.0, 10.0), 3: (20.0, 20.0)}
        self.keys = {i: int(self.store.lookup([i])[0]) for i in self.model}

    @rule(ids=st.lists(st.integers(1, 40), min_size=1, max_size=12, unique=True),
          data=st.data())
    def update(self, ids, data):
        lat = data.draw(st.lists(st.floats(-90, 90), min_size=len(ids), max_size=len(ids)))
        lon = data.draw(st.lists(st.floats(-180, 180), min_size=len(ids), max_size=len(ids)))
        self.store = self.store.with_updates(np.array(ids, np.uint64), lat, lon)
        for i, a, b in zip(ids, lat, lon):
            self.model[i] = (a, b)

    @invariant()
    def matches_model(self):
        assert len(self.store) == len(self.model)
        for i, (a, b) in self.model.items():
            k = int(self.store.lookup([i])[0])
            if i in self.keys:
                assert k == self.keys[i], "a key changed"
            self.keys[i] = k
            assert (self.store.lat[k], self.store.lon[k]) == (a, b)
        assert sorted(self.keys.values()) == list(range(len(self.model)))


TestStoreGenerations = StoreGenerations.TestCase
TestStoreGenerations.settings = settings(max_examples=30, stateful_step_count=8, deadline=None)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-90, 90), st.floats(-180, 180)), max_size=60))
def test_lookup_finds_every_device(points):
    ids = np.arange(len(points), dtype=np.uint64) * 7 + 3
    lat = [p[0] for p in points]
    lon = [p[1] for p in points]
    s = gt.DeviceStore.from_arrays(ids, lat, lon)
    k = s.lookup(ids)
    assert (k >= 0).all() and len(set(k.tolist())) == len(points)
    assert (s.lookup(np.array([2, 10**15], np.uint64)) == -1).all()


def _chunks(ids, lat, lon, size, app=None, seen=None):
    for s in range(0, len(ids), size):
        yield {"device_id": ids[s:s + size], "lat": lat[s:s + size], "lon": lon[s:s + size],
               "app": (app if app is not None else np.zeros(len(ids), np.int8))[s:s + size],
               "last_seen": (seen if seen is not None else np.full(len(ids), 1_700_000_000))[s:s + size]}


def test_write_chunks_streams_a_generation_to_disk(tmp_path):
    ids, lat, lon = _arrays(10_000, 7)
    app = (np.arange(10_000) % 3).astype(np.int8)
    seen = np.arange(10_000) + 1_700_000_000
    s = gt.DeviceStore.write_chunks(tmp_path, _chunks(ids, lat, lon, 3000, app, seen), 10_000,
                                    ["amap", "qq", "weibo"])
    assert len(s) == 10_000 and s.generation == 1 and s.app_names == ("amap", "qq", "weibo")
    k = s.lookup(ids)
    assert sorted(k.tolist()) == list(range(10_000))
    np.testing.assert_array_equal(s.lat[k], lat)
    np.testing.assert_array_equal(s.lon[k], lon)
    np.testing.assert_array_equal(s.app_codes[k], app)
    np.testing.assert_array_equal(s.last_seen_s[k], seen)
    # each chunk keeps its rows: chunk 0's devices hold keys 0..2999
    assert set(k[:3000].tolist()) == set(range(3000))
    reopened = gt.DeviceStore.open(tmp_path)
    np.testing.assert_array_equal(reopened.lookup(ids), k)
    assert reopened._id_index is not None            # the id lookup was saved, not recomputed
    s.release()
    np.testing.assert_array_equal(s.lat[k], lat)      # released pages fault back in


@pytest.mark.parametrize("damage,msg", [
    ("duplicate across chunks", "appears twice"),
    ("nan in second chunk", r"lat\[\d+\]"),
    ("short", "expected n="),
    ("bad app code", r"app\[\d+\]"),
])
def test_write_chunks_refuses_bad_input_and_leaves_nothing(tmp_path, damage, msg):
    ids, lat, lon = _arrays(6000, 8)
    n = 6000
    app = None
    if damage == "duplicate across chunks":
        ids[4500] = ids[10]
    elif damage == "nan in second chunk":
        lat[3500] = np.nan
    elif damage == "short":
        n = 7000
    else:
        app = np.zeros(6000, np.int8)
        app[5000] = 3
    with pytest.raises(InvalidInputError, match=msg):
        gt.DeviceStore.write_chunks(tmp_path, _chunks(ids, lat, lon, 3000, app), n, ["amap"])
    assert not (tmp_path / "store.arrow.tmp").exists()
    assert not (tmp_path / "store.arrow").exists()


@pytest.mark.parametrize("with_app", [False, True])
def test_with_updates_to_disk_equals_in_memory(tmp_path, with_app):
    ids, lat, lon = _arrays(20_000, 9)
    base = gt.DeviceStore.write_chunks(tmp_path / "g1", _chunks(ids, lat, lon, 7000), 20_000, ["amap"])
    rng = np.random.default_rng(10)
    up = np.concatenate([rng.choice(ids, 3000, replace=False), np.arange(900, dtype=np.uint64) + 10**13])
    rng.shuffle(up)
    ulat, ulon = rng.uniform(-80, 80, len(up)), rng.uniform(-179, 179, len(up))
    useen = np.full(len(up), 1_760_000_000)
    app = rng.choice(["amap", "didi"], len(up)) if with_app else None
    mem = base.with_updates(up, ulat, ulon, last_seen=useen, app=app)
    disk = base.with_updates(up, ulat, ulon, last_seen=useen, app=app, directory=tmp_path / "g2")
    assert disk.generation == mem.generation == 2 and len(disk) == len(mem) == 20_900
    assert disk.app_names == mem.app_names
    for col in ("device_id", "lat", "lon", "app_codes", "last_seen_s"):
        np.testing.assert_array_equal(getattr(disk, col), getattr(mem, col))
    everyone = np.concatenate([ids, up])
    np.testing.assert_array_equal(disk.lookup(everyone), mem.lookup(everyone))
    reopened = gt.DeviceStore.open(tmp_path / "g2")
    np.testing.assert_array_equal(reopened.lookup(everyone), mem.lookup(everyone))
    np.testing.assert_array_equal(base.lat, gt.DeviceStore.open(tmp_path / "g1").lat)  # old generation intact


@pytest.mark.parametrize("to_disk", [False, True])
def test_with_updates_without_app_keeps_moved_devices_apps_gh_scale_report(tmp_path, to_disk):
    """Regression: a batch with new devices and app=None reset moved devices' apps to 'default'."""
    ids, lat, lon = _arrays(1000, 11)
    app = np.where(np.arange(1000) % 2, "amap", "weibo")
    base = gt.DeviceStore.from_arrays(ids, lat, lon, app=app)
    moved = ids[:100]
    batch = np.concatenate([moved, np.arange(10, dtype=np.uint64) + 10**14])
    kw = {"directory": tmp_path / "g2"} if to_disk else {}
    if to_disk:
        base.save(tmp_path / "g1")
        base = gt.DeviceStore.open(tmp_path / "g1")
    g2 = base.with_updates(batch, np.zeros(110), np.zeros(110), **kw)
    k = g2.lookup(ids)
    assert [g2.app_names[c] for c in g2.app_codes[k]] == app.tolist()
    assert {g2.app_names[c] for c in g2.app_codes[g2.lookup(batch[100:])]} == {"default"}


@pytest.mark.parametrize("form", ["list", "numpy unicode", "numpy object", "arrow string", "arrow dictionary",
                                  "arrow chunked, a dictionary per chunk", "arrow chunked strings"])
def test_app_column_forms_agree(form):
    names = ["amap", "qq", "amap", "didi", "qq"]
    app = {"list": names, "numpy unicode": np.array(names), "numpy object": np.array(names, dtype=object),
           "arrow string": pa.array(names), "arrow dictionary": pa.array(names).dictionary_encode(),
           "arrow chunked, a dictionary per chunk": pa.chunked_array(
               [pa.array(names[:2]).dictionary_encode(), pa.array(names[2:]).dictionary_encode()]),
           "arrow chunked strings": pa.chunked_array([pa.array(names[:1]), pa.array([], pa.string()),
                                                      pa.array(names[1:])])}[form]
    s = gt.DeviceStore.from_arrays(np.arange(5, dtype=np.uint64), np.zeros(5), np.arange(5.0), app=app)
    k = s.lookup(np.arange(5, dtype=np.uint64))
    assert [s.app_names[c] for c in s.app_codes[k]] == names


def test_app_names_that_overflow_one_arrow_array():
    """pyarrow turns 20 M numpy names into a ChunkedArray; ingest must take it (it raised AttributeError)."""
    n = 20_000_000
    app = np.array(["amap", "qq", "didi", "weibo"])[np.arange(n) % 4]
    assert isinstance(pa.array(app, type=pa.string()), pa.ChunkedArray)
    codes, names = gt.spatial._store_checks.check_app(app, n)
    assert names == ["amap", "qq", "didi", "weibo"]
    np.testing.assert_array_equal(codes[:8], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(np.bincount(codes), [n // 4] * 4)


def test_null_app_in_a_later_chunk_names_its_row():
    app = pa.chunked_array([pa.array(["amap", "qq"]), pa.array(["qq", None, "amap"])])
    with pytest.raises(gt.InvalidInputError, match=r"app\[3\] is null"):
        gt.DeviceStore.from_arrays(np.arange(5, dtype=np.uint64), np.zeros(5), np.zeros(5), app=app)


# -- the on-disk new generation (the 400 M-device path) -----------------------------------------

def _disk_base(tmp_path, n=5000, seed=12, apps=("amap", "qq")):
    ids, lat, lon = _arrays(n, seed)
    app = (np.arange(n) % len(apps)).astype(np.int8)
    return ids, gt.DeviceStore.write_chunks(tmp_path / "g1", _chunks(ids, lat, lon, 1700, app), n, list(apps))


def _assert_same_generation(disk, mem, everyone):
    assert disk.generation == mem.generation and len(disk) == len(mem) and disk.app_names == mem.app_names
    for col in ("device_id", "lat", "lon", "app_codes", "last_seen_s"):
        np.testing.assert_array_equal(getattr(disk, col), getattr(mem, col), err_msg=col)
    np.testing.assert_array_equal(disk.changed_keys, mem.changed_keys)
    assert disk.parent_generation == mem.parent_generation
    # the id files are exactly a fresh sort of the new ids
    want_ids, want_keys = gt._array_kernels.sort_ids(np.ascontiguousarray(mem.device_id))
    np.testing.assert_array_equal(disk._sorted_ids, want_ids)
    np.testing.assert_array_equal(disk._id_index, want_keys)
    np.testing.assert_array_equal(disk.lookup(everyone), mem.lookup(everyone))


BATCHES = ["mixed", "movers only", "new only", "empty", "new ids above every id", "new ids below every id",
           "everyone moves"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("chunk_rows", [1 << 22, 777, 3])
@pytest.mark.parametrize("with_app", [False, True])
def test_with_updates_to_disk_matches_in_memory_in_every_shape(tmp_path, batch, chunk_rows, with_app):
    ids, base = _disk_base(tmp_path)
    rng = np.random.default_rng(13)
    movers = rng.choice(ids, 900, replace=False)
    fresh = np.arange(300, dtype=np.uint64) * 11 + 10**12
    up = {"mixed": np.concatenate([movers, fresh]), "movers only": movers, "new only": fresh,
          "empty": np.array([], np.uint64),
          "new ids above every id": np.concatenate([movers, np.uint64(2**64 - 1) - np.arange(50, dtype=np.uint64)]),
          "new ids below every id": np.concatenate([movers, np.arange(5, dtype=np.uint64)]),
          "everyone moves": ids.copy()}[batch]
    rng.shuffle(up)
    ulat, ulon = rng.uniform(-80, 80, len(up)), rng.uniform(-179, 179, len(up))
    useen = np.full(len(up), 1_760_000_000)
    app = rng.choice(["amap", "didi"], len(up)) if with_app else None
    mem = base.with_updates(up, ulat, ulon, last_seen=useen, app=app)
    disk = base._with_updates_to_disk(tmp_path / "g2", up, ulat, ulon, useen, app, None, chunk_rows=chunk_rows)
    everyone = np.concatenate([ids, up, np.array([3, 2**64 - 2], np.uint64)])
    _assert_same_generation(disk, mem, everyone)
    _assert_same_generation(gt.DeviceStore.open(tmp_path / "g2"), mem, everyone)
    assert sorted(p.name for p in (tmp_path / "g2").iterdir()) == [
        "changed_since_1.npy", "id_index.npy", "id_sorted.npy", "store.arrow", "store.json"]


@pytest.mark.parametrize("source", ["in memory", "store.arrow replaced since open", "no kernel copy",
                                    "no id files"])
def test_with_updates_to_disk_from_every_kind_of_old_generation(tmp_path, monkeypatch, source):
    ids, base = _disk_base(tmp_path)
    if source == "in memory":
        base = gt.DeviceStore.from_arrays(base.device_id, base.lat, base.lon,
                                          app=np.array(base.app_names)[base.app_codes], last_seen=base.last_seen_s)
    elif source == "store.arrow replaced since open":
        # another generation saved into the same directory: the open store keeps its own
        # (unlinked) file, and its columns must come from its mapping, not the new file
        other = gt.DeviceStore.from_arrays(ids, np.zeros(len(ids)), np.zeros(len(ids)))
        other.save(tmp_path / "g1")
    elif source == "no kernel copy":
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(gt.store.os, "copy_file_range", refuse)
    else:
        # saved without an id index (none was ever computed): its manifest lists none
        gt.DeviceStore.from_arrays(base.device_id, base.lat, base.lon, app=np.array(base.app_names)[base.app_codes],
                                   last_seen=base.last_seen_s).save(tmp_path / "g0")
        base = gt.DeviceStore.open(tmp_path / "g0")
        assert base._id_index is None
    rng = np.random.default_rng(14)
    up = np.concatenate([rng.choice(ids, 700, replace=False), np.arange(60, dtype=np.uint64) + 10**13])
    ulat, ulon = rng.uniform(-80, 80, len(up)), rng.uniform(-179, 179, len(up))
    useen = np.full(len(up), 1_760_000_000)
    mem = base.with_updates(up, ulat, ulon, last_seen=useen)
    disk = base._with_updates_to_disk(tmp_path / "g2", up, ulat, ulon, useen, None, None, chunk_rows=1000)
    _assert_same_generation(disk, mem, np.concatenate([ids, up]))


@pytest.mark.parametrize("fail_at", [1, 3, 9, "fsync"])
def test_with_updates_to_disk_failing_midway_leaves_no_new_generation(tmp_path, monkeypatch, fail_at):
    """A write error (disk full, I/O error) at any point: the error surfaces, the old generation
    is untouched and still opens, and the new directory holds no store and no companion."""
    ids, base = _disk_base(tmp_path)
    before = {f.name: f.read_bytes() for f in (tmp_path / "g1").iterdir()}
    calls = {"n": 0}
    if fail_at == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("store.arrow.tmp"):
                raise OSError(errno.EIO, "injected")
            real_fsync(fd)
        monkeypatch.setattr(gt.store.os, "fsync", fsync)
    else:
        real = gt.spatial._store_files.pwrite_all

        def pwrite_all(*a):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, "injected: no space left")
            real(*a)
        monkeypatch.setattr(gt.spatial._store_files, "pwrite_all", pwrite_all)
    up = np.concatenate([ids[:800], np.arange(50, dtype=np.uint64) + 10**13])
    with pytest.raises(OSError, match="injected"):
        base._with_updates_to_disk(tmp_path / "g2", up, np.zeros(len(up)), np.zeros(len(up)), None, None, None,
                                   chunk_rows=1000)
    assert list((tmp_path / "g2").iterdir()) == []
    assert {f.name: f.read_bytes() for f in (tmp_path / "g1").iterdir()} == before
    reopened = gt.DeviceStore.open(tmp_path / "g1")
    np.testing.assert_array_equal(reopened.lookup(ids), base.lookup(ids))


def test_with_updates_to_disk_into_a_directory_holding_another_generation(tmp_path):
    ids, base = _disk_base(tmp_path)
    g2 = base.with_updates(ids[:100], np.zeros(100), np.zeros(100), directory=tmp_path / "g2")
    g3 = g2.with_updates(np.arange(7, dtype=np.uint64) + 10**14, np.ones(7), np.ones(7), directory=tmp_path / "g2")
    assert g3.generation == 3 and len(g3) == len(ids) + 7
    assert sorted(p.name for p in (tmp_path / "g2").iterdir()) == [
        "changed_since_2.npy", "id_index.npy", "id_sorted.npy", "store.arrow", "store.json"]
    np.testing.assert_array_equal(g3.changed_keys, np.arange(len(ids), len(ids) + 7))
    np.testing.assert_array_equal(g2.lat[g2.lookup(ids[:100])], 0.0)   # g2 still serves its own rows
    assert (gt.DeviceStore.open(tmp_path / "g2").lookup(np.arange(7, dtype=np.uint64) + 10**14) >= len(ids)).all()


@pytest.mark.parametrize("name,override,msg", BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_bad_batches_to_disk_raise_and_write_nothing(tmp_path, name, override, msg):
    cols = dict(device_id=[5, 6, 7], lat=[0.0, 1.0, 2.0], lon=[0.0, 1.0, 2.0])
    cols.update(override)
    gt.DeviceStore.from_arrays([1, 2, 3], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]).save(tmp_path / "g1")
    base = gt.DeviceStore.open(tmp_path / "g1")
    with pytest.raises(InvalidInputError, match=msg):
        base.with_updates(cols["device_id"], cols["lat"], cols["lon"], last_seen=cols.get("last_seen"),
                          app=cols.get("app"), directory=tmp_path / "g2")
    assert not (tmp_path / "g2").exists() or list((tmp_path / "g2").iterdir()) == []
    np.testing.assert_array_equal(gt.DeviceStore.open(tmp_path / "g1").lat, [0.0, 1.0, 2.0])


def test_save_over_a_generation_with_an_id_index_drops_the_stale_index(tmp_path):
    """Regression: save() of a store without a cached id index left the previous
    generation's id_sorted/id_index next to the new store.arrow, so lookups used stale keys."""
    ids, base = _disk_base(tmp_path)
    other = gt.DeviceStore.from_arrays(ids[::-1].copy(), np.zeros(len(ids)), np.linspace(-170, 170, len(ids)))
    other.save(tmp_path / "g1")
    np.testing.assert_array_equal(gt.DeviceStore.open(tmp_path / "g1").lookup(ids), other.lookup(ids))


def test_buffer_pool_reuses_and_does_not_grow_with_the_number_of_requests():
    pool = gt.spatial._store_files.BufferPool()
    held = set()
    for size in list(range(1000, 1100)) + [500] * 10:   # merge chunks: sizes creep up
        b = pool.get(np.uint64, size)
        assert b.shape == (size,) and b.dtype == np.uint64
        held.add(id(b.base))
        pool.put(b)
    assert sum(len(v) for v in pool._free.values()) == 1
    assert len(held) < 10
