"""Every compiled kernel against its plain NumPy reference (hypothesis + adversarial cases)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import geotarget as gt
from geotarget import _kernels, _array_kernels, _refresh_kernels
from geotarget.geo import HALF_CIRCUMFERENCE_KM, haversine_km, unit_vectors
from geotarget.spatial.index import build_tree_reference, within_reference

lats = st.floats(-90, 90, allow_nan=False, allow_infinity=False)
lons = st.floats(-180, 180, allow_nan=False, allow_infinity=False)
# Adversarial coordinates: poles, antimeridian, equator, prime meridian, tiny offsets.
special_lats = st.sampled_from([-90.0, -89.999999, -45.0, 0.0, 1e-9, 45.0, 89.999999, 90.0])
special_lons = st.sampled_from([-180.0, -179.999999, -0.0, 0.0, 1e-12, 179.999999, 180.0])
any_lat = st.one_of(lats, special_lats)
any_lon = st.one_of(lons, special_lons)
radii = st.one_of(
    st.sampled_from([0.0, 1e-9, 0.001, 1.0, 100.0, 500.0, 10_007.5, HALF_CIRCUMFERENCE_KM - 1e-6,
                     HALF_CIRCUMFERENCE_KM, HALF_CIRCUMFERENCE_KM + 1, 1e6]),
    st.floats(0, 25_000, allow_nan=False, allow_infinity=False),
)


@st.composite
def point_clouds(draw, max_n=400):
    n = draw(st.integers(0, max_n))
    mode = draw(st.sampled_from(["uniform", "cluster", "duplicates", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "uniform":
        lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
        lon = rng.uniform(-180, 180, n)
    elif mode == "cluster":
        c_lat, c_lon = draw(any_lat), draw(any_lon)
        lat = np.clip(c_lat + rng.normal(0, draw(st.sampled_from([1e-6, 0.01, 1.0, 10.0])), n), -90, 90)
        lon = (c_lon + rng.normal(0, 1.0, n) + 180.0) % 360.0 - 180.0
    elif mode == "duplicates":
        lat = np.full(n, draw(any_lat))
        lon = np.full(n, draw(any_lon))
    else:
        lat = rng.choice([-90.0, 90.0, 0.0, 89.9999, -89.9999, 45.0], n)
        lon = rng.choice([-180.0, 180.0, 0.0, 179.9999, -179.9999, 90.0], n)
    return lat.astype(np.float64), lon.astype(np.float64)


def _store(lat, lon):
    return gt.DeviceStore.from_arrays(np.arange(len(lat), dtype=np.uint64) * 3 + 1, lat, lon)


def _assert_exact(store, index, clat, clon, r):
    """Both directions: nothing returned lies outside, nothing inside is missed.

    The only tolerated disagreement is a device whose reference distance lies
    within 1e-6 km of r (docs/design.md, Distance).
    """
    got = index.within(clat, clon, r).keys()
    ref = within_reference(store, clat, clon, r)
    if np.array_equal(got, ref):
        assert index.count(clat, clon, r) == len(ref)
        return
    d = haversine_km(clat, clon, store.lat, store.lon)
    extra = np.setdiff1d(got, ref)
    missed = np.setdiff1d(ref, got)
    assert np.all(np.abs(d[extra] - r) <= 1e-6), f"returned outside: {extra[:5]} d={d[extra][:5]} r={r}"
    assert np.all(np.abs(d[missed] - r) <= 1e-6), f"missed inside: {missed[:5]} d={d[missed][:5]} r={r}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cloud=point_clouds(), clat=any_lat, clon=any_lon, r=radii, leaf=st.sampled_from([1, 2, 7, 32]))
def test_within_equals_numpy_scan(cloud, clat, clon, r, leaf):
    lat, lon = cloud
    store = _store(lat, lon)
    index = gt.SpatialIndex.build(store, leaf_size=leaf)
    _assert_exact(store, index, clat, clon, r)


@settings(max_examples=60, deadline=None)
@given(cloud=point_clouds(max_n=200), data=st.data())
def test_boundary_points_are_decided_by_haversine(cloud, data):
    """Circles whose radius is exactly some device's reference distance (the hardest case)."""
    lat, lon = cloud
    assume(len(lat) > 0)
    store = _store(lat, lon)
    index = gt.SpatialIndex.build(store, leaf_size=data.draw(st.sampled_from([1, 4, 32])))
    clat, clon = data.draw(any_lat), data.draw(any_lon)
    d = haversine_km(clat, clon, store.lat, store.lon)
    i = data.draw(st.integers(0, len(d) - 1))
    for r in (d[i], np.nextafter(d[i], 0), np.nextafter(d[i], np.inf)):
        _assert_exact(store, index, clat, clon, float(r))


