# cython: language_level=3
# distutils: language = c++
"""Compiled hot path of geotarget: KD-tree build, exact circle query, gathers.

Why the index is shaped the way it is
=====================================

An alert asks one question, many times: *which devices lie within r km of this
point?*  The answer must equal, device for device, what a float64 NumPy
haversine scan over the stored coordinates returns (DESIGN §2), anywhere on
Earth, and it must come back in milliseconds for tens of millions of devices.

1. **Unit vectors, not latitude/longitude.**  Every device is stored as a point
   on the unit sphere, (x, y, z) in float32.  A spherical cap of radius r is
   then exactly the set of points whose straight-line (chord) distance to the
   centre is at most ``T = 2 sin(r / 2R)``.  Chord distance is monotone in
   great-circle distance, so the antimeridian and the poles need no special
   case at all: a circle that crosses longitude 180 or covers a pole is just a
   ball in 3-D.

2. **A KD-tree over those 3-D points, rows physically in leaf order.**  The
   tree is a complete binary tree stored as flat arrays (children of node i are
   2i+1 and 2i+2, as in scikit-learn's BallTree).  Node j at level L covers
   rows ``[floor(j n / 2^L), floor((j+1) n / 2^L))`` so row ranges are never
   stored: they are arithmetic.  The only per-node data is the float32
   bounding box (24 bytes).  Because the rows are sorted in leaf order, every
   subtree is one contiguous row range.

3. **Whole subtrees leave as ranges.**  If the farthest corner of a node's box
   is inside the cap, the whole node is inside: it is emitted as one
   ``[start, end)`` run with no per-point test; counting is arithmetic on runs
   and materialising is ``memcpy``.  If the nearest point of the box is outside,
   the node is skipped.  Only boundary leaves test points.

4. **Cheap but exact boundary tests.**  A boundary point is tested by its
   squared chord in float32 against two thresholds ``(T - g)^2`` and
   ``(T + g)^2``.  The guard ``g = 2e-6`` (about 13 m on Earth) is several times
   the worst error of float32 storage (|dp| <= 1.1e-7 per point and per centre)
   plus float32 arithmetic (relative 2^-22 in the sum).  Points that fall
   between the thresholds -- a band a few metres wide -- are re-checked with the
   float64 haversine on the stored float64 latitude/longitude, the same
   formula as :func:`geotarget.haversine_km`.  So the result is the reference
   result, not an approximation of it.

5. **Walk first, then test, with the points fetched ahead.**  A query walks
   the node boxes first and only records what it finds (inside ranges and
   boundary leaves, in row order); a second pass then tests the boundary
   leaves with the points of the next dozen leaves already prefetched.  At
   400 M devices the points are a 6.4 GB file mapping and every boundary leaf
   is a cache and TLB miss; overlapping those misses took the dense 500 km
   count from 3.7 ms to 1.1 ms.

6. **No Python on the query path.**  Kernels are ``nogil``, take clean
   contiguous arrays (validation lives in ``geotarget/index.py``), and return
   NumPy arrays of runs.  The build's array of (x, y, z, key) records *is* the
   serving layout (16 bytes a device), plus a contiguous copy of the keys
   (4 bytes) so that materialising an audience is ``memcpy`` of key ranges.  Gathers run over both cores with OpenMP where it is
   available.

Every kernel names its NumPy equivalent in its docstring; the tests compare the
two on hypothesis-generated and adversarial inputs.
"""

import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport asin, cos, sin, sqrt, fabs
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from libcpp.vector cimport vector

cnp.import_array()

