# cython: language_level=3
# distutils: language = c++
"""Compiled kernels for arrays of keys and ids: materialising audiences
(gathers of row runs, or the runs themselves when index rows are keys),
gathers by key, radix and id sorts, and runs of consecutive keys.

Every kernel names its NumPy equivalent in its docstring; ``tests/test_kernels.py``
compares the two on hypothesis-generated and adversarial inputs.
"""

import numpy as np
import pyarrow as pa
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from geotarget._geom cimport GtFresh, __builtin_popcountll, gt_fresh_view, gt_max_threads
from geotarget._roaring cimport (RB_BITSET, RB_COOKIE_RUNS, RB_OFFSETS_FROM, RB_RUN, RbContainer, RbReader,
                                 rb_header_bytes, rb_next, rb_open, rb_u16)

cnp.import_array()

#: The portable roaring format's constants, for the Python writer (``audience._bitmap_from_ranges``):
#: one definition, in geotarget/_roaring.pxd.
ROARING_COOKIE_RUNS = RB_COOKIE_RUNS
ROARING_OFFSETS_FROM = RB_OFFSETS_FROM


cdef extern from "gt_arrays.hpp" nogil:
    void gt_sort_ids(const uint64_t* ids, int64_t n, uint64_t* out_ids, uint32_t* out_rows)
    void gt_fill_rows(const int64_t* runs, const int64_t* offsets, int64_t k, int64_t total, int nt, uint32_t* out)
    void gt_gather_runs_u32(const uint32_t* src, const int64_t* runs, const int64_t* offsets, int64_t k,
                            int64_t total, int nt, uint32_t* out)
    void gt_radix_sort[T](T* a, int64_t n, T* tmp)
    void gt_group_by_app(const uint32_t* keys, int64_t n, const uint64_t* device_id, const int8_t* app,
                         uint64_t* out_ids, uint32_t* out_keys, int64_t* starts, int nt)
    void gt_fill_fresh(const uint32_t* src, const int64_t* runs, const int64_t* kept, const int64_t* offsets,
                       int64_t k, int64_t total, const uint32_t* seen, uint32_t cut, int nt, uint32_t* out)
    int64_t gt_plain_runs(const int64_t* runs, const int64_t* kept, int64_t k, const uint32_t* seen,
                          uint32_t cut, int64_t* out)
    int __builtin_clzll(unsigned long long)
    void gt_group_bitmap_by_app(const uint8_t* buf, const int64_t* kind, const int64_t* card,
                                const int64_t* pos, const uint32_t* base, const int64_t* chunk_at,
                                int64_t nch, int64_t total, const uint64_t* device_id, const int8_t* app,
                                uint64_t* out_ids, uint32_t* out_keys, int64_t* starts, int nt)
    void gt_group_runs_by_app(const uint32_t* rows_keys, const int64_t* runs, const int64_t* kept,
                              const int64_t* offsets, int64_t k, int64_t total, GtFresh fr,
                              const int8_t* app_rows, const uint64_t* device_id,
                              uint64_t* out_ids, uint32_t* out_keys, int64_t* starts, int nt, int ncodes)
    int gt_simd_level()
    int gt_simd_cap

# Below this many elements a gather runs on the calling thread.  A parallel
# region ends at a barrier, so on a busy machine it waits for the OS to
# schedule the second thread: measured 7 ms instead of 0.35 ms for a 580 k-key
# fill.  4 M keys copy in ~1.5 ms on one core; only larger copies (the 90 M
# audience at 400 M devices) are worth that risk.
DEF PARALLEL_MIN = 1 << 22


#: From this many keys up an audience is materialised on every core.
DEF RUNS_PARALLEL_MIN = 1 << 19
#: From this many roaring containers (of 2^16 keys; 8 KB of bitset each) up a
#: bitmap's containers are sized and written on every core.  Below, one core
#: takes well under a millisecond, less than waiting for a second thread that
#: the OS has not scheduled on a busy machine (PARALLEL_MIN's note).
DEF CONTAINERS_PARALLEL_MIN = 512


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