@settings(max_examples=80, deadline=None)
@given(cloud=point_clouds(max_n=300), data=st.data())
def test_boundary_points_with_a_cutoff_count_as_the_scan(cloud, data):
    """A count by last-seen tests boundary leaves in its own branch-free pass (``_leaf_count_fresh``):
    radius exactly some device's distance, cut-off exactly some device's last-seen (and one second
    either side), against the scan in both directions."""
    import datetime as dt
    lat, lon = cloud
    assume(len(lat) > 0)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    base = 1_700_000_000
    seen = base + rng.integers(0, data.draw(st.sampled_from([2, 50, 100_000])), len(lat))
    store = gt.DeviceStore.from_arrays(np.arange(len(lat), dtype=np.uint64) * 3 + 1, lat, lon, last_seen=seen)
    index = gt.SpatialIndex.build(store, leaf_size=data.draw(st.sampled_from([1, 4, 32])))
    clat, clon = data.draw(any_lat), data.draw(any_lon)
    d = haversine_km(clat, clon, store.lat, store.lon)
    i = data.draw(st.integers(0, len(d) - 1))
    cut = int(seen[data.draw(st.integers(0, len(d) - 1))]) + data.draw(st.sampled_from([-1, 0, 1]))
    since = dt.datetime.fromtimestamp(cut, dt.timezone.utc)
    for r in (float(d[i]), float(np.nextafter(d[i], 0)), float(np.nextafter(d[i], np.inf))):
        ref = within_reference(store, clat, clon, r, seen_since=since)
        got = index.within(clat, clon, r, seen_since=since).keys()
        n = index.count(clat, clon, r, seen_since=since)
        if np.array_equal(got, ref):
            assert n == len(ref)
            continue
        # only a device within 1e-6 km of r may be decided otherwise (docs/design.md, Distance)
        odd = np.setxor1d(got, ref)
        assert np.all(np.abs(d[odd] - r) <= 1e-6)
        assert abs(n - len(ref)) <= len(odd)


@settings(max_examples=80, deadline=None)
@given(lat1=any_lat, lon1=any_lon,
       lat2=hnp.arrays(np.float64, st.integers(0, 50), elements=any_lat),
       data=st.data())
def test_haversine_kernel_matches_reference(lat1, lon1, lat2, data):
    lon2 = data.draw(hnp.arrays(np.float64, len(lat2), elements=any_lon))
    got = _kernels.haversine_many(lat1, lon1, np.ascontiguousarray(lat2), np.ascontiguousarray(lon2))
    ref = haversine_km(lat1, lon1, lat2, lon2)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(cloud=point_clouds(max_n=300))
