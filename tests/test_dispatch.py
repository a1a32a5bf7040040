"""The dispatch path's kernels against plain NumPy: fresh runs (the ``seen_since``
filter), their fill, plain runs and roaring bitmaps, and the per-app grouping.

Both directions everywhere: every device returned is inside and fresh, and no
device that is inside and fresh is missed (set equality against the scan),
with the freshness cut-off placed on exact last-seen seconds.
"""
import contextlib
import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

import geotarget as gt
from geotarget import _array_kernels, _kernels
from geotarget.spatial.index import within_reference

BASE = 1_700_000_000
UTC = dt.timezone.utc


def _world(n, seed, shuffled, apps=("amap", "qq", "weibo"), base=BASE):
    """A store over East Asia; ``shuffled`` keeps rows in random order so that index rows are not keys."""
    rng = np.random.default_rng(seed)
    lat = np.clip(rng.normal(31.0, 3.0, n), -90, 90)
    lon = rng.normal(121.0, 3.0, n)
    seen = base + rng.integers(0, 100, n)
    ids = rng.permutation(np.arange(n, dtype=np.uint64) * 7919 + 11)
    codes = rng.integers(0, len(apps), n).astype(np.int8)
    if shuffled:
        store = gt.DeviceStore(ids, lat, lon, codes, apps, seen.astype(np.int64))
    else:
        store = gt.DeviceStore.from_arrays(ids, lat, lon, app=np.asarray(apps)[codes], last_seen=seen)
    return store


@st.composite
def fresh_cases(draw):
    n = draw(st.integers(0, 3000))
    return (n, draw(st.integers(0, 2**31)), draw(st.booleans()), draw(st.sampled_from([1, 4, 16, 64])),
            draw(st.sampled_from([0.0, 1.0, 50.0, 300.0, 1000.0, 30_000.0])), draw(st.integers(-1, 101)),
            draw(st.sampled_from([BASE, 2**31 - 50])))   # the second straddles the top bit of the u32 clock


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fresh_cases(), shared=st.booleans())
def test_fresh_audience_equals_scan_in_every_form(case, shared):
    """``shared``: the fresh items are counted over the cores beside the leaf tests whatever their
    size (from 2^18 rows otherwise), their runs settled afterwards (_settle_fresh)."""
    before = _kernels.fresh_parallel_min(0 if shared else None)
    try:
        _check_fresh_audience(case)
    finally:
        _kernels.fresh_parallel_min(before)


def _check_fresh_audience(case):
    n, seed, shuffled, leaf, r, cut, base = case
    # DeviceStore.from_arrays refuses last_seen more than a day ahead, so a clock past the top
    # bit (2038) is built with the plain constructor (rows in random order); the kernels' own
    # tests below take such values in every layout.
    shuffled = shuffled or base > BASE
    store = _world(n, seed, shuffled, base=base)
    index = gt.SpatialIndex.build(store, leaf_size=leaf)
    if shuffled and n > 4 * leaf:   # a tree of one leaf, or a few random rows, can leave rows as they are
        assert not index.keys_are_rows
    # the cut-off on an exact second some devices were last seen at: >= keeps them
    since = dt.datetime.fromtimestamp(base + cut, UTC)
    ref = within_reference(store, 31.0, 121.0, r, seen_since=since)
    aud = index.within(31.0, 121.0, r, seen_since=since)
    assert len(aud) == len(ref) == index.count(31.0, 121.0, r, seen_since=since)
    buf = np.full(len(ref) + 3, 0xDEADBEEF, dtype=np.uint32)
    assert aud.fill(buf) == len(ref)
    assert np.all(buf[len(ref):] == 0xDEADBEEF), "fill wrote past the audience"
    got = np.sort(buf[:len(ref)])
    np.testing.assert_array_equal(got, ref)                          # nothing missed, nothing extra
    assert np.all(store.last_seen_s[got] >= base + cut)              # each returned key is fresh
    np.testing.assert_array_equal(aud.keys(), ref)
    rows = np.concatenate([np.arange(s, e) for s, e in aud.runs]) if len(aud.runs) else np.empty(0)
    np.testing.assert_array_equal(np.sort(index.keys[rows.astype(np.int64)]), ref)
    assert aud.bitmap() == BitMap(ref)
    # one second later drops exactly the devices last seen at the cut-off second
    later = index.within(31.0, 121.0, r, seen_since=since + dt.timedelta(seconds=1))
    at_cut = ref[store.last_seen_s[ref] == base + cut] if cut >= 0 else np.empty(0, np.uint32)
    np.testing.assert_array_equal(np.setdiff1d(ref, later.keys()), at_cut)