def fill_fresh(const uint32_t[::1] src, const int64_t[:, ::1] runs, const int64_t[::1] kept,
               const int64_t[::1] offsets, const uint32_t[::1] seen, uint32_t seen_min, uint32_t[::1] out):
    """Write the keys of every run, fresh runs included, into ``out`` back to back.

    ``kept[i]`` rows of run i are written from ``offsets[i]`` (an exclusive
    cumsum of ``kept``); a run with ``kept < e - s`` keeps the rows r with
    ``seen[r] >= seen_min`` (see ``_kernels.Tree.query``).  ``src=None``
    means the rows are the keys.  In numpy, this operation is equivalent to::

        out[:kept.sum()] = np.concatenate([
            (np.arange(s, e) if src is None else src[s:e])[(seen[s:e] >= seen_min) | (k == e - s)]
            for (s, e), k in zip(runs, kept)])
    """
    cdef Py_ssize_t k = runs.shape[0]
    if kept.shape[0] != k or offsets.shape[0] != k:
        raise ValueError("kept and offsets need one entry per run")
    cdef int64_t total = offsets[k - 1] + kept[k - 1] if k else 0
    if total == 0:
        return
    if out.shape[0] < total:
        raise ValueError(f"out holds {out.shape[0]} keys, the runs {total}")
    cdef const uint32_t* srcp = &src[0] if src is not None and src.shape[0] else NULL
    with nogil:
        gt_fill_fresh(srcp, &runs[0, 0], &kept[0], &offsets[0], k, total, &seen[0], seen_min,
                      gt_max_threads() if total >= RUNS_PARALLEL_MIN else 1, &out[0])


def plain_runs(const int64_t[:, ::1] runs, const int64_t[::1] kept, const uint32_t[::1] seen,
               uint32_t seen_min):
    """The rows that runs with fresh runs hold, as plain ascending ``[start, end)`` runs (int64 ``(m, 2)``).

    In numpy, this operation is equivalent to ``consecutive_ranges(rows)`` of
    ``rows = np.concatenate([np.arange(s, e)[(seen[s:e] >= seen_min) | (k == e - s)]
    for (s, e), k in zip(runs, kept)])``.
    """
    cdef Py_ssize_t k = runs.shape[0], i
    cdef int64_t room = k
    if kept.shape[0] != k:
        raise ValueError("kept needs one entry per run")
    for i in range(k):
        room += runs[i, 1] - runs[i, 0] - kept[i]     # each stale row splits a run at most once
    out = np.empty((room, 2), dtype=np.int64)
    cdef int64_t[:, ::1] o = out
    cdef int64_t m = 0
    if k:
        with nogil:
            m = gt_plain_runs(&runs[0, 0], &kept[0], k, &seen[0] if seen.shape[0] else NULL,
                              seen_min, &o[0, 0])
    return np.ascontiguousarray(out[:m])


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


# From this many bytes up an output array comes from pyarrow's memory pool
# (_grouped_outputs): glibc serves numpy's arrays this large from fresh pages
# every call (its mmap threshold stops growing at 32 MiB on 64-bit).
DEF POOL_MIN_BYTES = 32 << 20


cdef object _output(Py_ssize_t n, object dtype):
    """``np.empty(n, dtype)``, from pyarrow's default memory pool when it is large (``_grouped_outputs``)."""
    cdef Py_ssize_t size = n * np.dtype(dtype).itemsize
    if size < POOL_MIN_BYTES:
        return np.empty(n, dtype=dtype)
    return np.frombuffer(pa.allocate_buffer(size), dtype=dtype)


