# cython: language_level=3
"""What the kernel modules share: the point record, the OpenMP switch, the
exact haversine and the box and threshold tests of the query (docs/design.md, Distance).

Everything here is inline, so each module compiles its own copy; the
algorithm is explained at the top of ``geotarget/_kernels.pyx``.
"""
from libc.math cimport asin, cos, sin, sqrt
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

cdef extern from "gt_geom.hpp" nogil:
    ctypedef struct GtPoint:
        float x
        float y
        float z
        uint32_t key
    int gt_max_threads()
    int GT_HAVE_OPENMP
    double GT_EARTH_R
    double GT_DEG2RAD
    double GT_GUARD
    int __builtin_ctzll(unsigned long long)
    int __builtin_popcountll(unsigned long long)
    uint64_t gt_fresh_word(const uint32_t* s, uint32_t cut)
    void __builtin_prefetch(const void*)
    ctypedef struct GtFresh:
        const uint32_t* seen
        const uint16_t* coarse
        uint16_t qc
        uint32_t cut
    GtFresh gt_fresh_view "GtFresh::of"(const uint32_t* seen, const uint16_t* coarse, int64_t n, uint32_t top,
                                        uint32_t cut)


cdef inline double _haversine_km(double lat1, double lon1, double lat2, double lon2) noexcept nogil:
    # Same operation order as geotarget.geo.haversine_km (the NumPy reference).
    cdef double p1 = lat1 * GT_DEG2RAD
    cdef double p2 = lat2 * GT_DEG2RAD
    cdef double dphi = (lat2 - lat1) * GT_DEG2RAD
    cdef double dlmb = (lon2 - lon1) * GT_DEG2RAD
    cdef double s1 = sin(dphi * 0.5)
    cdef double s2 = sin(dlmb * 0.5)
    cdef double a = s1 * s1 + cos(p1) * cos(p2) * s2 * s2
    if a > 1.0:
        a = 1.0
    return 2.0 * GT_EARTH_R * asin(sqrt(a))


cdef inline void _bbox(const GtPoint* p, int64_t count, float* box) noexcept nogil:
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


cdef struct Thresholds:
    bint everything
    double lo2, hi2           # node tests (float64)
    float flo2, fhi2          # point tests (float32)


cdef inline Thresholds _thresholds(double radius_km) noexcept nogil:
    """Squared-chord thresholds around ``T = 2 sin(r / 2R)``, widened by the guard band.

    Below ``lo2`` a point is surely inside, above ``hi2`` surely outside; in
    between the float64 haversine decides.  float32 rounding of the thresholds
    never widens the sure bands.
    """
    cdef Thresholds t
    cdef double half = radius_km / (2.0 * GT_EARTH_R)
    # Cap of angular radius r/R; beyond half the circumference it is the sphere.
    t.everything = half >= 1.5707963267948966
    cdef double T = 2.0 * sin(half) if not t.everything else 2.0
    cdef double lo = T - GT_GUARD
    cdef double hi = T + GT_GUARD
    t.lo2 = lo * lo if lo > 0 else -1.0
    t.hi2 = hi * hi
    t.flo2 = <float>t.lo2
    t.fhi2 = <float>t.hi2
    if <double>t.flo2 > t.lo2:
        t.flo2 = <float>(t.lo2 * (1.0 - 1e-7))
    if <double>t.fhi2 < t.hi2:
        t.fhi2 = <float>(t.hi2 * (1.0 + 1e-7))
    return t


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