def _fresh_runs(rng, n_rows, seen, cut):
    """Random ascending disjoint runs over ``n_rows`` rows, some plain, some fresh (kept < length)."""
    edges = np.arange(n_rows + 1)
    size = min(len(edges) // 2 * 2, int(rng.integers(0, 40)) * 2)
    cuts = np.sort(rng.choice(edges, size=size, replace=False))
    runs = cuts.reshape(-1, 2).astype(np.int64)
    runs = runs[runs[:, 1] > runs[:, 0]]
    kept = np.array([(seen[s:e] >= cut).sum() for s, e in runs], dtype=np.int64)
    plain = rng.random(len(runs)) < 0.3
    # a plain run keeps every row whatever its age; a fresh run keeps at least one
    kept = np.where(plain, runs[:, 1] - runs[:, 0], kept)
    keep = kept > 0
    return np.ascontiguousarray(runs[keep]), np.ascontiguousarray(kept[keep])


def _rows_ref(runs, kept, seen, cut):
    parts = [np.arange(s, e)[(seen[s:e] >= cut) | (k == e - s)] for (s, e), k in zip(runs, kept)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


#: Last-seen values where an unsigned compare done with signed instructions would break.
EDGE_SEEN = np.array([0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1], dtype=np.uint32)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), n_rows=st.integers(0, 5000),
       cut=st.one_of(st.integers(0, 11), st.sampled_from(EDGE_SEEN.tolist())),
       rows_are_keys=st.booleans(), edges=st.booleans())
def test_fill_plain_runs_and_bitmap_of_fresh_runs_match_numpy(seed, n_rows, cut, rows_are_keys, edges):
    """fill, plain runs and the bitmap of fresh runs against NumPy.  The fill writes each run at
    offsets two slots apart, so a write past any run's share (not only the last one's) shows in
    the slots between."""
    rng = np.random.default_rng(seed)
    seen = rng.integers(0, 11, n_rows).astype(np.uint32)
    if edges:
        seen = rng.choice(np.r_[EDGE_SEEN, np.arange(11, dtype=np.uint32)], n_rows)
    runs, kept = _fresh_runs(rng, n_rows, seen, cut)
    src = None if rows_are_keys else rng.permutation(n_rows).astype(np.uint32)
    rows = _rows_ref(runs, kept, seen, cut)
    want = rows.astype(np.uint32) if src is None else src[rows]
    offsets = np.zeros(len(runs), dtype=np.int64)
    if len(runs):
        np.cumsum(kept[:-1] + 2, out=offsets[1:])
    out = np.full(len(want) + 2 * len(runs) + 2, 7, dtype=np.uint32)
    _array_kernels.fill_fresh(src, runs, kept, offsets, seen, cut, out)
    written = np.zeros(out.shape[0], bool)
    for o, k in zip(offsets, kept):
        written[o:o + k] = True
    np.testing.assert_array_equal(out[written], want)
    assert np.all(out[~written] == 7), "fill wrote past a run's share"
    plain = _array_kernels.plain_runs(runs, kept, seen, cut)
    np.testing.assert_array_equal(plain, _array_kernels.consecutive_ranges(rows.astype(np.uint32)))
    bm = BitMap.deserialize(_array_kernels.roaring_from_runs(src, runs, max(n_rows, 1), kept, seen, cut))
    assert bm == BitMap(want)


@pytest.mark.parametrize("total", [1 << 19, (1 << 21) + 17])   # on one core, then split over cores
def test_fill_fresh_split_over_cores_matches_numpy(total):
    rng = np.random.default_rng(total)
    seen = rng.integers(0, 4, total + 5000).astype(np.uint32)
    edges = np.sort(rng.choice(np.arange(1, total + 5000), 4000, replace=False)).reshape(-1, 2)
    runs = np.ascontiguousarray(edges.astype(np.int64))
    lengths = runs[:, 1] - runs[:, 0]
    kept = np.array([(seen[s:e] >= 2).sum() for s, e in runs], dtype=np.int64)
    kept = np.where(np.arange(len(runs)) % 3 == 0, lengths, kept)     # a third plain (some are long)
    keep = kept > 0
    runs, kept = np.ascontiguousarray(runs[keep]), np.ascontiguousarray(kept[keep])
    offsets = np.zeros(len(runs), dtype=np.int64)
    np.cumsum(kept[:-1], out=offsets[1:])
    src = rng.permutation(total + 5000).astype(np.uint32)
    rows = _rows_ref(runs, kept, seen, 2)
    for s in (None, src):
        out = np.empty(int(kept.sum()), dtype=np.uint32)
        _array_kernels.fill_fresh(s, runs, kept, offsets, seen, 2, out)
        np.testing.assert_array_equal(out, rows.astype(np.uint32) if s is None else src[rows])
        bm = BitMap.deserialize(_array_kernels.roaring_from_runs(s, runs, total + 5000, kept, seen, 2))
        assert bm == BitMap(out)