cdef tuple _grouped_outputs(Py_ssize_t n):
    """What every grouping by app returns, before it is filled: ``n`` ids (uint64), ``n`` keys
    (uint32) and the 257 starts of the apps' slices (int64).

    Large id and key arrays live in buffers of pyarrow's default memory pool,
    which the batches' Arrow arrays then wrap without a copy.  The pool keeps
    what a dropped batch freed, so a dispatcher's next grouping writes into
    memory the kernel has already faulted in, where numpy's arrays of this
    size come from fresh pages every call: zeroing them took a fifth of the
    grouping's time at 400 M devices.  Smaller arrays stay numpy's, which
    glibc reuses while the pool returned them to the system between calls
    (docs/design.md, Dispatch path).
    """
    return _output(n, np.uint64), _output(n, np.uint32), np.zeros(257, dtype=np.int64)


def group_by_app(const uint32_t[::1] keys, const cnp.uint64_t[::1] device_id, const int8_t[::1] app):
    """Device ids and keys grouped by app code, each app in the input's order: ``(ids, keys, starts)``.

    ``starts`` is int64 ``(257,)``: code c (the int8 code read as unsigned)
    owns ``[starts[c], starts[c + 1])``.  Linear time over both cores (a
    stable counting sort by code); keys must index ``device_id`` and ``app``.
    In numpy, this operation is equivalent to::

        codes = app[keys].view(np.uint8)
        order = np.argsort(codes, kind="stable")
        ids, keys = device_id[keys[order]], keys[order]
        starts = np.r_[0, np.cumsum(np.bincount(codes, minlength=256))]
    """
    cdef Py_ssize_t n = keys.shape[0]
    ids, ks, starts = _grouped_outputs(n)
    cdef cnp.uint64_t[::1] io = ids
    cdef uint32_t[::1] ko = ks
    cdef cnp.int64_t[::1] so = starts
    if n:
        with nogil:
            gt_group_by_app(&keys[0], n, &device_id[0], &app[0], &io[0], &ko[0], &so[0],
                            gt_max_threads() if n >= RUNS_PARALLEL_MIN else 1)
    return ids, ks, starts


