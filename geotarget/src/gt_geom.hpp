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
/* Mean Earth radius (IUGG), km: DESIGN 2 fixes it. */
static const double GT_EARTH_R = 6371.0088;
static const double GT_DEG2RAD = 0.017453292519943295;
/* Guard band in chord units (unit sphere): the essay of _kernels.pyx, point 4. */
static const double GT_GUARD = 2e-6;

#endif