def test_fresh_kernels_reject_mismatched_lengths():
    runs = np.array([[0, 4]], dtype=np.int64)
    seen = np.zeros(4, np.uint32)
    with pytest.raises(ValueError):
        _array_kernels.fill_fresh(None, runs, np.array([1, 1]), np.zeros(1, np.int64), seen, 0,
                                  np.empty(4, np.uint32))
    with pytest.raises(ValueError):
        _array_kernels.fill_fresh(None, runs, np.array([4]), np.zeros(1, np.int64), seen, 0,
                                  np.empty(3, np.uint32))
    with pytest.raises(ValueError):
        _array_kernels.plain_runs(runs, np.array([1, 2]), seen, 0)
    with pytest.raises(ValueError):
        _array_kernels.roaring_from_runs(None, runs, 4, np.array([1, 2]), seen, 0)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.sampled_from([0, 1, 5, 300, 5000, (1 << 19) + 3]),
       n_apps=st.sampled_from([1, 3, 127]), negative=st.booleans())
def test_group_by_app_matches_stable_argsort(seed, n, n_apps, negative):
    rng = np.random.default_rng(seed)
    space = max(n, 1) * 2
    device_id = rng.integers(0, 2**64 - 1, space, dtype=np.uint64)
    app = rng.integers(0, n_apps, space).astype(np.int8)
    if negative:   # codes above 127 read as negative int8: grouped as unsigned
        app = (app.astype(np.int16) - 100).astype(np.int8)
    keys = rng.choice(space, n, replace=False).astype(np.uint32)
    ids, ks, starts = _array_kernels.group_by_app(keys, device_id, app)
    codes = app[keys].view(np.uint8)
    order = np.argsort(codes, kind="stable")
    np.testing.assert_array_equal(ks, keys[order])
    np.testing.assert_array_equal(ids, device_id[keys[order]])
    np.testing.assert_array_equal(starts, np.r_[0, np.cumsum(np.bincount(codes, minlength=256))])


@pytest.mark.parametrize("shuffled", [False, True])
def test_by_app_batches_and_device_ids_in_both_orders(shuffled):
    store = _world(20_000, 5, shuffled)
    index = gt.SpatialIndex.build(store)
    since = dt.datetime.fromtimestamp(BASE + 30, UTC)
    aud = index.within(31.0, 121.0, 400.0, seen_since=since)
    ref = within_reference(store, 31.0, 121.0, 400.0, seen_since=since)
    assert len(ref) > 1000
    for sort in (False, True):
        batches = aud.by_app(sort=sort)
        assert sum(t.num_rows for t in batches.values()) == len(ref)
        for name, t in batches.items():
            assert t.schema == pa.schema([("device_id", pa.uint64()), ("key", pa.uint32())])
            k = t.column("key").to_numpy()
            assert np.all(store.app_codes[k] == store.app_names.index(name))
            np.testing.assert_array_equal(t.column("device_id").to_numpy(), store.device_id[k])
            if sort:
                assert np.all(np.diff(t.column("device_id").to_numpy()) > 0)
        got = np.sort(np.concatenate([t.column("key").to_numpy() for t in batches.values()]))
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(aud.device_ids(), np.sort(store.device_id[ref]))
    np.testing.assert_array_equal(np.sort(aud.device_ids(sort=False)), np.sort(store.device_id[ref]))
    # a ring (set algebra) gives a bitmap audience: the same batches, keys ascending per app
    ring = aud - index.within(31.0, 121.0, 100.0, seen_since=since)
    want = np.setdiff1d(ref, within_reference(store, 31.0, 121.0, 100.0, seen_since=since))
    batches = ring.by_app()
    for t in batches.values():
        assert np.all(np.diff(t.column("key").to_numpy().astype(np.int64)) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([t.column("key").to_numpy()
                                                          for t in batches.values()])), want)
    assert index.within(31.0, 121.0, 0.0, seen_since=since).by_app() == {}


