/* Id lookups and id-index merges of store generations (geotarget/_store_kernels.pyx).

   Both walk two sorted sequences of very different lengths together and move
   through the long one by galloping; see the .pyx module docstring. */
#ifndef GT_STORE_HPP
#define GT_STORE_HPP
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
static inline int gts_threads(void) { return omp_get_max_threads(); }
#else
static inline int gts_threads(void) { return 1; }
#endif

/* First index p in [lo, n) with a[p] >= q (STRICT=0) or a[p] > q
   (STRICT=1), galloping forward from lo. */
template <int STRICT>
static inline int64_t gts_gallop(const uint64_t* a, int64_t n, int64_t lo, uint64_t q) {
    #define GTS_BEFORE(v) (STRICT ? (v) <= q : (v) < q)
    if (lo >= n || !GTS_BEFORE(a[lo])) return lo;
    int64_t step = 1, prev = lo;              /* invariant: a[prev] is before q */
    while (lo + step < n && GTS_BEFORE(a[lo + step])) { prev = lo + step; step <<= 1; }
    int64_t hi = lo + step < n ? lo + step : n; /* a[hi] is not before q, or hi == n */
    int64_t l = prev + 1;
    while (l < hi) {
        int64_t mid = l + ((hi - l) >> 1);
        if (GTS_BEFORE(a[mid])) l = mid + 1; else hi = mid;
    }
    return l;
    #undef GTS_BEFORE
}

/* Each thread takes one contiguous slice of the (sorted) queries, finds
   its first query by binary search, then gallops. */
static void gts_lookup_sorted(const uint64_t* ids, const uint32_t* keys, int64_t n,
                              const uint64_t* q, int64_t m, int64_t* out) {
    int nt = m >= (1 << 16) ? gts_threads() : 1;
    #pragma omp parallel num_threads(nt) if(nt > 1)
    {
        int t = 0, tn = 1;
        #ifdef _OPENMP
        t = omp_get_thread_num(); tn = omp_get_num_threads();
        #endif
        int64_t s = m * t / tn, e = m * (t + 1) / tn;
        int64_t p = 0;
        if (s < e) {
            int64_t lo = 0, hi = n;
            while (lo < hi) { int64_t mid = lo + ((hi - lo) >> 1); if (ids[mid] < q[s]) lo = mid + 1; else hi = mid; }
            p = lo;
        }
        for (int64_t i = s; i < e; i++) {
            p = gts_gallop<0>(ids, n, p, q[i]);
            out[i] = (p < n && ids[p] == q[i]) ? (int64_t)keys[p] : -1;
        }
    }
}

/* Stable merge, a first on ties: copy the run of a that precedes each
   element of b with memcpy. */
static void gts_merge(const uint64_t* a_ids, const uint32_t* a_keys, int64_t na,
                      const uint64_t* b_ids, const uint32_t* b_keys, int64_t nb,
                      uint64_t* o_ids, uint32_t* o_keys) {
    int64_t i = 0, o = 0;
    for (int64_t j = 0; j < nb; j++) {
        int64_t p = gts_gallop<1>(a_ids, na, i, b_ids[j]);
        if (p > i) {
            std::memcpy(o_ids + o, a_ids + i, (size_t)(p - i) * sizeof(uint64_t));
            std::memcpy(o_keys + o, a_keys + i, (size_t)(p - i) * sizeof(uint32_t));
            o += p - i; i = p;
        }
        o_ids[o] = b_ids[j]; o_keys[o] = b_keys[j]; o++;
    }
    if (na > i) {
        std::memcpy(o_ids + o, a_ids + i, (size_t)(na - i) * sizeof(uint64_t));
        std::memcpy(o_keys + o, a_keys + i, (size_t)(na - i) * sizeof(uint32_t));
    }
}

#endif  /* GT_STORE_HPP */
