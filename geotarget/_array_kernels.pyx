# cython: language_level=3
# distutils: language = c++
"""Compiled kernels for arrays of keys and ids: materialising audiences
(gathers of row runs, or the runs themselves when index rows are keys),
gathers by key, radix and id sorts, and runs of consecutive keys.

Every kernel names its NumPy equivalent in its docstring; ``tests/test_kernels.py``
compares the two on hypothesis-generated and adversarial inputs.
"""

import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int8_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from geotarget._geom cimport gt_max_threads

cnp.import_array()

cdef extern from "gt_arrays.hpp" nogil:
    void gt_sort_ids(const uint64_t* ids, int64_t n, uint64_t* out_ids, uint32_t* out_rows)
    void gt_fill_rows(const int64_t* runs, const int64_t* offsets, int64_t k, int64_t total, int nt, uint32_t* out)
    void gt_gather_runs_u32(const uint32_t* src, const int64_t* runs, const int64_t* offsets, int64_t k,
                            int64_t total, int nt, uint32_t* out)
    void gt_radix_sort[T](T* a, int64_t n, T* tmp)

# Below this many elements a gather runs on the calling thread.  A parallel
# region ends at a barrier, so on a busy machine it waits for the OS to
# schedule the second thread: measured 7 ms instead of 0.35 ms for a 580 k-key
# fill.  4 M keys copy in ~1.5 ms on one core; only larger copies (the 90 M
# audience at 400 M devices) are worth that risk.
DEF PARALLEL_MIN = 1 << 22


#: From this many keys up an audience is materialised on every core.
DEF RUNS_PARALLEL_MIN = 1 << 19


def gather_runs_u32(const uint32_t[::1] src, const int64_t[:, ::1] runs,
                    const int64_t[::1] offsets, uint32_t[::1] out):
    """Copy ``src[s:e]`` for every run into ``out`` back to back.

    ``offsets[i]`` is where run i starts in ``out`` (an exclusive cumsum of
    run lengths); the output is split evenly over the cores.  In numpy, this
    operation is equivalent to
    ``out[:total] = np.concatenate([src[s:e] for s, e in runs])``.
    """
    cdef Py_ssize_t k = runs.shape[0]
    cdef int64_t total = offsets[k - 1] + runs[k - 1, 1] - runs[k - 1, 0] if k else 0
    if total == 0:
        return
    with nogil:
        gt_gather_runs_u32(&src[0], &runs[0, 0], &offsets[0], k, total,
                           gt_max_threads() if total >= RUNS_PARALLEL_MIN else 1, &out[0])


def fill_rows(const int64_t[:, ::1] runs, const int64_t[::1] offsets, uint32_t[::1] out):
    """Write the row numbers of every run into ``out`` back to back (``gather_runs_u32`` when keys are rows).

    When an index's rows are its keys (a first generation ingested in one
    batch), materialising an audience needs no source array: this writes
    ``s, s+1, ..., e-1`` for each run, half the memory traffic of a copy.  In
    numpy, this operation is equivalent to
    ``out[:total] = np.concatenate([np.arange(s, e) for s, e in runs])``.
    """
    cdef Py_ssize_t k = runs.shape[0]
    cdef int64_t total = offsets[k - 1] + runs[k - 1, 1] - runs[k - 1, 0] if k else 0
    if total == 0:
        return
    with nogil:
        gt_fill_rows(&runs[0, 0], &offsets[0], k, total,
                     gt_max_threads() if total >= RUNS_PARALLEL_MIN else 1, &out[0])


def is_iota(const uint32_t[::1] keys):
    """Whether ``keys[i] == i`` for every i (an index whose rows are its keys).

    In numpy, this operation is equivalent to
    ``bool(np.array_equal(keys, np.arange(keys.size)))``.
    """
    cdef Py_ssize_t i, n = keys.shape[0]
    cdef int64_t bad = 0
    with nogil:
        for i in prange(n, schedule="static"):
            if keys[i] != <uint32_t>i:
                bad += 1
    return bad == 0


ctypedef fused gather_t:
    cnp.uint64_t
    cnp.int64_t
    double
    cnp.int8_t
    cnp.uint32_t


ctypedef fused index_t:
    cnp.int64_t
    cnp.uint32_t