def group_runs_by_app(const uint32_t[::1] keys, const int64_t[:, ::1] runs, const int64_t[::1] kept,
                      const uint32_t[::1] seen, uint32_t seen_min, const int8_t[::1] app,
                      const cnp.uint64_t[::1] device_id, const uint16_t[::1] coarse=None, uint32_t top=0,
                      int ncodes=0):
    """A query result grouped by app straight from its runs: ``(ids, keys, starts)`` as ``group_by_app``.

    ``keys``, ``seen`` and ``app`` are the index's leaf-ordered columns
    (``keys=None``: the rows are the keys); ``kept`` (None: every run keeps
    all its rows) and ``seen_min`` describe fresh runs as in ``fill_fresh``;
    ``device_id`` is the store's, by key.  No key array is written first, and
    app codes are read by row, not by key.  ``coarse`` (the index's
    ``coarse_seen(seen, top)``), when given, decides freshness where it can
    (half the bytes; the answer is the same).  ``ncodes`` (the store's number
    of apps; 0: unknown) lets the rows be counted per app by one vector
    compare per code where the CPU has AVX2 or AVX-512BW (``simd_level``); a
    row with a code of ``ncodes`` or more is still counted, row by row.  In
    numpy, this operation is
    equivalent to::

        rows = np.concatenate([np.arange(s, e)[(seen[s:e] >= seen_min) | (k == e - s)]
                               for (s, e), k in zip(runs, kept)])    # kept=None: every row
        order = np.argsort(app[rows].view(np.uint8), kind="stable")
        rows = rows[order]
        out_keys = rows if keys is None else keys[rows]
        ids = device_id[out_keys]
        starts = np.r_[0, np.cumsum(np.bincount(app[rows].view(np.uint8), minlength=256))]
    """
    cdef Py_ssize_t k = runs.shape[0], i
    if kept is not None and kept.shape[0] != k:
        raise ValueError("kept needs one count per run")
    if kept is not None and seen is None:
        raise ValueError("fresh runs need the seen column")
    for i in range(k):
        if not 0 <= runs[i, 0] <= runs[i, 1] <= app.shape[0]:
            raise ValueError("a run lies outside the index's rows")
        if kept is not None and (runs[i, 1] > seen.shape[0] or not 0 <= kept[i] <= runs[i, 1] - runs[i, 0]):
            raise ValueError("a fresh run lies outside the seen column or keeps too many rows")
        if keys is not None and runs[i, 1] > keys.shape[0]:
            raise ValueError("a run lies outside the index's keys")
    if coarse is not None and (seen is None or coarse.shape[0] != seen.shape[0]):
        raise ValueError("the coarse last-seen needs one value a row of seen")
    offsets = np.zeros(k, dtype=np.int64)
    cdef int64_t[::1] off = offsets
    cdef int64_t total = 0
    for i in range(k):
        off[i] = total
        total += kept[i] if kept is not None else runs[i, 1] - runs[i, 0]
    ids, ks, starts = _grouped_outputs(total)
    cdef cnp.uint64_t[::1] io = ids
    cdef uint32_t[::1] ko = ks
    cdef cnp.int64_t[::1] so = starts
    cdef const uint32_t* kp = &keys[0] if keys is not None and keys.shape[0] else NULL
    cdef const int64_t* keptp = &kept[0] if kept is not None and k else NULL
    cdef GtFresh fr = gt_fresh_view(&seen[0] if seen is not None and seen.shape[0] else NULL,
                                    &coarse[0] if coarse is not None and coarse.shape[0] else NULL,
                                    coarse.shape[0] if coarse is not None else 0, top, seen_min)
    if total:
        with nogil:
            gt_group_runs_by_app(kp, &runs[0, 0], keptp, &off[0], k, total, fr, &app[0],
                                 &device_id[0], &io[0], &ko[0], &so[0],
                                 gt_max_threads() if total >= RUNS_PARALLEL_MIN else 1, ncodes)
    return ids, ks, starts


def simd_level(cap=None):
    """The x86 vector level the array kernels use: 2 AVX-512BW, 1 AVX2, 0 neither.

    ``cap`` (0, 1 or 2) first lowers (or restores) the level allowed, so that
    tests can run every variant on one machine; the CPU's own level still
    bounds it.
    """
    global gt_simd_cap
    if cap is not None:
        if cap not in (0, 1, 2):
            raise ValueError("simd_level: cap is 0, 1 or 2")
        gt_simd_cap = cap
    return gt_simd_level()


