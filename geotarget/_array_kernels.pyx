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

cdef extern from * nogil:
    """
    #include <algorithm>
    #include <cstdint>
    #ifdef _OPENMP
    #include <omp.h>
    #endif
    struct GtIdKey { uint64_t id; uint32_t key; };

    #include <vector>
    #include <memory>
    /* d[j] = s + j for j < m.  GCC's own vectorisation of this loop for
       baseline x86-64 ran at 0.77 ms for 3.1 M keys, this unrolled SSE2 at
       0.26 ms (one 16-byte store a cycle, no data read). */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    static inline void gt_iota(uint32_t* d, int64_t m, uint32_t s) {
        int64_t j = 0;
        #if defined(__SSE2__)
        const __m128i k16 = _mm_set1_epi32(16);
        __m128i v0 = _mm_setr_epi32((int)s, (int)(s + 1), (int)(s + 2), (int)(s + 3));
        __m128i v1 = _mm_add_epi32(v0, _mm_set1_epi32(4));
        __m128i v2 = _mm_add_epi32(v0, _mm_set1_epi32(8));
        __m128i v3 = _mm_add_epi32(v0, _mm_set1_epi32(12));
        for (; j + 16 <= m; j += 16) {
            _mm_storeu_si128((__m128i*)(d + j), v0);
            _mm_storeu_si128((__m128i*)(d + j + 4), v1);
            _mm_storeu_si128((__m128i*)(d + j + 8), v2);
            _mm_storeu_si128((__m128i*)(d + j + 12), v3);
            v0 = _mm_add_epi32(v0, k16); v1 = _mm_add_epi32(v1, k16);
            v2 = _mm_add_epi32(v2, k16); v3 = _mm_add_epi32(v3, k16);
        }
        #endif
        for (; j < m; j++) d[j] = s + (uint32_t)j;
    }

    /* f(out_pos, row, len) for every piece of the runs, the output split
       evenly over nt threads by position.  Audiences mix a few runs of ~10^5
       rows with thousands of 1-3 rows, so splitting by run left one core with
       most of the bytes; this splits inside runs. */
    template <class F> static void gt_for_runs(const int64_t* runs, const int64_t* offsets, int64_t k,
                                               int64_t total, int nt, F f) {
        #pragma omp parallel num_threads(nt) if(nt > 1)
        {
            int t = 0, tn = 1;
            #ifdef _OPENMP
            t = omp_get_thread_num(); tn = omp_get_num_threads();
            #endif
            int64_t lo = total * t / tn, hi = total * (t + 1) / tn;
            if (lo < hi) {
                int64_t i = (int64_t)(std::upper_bound(offsets, offsets + k, lo) - offsets) - 1;
                for (; i < k && offsets[i] < hi; i++) {
                    int64_t o = offsets[i], len = runs[2 * i + 1] - runs[2 * i];
                    int64_t a = o > lo ? o : lo, b = o + len < hi ? o + len : hi;
                    if (a < b) f(a, runs[2 * i] + (a - o), b - a);
                }
            }
        }
    }
    static void gt_fill_rows(const int64_t* runs, const int64_t* offsets, int64_t k, int64_t total,
                             int nt, uint32_t* out) {
        gt_for_runs(runs, offsets, k, total, nt, [=](int64_t o, int64_t row, int64_t len) {
            gt_iota(out + o, len, (uint32_t)row); });
    }
    static void gt_gather_runs_u32(const uint32_t* src, const int64_t* runs, const int64_t* offsets, int64_t k,
                                   int64_t total, int nt, uint32_t* out) {
        gt_for_runs(runs, offsets, k, total, nt, [=](int64_t o, int64_t row, int64_t len) {
            std::copy(src + row, src + row + len, out + o); });
    }
    /* Sort ids carrying their row numbers.  One counting pass and one stable
       scatter into up to 2^16 buckets by the top bits of (id - min), then each
       bucket is sorted on its own, in cache, in parallel.  Device ids are
       hashes in practice, so buckets are small and even; a skewed id space
       only makes some buckets larger, never the result wrong. */
    static void gt_sort_ids(const uint64_t* ids, int64_t n, uint64_t* out_ids, uint32_t* out_rows) {
        if (n == 0) return;
        uint64_t lo = ids[0], hi = ids[0];
        #pragma omp parallel for reduction(min:lo) reduction(max:hi)
        for (int64_t i = 0; i < n; i++) { if (ids[i] < lo) lo = ids[i]; if (ids[i] > hi) hi = ids[i]; }
        uint64_t span = hi - lo;
        int bits = span ? 64 - __builtin_clzll(span) : 0;
        int shift = bits > 16 ? bits - 16 : 0;
        int64_t nb = (int64_t)(span >> shift) + 1;
        int nt = 1;
        #ifdef _OPENMP
        nt = omp_get_max_threads();
        #endif
        std::vector<int64_t> counts((size_t)nt * nb, 0);
        /* new[] without () leaves the memory untouched: no serial zeroing pass */
        std::unique_ptr<GtIdKey[]> tmp(new GtIdKey[(size_t)n]);
        #pragma omp parallel num_threads(nt)
        {
            int t = 0;
            #ifdef _OPENMP
            t = omp_get_thread_num();
            #endif
            int64_t s = n * t / nt, e = n * (t + 1) / nt;
            int64_t* c = &counts[(size_t)t * nb];
            for (int64_t i = s; i < e; i++) c[(ids[i] - lo) >> shift]++;
            #pragma omp barrier
            #pragma omp single
            {
                int64_t acc = 0;
                for (int64_t b = 0; b < nb; b++)
                    for (int u = 0; u < nt; u++) {
                        int64_t v = counts[(size_t)u * nb + b]; counts[(size_t)u * nb + b] = acc; acc += v; }
            }
            for (int64_t i = s; i < e; i++) {
                int64_t pos = c[(ids[i] - lo) >> shift]++;
                tmp[pos].id = ids[i]; tmp[pos].key = (uint32_t)i;
            }
        }
        /* after the scatter, counts[(nt-1)*nb + b] is the end of bucket b */
        #pragma omp parallel for schedule(dynamic, 64)
        for (int64_t b = 0; b < nb; b++) {
            int64_t e = counts[(size_t)(nt - 1) * nb + b];
            int64_t s = b ? counts[(size_t)(nt - 1) * nb + b - 1] : 0;
            if (e - s > 1)
                std::sort(tmp.get() + s, tmp.get() + e, [](const GtIdKey& a, const GtIdKey& b) {
                    return a.id < b.id || (a.id == b.id && a.key < b.key); });
        }
        #pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) { out_ids[i] = tmp[i].id; out_rows[i] = tmp[i].key; }
    }

    /* LSD radix sort of unsigned integers, 8-bit digits (4 passes for 32-bit
       keys, 8 for 64-bit ids) through one scratch buffer; a pass whose digit is
       the same for every element (the high bits of a local key range) is
       skipped.  One counting pass fills every digit's histogram.  256 buckets
       keep the scatter's open cache lines in L1: 11-bit digits took 86 ms for
       3.1 M ids against 49 ms; NumPy's sort took 178 ms on this machine. */
    template <class T> static void gt_radix_sort(T* a, int64_t n, T* tmp) {
        const int BITS = 8, NB = 1 << BITS, PASSES = (int)(sizeof(T) * 8 + BITS - 1) / BITS;
        std::vector<int64_t> count((size_t)PASSES * NB, 0);
        for (int64_t i = 0; i < n; i++) {
            T v = a[i];
            for (int p = 0; p < PASSES; p++) count[(size_t)p * NB + ((v >> (p * BITS)) & (NB - 1))]++;
        }
        T* src = a; T* dst = tmp;
        for (int p = 0; p < PASSES; p++) {
            int64_t* c = &count[(size_t)p * NB];
            if (c[(src[0] >> (p * BITS)) & (NB - 1)] == n) continue;  /* one digit value: nothing moves */
            int64_t acc = 0;
            for (int b = 0; b < NB; b++) { int64_t v = c[b]; c[b] = acc; acc += v; }
            for (int64_t i = 0; i < n; i++) { T v = src[i]; dst[c[(v >> (p * BITS)) & (NB - 1)]++] = v; }
            T* t = src; src = dst; dst = t;
        }
        if (src != a) std::copy(src, src + n, a);
    }

    """
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

