/* Counting the rows of a query's fresh runs (geotarget/_kernels.pyx, _query). */
#ifndef GT_FRESH_HPP
#define GT_FRESH_HPP
#include "gt_geom.hpp"
#include "gt_pool.hpp"

/* How many of s[0 .. n) are >= cut.  SSE2 keeps four counts per vector (a
   true compare is -1, subtracted), so there is no mask to build and no
   popcount (baseline x86-64 has no popcnt instruction: GCC calls libgcc). */
static inline int64_t gt_fresh_count(const uint32_t* s, int64_t n, uint32_t cut) {
    int64_t r = 0, kept = 0;
#if defined(__SSE2__)
    const __m128i bias = _mm_set1_epi32((int)0x80000000u);
    const __m128i c = _mm_xor_si128(_mm_set1_epi32((int)(cut - 1)), bias);   /* v >= cut  <=>  v > cut - 1 */
    if (cut == 0) return n;
    while (r + 16 <= n) {
        /* at most 4096 steps per lane before the 32-bit counts are added up */
        int64_t stop = r + 16 * 4096 < n ? r + 16 * 4096 : n;
        __m128i acc = _mm_setzero_si128();
        for (; r + 16 <= stop; r += 16) {
            __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(s + r)), bias);
            __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(s + r + 4)), bias);
            __m128i d = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(s + r + 8)), bias);
            __m128i e = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(s + r + 12)), bias);
            acc = _mm_sub_epi32(acc, _mm_cmpgt_epi32(a, c));
            acc = _mm_sub_epi32(acc, _mm_cmpgt_epi32(b, c));
            acc = _mm_sub_epi32(acc, _mm_cmpgt_epi32(d, c));
            acc = _mm_sub_epi32(acc, _mm_cmpgt_epi32(e, c));
        }
        uint32_t lanes[4];
        _mm_storeu_si128((__m128i*)lanes, acc);
        kept += (int64_t)lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
#endif
    for (; r < n; r++) kept += s[r] >= cut;
    return kept;
}

/* kept[i] = the rows >= cut of every fresh item i of a query's item list
   (flat (kind, start, end) triples; other kinds are left alone), over nt
   threads, items shared out in chunks of about 2^16 rows. */
static void gt_fresh_counts(const int64_t* items, int64_t m, int64_t fresh_kind, const uint32_t* seen,
                            uint32_t cut, int64_t* kept, int nt) {
    std::vector<int64_t> at(1, 0);   /* chunk c holds items [at[c], at[c + 1]) */
    int64_t rows = 0;
    for (int64_t i = 0; i < m; i++) {
        if (items[3 * i] == fresh_kind) rows += items[3 * i + 2] - items[3 * i + 1];
        if (rows >= ((int64_t)1 << 16) || i == m - 1) { at.push_back(i + 1); rows = 0; }
    }
    int64_t nch = (int64_t)at.size() - 1;
    gt_par(nch, nt, [&](int64_t ch) {
        for (int64_t i = at[ch]; i < at[ch + 1]; i++)
            if (items[3 * i] == fresh_kind)
                kept[i] = gt_fresh_count(seen + items[3 * i + 1], items[3 * i + 2] - items[3 * i + 1], cut);
    });
}
#endif