cdef extern from * nogil:
    """
    #include <algorithm>
    #include <cstdint>
    #ifdef _OPENMP
    #include <omp.h>
    #endif
    struct GtPoint { float x; float y; float z; uint32_t key; };
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

    /* Ties are broken by key so that the partition (and hence every leaf's
       membership) does not depend on the input order or the thread count. */
    /* Exact selection for large ranges.  A deterministic sample brackets the
       target rank between two pivots; one pass partitions around them (the
       bulk of the work, streaming), then nth_element runs only on the thin
       middle band.  Same result as std::nth_element (the order is total: value,
       then key), about half the memory traffic on ranges that do not fit in
       cache.  `par` lets the partitions use every core (top of the tree). */
    template <int AXIS> static inline bool gt_less(const GtPoint& a, const GtPoint& b) {
        float va = AXIS == 0 ? a.x : (AXIS == 1 ? a.y : a.z);
        float vb = AXIS == 0 ? b.x : (AXIS == 1 ? b.y : b.z);
        return va < vb || (va == vb && a.key < b.key);
    }
    /* In-place partition over every core: each thread partitions its own
       slice, then the misplaced stretch between the true parts and the false
       parts is swapped across, also in parallel.  One streaming pass plus a
       swap of at most half the range; libstdc++'s __gnu_parallel::partition
       moves far more and made the 400 M build slower. */
    template <class Pred> static GtPoint* gt_partition_par(GtPoint* first, int64_t n, Pred pred) {
        int nt = 1;
        #ifdef _OPENMP
        nt = omp_get_max_threads();
        #endif
        if (nt < 2 || n < ((int64_t)1 << 20)) return std::partition(first, first + n, pred);
        std::vector<int64_t> mid((size_t)nt);
        #pragma omp parallel for schedule(static, 1) num_threads(nt)
        for (int t = 0; t < nt; t++) {
            int64_t s = n * t / nt, e = n * (t + 1) / nt;
            mid[t] = std::partition(first + s, first + e, pred) - first;
        }
        /* Merge slice by slice: [T | F] then [T' | F'] becomes [T T' | F' F]
           by swapping the shorter of F and T' with the other's far end. */
        int64_t split = mid[0];
        for (int t = 1; t < nt; t++) {
            int64_t s = n * t / nt;          /* slice t starts here; [split, s) is false */
            int64_t f = s - split, tt = mid[t] - s, k = f < tt ? f : tt;
            GtPoint* a = first + split;      /* the first k false elements ... */
            GtPoint* b = first + mid[t] - k; /* ... change places with the last k true ones */
            #pragma omp parallel for schedule(static) num_threads(nt)
            for (int64_t i = 0; i < k; i++) std::swap(a[i], b[i]);
            split += tt;
        }
        return first + split;
    }

    /* Whether [first, first + nth) already holds the nth smallest points, that
       is max(left) < min(right) (the order is total).  Rows already in leaf
       order -- a store ingested in one batch is, since the ingest sorts it with
       this same tree -- then need no move at all, so a first generation's
       index rows *are* its keys and the build only reads.  A few sampled
       pairs reject a scrambled range before the full read pass. */
    template <int AXIS> static const GtPoint* gt_max_of(const GtPoint* p, int64_t n, bool par) {
        int nt = 1;
        #ifdef _OPENMP
        if (par) nt = omp_get_max_threads();
        #endif
        if (nt < 2 || n < ((int64_t)1 << 20)) {
            const GtPoint* m = p;
            for (int64_t i = 1; i < n; i++) if (gt_less<AXIS>(*m, p[i])) m = p + i;
            return m;
        }
        std::vector<const GtPoint*> part((size_t)nt);
        #pragma omp parallel for schedule(static, 1) num_threads(nt)
        for (int t = 0; t < nt; t++) part[t] = gt_max_of<AXIS>(p + n * t / nt, n * (t + 1) / nt - n * t / nt, false);
        const GtPoint* m = part[0];
        for (int t = 1; t < nt; t++) if (gt_less<AXIS>(*m, *part[t])) m = part[t];
        return m;
    }
    template <int AXIS> static bool gt_none_less(const GtPoint* p, int64_t n, const GtPoint& pivot, bool par) {
        int nt = 1;
        #ifdef _OPENMP
        if (par) nt = omp_get_max_threads();
        #endif
        if (nt < 2 || n < ((int64_t)1 << 20)) {
            for (int64_t i = 0; i < n; i++) if (gt_less<AXIS>(p[i], pivot)) return false;
            return true;
        }
        int ok = 1;
        #pragma omp parallel for schedule(static, 1) num_threads(nt) reduction(&&:ok)
        for (int t = 0; t < nt; t++)
            ok = ok && gt_none_less<AXIS>(p + n * t / nt, n * (t + 1) / nt - n * t / nt, pivot, false);
        return ok;
    }
    template <int AXIS> static bool gt_is_split(const GtPoint* first, int64_t nth, int64_t n, bool par) {
        if (nth <= 0 || nth >= n) return true;
        const int64_t S = 16;
        const GtPoint* m = first;
        for (int64_t i = 0; i < S; i++) {
            const GtPoint* q = first + (i * nth) / S;
            if (gt_less<AXIS>(*m, *q)) m = q;
        }
        if (gt_less<AXIS>(first[nth], *m)) return false;
        for (int64_t i = 0; i < S; i++)
            if (gt_less<AXIS>(first[nth + (i * (n - nth)) / S], *m)) return false;
        m = gt_max_of<AXIS>(first, nth, par);
        return gt_none_less<AXIS>(first + nth, n - nth, *m, par);
    }

    template <int AXIS> static void gt_select_axis(GtPoint* first, int64_t nth, int64_t n, bool par) {
        if (gt_is_split<AXIS>(first, nth, n, par)) return;
        /* A larger sample on huge ranges narrows the band left to nth_element
           (band ~ 3 n / sqrt(S): 4.7 % of n at 4096, 1.2 % at 65536). */
        const int64_t S = n >= ((int64_t)1 << 26) ? 65536 : 4096;
        if (n < (int64_t)1 << 18) {
            std::nth_element(first, first + nth, first + n, gt_less<AXIS>);
            return;
        }
        std::vector<GtPoint> sample((size_t)S);  /* heap: this recurses inside OpenMP threads */
        for (int64_t i = 0; i < S; i++) sample[i] = first[(i * n) / S + (n / S) / 2];
        std::sort(sample.begin(), sample.end(), gt_less<AXIS>);
        /* ~3 standard deviations of the sample rank, 3 sqrt(S) / 2 */
        int64_t r = (nth * S) / n, d = S == 65536 ? 384 : 96;
        GtPoint lo = sample[r - d < 0 ? 0 : r - d];
        GtPoint hi = sample[r + d >= S ? S - 1 : r + d];
        GtPoint* a; GtPoint* b;
        if (par) {
            a = gt_partition_par(first, n, [&](const GtPoint& p) { return gt_less<AXIS>(p, lo); });
            b = gt_partition_par(a, first + n - a, [&](const GtPoint& p) { return !gt_less<AXIS>(hi, p); });
        } else {
            a = std::partition(first, first + n, [&](const GtPoint& p) { return gt_less<AXIS>(p, lo); });
            b = std::partition(a, first + n, [&](const GtPoint& p) { return !gt_less<AXIS>(hi, p); });
        }
        GtPoint* mid = first + nth;
        if (mid < a) std::nth_element(first, mid, a, gt_less<AXIS>);
        else if (mid < b) std::nth_element(a, mid, b, gt_less<AXIS>);
        else std::nth_element(b, mid, first + n, gt_less<AXIS>);
    }
    static inline void gt_select(GtPoint* first, int64_t nth, int64_t n, int axis, int par) {
        if (axis == 0) gt_select_axis<0>(first, nth, n, par);
        else if (axis == 1) gt_select_axis<1>(first, nth, n, par);
        else gt_select_axis<2>(first, nth, n, par);
    }
    #ifdef _OPENMP
    #include <omp.h>
    static inline int gt_max_threads(void) { return omp_get_max_threads(); }
    static const int GT_HAVE_OPENMP = 1;
    #else
    static inline int gt_max_threads(void) { return 1; }
    static const int GT_HAVE_OPENMP = 0;
    #endif
    """
    ctypedef struct GtPoint:
        float x
        float y
        float z
        uint32_t key
    void gt_sort_ids(const uint64_t* ids, int64_t n, uint64_t* out_ids, uint32_t* out_rows)
    void gt_iota(uint32_t* d, int64_t m, uint32_t s)
    void gt_fill_rows(const int64_t* runs, const int64_t* offsets, int64_t k, int64_t total, int nt, uint32_t* out)
    void gt_gather_runs_u32(const uint32_t* src, const int64_t* runs, const int64_t* offsets, int64_t k,
                            int64_t total, int nt, uint32_t* out)
    void gt_radix_sort[T](T* a, int64_t n, T* tmp)
    void gt_select(GtPoint* first, int64_t nth, int64_t n, int axis, int par)
    int gt_max_threads()
    int GT_HAVE_OPENMP
    int __builtin_ctzll(unsigned long long)
    void __builtin_prefetch(const void*)

