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

/* out[r] = gt_coarse(seen[r], top) over nt threads. */
static void gt_coarse_column(const uint32_t* seen, int64_t n, uint32_t top, uint16_t* out, int nt) {
    const int64_t C = (int64_t)1 << 20;
    gt_par((n + C - 1) / C, nt, [&](int64_t ch) {
        int64_t s = ch * C, e = s + C < n ? s + C : n;
        for (int64_t r = s; r < e; r++) out[r] = gt_coarse(seen[r], top);
    });
}

/* How many of rows [0, n) were seen at or after cut, from their coarse
   values q (qc = gt_coarse(cut, top)) and, for values equal to qc, their
   last-seen s.  SSE2, 32 rows a step: four 16-bit compares summed and
   subtracted into 16-bit counters (4096 steps at most before pmaddwd sums
   them), and one branch, almost never taken, on whether a row shares qc. */
static inline int64_t gt_fresh_count_coarse(const uint16_t* q, const uint32_t* s, int64_t n, uint16_t qc,
                                            uint32_t cut) {
    int64_t r = 0, kept = 0;
#if defined(__SSE2__)
    const __m128i bias = _mm_set1_epi16((short)0x8000);
    const __m128i above = _mm_set1_epi16((short)(qc ^ 0x8000));   /* unsigned compare via signed */
    const __m128i equal = _mm_set1_epi16((short)qc);
    const __m128i ones = _mm_set1_epi16(1);
    while (r + 32 <= n) {
        int64_t stop = r + 32 * 4096 < n ? r + 32 * 4096 : n;
        __m128i acc = _mm_setzero_si128();
        for (; r + 32 <= stop; r += 32) {
            __m128i a = _mm_loadu_si128((const __m128i*)(q + r));
            __m128i b = _mm_loadu_si128((const __m128i*)(q + r + 8));
            __m128i c = _mm_loadu_si128((const __m128i*)(q + r + 16));
            __m128i d = _mm_loadu_si128((const __m128i*)(q + r + 24));
            __m128i t = _mm_add_epi16(_mm_add_epi16(_mm_cmpgt_epi16(_mm_xor_si128(a, bias), above),
                                                    _mm_cmpgt_epi16(_mm_xor_si128(b, bias), above)),
                                      _mm_add_epi16(_mm_cmpgt_epi16(_mm_xor_si128(c, bias), above),
                                                    _mm_cmpgt_epi16(_mm_xor_si128(d, bias), above)));
            acc = _mm_sub_epi16(acc, t);
            __m128i e = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi16(a, equal), _mm_cmpeq_epi16(b, equal)),
                                     _mm_or_si128(_mm_cmpeq_epi16(c, equal), _mm_cmpeq_epi16(d, equal)));
            if (__builtin_expect(_mm_movemask_epi8(e), 0))
                for (int64_t j = r; j < r + 32; j++) kept += q[j] == qc && s[j] >= cut;
        }
        __m128i sum = _mm_madd_epi16(acc, ones);   /* four 32-bit sums of lane pairs */
        uint32_t lanes[4];
        _mm_storeu_si128((__m128i*)lanes, sum);
        kept += (int64_t)lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
#endif
    for (; r < n; r++) kept += q[r] > qc || (q[r] == qc && s[r] >= cut);
    return kept;
}

/* Rows [s, e) that f counts fresh: from their coarse values where f has
   them (qc as in gt_fresh_count_coarse), else from the 4 B of last-seen. */
static inline int64_t gt_fresh_count_rows(const GtFresh& f, int64_t s, int64_t e) {
    return f.coarse ? gt_fresh_count_coarse(f.coarse + s, f.seen + s, e - s, f.qc, f.cut)
                    : gt_fresh_count(f.seen + s, e - s, f.cut);
}

/* kept[i] = the rows >= cut of every fresh item i of a query's item list
   (flat (kind, start, end) triples; other kinds are left alone), over nt
   threads.  Items are cut into pieces of at most 2^16 rows and the pieces
   shared out in chunks of about 2^16 rows, so that one large item (a whole
   inside subtree when only the count is wanted) still splits over the
   cores.  Where f has coarse values they are read instead of the 4 B of
   last-seen (gt_fresh_count_rows).  first(arg), when not
   NULL, runs on the calling thread while the helpers start counting (a
   count's boundary leaves, which need no fresh count). */
static void gt_fresh_counts(const int64_t* items, int64_t m, int64_t fresh_kind, GtFresh f, int64_t* kept,
                            int nt, void (*first)(void*) = nullptr, void* arg = nullptr) {
    const int64_t P = (int64_t)1 << 16;
    std::vector<int64_t> piece;      /* flat (item, start, end) */
    std::vector<int64_t> at(1, 0);   /* chunk c holds pieces [at[c], at[c + 1]) */
    int64_t rows = 0;
    for (int64_t i = 0; i < m; i++) {
        if (items[3 * i] != fresh_kind) continue;
        kept[i] = 0;
        for (int64_t s = items[3 * i + 1], e = items[3 * i + 2]; s < e; s += P) {
            int64_t t = e - s > P ? s + P : e;
            piece.push_back(i); piece.push_back(s); piece.push_back(t);
            rows += t - s;
            if (rows >= P) { at.push_back((int64_t)piece.size() / 3); rows = 0; }
        }
    }
    int64_t np_ = (int64_t)piece.size() / 3;
    if (at.back() != np_) at.push_back(np_);
    std::vector<int64_t> got(np_);
    gt_par_first((int64_t)at.size() - 1, nt, [&](int64_t ch) {
        for (int64_t p = at[ch]; p < at[ch + 1]; p++) {
            got[p] = gt_fresh_count_rows(f, piece[3 * p + 1], piece[3 * p + 2]);
        }
    }, first, arg);
    for (int64_t p = 0; p < np_; p++) kept[piece[3 * p]] += got[p];
}
#endif