def take(const gather_t[::1] src, const index_t[::1] idx, gather_t[::1] out):
    """``out[i] = src[idx[i]]`` over both cores (indices must be in range).

    In numpy, this operation is equivalent to ``np.take(src, idx, out=out)``.
    """
    cdef Py_ssize_t i, n = idx.shape[0]
    with nogil:
        if n < PARALLEL_MIN:
            for i in range(n):
                out[i] = src[idx[i]]
        else:
            for i in prange(n, schedule="static"):
                out[i] = src[idx[i]]


def sort_ids(const cnp.uint64_t[::1] ids):
    """Sort device ids and carry their row numbers: ``(sorted_ids, rows)``.

    In numpy, this operation is equivalent to
    ``rows = np.argsort(ids, kind="stable"); sorted_ids = ids[rows]``.
    """
    cdef Py_ssize_t n = ids.shape[0]
    sorted_ids = np.empty(n, dtype=np.uint64)
    rows = np.empty(n, dtype=np.uint32)
    cdef cnp.uint64_t[::1] so = sorted_ids
    cdef uint32_t[::1] ro = rows
    if n:
        with nogil:
            gt_sort_ids(&ids[0], n, &so[0], &ro[0])
    return sorted_ids, rows


ctypedef fused sortable_t:
    cnp.uint32_t
    cnp.uint64_t


def sort_inplace(sortable_t[::1] a):
    """Sort device keys or ids in place (LSD radix sort, one scratch buffer).

    In numpy, this operation is equivalent to ``a.sort()``.
    """
    cdef Py_ssize_t n = a.shape[0]
    if n < 2:
        return
    tmp = np.empty(n, dtype=np.uint32 if sortable_t is cnp.uint32_t else np.uint64)
    cdef sortable_t[::1] t = tmp
    with nogil:
        gt_radix_sort(&a[0], n, &t[0])


def gather_seen(const cnp.int64_t[::1] last_seen, const uint32_t[::1] keys, uint32_t[::1] out):
    """Last-seen seconds per leaf-ordered row, clipped to the uint32 clock (1970..2106).

    In numpy, this operation is equivalent to
    ``out[:] = np.clip(last_seen[keys], 0, 2**32 - 1)``.
    """
    cdef Py_ssize_t i, n = keys.shape[0]
    cdef cnp.int64_t v
    cdef cnp.int64_t top = 4294967295  # the u32 clock ends in 2106
    with nogil:
        for i in prange(n, schedule="static"):
            v = last_seen[keys[i]]
            if v < 0:
                v = 0
            elif v > top:
                v = top
            out[i] = <uint32_t>v


cdef inline bint _run_breaks(const uint32_t* k, Py_ssize_t i) noexcept nogil:
    """Does a new run of consecutive keys start at ``k[i]``?  (``k + 1`` wraps at the key space's end.)"""
    return k[i] != k[i - 1] + 1 or k[i - 1] == 0xFFFFFFFFu


cdef Py_ssize_t _count_runs(const uint32_t[::1] keys, bint* ascending) noexcept nogil:
    cdef Py_ssize_t i, m = 0, n = keys.shape[0]
    cdef bint up = True
    for i in range(1, n):
        if _run_breaks(&keys[0], i):
            m += 1
        if keys[i] <= keys[i - 1]:
            up = False
    ascending[0] = up
    return m + 1 if n else 0


def count_runs(const uint32_t[::1] keys):
    """``(runs, ascending)``: how many maximal runs of consecutive keys, and whether keys strictly ascend.

    In numpy, this operation is equivalent to::

        d = np.diff(keys.astype(np.int64))
        (int(keys.size > 0) + int(np.count_nonzero(d != 1)), bool(np.all(d > 0)))
    """
    cdef bint up
    cdef Py_ssize_t m
    with nogil:
        m = _count_runs(keys, &up)
    return m, bool(up)


def consecutive_ranges(const uint32_t[::1] keys):
    """Maximal runs of consecutive ascending keys, as int64 ``(m, 2)`` ``[start, end)``.

    In numpy, this operation is equivalent to::

        cut = np.flatnonzero(np.diff(keys.astype(np.int64)) != 1) + 1
        starts = keys[np.r_[0, cut]]; ends = keys[np.r_[cut - 1, len(keys) - 1]] + 1
    """
    cdef Py_ssize_t i, m, n = keys.shape[0]
    cdef bint up
    with nogil:
        m = _count_runs(keys, &up)
    out = np.empty((m, 2), dtype=np.int64)
    cdef cnp.int64_t[:, ::1] o = out
    cdef Py_ssize_t j = 0
    if n:
        with nogil:
            o[0, 0] = keys[0]
            for i in range(1, n):
                if _run_breaks(&keys[0], i):
                    o[j, 1] = <cnp.int64_t>keys[i - 1] + 1
                    j += 1
                    o[j, 0] = keys[i]
            o[j, 1] = <cnp.int64_t>keys[n - 1] + 1
    return out