# Mean Earth radius (IUGG), km.  DESIGN §2 fixes it.
DEF EARTH_R = 6371.0088
DEF DEG2RAD = 0.017453292519943295
# Guard band in chord units (unit sphere).  See the essay, point 4.
DEF GUARD = 2e-6
# Below this many elements a gather runs on the calling thread.  A parallel
# region ends at a barrier, so on a busy machine it waits for the OS to
# schedule the second thread: measured 7 ms instead of 0.35 ms for a 580 k-key
# fill.  4 M keys copy in ~1.5 ms on one core; only larger copies (the 90 M
# audience at 400 M devices) are worth that risk.
DEF PARALLEL_MIN = 1 << 22

HAVE_OPENMP = bool(GT_HAVE_OPENMP)
EARTH_RADIUS_KM = EARTH_R
CHORD_GUARD = GUARD

POINT_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("key", "<u4")])


def max_threads():
    """Number of OpenMP threads the kernels may use (1 without OpenMP)."""
    return gt_max_threads()


# ---------------------------------------------------------------------------
# exact distance
# ---------------------------------------------------------------------------

cdef inline double _haversine_km(double lat1, double lon1, double lat2, double lon2) noexcept nogil:
    # Same operation order as geotarget.geo.haversine_km (the NumPy reference).
    cdef double p1 = lat1 * DEG2RAD
    cdef double p2 = lat2 * DEG2RAD
    cdef double dphi = (lat2 - lat1) * DEG2RAD
    cdef double dlmb = (lon2 - lon1) * DEG2RAD
    cdef double s1 = sin(dphi * 0.5)
    cdef double s2 = sin(dlmb * 0.5)
    cdef double a = s1 * s1 + cos(p1) * cos(p2) * s2 * s2
    if a > 1.0:
        a = 1.0
    return 2.0 * EARTH_R * asin(sqrt(a))


