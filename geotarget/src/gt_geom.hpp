/* Shared by every kernel module: the point record, the OpenMP switch and the contract's constants (geotarget/_geom.pxd). */
#ifndef GT_GEOM_HPP
#define GT_GEOM_HPP

#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
static inline int gt_max_threads(void) { return omp_get_max_threads(); }
static const int GT_HAVE_OPENMP = 1;
#else
static inline int gt_max_threads(void) { return 1; }
static const int GT_HAVE_OPENMP = 0;
#endif
struct GtPoint { float x; float y; float z; uint32_t key; };
/* Mean Earth radius (IUGG), km: docs/design.md, Distance, fixes it. */
static const double GT_EARTH_R = 6371.0088;
static const double GT_DEG2RAD = 0.017453292519943295;
/* Guard band in chord units (unit sphere): the essay of _kernels.pyx, point 4. */
static const double GT_GUARD = 2e-6;

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
/* Wider x86 vectors, chosen at run time (GCC or Clang on x86-64): kernels
   with a variant for AVX2 (level 1) or AVX-512BW (level 2) call it when the
   CPU and OS support it, up to gt_simd_cap (tests lower it to check each
   variant against the others). */
#if defined(__x86_64__) && defined(__GNUC__)
#define GT_X86_SIMD 1
#include <immintrin.h>
#else
#define GT_X86_SIMD 0
#endif
static int gt_simd_cap = 2;
static inline int gt_simd_level(void) {
#if GT_X86_SIMD
    static const int have = __builtin_cpu_supports("avx512bw") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    return have < gt_simd_cap ? have : gt_simd_cap;
#else
    return 0;
#endif
}
/* Bit j set iff s[j] >= cut, for 64 last-seen values (SSE2: four compares
   a step; unsigned order is signed order with the top bit flipped). */
static inline uint64_t gt_fresh_word(const uint32_t* s, uint32_t cut) {
    uint64_t m = 0;
#if defined(__SSE2__)
    const __m128i bias = _mm_set1_epi32((int)0x80000000u);
    const __m128i c = _mm_xor_si128(_mm_set1_epi32((int)cut), bias);
    for (int j = 0; j < 64; j += 4) {
        __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(s + j)), bias);
        uint64_t lt = (uint64_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmplt_epi32(v, c)));
        m |= (~lt & 15) << j;
    }
#else
    for (int j = 0; j < 64; j++) m |= (uint64_t)(s[j] >= cut) << j;
#endif
    return m;
}

/* The coarse last-seen of a row: two bytes, 65535 - min(65535, (top - s) >> 2)
   (4-second steps over the 72.8 h before top, the column's newest last-seen),
   and 65535 for s >= top.  It is monotone in s whatever top is, so for a
   cut-off c with coarse value qc = gt_coarse(c, top), a row whose value is
   above qc was seen after c and one below qc before it: only the rows that
   share the cut-off's 4 s step need their 4 B of last-seen.  Counting fresh
   rows then reads half the bytes (docs/design.md, Dispatch path). */
static const int GT_COARSE_SHIFT = 2;
static inline uint16_t gt_coarse(uint32_t s, uint32_t top) {
    if (s >= top) return 65535;
    uint32_t d = (top - s) >> GT_COARSE_SHIFT;
    return (uint16_t)(65535 - (d < 65535 ? d : 65535));
}

/* Which rows were seen at or after cut, read from the coarse last-seen where
   it decides (coarse not NULL, qc = gt_coarse(cut, top)) and from the 4 B
   last-seen otherwise: the coarse column is half the bytes, and it is the one
   a query has just read.  Only rows whose coarse value equals qc (those of
   the cut-off's 4 s step) are read again in seen. */
struct GtFresh {
    const uint32_t* seen;
    const uint16_t* coarse;   /* NULL: seen alone */
    uint16_t qc;
    uint32_t cut;