def group_bitmap_by_app(const uint8_t[::1] buf, const cnp.uint64_t[::1] device_id, const int8_t[::1] app):
    """A roaring bitmap's keys grouped by app, from its portable serialisation: ``(ids, keys, starts)``.

    ``buf`` is ``BitMap.serialize()``; the result is ``group_by_app`` of the
    bitmap's sorted keys (each app's keys ascend), without writing those keys
    out first.  Raises ``ValueError`` on bytes that are not a well-formed
    serialisation or on a key outside ``device_id`` and ``app``.  In numpy,
    this operation is equivalent to::

        keys = np.asarray(BitMap.deserialize(buf).to_array(), np.uint32)
        codes = app[keys].view(np.uint8)
        order = np.argsort(codes, kind="stable")
        ids, keys = device_id[keys[order]], keys[order]
        starts = np.r_[0, np.cumsum(np.bincount(codes, minlength=256))]
    """
    cdef Py_ssize_t size_b = buf.shape[0], size, i, j
    cdef RbReader r
    cdef RbContainer ct
    cdef int64_t n = min(device_id.shape[0], app.shape[0]), c, got, top
    cdef uint64_t w
    rb_open(&r, &buf[0] if size_b > 0 else NULL, size_b)
    size = r.size
    cdef const uint8_t* p = r.p
    kind_a = np.empty(size, dtype=np.int64)
    card_a = np.empty(size, dtype=np.int64)
    pos_a = np.empty(size, dtype=np.int64)
    base_a = np.empty(size, dtype=np.uint32)
    chunk_a = np.zeros(size + 1, dtype=np.int64)
    cdef int64_t[::1] kind = kind_a, card = card_a, pos = pos_a, chunk_at = chunk_a
    cdef uint32_t[::1] base = base_a
    cdef int64_t total = 0, in_chunk = 0, nch = 0
    for i in range(size):
        rb_next(&r, i, &ct)
        c = ct.base >> 16
        base[i] = <uint32_t>ct.base
        card[i] = ct.card
        kind[i] = ct.kind
        top = -1
        if ct.kind == RB_RUN:
            pos[i] = ct.at - 2          # the kernel reads the run count first
            got = 0
            for j in range(ct.runs):
                got += <int64_t>rb_u16(p + ct.at + 2 + 4 * j) + 1
                top = max(top, <int64_t>rb_u16(p + ct.at + 4 * j) + rb_u16(p + ct.at + 2 + 4 * j))
            if got != ct.card or top > 65535:
                raise ValueError("roaring bitmap: a run container disagrees with its cardinality")
        elif ct.kind == RB_BITSET:
            pos[i] = ct.at
            got = 0
            for j in range(1024):
                memcpy(&w, p + ct.at + 8 * j, 8)
                got += __builtin_popcountll(w)
                if w:
                    top = 64 * j + 63 - __builtin_clzll(w)
            if got != ct.card:
                raise ValueError("roaring bitmap: a bitmap container disagrees with its cardinality")
        else:
            pos[i] = ct.at
            for j in range(ct.card):
                top = max(top, <int64_t>rb_u16(p + ct.at + 2 * j))
        if (c << 16) + top >= n:
            raise ValueError(f"roaring bitmap: key {(c << 16) + top} outside the {n} devices")
        total += card[i]
        in_chunk += card[i]
        if in_chunk >= RUNS_PARALLEL_MIN // 8 or i == size - 1:
            nch += 1
            chunk_at[nch] = i + 1
            in_chunk = 0
    ids, ks, starts = _grouped_outputs(total)
    cdef cnp.uint64_t[::1] io = ids
    cdef uint32_t[::1] ko = ks
    cdef cnp.int64_t[::1] so = starts
    if total:
        with nogil:
            gt_group_bitmap_by_app(p, &kind[0], &card[0], &pos[0], &base[0], &chunk_at[0], nch, total,
                                   &device_id[0], &app[0], &io[0], &ko[0], &so[0],
                                   gt_max_threads() if total >= RUNS_PARALLEL_MIN else 1)
    return ids, ks, starts


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
    void gt_container_sizes(const uint64_t* w, int64_t nc, GtContainer* c, int nt)
    void gt_container_write(const uint64_t* b, const GtContainer& c, uint8_t* out)
    void gt_put16(uint8_t* p, uint32_t v)
    void gt_put32(uint8_t* p, uint32_t v)
    void gt_bitset_fresh(const uint32_t* src, const int64_t* runs, const int64_t* kept, int64_t k,
                         const uint32_t* seen, uint32_t cut, uint64_t* w, int64_t nw, int nt)


