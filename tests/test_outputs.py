"""The library side of what the CLI hands over: outputs.py and DeviceStore.with_updates_from_table."""
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

import geotarget as gt
from geotarget.errors import InvalidInputError
from geotarget.outputs import app_counts, audience_table, largest_first, push_table


@pytest.fixture(scope="module")
def store():
    rng = np.random.default_rng(5)
    n = 5000
    apps = np.array(["amap", "qq", "didi", "weibo"])[rng.integers(0, 4, n)]
    return gt.DeviceStore.from_arrays(rng.choice(10**12, n, replace=False).astype(np.uint64),
                                      30 + rng.uniform(-2, 2, n), 120 + rng.uniform(-2, 2, n), app=apps)


def test_audience_table_holds_the_devices_of_the_keys(store):
    aud = gt.SpatialIndex.build(store).within(30.0, 120.0, 80.0)
    keys = aud.keys()
    assert 0 < keys.size < len(store)
    t = audience_table(store, keys)
    assert t.column_names == ["device_id", "key", "app"]
    assert t.schema.field("device_id").type == pa.uint64() and t.schema.field("key").type == pa.uint32()
    np.testing.assert_array_equal(t.column("key").to_numpy(), keys)
    np.testing.assert_array_equal(t.column("device_id").to_numpy(), store.device_id[keys])
    assert t.column("app").to_pylist() == [store.app_names[c] for c in store.app_codes[keys]]


def test_push_table_joins_the_per_app_batches(store):
    aud = gt.SpatialIndex.build(store).within(30.0, 120.0, 80.0)
    batches = aud.by_app()
    t = push_table(batches)
    assert t.column_names == ["device_id", "key", "app"]
    assert t.num_rows == len(aud)
    assert Counter(t.column("app").to_pylist()) == {a: b.num_rows for a, b in batches.items()}
    np.testing.assert_array_equal(np.sort(t.column("key").to_numpy()), np.sort(aud.keys()))
    empty = push_table({})
    assert empty.num_rows == 0 and empty.column_names == ["device_id", "key", "app"]


def test_counts_by_app_largest_first(store):
    keys = np.arange(0, len(store), 3, dtype=np.uint32)
    got = app_counts(store, keys)
    want = Counter(store.app_names[c] for c in store.app_codes[keys])
    assert got == dict(want)
    assert list(got.values()) == sorted(got.values(), reverse=True)
    assert list(largest_first({"b": 2, "a": 2, "c": 5})) == ["c", "a", "b"]
    with pytest.raises(InvalidInputError, match="beyond"):
        app_counts(store, [len(store)])


def test_with_updates_from_table_reads_columns_as_from_table(store):
    rng = np.random.default_rng(9)
    ids = np.concatenate([store.device_id[:300], np.arange(50, dtype=np.uint64) + 10**13])
    lat, lon = rng.uniform(29, 31, ids.size), rng.uniform(119, 121, ids.size)
    seen = np.full(ids.size, 1_700_000_000)
    table = pa.table({"ID": ids, "Latitude": lat, "lng": lon, "last_seen": seen})
    got = store.with_updates_from_table(table)
    want = store.with_updates(ids, lat, lon, last_seen=seen)
    for col in ("device_id", "lat", "lon", "app_codes", "last_seen_s", "changed_keys"):
        np.testing.assert_array_equal(getattr(got, col), getattr(want, col), err_msg=col)
    with pytest.raises(InvalidInputError, match="no device_id column"):
        store.with_updates_from_table(pa.table({"lat": lat, "lon": lon}))
    with pytest.raises(InvalidInputError, match=r"lat\[1\] is null"):
        store.with_updates_from_table(pa.table({"device_id": ids[:3], "lat": [1.0, None, 2.0],
                                                "lon": [1.0, 1.0, 1.0]}))