def test_fill_points_matches_reference(cloud):
    lat, lon = cloud
    pts = np.empty(len(lat), dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(lat, lon, pts)
    ref = unit_vectors(lat, lon).astype(np.float32)
    np.testing.assert_array_equal(np.stack([pts["x"], pts["y"], pts["z"]], -1), ref)
    np.testing.assert_array_equal(pts["key"], np.arange(len(lat)))


@settings(max_examples=60, deadline=None)
@given(cloud=point_clouds(max_n=300), leaf=st.sampled_from([1, 3, 8, 32]))
def test_build_tree_matches_reference(cloud, leaf):
    """Same leaves (membership) and identical node boxes as the NumPy reference build."""
    lat, lon = cloud
    n = len(lat)
    pts = np.empty(n, dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(lat, lon, pts)
    xyz = np.stack([pts["x"], pts["y"], pts["z"]], -1).copy()
    keys = pts["key"].copy()
    order, ref_bounds, ref_depth = build_tree_reference(xyz, keys, leaf)
    bounds, depth = _kernels.build_tree(pts, leaf)
    assert depth == ref_depth
    np.testing.assert_array_equal(bounds, ref_bounds)
    n_leaves = 1 << depth
    starts = (np.arange(n_leaves + 1, dtype=np.int64) * n) >> depth
    for j in range(n_leaves):
        s, e = starts[j], starts[j + 1]
        assert set(pts["key"][s:e].tolist()) == set(keys[order[s:e]].tolist())
    assert sorted(pts["key"].tolist()) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(cloud=point_clouds(max_n=300), data=st.data())
def test_gather_runs_matches_concatenate(cloud, data):
    lat, lon = cloud
    store = _store(lat, lon)
    index = gt.SpatialIndex.build(store)
    aud = index.within(data.draw(any_lat), data.draw(any_lon), data.draw(radii))
    buf = np.zeros(len(store) + 1, dtype=np.uint32)
    m = aud.fill(buf)
    ref = np.concatenate([index.keys[s:e] for s, e in aud.runs] or [np.empty(0, np.uint32)])
    np.testing.assert_array_equal(buf[:m], ref)
    # runs are sorted, disjoint and non-adjacent
    r = aud.runs
    if len(r):
        assert np.all(r[:, 1] > r[:, 0])
        assert np.all(r[1:, 0] > r[:-1, 1])


def test_copy_keys_matches_reference():
    rng = np.random.default_rng(4)
    pts = np.empty(257, dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(rng.uniform(-90, 90, 257), rng.uniform(-180, 180, 257), pts,
                         rng.permutation(257).astype(np.uint32))
    keys = np.empty(257, np.uint32)
    _kernels.copy_keys(pts, keys)
    np.testing.assert_array_equal(keys, pts["key"])


def test_take_matches_numpy():
    rng = np.random.default_rng(5)
    for n_idx in (3000, 5_000_000):  # serial and OpenMP paths (threshold 2^22)
      idx = rng.integers(0, 1000, n_idx)
      for dtype in (np.uint64, np.int64, np.float64, np.int8, np.uint32):
        src = rng.integers(-100, 100, 1000).astype(dtype)
        out = np.empty(n_idx, dtype=dtype)
        _array_kernels.take(src, idx, out)
        np.testing.assert_array_equal(out, src[idx])


def test_take_with_uint32_indices_and_gather_seen():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 500, 2000).astype(np.uint32)
    src = rng.integers(-10, 2**33, 500)
    out = np.empty(2000, np.int64)
    _array_kernels.take(src, keys, out)
    np.testing.assert_array_equal(out, src[keys])
    seen = np.empty(2000, np.uint32)
    _array_kernels.gather_seen(src, keys, seen)
    np.testing.assert_array_equal(seen, np.clip(src[keys], 0, 2**32 - 1))


def test_sort_ids_matches_argsort():
    rng = np.random.default_rng(6)
    for ids in (rng.integers(0, 2**63, 5000, dtype=np.int64).astype(np.uint64),
                rng.integers(0, 50, 5000).astype(np.uint64),          # many duplicates
                np.arange(5000, dtype=np.uint64)[::-1].copy(),
                np.array([], dtype=np.uint64), np.array([2**64 - 1, 0], dtype=np.uint64)):
        s, rows = _array_kernels.sort_ids(ids)
        order = np.argsort(ids, kind="stable")
        np.testing.assert_array_equal(s, ids[order])
        np.testing.assert_array_equal(rows, order)


@pytest.mark.parametrize("n,leaf", [(0, 32), (1, 32), (32, 32), (33, 32), (1000, 1), (10**6, 32)])
def test_tree_depth_is_minimal(n, leaf):
    depth = _kernels.tree_depth(n, leaf)
    assert -(-n // (1 << depth)) <= leaf
    if depth:
        assert -(-n // (1 << (depth - 1))) > leaf


@pytest.mark.parametrize("parallel_top,n", [(False, 300_000), (True, 300_000), (True, 1_500_000)])
def test_build_tree_large_ranges_use_sampled_select_exactly(parallel_top, n):
    """Ranges above 2^18 points take the sample-bracketed select, above 2^20 the two-core
    partition of the root; membership must not change."""
    rng = np.random.default_rng(12)
    lat, lon = rng.uniform(20, 45, n), rng.uniform(80, 125, n)
    lat[::5] = 30.0            # heavy ties on one axis exercise the key tie-break
    lon[::11] = 100.0
    pts = np.empty(n, dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(lat, lon, pts)
    xyz = np.stack([pts["x"], pts["y"], pts["z"]], -1).copy()
    keys = pts["key"].copy()
    leaf = 256 if n < 10**6 else 4096
    order, ref_bounds, ref_depth = build_tree_reference(xyz, keys, leaf)
    bounds, depth = _kernels.build_tree(pts, leaf, parallel_top)
    assert depth == ref_depth
    np.testing.assert_array_equal(bounds, ref_bounds)
    starts = (np.arange((1 << depth) + 1, dtype=np.int64) * n) >> depth
    for j in range(1 << depth):
        s, e = starts[j], starts[j + 1]
        np.testing.assert_array_equal(np.sort(pts["key"][s:e]), np.sort(keys[order[s:e]]))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 200),
                  elements=st.one_of(st.integers(0, 40), st.just(2**32 - 1), st.just(2**32 - 2))))
def test_consecutive_ranges_matches_reference(keys):
    got = _array_kernels.consecutive_ranges(keys)
    if len(keys) == 0:
        assert got.shape == (0, 2)
        return
    k = keys.astype(np.int64)
    cut = np.flatnonzero(np.diff(k) != 1) + 1
    ref = np.stack([k[np.r_[0, cut]], k[np.r_[cut - 1, len(k) - 1]] + 1], axis=1)
    np.testing.assert_array_equal(got, ref)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 3000), elements=st.integers(0, 5000)))
