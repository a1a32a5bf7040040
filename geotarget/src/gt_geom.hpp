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

#endif