cdef extern from * nogil:
    """
    #include <cstring>
    /* Roaring's portable serialisation (RoaringFormatSpec, with run containers)
       of a dense bitset of `words` 64-bit words.  Each container of 2^16 keys
       is written in the smallest form CRoaring's run_optimize would pick: runs
       when 2 + 4 runs is smaller than the array (2 per key, up to 4096 keys)
       or bitmap (8 KB) form.  Two passes over the bitset (sizes, then bytes),
       each over every core. */
    static inline int64_t gt_word_runs(uint64_t x, uint64_t prev_top) {
        return __builtin_popcountll(x & ~((x << 1) | prev_top));
    }
    struct GtContainer { int64_t card, runs, bytes, kind; };   /* kind 0 array, 1 bitmap, 2 run */
    static void gt_container_sizes(const uint64_t* w, int64_t nc, GtContainer* c) {
        #pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < nc; i++) {
            const uint64_t* b = w + 1024 * i;
            int64_t card = 0, runs = 0; uint64_t top = 0;
            for (int j = 0; j < 1024; j++) {
                card += __builtin_popcountll(b[j]);
                runs += gt_word_runs(b[j], top);
                top = b[j] >> 63;
            }
            int64_t plain = card <= 4096 ? 2 * card : 8192, run = 2 + 4 * runs;
            c[i].card = card; c[i].runs = runs;
            c[i].kind = run < plain ? 2 : (card <= 4096 ? 0 : 1);
            c[i].bytes = card == 0 ? 0 : (run < plain ? run : plain);
        }
    }
    static inline void gt_put16(uint8_t* p, uint32_t v) { uint16_t u = (uint16_t)v; std::memcpy(p, &u, 2); }
    static inline void gt_put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
    static void gt_container_write(const uint64_t* b, const GtContainer& c, uint8_t* out) {
        if (c.kind == 1) { std::memcpy(out, b, 8192); return; }
        if (c.kind == 0) {
            int64_t k = 0;
            for (int j = 0; j < 1024; j++)
                for (uint64_t x = b[j]; x; x &= x - 1) gt_put16(out + 2 * k++, 64 * j + __builtin_ctzll(x));
            return;
        }
        gt_put16(out, (uint32_t)c.runs);
        uint8_t* p = out + 2;
        int64_t start = -1;
        for (int j = 0; j < 1024; j++) {
            uint64_t x = b[j];
            if (start >= 0 && !(x & 1)) { gt_put16(p, start); gt_put16(p + 2, 64 * j - 1 - start); p += 4; start = -1; }
            while (x) {
                int t = __builtin_ctzll(x);
                if (start < 0) start = 64 * j + t;
                uint64_t inv = ~(x >> t);
                int ones = inv ? __builtin_ctzll(inv) : 64 - t;
                if (t + ones >= 64) break;                /* the run goes on into the next word */
                gt_put16(p, start); gt_put16(p + 2, 64 * j + t + ones - 1 - start); p += 4; start = -1;
                x &= ~((((uint64_t)1 << ones) - 1) << t);
            }
        }
        if (start >= 0) { gt_put16(p, start); gt_put16(p + 2, 65535 - start); }
    }
    """
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
