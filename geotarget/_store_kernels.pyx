# cython: language_level=3
# distutils: language = c++
"""Compiled kernels for store generations: id lookups and id-index merges.

A new generation of 400 M devices is mostly the old one: 40 M rows change and
a few million ids are appended.  Both kernels here therefore walk two sorted
sequences of very different lengths together, and move forward through the
long one by *galloping* (exponential then binary search from the last
position) rather than one element at a time or by a fresh binary search per
element:

- when the short sequence is dense in the long one, a gallop is one or two
  comparisons, as cheap as a linear merge;
- when it is sparse, the gaps are skipped in O(log gap) and, in the merge, the
  skipped run of the long sequence is copied with ``memcpy``;
- the long sequence (a memory-mapped 3.2 GB ``id_sorted.npy`` at 400 M) is read
  front to back, so the page cache and the prefetcher see a stream.

The C++ is in ``geotarget/src/gt_store.hpp``.  The kernels are ``nogil`` and
assume clean input (contiguous, sorted where said); validation lives in
``geotarget/_store_checks.py`` and ``geotarget/store.py``.  Every kernel names its
NumPy equivalent in its docstring and ``tests/test_store_kernels.py`` compares
the two.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint32_t, uint64_t

cnp.import_array()

cdef extern from "gt_store.hpp" nogil:
    void gts_lookup_sorted(const uint64_t* ids, const uint32_t* keys, int64_t n,
                           const uint64_t* q, int64_t m, int64_t* out)
    void gts_merge(const uint64_t* a_ids, const uint32_t* a_keys, int64_t na,
                   const uint64_t* b_ids, const uint32_t* b_keys, int64_t nb,
                   uint64_t* o_ids, uint32_t* o_keys)


def lookup_sorted(const uint64_t[::1] sorted_ids, const uint32_t[::1] keys,
                  const uint64_t[::1] queries, int64_t[::1] out):
    """Key of each query id in an id index, -1 where absent, for queries in ascending order.

    ``sorted_ids`` is ascending and ``keys[i]`` is the key of ``sorted_ids[i]``;
    ``queries`` must be non-decreasing (the result is meaningless, but memory
    safe, if not).  Uses both cores for 65,536 queries or more.

    In numpy, this operation is equivalent to
    ``pos = np.searchsorted(sorted_ids, queries); ok = pos < len(sorted_ids);
    ok[ok] = sorted_ids[pos[ok]] == queries[ok];
    out[:] = np.where(ok, keys[np.minimum(pos, len(keys) - 1)], -1)``.
    """
    cdef int64_t n = sorted_ids.shape[0], m = queries.shape[0]
    if keys.shape[0] != n or out.shape[0] != m:
        raise ValueError("lookup_sorted: keys must match sorted_ids and out must match queries")
    if m == 0:
        return
    if n == 0:
        out[:] = -1
        return
    with nogil:
        gts_lookup_sorted(&sorted_ids[0], &keys[0], n, &queries[0], m, &out[0])


def merge_sorted(const uint64_t[::1] a_ids, const uint32_t[::1] a_keys,
                 const uint64_t[::1] b_ids, const uint32_t[::1] b_keys,
                 uint64_t[::1] out_ids, uint32_t[::1] out_keys):
    """Merge two ascending id runs, each carrying its keys, into ``out_ids`` / ``out_keys``.

    Stable: where ids tie, ``a``'s rows come first.  ``out_*`` hold exactly
    ``len(a_ids) + len(b_ids)`` elements.  Fast when ``b`` is short: runs of
    ``a`` between consecutive ``b`` ids are found by galloping and copied whole.

    In numpy, this operation is equivalent to
    ``ids = np.concatenate([a_ids, b_ids]); o = np.argsort(ids, kind="stable");
    out_ids[:] = ids[o]; out_keys[:] = np.concatenate([a_keys, b_keys])[o]``.
    """
    cdef int64_t na = a_ids.shape[0], nb = b_ids.shape[0]
    if a_keys.shape[0] != na or b_keys.shape[0] != nb:
        raise ValueError("merge_sorted: each id run needs one key per id")
    if out_ids.shape[0] != na + nb or out_keys.shape[0] != na + nb:
        raise ValueError(f"merge_sorted: outputs must hold {na + nb} elements")
    if na + nb == 0:
        return
    # Empty memoryviews have no element 0 to take the address of.
    cdef const uint64_t* pa = &a_ids[0] if na else NULL
    cdef const uint32_t* pak = &a_keys[0] if na else NULL
    cdef const uint64_t* pb = &b_ids[0] if nb else NULL
    cdef const uint32_t* pbk = &b_keys[0] if nb else NULL
    with nogil:
        gts_merge(pa, pak, na, pb, pbk, nb, &out_ids[0], &out_keys[0])