def test_audience_bitmap_from_any_key_order(keys):
    from geotarget.spatial.audience import _bitmap_from_keys
    assert set(_bitmap_from_keys(keys)) == set(keys.tolist())
    runs = np.sort(np.unique(keys))
    assert set(_bitmap_from_keys(runs)) == set(runs.tolist())


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 500), elements=st.integers(0, 2**32 - 1)),
       st.sampled_from([1, 3, 16]))
def test_node_seen_bounds_matches_reference(seen, leaf):
    n = len(seen)
    depth = _kernels.tree_depth(n, leaf)
    got = _kernels.node_seen_bounds(seen, depth)
    for i in range((2 << depth) - 1):
        level = int(np.floor(np.log2(i + 1)))
        j = i + 1 - (1 << level)
        s, e = (j * n) >> level, ((j + 1) * n) >> level
        ref = (seen[s:e].min(), seen[s:e].max()) if e > s else (2**32 - 1, 0)
        assert tuple(got[i]) == ref


@settings(max_examples=60, deadline=None)
@given(cloud=point_clouds(max_n=400), clat=any_lat, clon=any_lon, r=radii,
       mode=st.sampled_from(["by latitude", "random", "all old", "all new"]),
       cut=st.integers(0, 100), leaf=st.sampled_from([1, 4, 32]))
def test_seen_since_filter_equals_scan(cloud, clat, clon, r, mode, cut, leaf):
    """Whole subtrees pass or fail the age filter by their bounds; the result is still the scan's."""
    import datetime as dt
    lat, lon = cloud
    base = 1_700_000_000
    if mode == "by latitude":        # age follows position: whole subtrees are old or new
        seen = base + ((lat + 90) / 180 * 100).astype(np.int64)
    elif mode == "random":
        seen = base + np.random.default_rng(len(lat)).integers(0, 100, len(lat))
    else:
        seen = np.full(len(lat), base + (0 if mode == "all old" else 100))
    store = gt.DeviceStore.from_arrays(np.arange(len(lat), dtype=np.uint64), lat, lon, last_seen=seen)
    index = gt.SpatialIndex.build(store, leaf_size=leaf)
    since = dt.datetime.fromtimestamp(base + cut, dt.timezone.utc)
    got = index.within(clat, clon, r, seen_since=since).keys()
    ref = within_reference(store, clat, clon, r, seen_since=since)
    np.testing.assert_array_equal(got, ref)
    assert index.count(clat, clon, r, seen_since=since) == len(ref)


def _ranges_of(keys):
    """Sorted disjoint [start, end) ranges of a key set (plain NumPy)."""
    k = np.unique(np.asarray(sorted(keys), dtype=np.int64))
    if k.size == 0:
        return np.empty((0, 2), np.int64)
    cut = np.flatnonzero(np.diff(k) != 1) + 1
    return np.stack([k[np.r_[0, cut]], k[np.r_[cut - 1, k.size - 1]] + 1], 1).astype(np.int64)


def _in_ranges(keys, ranges):
    """Which keys fall in one of the sorted disjoint [start, end) ranges (plain NumPy)."""
    keys = np.asarray(keys, dtype=np.int64)
    i = np.searchsorted(ranges[:, 1], keys, side="right")
    ok = i < len(ranges)
    ok[ok] = ranges[i[ok], 0] <= keys[ok]
    return ok


@settings(max_examples=80, deadline=None)
@given(cloud=point_clouds(max_n=300), centres=st.lists(st.tuples(any_lat, any_lon, radii), min_size=0, max_size=5),
       data=st.data())
def test_circles_new_points_matches_reference(cloud, centres, data):
    """Both directions, per circle: every key returned is inside and not skipped; none is missed."""
    lat, lon = cloud
    n = len(lat)
    subset = np.array(sorted(data.draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n))) if n else [],
                      dtype=np.uint32)
    if data.draw(st.booleans()):       # any input order works (the cursor re-searches on a step back)
        subset = subset[np.random.default_rng(len(subset)).permutation(len(subset))]
    pts = np.empty(len(subset), dtype=_kernels.POINT_DTYPE)
    if len(subset):
        _kernels.fill_points(lat[subset], lon[subset], pts, subset)
    block = data.draw(st.sampled_from([1, 3, 64]))
    skips = [_ranges_of(data.draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n))) if n else
             np.empty((0, 2), np.int64) for _ in centres]
    circles = np.array(centres, dtype=np.float64).reshape(-1, 3)
    skip = np.concatenate(skips) if skips else np.empty((0, 2), np.int64)
    skip_off = np.r_[0, np.cumsum([len(x) for x in skips], dtype=np.int64)].astype(np.int64)
    keys, off = _refresh_kernels.circles_new_points(pts, _refresh_kernels.block_bounds(pts, block), block, lat[subset],
                                            lon[subset], circles, np.ascontiguousarray(skip), skip_off)
    assert off.shape == (len(centres) + 1,) and off[-1] == len(keys)
    for c, (clat, clon, r) in enumerate(centres):
        got = keys[off[c]:off[c + 1]]
        notified = _in_ranges(subset, skips[c])
        d_sub = haversine_km(clat, clon, lat[subset], lon[subset]) if len(subset) else np.empty(0)
        ref = subset[(d_sub <= r) & ~notified]
        # input order is kept (so sorted input gives sorted output)
        pos = {int(k): i for i, k in enumerate(subset)}
        assert all(pos[int(a)] < pos[int(b)] for a, b in zip(got[:-1], got[1:]))
        extra, missed = np.setdiff1d(got, ref), np.setdiff1d(ref, got)
        d = haversine_km(clat, clon, lat, lon)
        assert np.all(np.abs(d[extra] - r) <= 1e-6) and np.all(np.abs(d[missed] - r) <= 1e-6)
        assert not np.isin(extra, subset[notified]).any()