    inline bool row(int64_t r) const {
        if (!coarse) return seen[r] >= cut;
        return coarse[r] > qc || (coarse[r] == qc && seen[r] >= cut);
    }
    /* The view of seen (n rows) and its coarse values (NULL when none were
       made, top their newest last-seen) for cut: the coarse values decide a
       row alone unless it shares the cut-off's 4 s step; a cut-off older
       than their 72.8 h window (value 0) or at or after the newest row
       (65535) gains nothing from them, and they are left out. */
    static inline GtFresh of(const uint32_t* seen, const uint16_t* coarse, int64_t n, uint32_t top, uint32_t cut) {
        GtFresh f;
        f.seen = seen;
        f.cut = cut;
        f.qc = coarse ? gt_coarse(cut, top) : 0;
        f.coarse = coarse && n > 0 && 0 < f.qc && f.qc < 65535 ? coarse : NULL;
        return f;
    }
    /* bit j set iff row r + j is fresh, for 64 rows */
    inline uint64_t word(int64_t r) const {
        if (!coarse) return gt_fresh_word(seen + r, cut);
        const uint16_t* q = coarse + r;
        uint64_t above = 0, equal = 0;
#if defined(__SSE2__)
        const __m128i bias = _mm_set1_epi16((short)0x8000);
        const __m128i c = _mm_set1_epi16((short)(qc ^ 0x8000));   /* unsigned compare via signed */
        const __m128i e = _mm_set1_epi16((short)qc);
        for (int j = 0; j < 64; j += 16) {
            __m128i a = _mm_loadu_si128((const __m128i*)(q + j));
            __m128i b = _mm_loadu_si128((const __m128i*)(q + j + 8));
            __m128i ga = _mm_cmpgt_epi16(_mm_xor_si128(a, bias), c);
            __m128i gb = _mm_cmpgt_epi16(_mm_xor_si128(b, bias), c);
            above |= (uint64_t)(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(ga, gb)) << j;
            equal |= (uint64_t)(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm_cmpeq_epi16(a, e),
                                                                           _mm_cmpeq_epi16(b, e))) << j;
        }
#else
        for (int j = 0; j < 64; j++) {
            above |= (uint64_t)(q[j] > qc) << j;
            equal |= (uint64_t)(q[j] == qc) << j;
        }
#endif
        return recheck(r, above, equal);
    }
    /* above, plus the rows of equal (sharing the cut-off's 4 s step) whose last-seen is >= cut */
    inline uint64_t recheck(int64_t r, uint64_t above, uint64_t equal) const {
        for (; equal; equal &= equal - 1) {
            int j = __builtin_ctzll(equal);
            above |= (uint64_t)(seen[r + j] >= cut) << j;
        }
        return above;
    }
#if GT_X86_SIMD
    /* word(r) for callers compiled for AVX-512BW: two unsigned compares of 32 values each */
    __attribute__((target("avx512bw"))) inline uint64_t word512(int64_t r) const {
        if (!coarse) {
            const __m512i c = _mm512_set1_epi32((int)cut);
            uint64_t m = 0;
            for (int j = 0; j < 64; j += 16)
                m |= (uint64_t)_mm512_cmpge_epu32_mask(_mm512_loadu_si512((const void*)(seen + r + j)), c) << j;
            return m;
        }
        const __m512i c = _mm512_set1_epi16((short)qc);
        __m512i a = _mm512_loadu_si512((const void*)(coarse + r)), b = _mm512_loadu_si512((const void*)(coarse + r + 32));
        uint64_t above = (uint64_t)_mm512_cmpgt_epu16_mask(a, c) | (uint64_t)_mm512_cmpgt_epu16_mask(b, c) << 32;
        uint64_t equal = (uint64_t)_mm512_cmpeq_epu16_mask(a, c) | (uint64_t)_mm512_cmpeq_epu16_mask(b, c) << 32;
        return recheck(r, above, equal);
    }
#endif
};

#endif