def roaring_from_runs(const uint32_t[::1] src, const int64_t[:, ::1] runs, int64_t key_space,
                      const int64_t[::1] kept=None, const uint32_t[::1] seen=None, uint32_t seen_min=0):
    """Roaring portable serialisation (a uint8 array: no copy into ``bytes``) of the keys ``src[s:e]`` of every run, all below ``key_space``.

    The keys are set in a dense bitset, each core owning one stretch of the
    key space, and the bitset is written container by container in the form
    ``run_optimize`` would choose -- no sort.  ``src=None`` means the rows
    are the keys.  With ``kept`` (rows kept per run, see
    ``_kernels.Tree.query``), a run with ``kept < e - s`` holds only the rows
    r with ``seen[r] >= seen_min``.  In numpy, this operation is equivalent to::

        rows = np.concatenate([np.arange(s, e)[(seen[s:e] >= seen_min) | (k == e - s)]
                               for (s, e), k in zip(runs, kept)])     # kept=None: every row
        bm = BitMap(rows if src is None else src[rows]); bm.run_optimize()
        bm.serialize()          # the same set; BitMap.deserialize gives an equal bitmap
    """
    cdef int64_t nw = ((key_space + 65535) >> 16) << 10 if key_space > 0 else 0
    cdef int64_t nc = nw >> 10
    words = np.zeros(max(nw, 1), dtype=np.uint64)
    cdef uint64_t[::1] w = words
    cdef Py_ssize_t k = runs.shape[0], i
    cdef int64_t total = 0
    cdef const int64_t* kp = NULL
    cdef const uint32_t* sp = NULL
    cdef const uint32_t* srcp = NULL
    if kept is not None:
        if kept.shape[0] != k or seen is None:
            raise ValueError("kept needs one count per run and the seen column")
        kp = &kept[0] if k else NULL
        sp = &seen[0] if seen.shape[0] else NULL
    if src is not None and src.shape[0]:
        srcp = &src[0]
    for i in range(k):
        total += runs[i, 1] - runs[i, 0]
    cdef int nt = gt_max_threads() if total >= RUNS_PARALLEL_MIN else 1
    if k and nw:
        with nogil:
            gt_bitset_fresh(srcp, &runs[0, 0], kp, k, sp, seen_min, &w[0], nw, nt)
    cont = np.zeros((max(nc, 1), 4), dtype=np.int64)
    cdef int64_t[:, ::1] cv = cont
    if nc:
        with nogil:
            gt_container_sizes(&w[0], nc, <GtContainer*>&cv[0, 0], gt_max_threads() if nc >= CONTAINERS_PARALLEL_MIN else 1)
    used = np.flatnonzero(cont[:nc, 0]).astype(np.int64)
    cdef int64_t m = used.shape[0]
    if m == 0:   # cookie 12346, no containers: the empty bitmap
        return np.frombuffer(b"\x3a\x30\x00\x00\x00\x00\x00\x00", dtype=np.uint8)
    cdef int64_t head = rb_header_bytes(m)
    body = cont[used, 2]
    offsets = np.full(m, head, dtype=np.int64)
    offsets[1:] += np.cumsum(body[:m - 1])
    out = np.zeros(head + int(body.sum()), dtype=np.uint8)
    cdef uint8_t[::1] o = out
    cdef int64_t[::1] uv = used, ov = offsets
    cdef int64_t j, c
    gt_put32(&o[0], <uint32_t>RB_COOKIE_RUNS | (<uint32_t>(m - 1) << 16))
    for j in range(m):
        c = uv[j]
        if cv[c, 3] == 2:
            o[4 + j // 8] |= <uint8_t>(1 << (j % 8))
        gt_put16(&o[4 + (m + 7) // 8 + 4 * j], <uint32_t>c)
        gt_put16(&o[4 + (m + 7) // 8 + 4 * j + 2], <uint32_t>(cv[c, 0] - 1))
        if m >= RB_OFFSETS_FROM:
            gt_put32(&o[4 + (m + 7) // 8 + 4 * m + 4 * j], <uint32_t>ov[j])
    with nogil:
        for j in prange(m, schedule="dynamic", num_threads=gt_max_threads() if m >= CONTAINERS_PARALLEL_MIN else 1):
            c = uv[j]
            gt_container_write(&w[c << 10], (<GtContainer*>&cv[0, 0])[c], &o[ov[j]])
    return out