def test_circles_new_points_rejects_coordinates_of_another_length():
    pts = np.zeros(3, dtype=_kernels.POINT_DTYPE)
    with pytest.raises(ValueError, match="lat/lon"):
        _refresh_kernels.circles_new_points(pts, _refresh_kernels.block_bounds(pts, 2), 2, np.zeros(2), np.zeros(3),
                                    np.zeros((1, 3)), np.empty((0, 2), np.int64), np.zeros(2, np.int64))


def test_circles_new_points_on_both_cores_is_exact_and_repeatable():
    """Many chunks over both cores (the hypothesis clouds are too small to split): same keys every run."""
    rng = np.random.default_rng(21)
    n = 300_000
    lat = np.clip(30 + rng.normal(0, 4, n), -90, 90)
    lon = 115 + rng.normal(0, 6, n)
    subset = np.sort(rng.choice(n, n // 3, replace=False)).astype(np.uint32)
    pts = np.empty(len(subset), dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(lat[subset], lon[subset], pts, subset)
    blocks = _refresh_kernels.block_bounds(pts, 256)
    circles = np.array([(30 + rng.normal(0, 3), 115 + rng.normal(0, 5), r) for r in
                        rng.choice([50.0, 100.0, 300.0, 500.0], 24)], dtype=np.float64)
    skips = [_ranges_of(rng.choice(n, rng.integers(0, n // 2), replace=False)) for _ in circles]
    skip = np.ascontiguousarray(np.concatenate(skips))
    skip_off = np.r_[0, np.cumsum([len(x) for x in skips])].astype(np.int64)
    first = None
    for _ in range(3):
        keys, off = _refresh_kernels.circles_new_points(pts, blocks, 256, lat[subset], lon[subset], circles, skip,
                                                skip_off)
        if first is None:
            first = (keys, off)
        np.testing.assert_array_equal(keys, first[0])
        np.testing.assert_array_equal(off, first[1])
    for c, (clat, clon, r) in enumerate(circles):
        notified = _in_ranges(subset, skips[c])
        ref = subset[(haversine_km(clat, clon, lat[subset], lon[subset]) <= r) & ~notified]
        np.testing.assert_array_equal(keys[off[c]:off[c + 1]], ref)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 5, 4095, 65_530, 2**16, 3 * 2**16 - 1, 2**31, 2**32 - 70_000]),
                          st.integers(0, 70_000), st.integers(1, 9000)), max_size=8),
       st.sets(st.integers(0, 2**32 - 1), max_size=50), st.booleans())
def test_bitmap_ranges_matches_reference(spec, singles, optimize):
    """Run, array and bitmap containers, across container boundaries, with and without run optimisation."""
    from pyroaring import BitMap
    bm = BitMap(singles)
    for base, off, length in spec:
        a = min(base + off, 2**32 - 1)
        bm.add_range(a, min(a + length, 2**32))
        bm.update(range(a + length + 1, min(a + length + 6000, 2**32), 2))   # a dense, not run-like stretch
    if optimize:
        bm.run_optimize()
    got = _refresh_kernels.bitmap_ranges(bm.serialize())
    ref = _array_kernels.consecutive_ranges(np.asarray(bm.to_array(), dtype=np.uint32)) if len(bm) else \
        np.empty((0, 2), np.int64)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("blob", [b"", b"\x01\x02", b"\x00\x00\x00\x00", b"\x3b\x30\x05\x00",
                                  b"\x3a\x30\x00\x00\x02\x00\x00\x00"])
def test_bitmap_ranges_rejects_malformed_bytes(blob):
    with pytest.raises(ValueError, match="roaring bitmap"):
        _refresh_kernels.bitmap_ranges(blob)


def test_bitmap_ranges_rejects_truncated_containers():
    from pyroaring import BitMap
    for bm in (BitMap(range(0, 100_000, 3)), BitMap(range(10, 20)), BitMap([1, 5, 9])):
        blob = bm.serialize()
        for cut in range(1, len(blob) - 1, max(1, len(blob) // 40)):
            with pytest.raises(ValueError, match="roaring bitmap"):
                _refresh_kernels.bitmap_ranges(blob[:cut])


def _runs_and_offsets(lengths, gaps):
    starts = np.cumsum(np.r_[0, lengths[:-1]] + gaps).astype(np.int64)
    runs = np.stack([starts, starts + lengths], 1).astype(np.int64).copy()
    offsets = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
    return runs, offsets


@pytest.mark.parametrize("shape", ["even", "one huge run among tiny ones", "empty runs"])
@pytest.mark.parametrize("total", [1000, 600_000, 5_000_000])   # serial and all-cores paths (from 2^19)
def test_gather_runs_and_fill_rows_both_paths(total, shape):
    """The output is split evenly over the cores, inside runs: every split point is exercised."""
    rng = np.random.default_rng(13)
    if shape == "even":
        lengths = np.full(200, total // 200, np.int64)
    elif shape == "one huge run among tiny ones":
        lengths = rng.integers(1, 4, min(3000, total // 10)).astype(np.int64)
        lengths[len(lengths) // 3] += total - lengths.sum()
    else:
        lengths = rng.integers(0, 2, 4000).astype(np.int64) * (total // 2000)
        lengths[0] = lengths[-1] = 0
    gaps = rng.integers(0, 5, lengths.size)
    runs, offsets = _runs_and_offsets(lengths, gaps)
    src = rng.integers(0, 2**32, int(runs[-1, 1]) + 1, dtype=np.uint64).astype(np.uint32)
    out = np.full(int(lengths.sum()) + 1, 7, np.uint32)
    _array_kernels.gather_runs_u32(src, runs, offsets, out)
    np.testing.assert_array_equal(out[:-1], np.concatenate([src[a:b] for a, b in runs]))
    assert out[-1] == 7
    out[:] = 7
    _array_kernels.fill_rows(runs, offsets, out)
    np.testing.assert_array_equal(out[:-1], np.concatenate([np.arange(a, b) for a, b in runs]))
    assert out[-1] == 7


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3)), max_size=60),
       st.sampled_from([0, 1, 2**31, 2**32 - 200]))
def test_fill_rows_matches_arange(spec, base):
    """Lengths around the 16-key vector stride, empty runs, rows near 2^32."""
    lengths = np.array([a for a, _ in spec], np.int64)
    gaps = np.array([b for _, b in spec], np.int64)
    if not spec:
        lengths = gaps = np.empty(0, np.int64)
    runs, offsets = _runs_and_offsets(lengths, gaps)
    runs += base
    assume(runs.size == 0 or runs[-1, 1] <= 2**32)
    out = np.full(int(lengths.sum()) + 2, 3, np.uint32)
    _array_kernels.fill_rows(runs, offsets, out)
    ref = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs] or [np.empty(0, np.int64)])
    np.testing.assert_array_equal(out[: ref.size], ref.astype(np.uint32))
    assert np.all(out[ref.size:] == 3)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 300), elements=st.integers(0, 300)))