def test_concurrent_callers_and_a_forked_child_get_the_same_answers():
    """The work-sharing pool: callers on several threads at once (one runs alone while another holds
    the pool), and a child forked after the pool started, all give the NumPy answer."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    n = (1 << 20) + 11
    keys = rng.permutation(n).astype(np.uint32)
    device_id = rng.integers(0, 2**63, n, dtype=np.uint64)
    app = rng.integers(0, 30, n).astype(np.int8)
    order = np.argsort(app[keys], kind="stable")

    def one(_):
        ids, ks, _ = _array_kernels.group_by_app(keys, device_id, app)
        return np.array_equal(ks, keys[order]) and np.array_equal(ids, device_id[keys[order]])

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(one, range(16)))
    pid = os.fork()
    if pid == 0:   # the child: exit status 0 only for the right answer
        os._exit(0 if one(0) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_bitset_of_keys_beyond_the_key_space_writes_nothing_outside():
    """Keys come from index files: one past the key space is left out, never written out of bounds."""
    src = np.array([0, 5, 70_000, 2**32 - 1, 131_071, 131_072], dtype=np.uint32)
    runs = np.array([[0, 6]], dtype=np.int64)
    bm = BitMap.deserialize(_array_kernels.roaring_from_runs(src, runs, 131_072))
    assert bm == BitMap([0, 5, 70_000, 131_071])
    seen = np.array([9, 0, 9, 9, 9, 9], dtype=np.uint32)
    bm = BitMap.deserialize(_array_kernels.roaring_from_runs(src, runs, 131_072, np.array([5]), seen, 1))
    assert bm == BitMap([0, 70_000, 131_071])


@contextlib.contextmanager
def simd_capped(level):
    """The array kernels limited to x86 vector ``level`` (0 none, 1 AVX2, 2 AVX-512BW; the CPU's
    own level still bounds it), restored after."""
    _array_kernels.simd_level(level)
    try:
        yield
    finally:
        _array_kernels.simd_level(2)


def _group_ref(keys, device_id, app):
    """Plain NumPy grouping by app (stable): (ids, keys, starts)."""
    codes = app[keys].view(np.uint8)
    order = np.argsort(codes, kind="stable")
    return (device_id[keys[order]], keys[order],
            np.r_[0, np.cumsum(np.bincount(codes, minlength=256))])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), n_rows=st.integers(0, 5000),
       cut=st.one_of(st.integers(0, 11), st.sampled_from(EDGE_SEEN.tolist())),
       rows_are_keys=st.booleans(), edges=st.booleans(), fresh=st.booleans(), negative=st.booleans(),
       top=st.one_of(st.none(), st.integers(0, 12), st.sampled_from([2**18, 2**32 - 1])),
       ncodes=st.sampled_from([0, 1, 3, 5, 6, 48, 49]), level=st.sampled_from([0, 1, 2]))
def test_group_runs_by_app_matches_numpy(seed, n_rows, cut, rows_are_keys, edges, fresh, negative, top,
                                         ncodes, level):
    """Straight from a query's runs (fresh runs dropping rows below the cut-off second) to the grouping
    of the rows they hold: every fresh row of every run is there once, no stale row of a fresh run.
    With a coarse last-seen (any top: 4 s steps, so most rows share the cut-off's step) the same.
    Counted per app by vector compares (each level this CPU has) or row by row, and with an app
    count too small for the codes present (3, or negative codes), which the rows must still count."""
    with simd_capped(level):
        _check_group_runs(seed, n_rows, cut, rows_are_keys, edges, fresh, negative, top, ncodes)


def _check_group_runs(seed, n_rows, cut, rows_are_keys, edges, fresh, negative, top, ncodes):
    rng = np.random.default_rng(seed)
    seen = rng.integers(0, 11, n_rows).astype(np.uint32)
    if edges:
        seen = rng.choice(np.r_[EDGE_SEEN, np.arange(11, dtype=np.uint32)], n_rows)
    runs, kept = _fresh_runs(rng, n_rows, seen, cut)
    if not fresh:   # plain runs only (an unfiltered query, or an app filter)
        kept = None
    app = rng.integers(0, 5, n_rows).astype(np.int8)
    if negative:
        app = (app.astype(np.int16) - 3).astype(np.int8)
    keys = None if rows_are_keys else rng.permutation(n_rows).astype(np.uint32)
    device_id = rng.integers(0, 2**64 - 1, max(n_rows, 1), dtype=np.uint64)
    rows = (_rows_ref(runs, kept, seen, cut) if kept is not None else
            np.concatenate([np.arange(s, e) for s, e in runs]) if len(runs) else np.empty(0, np.int64))
    coarse = None if top is None or kept is None else _kernels.coarse_seen(seen, top)
    ids, ks, starts = _array_kernels.group_runs_by_app(keys, runs, kept, seen if kept is not None else None,
                                                       cut, app, device_id, coarse, top or 0, ncodes)
    order = np.argsort(app[rows].view(np.uint8), kind="stable")
    want_keys = (rows if keys is None else keys[rows])[order].astype(np.uint32)
    np.testing.assert_array_equal(ks, want_keys)
    np.testing.assert_array_equal(ids, device_id[want_keys])
    np.testing.assert_array_equal(starts, np.r_[0, np.cumsum(np.bincount(app[rows].view(np.uint8),
                                                                          minlength=256))])
    if kept is not None and n_rows:   # both directions against the seen column itself
        fresh_rows = np.zeros(n_rows, bool)
        fresh_rows[rows] = True
        in_fresh = np.zeros(n_rows, bool)
        for (s, e), k in zip(runs, kept):
            if k < e - s:
                in_fresh[s:e] = True
        assert np.all(seen[fresh_rows & in_fresh] >= cut)
        assert not np.any(in_fresh & ~fresh_rows & (seen >= cut))


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("total", [1 << 19, (1 << 21) + 17])   # on one core, then split over cores
def test_group_runs_by_app_split_over_cores_matches_numpy(total, level):
    with simd_capped(level):
        _check_group_runs_split(total)


def _check_group_runs_split(total):
    rng = np.random.default_rng(total)
    seen = rng.integers(0, 4, total + 5000).astype(np.uint32)
    edges = np.sort(rng.choice(np.arange(1, total + 5000), 4000, replace=False)).reshape(-1, 2)
    runs = np.ascontiguousarray(edges.astype(np.int64))
    kept = np.array([(seen[s:e] >= 2).sum() for s, e in runs], dtype=np.int64)
    kept = np.where(np.arange(len(runs)) % 3 == 0, runs[:, 1] - runs[:, 0], kept)
    keep = kept > 0
    runs, kept = np.ascontiguousarray(runs[keep]), np.ascontiguousarray(kept[keep])
    app = rng.integers(0, 25, total + 5000).astype(np.int8)
    device_id = rng.integers(0, 2**63, total + 5000, dtype=np.uint64)
    rows = _rows_ref(runs, kept, seen, 2)
    app[rng.integers(0, total + 5000, 3)] = 30     # three rows beyond 25 codes: their chunks count by row
    for keys, ncodes in ((None, 25), (rng.permutation(total + 5000).astype(np.uint32), 31), (None, 0)):
        ids, ks, starts = _array_kernels.group_runs_by_app(keys, runs, kept, seen, 2, app, device_id,
                                                           None, 0, ncodes)
        codes = app[rows].view(np.uint8)     # app is by row (the index's column), the ids by key
        want = (rows if keys is None else keys[rows]).astype(np.uint32)[np.argsort(codes, kind="stable")]
        np.testing.assert_array_equal(ks, want)
        np.testing.assert_array_equal(ids, device_id[want])
        np.testing.assert_array_equal(starts, np.r_[0, np.cumsum(np.bincount(codes, minlength=256))])


def test_large_groupings_write_into_arrow_pool_memory_that_is_reused():
    """From 32 MiB up the ids come from pyarrow's pool, which hands back what the last grouping
    freed (not zeroed): every slot is still written, and the answer is numpy's each time."""
    rng = np.random.default_rng(7)
    n = (1 << 22) + 1000            # 33.6 MB of ids
    space = n + 5000
    device_id = rng.integers(0, 2**63, space, dtype=np.uint64)
    app = rng.integers(0, 25, space).astype(np.int8)
    keys = rng.permutation(space)[:n].astype(np.uint32)
    codes = app[keys].view(np.uint8)
    order = np.argsort(codes, kind="stable")
    runs = np.array([[0, space]], dtype=np.int64)
    for attempt in range(2):
        ids, ks, starts = _array_kernels.group_by_app(keys, device_id, app)
        assert isinstance(ids.base, pa.Buffer)
        np.testing.assert_array_equal(ks, keys[order])
        np.testing.assert_array_equal(ids, device_id[keys[order]])
        ids, ks, starts = _array_kernels.group_runs_by_app(None, runs, None, None, 0, app, device_id)
        want = np.argsort(app.view(np.uint8), kind="stable").astype(np.uint32)
        np.testing.assert_array_equal(ks, want)
        np.testing.assert_array_equal(ids, device_id[want])
        del ids, ks


def test_group_runs_by_app_rejects_runs_outside_the_columns():
    runs = np.array([[0, 4]], dtype=np.int64)
    app, seen, ids = np.zeros(4, np.int8), np.zeros(4, np.uint32), np.zeros(4, np.uint64)
    with pytest.raises(ValueError):
        _array_kernels.group_runs_by_app(None, np.array([[0, 5]], dtype=np.int64), None, None, 0, app, ids)
    with pytest.raises(ValueError):
        _array_kernels.group_runs_by_app(None, runs, np.array([5]), seen, 0, app, ids)
    with pytest.raises(ValueError):
        _array_kernels.group_runs_by_app(None, runs, np.array([1, 1]), seen, 0, app, ids)
    with pytest.raises(ValueError):
        _array_kernels.group_runs_by_app(np.zeros(3, np.uint32), runs, None, None, 0, app, ids)


@st.composite
def roaring_sets(draw):
    """Key sets that give array, bitmap and run containers, and container edges."""
    parts = draw(st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["one", "run", "dense", "sparse"])),
                          max_size=8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    keys = [np.empty(0, np.uint32)]
    for c, form in parts:
        base = c << 16
        if form == "one":
            keys.append(np.array([base + draw(st.sampled_from([0, 1, 65_535]))], np.uint32))
        elif form == "run":
            s = int(rng.integers(0, 60_000))
            keys.append(np.arange(base + s, base + s + int(rng.integers(1, 5536)), dtype=np.uint32))
        elif form == "dense":     # > 4096 scattered keys: a bitmap container
            keys.append((base + rng.choice(65_536, int(rng.integers(4097, 30_000)), replace=False)).astype(np.uint32))
        else:
            keys.append((base + rng.choice(65_536, int(rng.integers(1, 4096)), replace=False)).astype(np.uint32))
    return np.unique(np.concatenate(keys)), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(case=roaring_sets(), seed=st.integers(0, 2**31))