def haversine_many(double lat, double lon, const double[::1] lats, const double[::1] lons):
    """Great-circle distance (km) from one point to many.

    In numpy, this operation is equivalent to
    ``geotarget.geo.haversine_km(lat, lon, lats, lons)``.
    """
    cdef Py_ssize_t i, n = lats.shape[0]
    out = np.empty(n, dtype=np.float64)
    cdef double[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = _haversine_km(lat, lon, lats[i], lons[i])
    return out


# ---------------------------------------------------------------------------
# unit vectors
# ---------------------------------------------------------------------------

def fill_points(const double[::1] lat, const double[::1] lon, GtPoint[::1] out,
                const uint32_t[::1] keys=None):
    """Fill ``out`` with float32 unit vectors and keys.

    In numpy, this operation is equivalent to::

        phi, lam = np.radians(lat), np.radians(lon)
        out["x"] = (np.cos(phi) * np.cos(lam)).astype(np.float32)
        out["y"] = (np.cos(phi) * np.sin(lam)).astype(np.float32)
        out["z"] = np.sin(phi).astype(np.float32)
        out["key"] = keys if keys is not None else np.arange(len(lat))
    """
    cdef Py_ssize_t i, n = lat.shape[0]
    cdef double phi, lam, cp
    cdef bint have_keys = keys is not None
    with nogil:
        for i in prange(n, schedule="static"):
            phi = lat[i] * DEG2RAD
            lam = lon[i] * DEG2RAD
            cp = cos(phi)
            out[i].x = <float>(cp * cos(lam))
            out[i].y = <float>(cp * sin(lam))
            out[i].z = <float>sin(phi)
            if have_keys:
                out[i].key = keys[i]
            else:
                out[i].key = <uint32_t>i


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

cdef inline int64_t _node_start(int64_t j, int level, int64_t n) noexcept nogil:
    # floor(j * n / 2^level); j * n < 2^63 for n < 2^32 and level <= 31.
    return (j * n) >> level


cdef void _bbox(const GtPoint* p, int64_t count, float* box) noexcept nogil:
    cdef int64_t i
    cdef float x0 = 1e30, y0 = 1e30, z0 = 1e30, x1 = -1e30, y1 = -1e30, z1 = -1e30
    for i in range(count):
        if p[i].x < x0: x0 = p[i].x
        if p[i].x > x1: x1 = p[i].x
        if p[i].y < y0: y0 = p[i].y
        if p[i].y > y1: y1 = p[i].y
        if p[i].z < z0: z0 = p[i].z
        if p[i].z > z1: z1 = p[i].z
    box[0] = x0; box[1] = y0; box[2] = z0
    box[3] = x1; box[4] = y1; box[5] = z1


cdef void _bbox_par(const GtPoint* p, int64_t count, float* box) noexcept nogil:
    """``_bbox`` over all cores: per-chunk boxes, then their union."""
    cdef int64_t chunks = 64, c, s, e
    cdef float part[64 * 6]
    cdef int a
    for c in prange(chunks, schedule="static"):
        s = (c * count) // chunks
        e = ((c + 1) * count) // chunks
        _bbox(p + s, e - s, &part[6 * c])
    _bbox(p, 0, box)
    for c in range(chunks):
        for a in range(3):
            if part[6 * c + a] < box[a]:
                box[a] = part[6 * c + a]
            if part[6 * c + 3 + a] > box[3 + a]:
                box[3 + a] = part[6 * c + 3 + a]


cdef inline int _widest_axis(const float* box) noexcept nogil:
    cdef float ex = box[3] - box[0], ey = box[4] - box[1], ez = box[5] - box[2]
    if ex >= ey and ex >= ez:
        return 0
    if ey >= ez:
        return 1
    return 2


cdef void _split_node(GtPoint* pts, float* bounds, int64_t n, int depth, int64_t node, int level,
                      bint par) noexcept nogil:
    """Box one node; unless it is a leaf, partition its rows at the median of its widest axis.

    ``par`` spreads the work of this one node over every core (the top of the tree).
    """
    cdef int64_t j = node + 1 - (<int64_t>1 << level)
    cdef int64_t s = _node_start(j, level, n)
    cdef int64_t e = _node_start(j + 1, level, n)
    cdef float* box = bounds + 6 * node
    if par:
        _bbox_par(pts + s, e - s, box)
    else:
        _bbox(pts + s, e - s, box)
    if level == depth or e - s <= 1:
        return
    gt_select(pts + s, _node_start(2 * j + 1, level + 1, n) - s, e - s, _widest_axis(box), par)


cdef void _build_node(GtPoint* pts, float* bounds, int64_t n, int depth,
                      int64_t node, int level) noexcept nogil:
    """Build the subtree rooted at ``node`` (depth-first, cache-friendly)."""
    _split_node(pts, bounds, n, depth, node, level, False)
    if level < depth:
        _build_node(pts, bounds, n, depth, 2 * node + 1, level + 1)
        _build_node(pts, bounds, n, depth, 2 * node + 2, level + 1)


def tree_depth(int64_t n, int leaf_size):
    """Smallest depth whose leaves hold at most ``leaf_size`` points."""
    cdef int depth = 0
    while depth < 31 and ((n + (<int64_t>1 << depth) - 1) >> depth) > leaf_size:
        depth += 1
    return depth


def build_tree(GtPoint[::1] pts, int leaf_size, bint parallel_top=True):
    """Reorder ``pts`` in place into KD leaf order and return node boxes.

    Returns ``(bounds, depth)`` where ``bounds`` is float32 ``(2^(depth+1)-1, 6)``
    holding ``[xmin, ymin, zmin, xmax, ymax, zmax]`` per node.

    In numpy, this operation is equivalent to ``geotarget.index.build_tree_reference``
    (recursive ``np.argsort`` on the widest axis with ties broken by key).
    """
    cdef int64_t n = pts.shape[0]
    cdef int depth = tree_depth(n, leaf_size)
    cdef int64_t nnodes = (<int64_t>2 << depth) - 1
    bounds_arr = np.empty((nnodes, 6), dtype=np.float32)
    cdef float[:, ::1] bview = bounds_arr
    cdef float* bounds = &bview[0, 0]
    cdef GtPoint* p = &pts[0] if n > 0 else NULL
    cdef int level, cut
    cdef int64_t j, count
    if n == 0:
        bounds_arr[:] = np.array([1e30, 1e30, 1e30, -1e30, -1e30, -1e30], dtype=np.float32)  # empty box
        return bounds_arr, depth
    # Top levels: one node per thread-slot, level by level, until there are
    # enough independent subtrees to keep every core busy; below that, each
    # subtree is finished depth-first by one thread while it is hot in cache.
    cut = 0
    while cut < depth and (<int64_t>1 << cut) < 8 * gt_max_threads():
        cut += 1
    with nogil:
        for level in range(cut):
            count = <int64_t>1 << level
            if parallel_top and count < gt_max_threads():
                # Fewer ranges than cores (the root, on two cores): each partition
                # uses every core (gt_partition_par), else one core would stream
                # the whole 6.4 GB of a 400 M build alone.
                for j in range(count):
                    _split_node(p, bounds, n, depth, count - 1 + j, level, True)
            else:
                for j in prange(count, schedule="dynamic"):
                    _split_node(p, bounds, n, depth, count - 1 + j, level, False)
        count = <int64_t>1 << cut
        for j in prange(count, schedule="dynamic"):
            _build_node(p, bounds, n, depth, count - 1 + j, cut)
    return bounds_arr, depth


def copy_keys(const GtPoint[::1] pts, uint32_t[::1] keys):
    """Copy the key of every point into a contiguous array (the gather source of ``fill``).

    In numpy, this operation is equivalent to ``keys[:] = pts["key"]``.
    """
    cdef Py_ssize_t i, n = pts.shape[0]
    with nogil:
        for i in prange(n, schedule="static"):
            keys[i] = pts[i].key


# ---------------------------------------------------------------------------
# query
# ---------------------------------------------------------------------------

cdef struct Thresholds:
    bint everything
    double lo2, hi2           # node tests (float64)
    float flo2, fhi2          # point tests (float32)


cdef Thresholds _thresholds(double radius_km) noexcept nogil:
    """Squared-chord thresholds around ``T = 2 sin(r / 2R)``, widened by the guard band.

    Below ``lo2`` a point is surely inside, above ``hi2`` surely outside; in
    between the float64 haversine decides.  float32 rounding of the thresholds
    never widens the sure bands.
    """
    cdef Thresholds t
    cdef double half = radius_km / (2.0 * EARTH_R)
    # Cap of angular radius r/R; beyond half the circumference it is the sphere.
    t.everything = half >= 1.5707963267948966
    cdef double T = 2.0 * sin(half) if not t.everything else 2.0
    cdef double lo = T - GUARD
    cdef double hi = T + GUARD
    t.lo2 = lo * lo if lo > 0 else -1.0
    t.hi2 = hi * hi
    t.flo2 = <float>t.lo2
    t.fhi2 = <float>t.hi2
    if <double>t.flo2 > t.lo2:
        t.flo2 = <float>(t.lo2 * (1.0 - 1e-7))
    if <double>t.fhi2 < t.hi2:
        t.fhi2 = <float>(t.hi2 * (1.0 + 1e-7))
    return t


cdef struct QueryCtx:
    const GtPoint* pts        # (n,) leaf-ordered unit vectors (+ key)
    const uint32_t* keys      # (n,) leaf-ordered device keys
    const float* bounds       # (nnodes, 6)
    const double* lat         # store latitude by key (exact re-check)
    const double* lon
    const uint32_t* seen      # (n,) leaf-ordered last-seen seconds, or NULL
    const uint32_t* seen_bounds  # (nnodes, 2) min/max last-seen per node, or NULL
    const int8_t* app         # (n,) leaf-ordered app codes, or NULL
    int64_t n
    int depth
    double clat, clon, radius
    double cx, cy, cz
    float fx, fy, fz
    double lo2, hi2           # node tests (float64)
    float flo2, fhi2          # point tests (float32)
    bint everything
    bint filter_seen
    uint32_t seen_min
    bint filter_app
    uint64_t app_mask[4]
    bint emit
    int64_t count
    int64_t exact_checks
    int64_t nodes             # nodes whose box was tested
    int64_t leaf_points       # points tested in boundary leaves
    vector[int64_t]* runs     # flat [s0, e0, s1, e1, ...]


cdef inline bint _passes(QueryCtx* q, int64_t row) noexcept nogil:
    cdef int code
    if q.filter_seen and q.seen[row] < q.seen_min:
        return False
    if q.filter_app:
        code = <int>(<uint8_t>q.app[row])
        if not (q.app_mask[code >> 6] >> (code & 63)) & 1:
            return False
    return True


cdef inline void _emit(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    q.count += e - s
    if not q.emit:
        return
    cdef size_t m = q.runs.size()
    if m > 0 and q.runs[0][m - 1] == s:
        q.runs[0][m - 1] = e
    else:
        q.runs.push_back(s)
        q.runs.push_back(e)


cdef inline void _track(QueryCtx* q, int64_t* run_start, int64_t r, bint inside) noexcept nogil:
    """Extend the open run with row ``r`` if it is inside, else close the run (if any)."""
    if inside:
        if run_start[0] < 0:
            run_start[0] = r
    elif run_start[0] >= 0:
        _emit(q, run_start[0], r)
        run_start[0] = -1


cdef inline void _emit_range(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    cdef int64_t r, run_start
    if not (q.filter_seen or q.filter_app):
        _emit(q, s, e)
        return
    run_start = -1
    for r in range(s, e):
        _track(q, &run_start, r, _passes(q, r))
    if run_start >= 0:
        _emit(q, run_start, e)


cdef void _leaf(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    """A boundary leaf: a branch-free pass first, the careful pass only if needed.

    Most boundary leaves turn out wholly inside or wholly outside, with no
    point in the guard band; the first loop (which the compiler vectorises)
    settles those with one count, and only mixed leaves pay for run tracking.
    """
    cdef int64_t r, inside = 0, band = 0
    cdef float fx = q.fx, fy = q.fy, fz = q.fz, flo2 = q.flo2, fhi2 = q.fhi2
    cdef float dx, dy, dz, d2
    cdef const GtPoint* p = q.pts
    q.leaf_points += e - s
    for r in range(s, e):
        dx = p[r].x - fx
        dy = p[r].y - fy
        dz = p[r].z - fz
        d2 = dx * dx + dy * dy + dz * dz
        inside += d2 <= flo2
        band += (d2 > flo2) & (d2 <= fhi2)
    if band == 0 and not (q.filter_seen or q.filter_app):
        if inside == e - s:
            _emit(q, s, e)
            return
        if inside == 0:
            return
        if not q.emit:
            q.count += inside
            return
    _leaf_exact(q, s, e)


cdef void _leaf_exact(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    cdef int64_t r, run_start = -1
    cdef float dx, dy, dz, d2
    cdef bint inside
    cdef uint32_t k
    for r in range(s, e):
        dx = q.pts[r].x - q.fx
        dy = q.pts[r].y - q.fy
        dz = q.pts[r].z - q.fz
        d2 = dx * dx + dy * dy + dz * dz
        if d2 <= q.flo2:
            inside = True
        elif d2 > q.fhi2:
            inside = False
        else:
            q.exact_checks += 1
            k = q.pts[r].key   # in the record already: no miss on the keys array
            inside = _haversine_km(q.clat, q.clon, q.lat[k], q.lon[k]) <= q.radius
        if inside and (q.filter_seen or q.filter_app):
            inside = _passes(q, r)
        _track(q, &run_start, r, inside)
    if run_start >= 0:
        _emit(q, run_start, e)


cdef inline void _box_dist2(const float* b, double cx, double cy, double cz,
                            double* dmin2, double* dmax2) noexcept nogil:
    """Squared distance from a point to the nearest and the farthest point of a box."""
    cdef double c, lo, hi, t
    cdef int axis
    dmin2[0] = 0.0
    dmax2[0] = 0.0
    for axis in range(3):
        c = cx if axis == 0 else (cy if axis == 1 else cz)
        lo = b[axis]
        hi = b[axis + 3]
        if c < lo:
            t = lo - c
            dmin2[0] += t * t
        elif c > hi:
            t = c - hi
            dmin2[0] += t * t
        t = c - lo if c - lo > hi - c else hi - c
        dmax2[0] += t * t


# What the traversal found, executed afterwards in row order (see _query).
DEF ITEM_RANGE = 0      # inside, filters decide row by row (_emit_range)
DEF ITEM_LEAF = 1       # a boundary leaf (_leaf)
DEF ITEM_RUN = 2        # inside, every row passes (_emit)
# Boundary leaves whose points are prefetched ahead of the one being tested.
# At 400 M devices the points are a 6.4 GB mapping and each boundary leaf is a
# cache and TLB miss; with this many in flight the misses overlap.
DEF LEAF_PREFETCH = 12


cdef inline void _defer(vector[int64_t]* items, int64_t kind, int64_t s, int64_t e) noexcept nogil:
    items.push_back(kind)
    items.push_back(s)
    items.push_back(e)


cdef inline void _prefetch_rows(const GtPoint* p, int64_t s, int64_t e) noexcept nogil:
    cdef const char* a = <const char*>(p + s)
    cdef const char* z = <const char*>(p + e)
    while a < z:
        __builtin_prefetch(a)
        a += 64


cdef void _query(QueryCtx* q) noexcept nogil:
    """Two passes: walk the node boxes, then execute what the walk found, in row order.

    The walk only touches node boxes and records inside ranges and boundary
    leaves; the second pass tests the leaves with their points prefetched
    ``LEAF_PREFETCH`` leaves ahead, so that on a large index the memory
    latency of one leaf overlaps the tests of the ones before it.
    """
    cdef int64_t stack_node[64]
    cdef int stack_level[64]
    cdef int top = 0
    cdef int64_t node, j, s, e, i, m, pf, pending
    cdef int level
    cdef double dmin2, dmax2
    cdef vector[int64_t] items
    if q.n == 0:
        return
    if q.everything:
        _emit_range(q, 0, q.n)
        return
    stack_node[0] = 0
    stack_level[0] = 0
    top = 1
    while top > 0:
        top -= 1
        node = stack_node[top]
        level = stack_level[top]
        j = node + 1 - (<int64_t>1 << level)
        s = _node_start(j, level, q.n)
        e = _node_start(j + 1, level, q.n)
        if e <= s:
            continue
        q.nodes += 1
        _box_dist2(q.bounds + 6 * node, q.cx, q.cy, q.cz, &dmin2, &dmax2)
        if dmin2 > q.hi2:
            continue
        if q.filter_seen and q.seen_bounds != NULL and q.seen_bounds[2 * node + 1] < q.seen_min:
            continue  # every device here was last seen before the cutoff
        if dmax2 <= q.lo2:
            if not (q.filter_seen or q.filter_app):
                _defer(&items, ITEM_RUN, s, e)
                continue
            if (not q.filter_app and q.seen_bounds != NULL
                    and q.seen_bounds[2 * node] >= q.seen_min):
                _defer(&items, ITEM_RUN, s, e)  # inside, and every device here is recent enough
                continue
            if level == q.depth or q.seen_bounds == NULL or q.filter_app:
                _defer(&items, ITEM_RANGE, s, e)
                continue
            # mixed ages: let the children decide (their boxes are inside too)
        if level == q.depth:
            _defer(&items, ITEM_LEAF, s, e)
            continue
        # Push right first so the left subtree is visited first: items come
        # out in ascending row order, which keeps runs sorted and mergeable.
        # Both children's boxes share a cache line or two; fetch them now.
        __builtin_prefetch(q.bounds + 6 * (2 * node + 1))
        stack_node[top] = 2 * node + 2
        stack_level[top] = level + 1
        stack_node[top + 1] = 2 * node + 1
        stack_level[top + 1] = level + 1
        top += 2
    m = items.size() // 3
    pf = 0
    pending = 0     # boundary leaves in (i, pf) already prefetched
    for i in range(m):
        while pf < m and pending < LEAF_PREFETCH:
            if items[3 * pf] == ITEM_LEAF:
                _prefetch_rows(q.pts, items[3 * pf + 1], items[3 * pf + 2])
                pending += 1
            pf += 1
        if items[3 * i] == ITEM_LEAF:
            pending -= 1
            _leaf(q, items[3 * i + 1], items[3 * i + 2])
        elif items[3 * i] == ITEM_RUN:
            _emit(q, items[3 * i + 1], items[3 * i + 2])
        else:
            _emit_range(q, items[3 * i + 1], items[3 * i + 2])


cdef class Tree:
    """A built index's arrays, acquired once, so that a query only passes its circle.

    ``query`` works in numpy terms as::

        d = haversine_km(clat, clon, lat[keys], lon[keys])
        mask = d <= radius_km
        if seen_min >= 0: mask &= seen >= seen_min
        if app_codes is not None: mask &= np.isin(app, app_codes)
        rows = np.flatnonzero(mask)          # runs are the maximal ranges of rows
    """
    cdef const GtPoint[::1] pts
    cdef const uint32_t[::1] keys
    cdef const float[:, ::1] bounds
    cdef const double[::1] lat
    cdef const double[::1] lon
    cdef const uint32_t[::1] seen
    cdef const int8_t[::1] app
    cdef const uint32_t[:, ::1] seen_bounds
    cdef int depth
    cdef int64_t n

    def __init__(self, const GtPoint[::1] pts, const uint32_t[::1] keys, const float[:, ::1] bounds,
                 int depth, const double[::1] lat, const double[::1] lon, const uint32_t[::1] seen,
                 const int8_t[::1] app, const uint32_t[:, ::1] seen_bounds):
        self.pts, self.keys, self.bounds, self.depth = pts, keys, bounds, depth
        self.lat, self.lon, self.seen, self.app, self.seen_bounds = lat, lon, seen, app, seen_bounds
        self.n = pts.shape[0]

    def query(self, double clat, double clon, double radius_km, int64_t seen_min=-1,
              object app_codes=None, bint emit=True):
        """Rows within ``radius_km`` of (clat, clon), as sorted disjoint runs.

        Returns ``(runs, count, stats)``: ``runs`` is int64 ``(k, 2)`` of
        ``[start, end)`` row ranges in ascending order (``None`` when
        ``emit=False``); ``stats`` counts tested nodes, boundary-leaf points and
        exact re-checks.  ``seen_min`` (epoch seconds, -1 for none) and
        ``app_codes`` (int codes, None for all) filter rows.
        """
        cdef QueryCtx q
        cdef vector[int64_t] runs
        cdef double phi, lam, cp
        cdef int code
        q.n = self.n
        q.pts = &self.pts[0] if q.n > 0 else NULL
        q.keys = &self.keys[0] if q.n > 0 else NULL
        q.bounds = &self.bounds[0, 0]
        q.lat = &self.lat[0] if self.lat.shape[0] > 0 else NULL
        q.lon = &self.lon[0] if self.lon.shape[0] > 0 else NULL
        q.depth = self.depth
        q.clat = clat
        q.clon = clon
        q.radius = radius_km
        phi = clat * DEG2RAD
        lam = clon * DEG2RAD
        cp = cos(phi)
        # The centre is rounded to float32 like the points; the guard band covers it.
        q.fx = <float>(cp * cos(lam))
        q.fy = <float>(cp * sin(lam))
        q.fz = <float>sin(phi)
        q.cx = q.fx
        q.cy = q.fy
        q.cz = q.fz
        cdef Thresholds th = _thresholds(radius_km)
        q.everything = th.everything
        q.lo2, q.hi2, q.flo2, q.fhi2 = th.lo2, th.hi2, th.flo2, th.fhi2
        q.filter_seen = seen_min >= 0
        q.seen = &self.seen[0] if self.seen.shape[0] > 0 else NULL
        q.seen_min = <uint32_t>(seen_min if seen_min >= 0 else 0)
        q.seen_bounds = &self.seen_bounds[0, 0] if self.seen_bounds.shape[0] > 0 else NULL
        q.filter_app = app_codes is not None
        q.app = &self.app[0] if self.app.shape[0] > 0 else NULL
        q.app_mask[0] = q.app_mask[1] = q.app_mask[2] = q.app_mask[3] = 0
        if q.filter_app:
            for code in app_codes:
                code = code & 255
                q.app_mask[code >> 6] |= (<uint64_t>1) << (code & 63)
        q.emit = emit
        q.count = 0
        q.exact_checks = 0
        q.nodes = 0
        q.leaf_points = 0
        q.runs = &runs
        with nogil:
            _query(&q)
        stats = {"nodes": q.nodes, "leaf_points": q.leaf_points, "exact_checks": q.exact_checks}
        if not emit:
            return None, q.count, stats
        out = np.empty((runs.size() // 2, 2), dtype=np.int64)
        cdef int64_t[:, ::1] ov = out
        if runs.size() > 0:
            memcpy(&ov[0, 0], runs.data(), runs.size() * sizeof(int64_t))
        return out, q.count, stats


# ---------------------------------------------------------------------------
# gathers
# ---------------------------------------------------------------------------

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


def node_seen_bounds(const uint32_t[::1] seen, int depth):
    """Per-node (min, max) of last-seen seconds over each node's rows, uint32 ``(nnodes, 2)``.

    In numpy, this operation is equivalent to, for every node i at level L, j = i + 1 - 2^L::

        s, e = (j * n) >> L, ((j + 1) * n) >> L
        out[i] = (seen[s:e].min(), seen[s:e].max())      # (2^32-1, 0) for an empty node
    """
    cdef int64_t n = seen.shape[0]
    cdef int64_t nnodes = (<int64_t>2 << depth) - 1
    cdef int64_t leaves = <int64_t>1 << depth
    cdef int64_t j, s, e, r, node
    cdef int level
    cdef uint32_t lo, hi, a, b
    out = np.empty((nnodes, 2), dtype=np.uint32)
    cdef uint32_t[:, ::1] o = out
    with nogil:
        for j in prange(leaves, schedule="static"):
            s = _node_start(j, depth, n)
            e = _node_start(j + 1, depth, n)
            lo = 0xFFFFFFFF
            hi = 0
            for r in range(s, e):
                if seen[r] < lo:
                    lo = seen[r]
                if seen[r] > hi:
                    hi = seen[r]
            o[leaves - 1 + j, 0] = lo
            o[leaves - 1 + j, 1] = hi
        for level in range(depth - 1, -1, -1):
            for node in range((<int64_t>1 << level) - 1, (<int64_t>2 << level) - 1):
                a = o[2 * node + 1, 0]
                b = o[2 * node + 2, 0]
                o[node, 0] = a if a < b else b
                a = o[2 * node + 1, 1]
                b = o[2 * node + 2, 1]
                o[node, 1] = a if a > b else b
    return out


def block_bounds(const GtPoint[::1] pts, int block):
    """Boxes of consecutive blocks of ``block`` points, float32 ``(ceil(n / block), 6)``.

    In numpy, this operation is equivalent to, for each block b::

        p = pts[b * block:(b + 1) * block]
        out[b] = [p["x"].min(), p["y"].min(), p["z"].min(), p["x"].max(), p["y"].max(), p["z"].max()]
    """
    cdef Py_ssize_t b, n = pts.shape[0]
    cdef Py_ssize_t nb = (n + block - 1) // block
    out = np.empty((nb, 6), dtype=np.float32)
    cdef float[:, ::1] o = out
    with nogil:
        for b in prange(nb, schedule="static"):
            _bbox(&pts[b * block], min(n, (b + 1) * block) - b * block, &o[b, 0])
    return out


cdef inline int64_t _first_end_after(const int64_t* r, int64_t lo, int64_t hi, int64_t key) noexcept nogil:
    """Index of the first range in ``r[lo:hi]`` (flat ``[s, e]`` pairs, sorted) whose end exceeds ``key``."""
    cdef int64_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if r[2 * mid + 1] <= key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline bint _in_ranges(const int64_t* r, int64_t lo, int64_t hi, int64_t* cur, int64_t key) noexcept nogil:
    """Is ``key`` in one of the sorted disjoint ranges ``r[lo:hi]``?

    ``cur`` remembers where the last lookup ended: keys that ascend (the usual
    case) cost a step or two; a jump, or a key below the last one, costs one
    binary search.  Invariant after the call: every range before ``cur`` ends
    at or below ``key``.
    """
    cdef int64_t c = cur[0]
    if c < lo or (c > lo and r[2 * (c - 1) + 1] > key):
        c = _first_end_after(r, lo, hi, key)
    elif c < hi and r[2 * c + 1] <= key:
        c += 1
        if c < hi and r[2 * c + 1] <= key:
            c = _first_end_after(r, c, hi, key)
    cur[0] = c
    return c < hi and r[2 * c] <= key


def circles_new_points(const GtPoint[::1] pts, const float[:, ::1] blocks, int block,
                       const double[::1] lat, const double[::1] lon, const double[:, ::1] circles,
                       const int64_t[:, ::1] skip, const int64_t[::1] skip_offsets):
    """For every circle, the keys of the given points inside it and not in its skip ranges.

    ``pts`` are unit vectors with their keys and ``lat``/``lon`` their
    stored coordinates (the same order: the exact re-check reads them
    sequentially, never the store), cut into blocks of ``block`` points with
    boxes (``block_bounds``); ``circles`` is
    ``(k, 3)`` of (lat, lon, radius_km); circle c skips the keys in
    ``skip[skip_offsets[c]:skip_offsets[c + 1]]``, sorted disjoint
    ``[start, end)`` ranges (the devices an alert already notified).  This is
    the re-targeting of a refresh: the devices a generation changed, tested
    against every open alert in one pass over both cores, block by block, with
    the box tests, two-threshold float32 chord test and float64 haversine
    re-check of :meth:`Tree.query`.  Only the few devices that are new to an
    alert come out.

    Returns ``(keys, offsets)``: circle c's keys are ``keys[offsets[c]:offsets[c + 1]]``,
    in input order.  In numpy, this operation is equivalent to, for each c::

        k = pts["key"]
        inside = haversine_km(circles[c, 0], circles[c, 1], lat, lon) <= circles[c, 2]
        notified = np.zeros(len(k), bool)
        for s, e in skip[skip_offsets[c]:skip_offsets[c + 1]]:
            notified |= (k >= s) & (k < e)
        keys_c = k[inside & ~notified]
    """
    cdef Py_ssize_t n = pts.shape[0], nb = blocks.shape[0], k = circles.shape[0]
    cdef Py_ssize_t ch, nch, b, b0, b1, c, i, s, e, slot
    if lat.shape[0] != n or lon.shape[0] != n:
        raise ValueError(f"lat/lon hold {lat.shape[0]}/{lon.shape[0]} values for {n} points")
    # Chunks of consecutive blocks, taken in any order by either core; each
    # chunk's output per circle is concatenated in chunk order, so the result
    # keeps input order whatever the schedule.
    nch = min(nb, 16 * gt_max_threads()) if nb else 0
    cdef vector[float] cf = vector[float](3 * k)
    cdef vector[Thresholds] th = vector[Thresholds](k)
    cdef double phi, lam, cp, dmin2, dmax2
    for c in range(k):
        phi = circles[c, 0] * DEG2RAD
        lam = circles[c, 1] * DEG2RAD
        cp = cos(phi)
        cf[3 * c] = <float>(cp * cos(lam))
        cf[3 * c + 1] = <float>(cp * sin(lam))
        cf[3 * c + 2] = <float>sin(phi)
        th[c] = _thresholds(circles[c, 2])
    cdef vector[vector[uint32_t]] outs = vector[vector[uint32_t]](nch * k)
    cdef vector[int64_t] cursors = vector[int64_t](nch * k, -1)
    cdef const int64_t* sk = &skip[0, 0] if skip.shape[0] > 0 else NULL
    cdef float dx, dy, dz, d2, fx, fy, fz
    cdef uint32_t key, kmin, kmax
    cdef bint inside, whole
    with nogil:
        for ch in prange(nch, schedule="dynamic"):
            b0 = (ch * nb) // nch
            b1 = ((ch + 1) * nb) // nch
            # Assigned here so that prange makes them thread-private: they are
            # otherwise only written through pointers, which Cython would share.
            dmin2 = 0.0
            dmax2 = 0.0
            for b in range(b0, b1):
                s = b * block
                e = min(n, s + block)
                kmin = pts[s].key
                kmax = kmin
                for i in range(s + 1, e):
                    if pts[i].key < kmin:
                        kmin = pts[i].key
                    if pts[i].key > kmax:
                        kmax = pts[i].key
                for c in range(k):
                    slot = ch * k + c
                    # A block whose keys all lie in one skipped range has nothing
                    # new for this circle, wherever its points are: most blocks
                    # inside an alert's circle were notified long ago.
                    if skip_offsets[c + 1] > skip_offsets[c] and _in_ranges(
                            sk, skip_offsets[c], skip_offsets[c + 1], &cursors[slot], kmin) \
                            and sk[2 * cursors[slot] + 1] > kmax:
                        continue
                    whole = th[c].everything
                    if not whole:
                        _box_dist2(&blocks[b, 0], cf[3 * c], cf[3 * c + 1], cf[3 * c + 2], &dmin2, &dmax2)
                        if dmin2 > th[c].hi2:
                            continue
                        whole = dmax2 <= th[c].lo2
                    fx = cf[3 * c]
                    fy = cf[3 * c + 1]
                    fz = cf[3 * c + 2]
                    for i in range(s, e):
                        key = pts[i].key
                        inside = whole
                        if not inside:
                            dx = pts[i].x - fx
                            dy = pts[i].y - fy
                            dz = pts[i].z - fz
                            d2 = dx * dx + dy * dy + dz * dz
                            if d2 <= th[c].flo2:
                                inside = True
                            elif d2 <= th[c].fhi2:
                                inside = _haversine_km(circles[c, 0], circles[c, 1], lat[i], lon[i]) <= circles[c, 2]
                        if inside and not (skip_offsets[c + 1] > skip_offsets[c] and _in_ranges(
                                sk, skip_offsets[c], skip_offsets[c + 1], &cursors[slot], key)):
                            outs[slot].push_back(key)
    offsets = np.zeros(k + 1, dtype=np.int64)
    cdef int64_t[::1] ov = offsets
    for c in range(k):
        ov[c + 1] = ov[c]
        for ch in range(nch):
            ov[c + 1] += outs[ch * k + c].size()
    out = np.empty(ov[k], dtype=np.uint32)
    cdef uint32_t[::1] o = out
    cdef int64_t at
    for c in range(k):
        at = ov[c]
        for ch in range(nch):
            slot = ch * k + c
            if outs[slot].size():
                memcpy(&o[at], outs[slot].data(), outs[slot].size() * sizeof(uint32_t))
                at += outs[slot].size()
    return out, offsets


cdef inline void _push_range(vector[int64_t]* v, int64_t s, int64_t e) noexcept nogil:
    cdef size_t m = v.size()
    if m > 0 and v[0][m - 1] == s:
        v[0][m - 1] = e
    else:
        v.push_back(s)
        v.push_back(e)


cdef inline uint32_t _u32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t _u16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


def bitmap_ranges(const uint8_t[::1] buf):
    """The maximal ``[start, end)`` runs of a roaring bitmap, from its portable serialisation.

    Reads the RoaringFormatSpec layout (cookie, descriptive header, optional
    run flags and offsets, then array, bitmap and run containers) without
    materialising the values, so a 60 M-device audience held as a few
    thousand runs costs a few thousand steps.  Raises ``ValueError`` on bytes
    that are not a well-formed serialisation.  In numpy, this operation is
    equivalent to ``consecutive_ranges(np.asarray(BitMap.deserialize(buf).to_array(), np.uint32))``.
    """
    cdef Py_ssize_t size_b = buf.shape[0], pos, size, i, j, card, nruns
    cdef const uint8_t* p = &buf[0] if size_b > 0 else NULL
    cdef uint32_t cookie
    cdef bint has_run
    cdef Py_ssize_t flags_at = 0, desc_at
    cdef int64_t base, st, ln, t, ones
    cdef uint64_t w, x
    cdef vector[int64_t] v
    if size_b < 4:
        raise ValueError("roaring bitmap: truncated header")
    cookie = _u32(p)
    if (cookie & 0xFFFF) == 12347:
        has_run = True
        size = (cookie >> 16) + 1
        flags_at = 4
        pos = 4 + (size + 7) // 8
    elif cookie == 12346:
        if size_b < 8:
            raise ValueError("roaring bitmap: truncated header")
        has_run = False
        size = _u32(p + 4)
        pos = 8
    else:
        raise ValueError(f"roaring bitmap: unknown cookie {cookie}")
    desc_at = pos
    pos += 4 * size
    if not has_run or size >= 4:
        pos += 4 * size   # offset header; containers are read in order, so it is not needed
    if pos > size_b:
        raise ValueError("roaring bitmap: truncated header")
    for i in range(size):
        base = <int64_t>_u16(p + desc_at + 4 * i) << 16
        card = <Py_ssize_t>_u16(p + desc_at + 4 * i + 2) + 1
        if has_run and (p[flags_at + i // 8] >> (i % 8)) & 1:
            if pos + 2 > size_b:
                raise ValueError("roaring bitmap: truncated run container")
            nruns = _u16(p + pos)
            pos += 2
            if pos + 4 * nruns > size_b:
                raise ValueError("roaring bitmap: truncated run container")
            for j in range(nruns):
                st = _u16(p + pos + 4 * j)
                ln = <int64_t>_u16(p + pos + 4 * j + 2) + 1
                _push_range(&v, base + st, base + st + ln)
            pos += 4 * nruns
        elif card > 4096:
            if pos + 8192 > size_b:
                raise ValueError("roaring bitmap: truncated bitmap container")
            for j in range(1024):
                memcpy(&w, p + pos + 8 * j, 8)
                while w:
                    t = __builtin_ctzll(w)
                    x = ~(w >> t)
                    ones = __builtin_ctzll(x) if x else 64 - t
                    _push_range(&v, base + 64 * j + t, base + 64 * j + t + ones)
                    if t + ones >= 64:
                        w = 0
                    else:
                        w &= ~((((<uint64_t>1) << ones) - 1) << t)
            pos += 8192
        else:
            if pos + 2 * card > size_b:
                raise ValueError("roaring bitmap: truncated array container")
            for j in range(card):
                st = _u16(p + pos + 2 * j)
                _push_range(&v, base + st, base + st + 1)
            pos += 2 * card
    out = np.empty((v.size() // 2, 2), dtype=np.int64)
    cdef int64_t[:, ::1] o = out
    if v.size():
        memcpy(&o[0, 0], v.data(), v.size() * sizeof(int64_t))
    return out