def test_is_iota_matches_reference(keys):
    assert _array_kernels.is_iota(keys) == np.array_equal(keys, np.arange(keys.size))
    ident = np.arange(keys.size, dtype=np.uint32)
    assert _array_kernels.is_iota(ident)
    if keys.size > 1:
        ident[-1] += 1
        assert not _array_kernels.is_iota(ident)


@settings(max_examples=40, deadline=None)
@given(cloud=point_clouds(max_n=400), leaf=st.sampled_from([1, 3, 8, 64]))
def test_build_tree_leaves_rows_already_in_leaf_order_in_place(cloud, leaf):
    """Points already in leaf order (re-keyed by their new position, as an ingest
    does) are not moved: every node is found split already, ties included."""
    lat, lon = cloud
    pts = np.empty(len(lat), dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(lat, lon, pts)
    _kernels.build_tree(pts, leaf)
    order = pts["key"].copy()
    again = np.empty(len(lat), dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(np.ascontiguousarray(lat[order]), np.ascontiguousarray(lon[order]), again)
    bounds_first, _ = _kernels.build_tree(pts.copy(), leaf)
    bounds, _ = _kernels.build_tree(again, leaf)
    np.testing.assert_array_equal(again["key"], np.arange(len(lat)))
    np.testing.assert_array_equal(bounds, bounds_first)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 5, 2**16 - 3, 2**16, 3 * 2**16 - 1, 2**31, 2**32 - 70_000]),
                          st.integers(0, 70_000), st.integers(1, 140_000)), min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_bitmap_from_ranges_is_the_union(spec, rnd):
    """Ranges across 2^16 container boundaries, touching and shuffled, serialised as run containers."""
    from pyroaring import BitMap
    from geotarget.spatial.audience import _bitmap_from_keys
    keys = set()
    for base, off, length in spec:
        a = min(base + off, 2**32 - 1)
        keys.update(range(a, min(a + length, 2**32)))
    k = np.array(sorted(keys), dtype=np.uint32)
    blocks = np.split(k, np.sort(rnd.sample(range(1, len(k)), min(5, len(k) - 1))) if len(k) > 1 else [])
    rnd.shuffle(blocks)
    shuffled = np.concatenate(blocks)          # runs in any order, as an index hands them out
    bm = _bitmap_from_keys(shuffled)
    ref = BitMap()
    ref.update(k)
    assert bm == ref and len(bm) == len(k)


