/* The index build's selection and partitions (geotarget/_kernels.pyx). */
#ifndef GT_BUILD_HPP
#define GT_BUILD_HPP
#include "gt_geom.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

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

#endif
