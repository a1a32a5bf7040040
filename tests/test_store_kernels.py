"""The store-generation kernels against their NumPy references (hypothesis + adversarial cases)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geotarget import _store_kernels as sk

U64_MAX = 2**64 - 1
# ids near the ends of the uint64 range and around the int64 sign bit, where
# signed/unsigned mix-ups and overflowing midpoints would show
EXTREMES = [0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**63 + 1, U64_MAX - 1, U64_MAX]


@st.composite
def id_sets(draw, max_n=300):
    """A sorted array of uint64 ids drawn in one of several adversarial shapes."""
    n = draw(st.integers(0, max_n))
    mode = draw(st.sampled_from(["wide", "dense", "extremes", "equal", "equal-but-one", "clustered"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "wide":
        a = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    elif mode == "dense":
        a = rng.integers(0, max(1, n // 2), n).astype(np.uint64) + np.uint64(draw(st.sampled_from([0, 2**63, U64_MAX - 1000])))
    elif mode == "extremes":
        a = rng.choice(np.array(EXTREMES, dtype=np.uint64), n)
    elif mode == "equal":
        a = np.full(n, draw(st.sampled_from(EXTREMES)), dtype=np.uint64)
    elif mode == "equal-but-one":
        a = np.full(n, draw(st.sampled_from(EXTREMES)), dtype=np.uint64)
        if n:
            a[rng.integers(n)] = draw(st.sampled_from(EXTREMES))
    else:
        centres = rng.integers(0, 2**64 - 2**20, 3, dtype=np.uint64)
        a = rng.choice(centres, n) + rng.integers(0, 50, n).astype(np.uint64)
    return np.sort(a)


def lookup_reference(sorted_ids, keys, queries):
    pos = np.searchsorted(sorted_ids, queries)
    ok = pos < len(sorted_ids)
    ok[ok] = sorted_ids[pos[ok]] == queries[ok]
    if len(keys) == 0:
        return np.full(len(queries), -1, dtype=np.int64)
    return np.where(ok, keys[np.minimum(pos, len(keys) - 1)].astype(np.int64), -1)


def merge_reference(a_ids, a_keys, b_ids, b_keys):
    ids = np.concatenate([a_ids, b_ids])
    o = np.argsort(ids, kind="stable")
    return ids[o], np.concatenate([a_keys, b_keys])[o]


def _lookup(sorted_ids, keys, queries):
    out = np.empty(len(queries), dtype=np.int64)
    sk.lookup_sorted(sorted_ids, keys, queries, out)
    return out


def _merge(a_ids, a_keys, b_ids, b_keys):
    out_ids = np.empty(len(a_ids) + len(b_ids), dtype=np.uint64)
    out_keys = np.empty(len(a_ids) + len(b_ids), dtype=np.uint32)
    sk.merge_sorted(a_ids, a_keys, b_ids, b_keys, out_ids, out_keys)
    return out_ids, out_keys


@settings(max_examples=300, deadline=None)
@given(id_sets(), id_sets(), st.booleans())
def test_lookup_sorted_matches_searchsorted(index_ids, queries, mix):
    # the index of a store holds each id once; queries may repeat and may overlap it
    index_ids = np.unique(index_ids)
    if mix and len(index_ids):
        queries = np.sort(np.concatenate([queries, index_ids[::3]]))
    keys = np.random.default_rng(len(index_ids)).permutation(len(index_ids)).astype(np.uint32)
    np.testing.assert_array_equal(_lookup(index_ids, keys, queries), lookup_reference(index_ids, keys, queries))


@settings(max_examples=300, deadline=None)
@given(id_sets(), id_sets())
def test_merge_sorted_matches_stable_argsort(a_ids, b_ids):
    a_keys = np.arange(len(a_ids), dtype=np.uint32)
    b_keys = (np.arange(len(b_ids)) + 10**6).astype(np.uint32)  # tells a's rows from b's on ties
    got = _merge(a_ids, a_keys, b_ids, b_keys)
    want = merge_reference(a_ids, a_keys, b_ids, b_keys)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_lookup_uses_both_threads_on_large_inputs_and_agrees():
    """Above 65,536 queries the work is split between threads; each slice finds its own start."""
    rng = np.random.default_rng(0)
    index_ids = np.unique(rng.integers(0, 2**64, 400_000, dtype=np.uint64, endpoint=False))
    keys = rng.permutation(len(index_ids)).astype(np.uint32)
    queries = np.sort(np.concatenate([rng.choice(index_ids, 150_000, replace=False),
                                      rng.integers(0, 2**64, 50_000, dtype=np.uint64, endpoint=False),
                                      np.array(EXTREMES, dtype=np.uint64)]))
    np.testing.assert_array_equal(_lookup(index_ids, keys, queries), lookup_reference(index_ids, keys, queries))


@pytest.mark.parametrize("case", ["both empty", "a empty", "b empty", "one each, equal", "b before all",
                                  "b after all", "all equal", "uint64 extremes"])
def test_merge_sorted_edge_cases(case):
    E = np.array(EXTREMES, dtype=np.uint64)
    a, b = {
        "both empty": ([], []), "a empty": ([], [3, 4]), "b empty": ([1, 2], []),
        "one each, equal": ([7], [7]), "b before all": ([10, 11, 12], [0, 1]),
        "b after all": ([0, 1], [U64_MAX - 1, U64_MAX]), "all equal": ([5] * 4, [5] * 3),
        "uint64 extremes": (E[::2], E[1::2]),
    }[case]
    a, b = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    ak, bk = np.arange(len(a), dtype=np.uint32), np.arange(len(b), dtype=np.uint32) + 100
    got, want = _merge(a, ak, b, bk), merge_reference(a, ak, b, bk)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("case", ["empty index", "empty queries", "one of one", "one missing",
                                  "below and above every id", "uint64 extremes"])
def test_lookup_sorted_edge_cases(case):
    E = np.array(EXTREMES, dtype=np.uint64)
    index_ids, queries = {
        "empty index": ([], [1, 2]), "empty queries": ([1, 2], []), "one of one": ([9], [9]),
        "one missing": ([9], [8]), "below and above every id": ([5, 6], [0, 4, 7, U64_MAX]),
        "uint64 extremes": (E[1::2], E),
    }[case]
    index_ids, queries = np.array(index_ids, dtype=np.uint64), np.array(queries, dtype=np.uint64)
    keys = (np.arange(len(index_ids)) * 3).astype(np.uint32)
    np.testing.assert_array_equal(_lookup(index_ids, keys, queries), lookup_reference(index_ids, keys, queries))


def test_kernels_refuse_mismatched_lengths_and_read_only_memmaps_work(tmp_path):
    ids = np.arange(10, dtype=np.uint64)
    with pytest.raises(ValueError):
        sk.lookup_sorted(ids, np.zeros(9, np.uint32), ids, np.empty(10, np.int64))
    with pytest.raises(ValueError):
        sk.merge_sorted(ids, np.zeros(10, np.uint32), ids, np.zeros(10, np.uint32),
                        np.empty(19, np.uint64), np.empty(20, np.uint32))
    np.save(tmp_path / "ids.npy", ids)
    mm = np.load(tmp_path / "ids.npy", mmap_mode="r")   # what a store opened from disk passes
    keys = np.arange(10, dtype=np.uint32)
    keys.flags.writeable = False
    np.testing.assert_array_equal(_lookup(mm, keys, mm), np.arange(10))
    got = _merge(mm, keys, mm[:0], keys[:0])
    np.testing.assert_array_equal(got[0], ids)