def test_group_bitmap_by_app_matches_numpy(case, seed):
    keys, optimise = case
    bm = BitMap(keys)
    if optimise:
        bm.run_optimize()
    rng = np.random.default_rng(seed)
    space = int(keys.max()) + 1 if keys.size else 1
    device_id = rng.integers(0, 2**64 - 1, space, dtype=np.uint64)
    app = (rng.integers(0, 7, space) - 3).astype(np.int8)
    ids, ks, starts = _array_kernels.group_bitmap_by_app(bm.serialize(), device_id, app)
    want = _group_ref(keys, device_id, app)
    np.testing.assert_array_equal(ks, want[1])      # every key once, each app's keys ascending
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(starts, want[2])


def test_group_bitmap_by_app_split_over_cores_and_bad_bytes():
    rng = np.random.default_rng(1)
    n = 3_000_000
    keys = np.unique(np.r_[rng.choice(n, 900_000, replace=False), np.arange(1_000_000, 1_400_000)]).astype(np.uint32)
    bm = BitMap(keys)
    bm.run_optimize()
    device_id = rng.integers(0, 2**63, n, dtype=np.uint64)
    app = rng.integers(0, 25, n).astype(np.int8)
    ids, ks, starts = _array_kernels.group_bitmap_by_app(bm.serialize(), device_id, app)
    want = _group_ref(keys, device_id, app)
    np.testing.assert_array_equal(ks, want[1])
    np.testing.assert_array_equal(ids, want[0])
    blob = bm.serialize()
    for bad in (blob[:3], blob[:len(blob) // 2], b"\x00" * 16):
        with pytest.raises(ValueError):
            _array_kernels.group_bitmap_by_app(bad, device_id, app)
    with pytest.raises(ValueError):   # a key past the columns
        _array_kernels.group_bitmap_by_app(BitMap([5, n]).serialize(), device_id, app)
    with pytest.raises(ValueError):   # a run container whose runs disagree with its cardinality
        r = BitMap(np.arange(100, 200))
        r.run_optimize()
        bad = bytearray(r.serialize())
        bad[-2:] = (500).to_bytes(2, "little")
        _array_kernels.group_bitmap_by_app(bytes(bad), device_id, app)


@pytest.mark.parametrize("shuffled,base", [(False, BASE), (True, 2**31 - 50)])
def test_fresh_counts_shared_over_cores_match_the_scan(shuffled, base):
    """Over a million rows in fresh runs: the query counts them over the cores before its second
    pass (gt_fresh.hpp).  Both directions against the scan, cut-offs on exact seconds, the u32
    clock's top bit straddled, and a cut-off at 0 (1970) that keeps everything."""
    store = _world(1_500_000, 9, shuffled, base=base)
    index = gt.SpatialIndex.build(store)
    for cut in (-base, 0, 37, 99, 100):
        since = dt.datetime.fromtimestamp(base + cut, UTC)
        ref = within_reference(store, 31.0, 121.0, 1500.0, seen_since=since)
        aud = index.within(31.0, 121.0, 1500.0, seen_since=since)
        if cut in (37, 99):   # the shared path ran: over 2^20 rows in fresh runs
            lengths = aud._runs[:, 1] - aud._runs[:, 0]
            assert lengths[aud._kept < lengths].sum() > 1 << 20
        assert index.count(31.0, 121.0, 1500.0, seen_since=since) == len(aud) == len(ref)
        np.testing.assert_array_equal(aud.keys(), ref)
        assert np.all(store.last_seen_s[ref] >= max(base + cut, 0))


@pytest.mark.parametrize("shuffled", [False, True])
def test_fresh_items_counted_beside_the_leaf_tests_leave_the_runs_of_one_thread(shuffled):
    """From 2^18 rows in fresh items up, helpers count them while the calling thread tests the
    boundary leaves and leaves the fresh runs open (_settle_fresh).  Last-seen in blocks of rows
    (all stale, all fresh, mixed), so that whole pieces keep no row or every row: the runs must be
    the ones a single pass writes (no empty run, plain runs joined where they touch, each fresh
    run's count its rows at or after the cut-off) and hold exactly the scan's devices."""
    n = 900_000
    store = _world(n, 4, shuffled)
    rows = np.empty(n, np.int64)
    rows[gt.SpatialIndex.build(store).keys] = np.arange(n)          # each key's row in leaf order
    block = (rows // 10_000) % 3
    rng = np.random.default_rng(5)
    seen = np.where(block == 0, BASE + 90, np.where(block == 1, BASE + 10, BASE + rng.integers(0, 100, n)))
    store = _world_seen(store, seen, shuffled)
    index = gt.SpatialIndex.build(store)
    np.testing.assert_array_equal(index.seen, seen[index.keys])       # the same leaf order
    for cut in (10, 11, 50, 90, 91):
        since = dt.datetime.fromtimestamp(BASE + cut, UTC)
        ref = within_reference(store, 31.0, 121.0, 900.0, seen_since=since)
        aud = index.within(31.0, 121.0, 900.0, seen_since=since)
        runs, kept = aud._runs, aud._kept
        lengths = runs[:, 1] - runs[:, 0]
        fresh = kept < lengths
        if 11 <= cut <= 90:
            assert lengths[fresh].sum() >= 1 << 18                     # the shared path ran
        assert np.all(kept > 0) and np.all(runs[1:, 0] >= runs[:-1, 1])
        touching = (runs[1:, 0] == runs[:-1, 1]) & ~fresh[:-1] & ~fresh[1:]
        assert not touching.any(), "two plain runs left apart"
        for (s, e), k in zip(runs[fresh], kept[fresh]):
            assert k == np.count_nonzero(index.seen[s:e] >= BASE + cut)
        assert len(aud) == kept.sum() == len(ref) == index.count(31.0, 121.0, 900.0, seen_since=since)
        np.testing.assert_array_equal(aud.keys(), ref)


def _world_seen(store, seen, shuffled):
    """``store`` with its last-seen replaced (same rows, same order)."""
    ids, lat, lon = store.device_id, store.lat, store.lon
    codes = np.asarray(store.app_codes)
    if shuffled:
        return gt.DeviceStore(ids, lat, lon, codes, store.app_names, seen.astype(np.int64))
    return gt.DeviceStore.from_arrays(ids, lat, lon, app=np.asarray(store.app_names)[codes], last_seen=seen)


def _coarse_ref(seen, top):
    d = (np.int64(top) - seen.astype(np.int64)) >> _kernels.COARSE_SHIFT
    return np.where(seen >= top, 65535, 65535 - np.minimum(65535, d)).astype(np.uint16)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.sampled_from([0, 1, 31, 32, 33, 64, 1000, 20_000, (32 << 12) + 65]),
       spread=st.sampled_from([1, 8, 3600, 3 * 86400, 2**32 - 1]), base=st.sampled_from([0, BASE, 2**31 - 50]),
       top_shift=st.integers(-5 * 86400, 86400), pick=st.integers(0, 2**31), delta=st.sampled_from([-4, -1, 0, 1, 4]))
def test_coarse_last_seen_counts_equal_the_scan(seed, n, spread, base, top_shift, pick, delta):
    """The coarse last-seen (2 B a row, 4 s steps) counts exactly what a scan of the 4 B column
    counts, both ways (kept and dropped), whatever top is; cut-offs on exact seconds of rows and
    one or four seconds either side, the u32 clock's edges and the top bit straddled."""
    rng = np.random.default_rng(seed)
    seen = (np.int64(base) + rng.integers(0, spread, n, endpoint=True)).clip(0, 2**32 - 1).astype(np.uint32)
    if n > 40:
        seen[rng.integers(0, n, 7)] = EDGE_SEEN
    newest = int(seen.max()) if n else base
    top = int(np.clip(newest + top_shift, 0, 2**32 - 1))
    coarse = _kernels.coarse_seen(seen, top)
    np.testing.assert_array_equal(coarse, _coarse_ref(seen, top))
    at = int(seen[pick % n]) if n else base
    for cut in {at + delta, at, top, newest, 0, 2**32 - 1}:
        cut = int(np.clip(cut, 0, 2**32 - 1))
        want = int(np.count_nonzero(seen >= cut))
        got = _kernels.fresh_count(seen, cut, coarse, top)
        assert got == want == _kernels.fresh_count(seen, cut)
        assert n - got == int(np.count_nonzero(seen < cut))   # nothing kept that is stale
        if n:   # monotone: a row above the cut-off's value is fresh, one below it stale
            qc = _coarse_ref(np.array([cut], np.uint32), top)[0]
            assert np.all(seen[coarse > qc] >= cut) and np.all(seen[coarse < qc] < cut)


@pytest.mark.parametrize("spread_h,age_h", [(72, 24), (72, 6), (200, 100), (1, 0)])
def test_queries_count_with_the_coarse_last_seen(spread_h, age_h):
    """A query that filters by last-seen counts through the coarse values (made on first use, for
    the verified column) and gets the scan's answer; cut-offs on exact seconds and either side."""
    rng = np.random.default_rng(spread_h)
    n = 1_200_000
    top = BASE + spread_h * 3600
    ids = rng.permutation(np.arange(n, dtype=np.uint64) * 7919 + 11)
    store = gt.DeviceStore(ids, np.clip(rng.normal(31.0, 3.0, n), -90, 90), rng.normal(121.0, 3.0, n),
                           rng.integers(0, 3, n).astype(np.int8), ("amap", "qq", "weibo"),
                           rng.integers(BASE, top, n, endpoint=True).astype(np.int64))
    index = gt.SpatialIndex.build(store)
    assert index.seen_coarse is None
    index.count(31.0, 121.0, 100.0)                    # unfiltered: no coarse values made
    assert index.seen_coarse is None
    at = int(store.last_seen_s[rng.integers(0, n)])
    for cut in (top - age_h * 3600, at - 1, at, at + 1, top, top + 1):
        since = dt.datetime.fromtimestamp(cut, UTC)
        for r in (50.0, 400.0, 3000.0):
            ref = within_reference(store, 31.0, 121.0, r, seen_since=since)
            assert index.count(31.0, 121.0, r, seen_since=since) == len(ref)
            np.testing.assert_array_equal(index.within(31.0, 121.0, r, seen_since=since).keys(), ref)
    np.testing.assert_array_equal(index.seen_coarse, _coarse_ref(index.seen, int(index.seen_bounds[0, 1])))
    assert index.nbytes_with_filters >= index.nbytes + 2 * n