# ---------------------------------------------------------------------------
# roaring bitmaps from key runs
# ---------------------------------------------------------------------------

cdef extern from "gt_arrays.hpp" nogil:
    ctypedef struct GtContainer:
        int64_t card
        int64_t runs
        int64_t bytes
        int64_t kind
    void gt_container_sizes(const uint64_t* w, int64_t nc, GtContainer* c)
    void gt_container_write(const uint64_t* b, const GtContainer& c, uint8_t* out)
    void gt_put16(uint8_t* p, uint32_t v)
    void gt_put32(uint8_t* p, uint32_t v)


def roaring_from_runs(const uint32_t[::1] src, const int64_t[:, ::1] runs, int64_t key_space):
    """Roaring portable serialisation (bytes) of the keys ``src[s:e]`` of every run, all below ``key_space``.

    For audiences whose keys are not runs of rows (a chunked ingest, a later
    generation): the keys are set in a dense bitset, each core owning one
    stretch of the key space, and the bitset is written container by
    container in the form ``run_optimize`` would choose -- no sort.  In numpy,
    this operation is equivalent to::

        bm = BitMap(np.concatenate([src[s:e] for s, e in runs])); bm.run_optimize()
        bm.serialize()          # the same set; BitMap.deserialize gives an equal bitmap
    """
    cdef int64_t nw = ((key_space + 65535) >> 16) << 10 if key_space > 0 else 0
    cdef int64_t nc = nw >> 10
    words = np.zeros(max(nw, 1), dtype=np.uint64)
    cdef uint64_t[::1] w = words
    cdef Py_ssize_t k = runs.shape[0], i
    cdef int nt = gt_max_threads()
    cdef int t
    cdef int64_t r, lo, hi, key
    if k and nw:
        with nogil:
            for t in prange(nt, schedule="static", num_threads=nt):
                lo = (nw * t // nt) << 6          # this thread owns keys [lo, hi)
                hi = (nw * (t + 1) // nt) << 6
                for i in range(k):
                    for r in range(runs[i, 0], runs[i, 1]):
                        key = src[r]
                        if key >= lo and key < hi:
                            w[key >> 6] |= (<uint64_t>1) << (key & 63)
    cont = np.zeros((max(nc, 1), 4), dtype=np.int64)
    cdef int64_t[:, ::1] cv = cont
    if nc:
        with nogil:
            gt_container_sizes(&w[0], nc, <GtContainer*>&cv[0, 0])
    used = np.flatnonzero(cont[:nc, 0]).astype(np.int64)
    cdef int64_t m = used.shape[0]
    if m == 0:
        return b"\x3a\x30\x00\x00\x00\x00\x00\x00"   # cookie 12346, no containers: the empty bitmap
    cdef int64_t head = 4 + (m + 7) // 8 + 4 * m + (4 * m if m >= 4 else 0)
    body = cont[used, 2]
    offsets = np.full(m, head, dtype=np.int64)
    offsets[1:] += np.cumsum(body[:m - 1])
    out = np.zeros(head + int(body.sum()), dtype=np.uint8)
    cdef uint8_t[::1] o = out
    cdef int64_t[::1] uv = used, ov = offsets
    cdef int64_t j, c
    gt_put32(&o[0], 12347u | (<uint32_t>(m - 1) << 16))
    for j in range(m):
        c = uv[j]
        if cv[c, 3] == 2:
            o[4 + j // 8] |= <uint8_t>(1 << (j % 8))
        gt_put16(&o[4 + (m + 7) // 8 + 4 * j], <uint32_t>c)
        gt_put16(&o[4 + (m + 7) // 8 + 4 * j + 2], <uint32_t>(cv[c, 0] - 1))
        if m >= 4:
            gt_put32(&o[4 + (m + 7) // 8 + 4 * m + 4 * j], <uint32_t>ov[j])
    with nogil:
        for j in prange(m, schedule="dynamic"):
            c = uv[j]
            gt_container_write(&w[c << 10], (<GtContainer*>&cv[0, 0])[c], &o[ov[j]])
    return out.tobytes()