@settings(max_examples=40, deadline=None)
@given(cloud=point_clouds(max_n=300), block=st.sampled_from([1, 7, 64]))
def test_block_bounds_matches_reference(cloud, block):
    lat, lon = cloud
    pts = np.empty(len(lat), dtype=_kernels.POINT_DTYPE)
    _kernels.fill_points(lat, lon, pts)
    got = _refresh_kernels.block_bounds(pts, block)
    assert got.shape == ((len(lat) + block - 1) // block, 6)
    for b in range(got.shape[0]):
        p = pts[b * block:(b + 1) * block]
        ref = [p["x"].min(), p["y"].min(), p["z"].min(), p["x"].max(), p["y"].max(), p["z"].max()]
        np.testing.assert_array_equal(got[b], np.array(ref, dtype=np.float32))


@settings(max_examples=60, deadline=None)
@given(st.sets(st.one_of(st.integers(0, 300_000), st.integers(0, 70_000), st.integers(2**32 - 5, 2**32 - 1)),
               max_size=20_000),
       st.randoms(use_true_random=False))
def test_bitmap_from_keys_matches_set(keys, rnd):
    """Sorted and shuffled scattered keys (the bulk-add path), including the top of the key space."""
    from pyroaring import BitMap
    from geotarget.spatial.audience import _bitmap_from_keys
    k = np.array(sorted(keys), dtype=np.uint32)
    assert _bitmap_from_keys(k) == BitMap(sorted(keys))
    rnd.shuffle(k)
    assert _bitmap_from_keys(k) == BitMap(sorted(keys))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 300),
                  elements=st.one_of(st.integers(0, 20), st.sampled_from([2**32 - 2, 2**32 - 1]))))
def test_count_runs_matches_reference(keys):
    d = np.diff(keys.astype(np.int64))
    ref = (int(keys.size > 0) + int(np.count_nonzero(d != 1)), bool(np.all(d > 0)))
    assert _array_kernels.count_runs(keys) == ref
    assert ref[0] == len(_array_kernels.consecutive_ranges(keys))


def test_bitmap_from_keys_dense_and_sparse_containers():
    from pyroaring import BitMap
    from geotarget.spatial.audience import _bitmap_from_keys
    rng = np.random.default_rng(14)
    dense = rng.choice(3 * 65536 + 100, 150_000, replace=False)                # > 4096 per container
    sparse = rng.choice(np.arange(2**20, 2**28), 70_000, replace=False)       # < 4096 per container
    k = rng.permutation(np.concatenate([dense, sparse])).astype(np.uint32)
    assert _bitmap_from_keys(k) == BitMap(np.sort(k))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([np.uint32, np.uint64]), st.integers(0, 3000), st.integers(0, 2**32 - 1),
       st.sampled_from(["random", "local", "few", "extremes", "sorted", "reversed"]))
def test_sort_inplace_matches_numpy(dtype, n, seed, mode):
    """The radix sort of keys and ids, including inputs whose high digits never change (skipped passes)."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    if mode == "random":
        a = rng.integers(0, top, n, dtype=dtype, endpoint=True)
    elif mode == "local":
        a = rng.integers(0, 5000, n).astype(dtype) + rng.integers(0, top - 5000, dtype=dtype)
    elif mode == "few":
        a = rng.choice(np.array([0, 1, 2047, 2048, top], dtype=dtype), n)
    elif mode == "extremes":
        a = rng.choice(np.array([0, top, top - 1, 1 << 31], dtype=dtype), n)
    else:
        a = np.sort(rng.integers(0, top, n, dtype=dtype, endpoint=True))
        a = a if mode == "sorted" else a[::-1].copy()
    got = a.copy()
    _array_kernels.sort_inplace(got)
    np.testing.assert_array_equal(got, np.sort(a))


@st.composite
def key_sets(draw):
    """Keys over a few 2^16 containers: empty, sparse (array), dense (bitmap), runs, and
    runs crossing word and container boundaries, in any order, split into runs of a source."""
    space = draw(st.sampled_from([1, 64, 65_536, 65_537, 3 * 65_536 + 70, 2**20]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["sparse", "dense", "run", "edge"]))
        if kind == "sparse":
            parts.append(rng.integers(0, space, draw(st.integers(1, 300))))
        elif kind == "dense":
            lo = int(rng.integers(0, space))
            parts.append(rng.integers(lo, min(space, lo + 65_536), draw(st.integers(1, 40_000))))
        elif kind == "run":
            lo = int(rng.integers(0, space))
            parts.append(np.arange(lo, min(space, lo + draw(st.integers(1, 140_000)))))
        else:
            edges = np.array([0, 63, 64, 65_535, 65_536, 65_599, space - 1])
            parts.append(edges[edges < space])
    keys = np.concatenate(parts).astype(np.uint32) if parts else np.empty(0, np.uint32)
    keys = keys[rng.permutation(keys.size)]
    cuts = np.sort(rng.integers(0, keys.size + 1, draw(st.integers(0, 6))))
    edges = np.r_[0, cuts, keys.size]
    runs = np.stack([edges[:-1], edges[1:]], 1).astype(np.int64)
    runs = runs[rng.permutation(len(runs))][: max(1, len(runs) - draw(st.integers(0, 1)))].copy()
    return keys, runs, space


@settings(max_examples=80, deadline=None)
@given(key_sets())
def test_roaring_from_runs_matches_pyroaring(case):
    """The serialisation deserialises to the set pyroaring builds, in run_optimize's sizes."""
    from pyroaring import BitMap
    keys, runs, space = case
    blob = _array_kernels.roaring_from_runs(keys, runs, space)
    chosen = np.concatenate([keys[a:b] for a, b in runs] or [np.empty(0, np.uint32)])
    ref = BitMap(chosen.tolist())
    got = BitMap.deserialize(blob)
    assert got == ref
    ref.run_optimize()
    assert len(blob) <= len(ref.serialize())
    np.testing.assert_array_equal(_refresh_kernels.bitmap_ranges(blob),
                                  _array_kernels.consecutive_ranges(np.asarray(ref.to_array(), np.uint32)))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 200), elements=st.integers(0, 50)), st.data())
def test_same_keys_matches_reference(keys, data):
    pts = np.zeros(keys.size, dtype=_kernels.POINT_DTYPE)
    pts["key"] = keys
    other = keys.copy()
    if other.size and data.draw(st.booleans()):
        i = data.draw(st.integers(0, other.size - 1))
        other[i] = other[i] + 1
    if data.draw(st.booleans()):
        other = other[: max(0, other.size - 1)]
    ref = pts.shape[0] == other.shape[0] and np.array_equal(pts["key"], other)
    assert _kernels.same_keys(pts, np.ascontiguousarray(other)) == ref


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5 * 65536 - 1), max_size=3000), st.booleans(), st.data())
def test_both_roaring_readers_judge_bytes_alike(values, optimize, data):
    """bitmap_ranges and group_bitmap_by_app read the format through one reader (_roaring.pxd): on
    pyroaring's bytes both answer like their references, and on damaged bytes either both refuse
    with ValueError or both answer, and then alike."""
    from pyroaring import BitMap
    n = 5 * 65536
    device_id = np.arange(n, dtype=np.uint64) + 7
    app = (np.arange(n) % 5).astype(np.int8)
    bm = BitMap(values)
    if optimize:
        bm.run_optimize()
    blob = bytearray(bm.serialize())
    if data.draw(st.booleans()) and len(blob) > 0:   # damage: cut the tail, or flip a byte
        if data.draw(st.booleans()):
            del blob[data.draw(st.integers(0, len(blob) - 1)):]
        else:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    blob = bytes(blob)
    outcomes = []
    for read in (lambda: _refresh_kernels.bitmap_ranges(blob),
                 lambda: _array_kernels.group_bitmap_by_app(np.frombuffer(blob, np.uint8), device_id, app)):
        try:
            outcomes.append(read())
        except ValueError as exc:
            assert "roaring bitmap" in str(exc)
            outcomes.append(None)
    ranges, grouped = outcomes
    if blob == bm.serialize():
        assert ranges is not None and grouped is not None
    # group_bitmap_by_app also checks each container's cardinality and its keys' range: it may
    # refuse what the range reader takes, never the reverse
    assert not (ranges is None and grouped is not None)
    if ranges is None or grouped is None:
        return
    keys = np.concatenate([np.arange(s, e) for s, e in ranges]) if len(ranges) else np.empty(0, np.int64)
    ids, got_keys, starts = grouped
    assert np.array_equal(np.sort(got_keys.astype(np.int64)), np.sort(keys))
    assert np.array_equal(ids, device_id[got_keys])
