# cython: language_level=3
# distutils: language = c++
"""Compiled hot path of geotarget: KD-tree build, exact circle query, gathers.

Why the index is shaped the way it is
=====================================

An alert asks one question, many times: *which devices lie within r km of this
point?*  The answer must equal, device for device, what a float64 NumPy
haversine scan over the stored coordinates returns (docs/design.md, Distance), anywhere on
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
   contiguous arrays (validation lives in ``geotarget/spatial/index.py``), and return
   NumPy arrays of runs.  The build's array of (x, y, z, key) records *is* the
   serving layout (16 bytes a device), plus a contiguous copy of the keys
   (4 bytes) so that materialising an audience is ``memcpy`` of key ranges.
   When the rows are already in leaf order (a store ingested in one batch:
   the ingest sorted it with this same tree), the build finds every node
   split and moves nothing; the index rows are then the keys, and an
   audience is written as ranges without reading the keys at all.  Gathers
   run over both cores with OpenMP where it is available.

7. **The freshness filter reads last-seen once, without branches.**  Each
   node keeps the min/max last-seen of its rows, so an all-fresh subtree
   still leaves as one range and an all-stale one is skipped.  But devices
   report every few hours, so nearly every leaf of a 24 h audience holds a
   stale device.  An inside subtree of mixed ages (up to 16 leaves) therefore
   leaves as a *fresh run* ``(start, end, kept)``: ``kept`` is counted 64 rows
   at a time, and whoever materialises the audience (``fill``, the bitmap)
   drops the stale rows in the same pass as its copy.  Rows stay in leaf
   order, so an unfiltered audience is still ranges of keys.
   ``docs/design.md`` (Dispatch path) says why not leaves sorted by
   last-seen or recency tiers.

Every kernel names its NumPy equivalent in its docstring; the tests compare the
two on hypothesis-generated and adversarial inputs.

This module holds the build and the query.  Materialising audiences, gathers
and sorts live in ``_array_kernels.pyx``, the refresh's re-targeting and the
roaring reader in ``_refresh_kernels.pyx``; ``_geom.pxd`` holds what they
share (the point record, the exact haversine, the box and threshold tests).
"""

import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport cos, sin
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from libcpp.vector cimport vector

from geotarget._geom cimport (GT_DEG2RAD, GT_EARTH_R, GT_GUARD, GT_HAVE_OPENMP, GtFresh, GtPoint, Thresholds,
                              __builtin_popcountll, __builtin_prefetch, _bbox, _box_dist2, _haversine_km,
                              _thresholds, gt_fresh_view, gt_fresh_word, gt_max_threads)

cnp.import_array()

cdef extern from "gt_fresh.hpp" nogil:
    int GT_COARSE_SHIFT
    uint16_t gt_coarse(uint32_t s, uint32_t top)
    void gt_coarse_column(const uint32_t* seen, int64_t n, uint32_t top, uint16_t* out, int nt)
    int64_t gt_fresh_count_rows(const GtFresh& f, int64_t s, int64_t e)
    void gt_fresh_counts(const int64_t* items, int64_t m, int64_t fresh_kind, GtFresh f, int64_t* kept, int nt,
                         void (*first)(void*) noexcept nogil, void* arg)

cdef extern from "gt_build.hpp" nogil:
    void gt_select(GtPoint* first, int64_t nth, int64_t n, int axis, int par)

HAVE_OPENMP = bool(GT_HAVE_OPENMP)
#: Coarse last-seen values step in 2**COARSE_SHIFT seconds (gt_fresh.hpp).
COARSE_SHIFT = GT_COARSE_SHIFT
EARTH_RADIUS_KM = GT_EARTH_R
CHORD_GUARD = GT_GUARD

POINT_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("key", "<u4")])


def max_threads():
    """Number of OpenMP threads the kernels may use (1 without OpenMP)."""
    return gt_max_threads()


# ---------------------------------------------------------------------------
# exact distance
# ---------------------------------------------------------------------------

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
            phi = lat[i] * GT_DEG2RAD
            lam = lon[i] * GT_DEG2RAD
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

    In numpy, this operation is equivalent to ``geotarget.spatial.index.build_tree_reference``
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


def same_keys(const GtPoint[::1] pts, const uint32_t[::1] keys):
    """Whether the points carry exactly these keys, in this order.

    A refresh checks saved changed-device points against the store's changed
    keys before trusting them; NumPy's comparison of the strided key field
    took 1.5 s for 40 M points.  In numpy, this operation is equivalent to
    ``pts.shape[0] == keys.shape[0] and np.array_equal(pts["key"], keys)``.
    """
    cdef Py_ssize_t i, n = pts.shape[0]
    cdef int64_t bad = 0
    if keys.shape[0] != n:
        return False
    with nogil:
        for i in prange(n, schedule="static"):
            if pts[i].key != keys[i]:
                bad += 1
    return bad == 0


# ---------------------------------------------------------------------------
# query
# ---------------------------------------------------------------------------

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
    GtFresh fresh             # which rows were seen at or after the cut-off (gt_geom.hpp): seen, cut,
                              # and the coarse values with the cut-off's (coarse NULL without a filter)
    bint filter_app
    uint64_t app_mask[4]
    bint emit
    bint lazy                 # inside rows of mixed ages leave as fresh runs (no per-row runs)
    int64_t count
    int64_t exact_checks
    int64_t nodes             # nodes whose box was tested
    int64_t leaf_points       # points tested in boundary leaves
    vector[int64_t]* runs     # flat [s0, e0, kept0, s1, e1, kept1, ...]
    int64_t fresh_runs        # runs whose kept < e - s


cdef inline bint _passes(QueryCtx* q, int64_t row) noexcept nogil:
    cdef int code
    if q.filter_seen and q.fresh.seen[row] < q.fresh.cut:
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
    # extend the previous run if it ends here and keeps every row
    if m > 0 and q.runs[0][m - 2] == s and q.runs[0][m - 1] == q.runs[0][m - 2] - q.runs[0][m - 3]:
        q.runs[0][m - 2] = e
        q.runs[0][m - 1] += e - s
    else:
        q.runs.push_back(s)
        q.runs.push_back(e)
        q.runs.push_back(e - s)


cdef inline void _emit_fresh(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    """Rows of ``[s, e)`` (all inside the circle) seen at or after the cutoff, as one fresh run.

    The count is a branch-free pass over the leaf-ordered last-seen column;
    which rows pass is left to whoever materialises the audience (``fill``,
    ``bitmap``), which reads the same column again in the same pass as its
    copy.  Tracking runs row by row here cost a branch per row and, with
    one device in ten stale, a run per ten devices (5 M runs at 400 M).
    """
    _emit_fresh_kept(q, s, e, gt_fresh_count_rows(q.fresh, s, e))


cdef inline void _emit_fresh_kept(QueryCtx* q, int64_t s, int64_t e, int64_t kept) noexcept nogil:
    """``_emit_fresh`` with the rows of ``[s, e)`` seen at or after the cutoff already counted."""
    if kept == e - s:
        _emit(q, s, e)
        return
    if kept == 0:
        return
    q.count += kept
    if not q.emit:
        return
    q.fresh_runs += 1
    q.runs.push_back(s)
    q.runs.push_back(e)
    q.runs.push_back(kept)


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


cdef inline float _chord2(const GtPoint* p, float fx, float fy, float fz) noexcept nogil:
    """Squared chord (float32) from the query centre's unit vector to a point, as every leaf test takes it."""
    cdef float dx = p.x - fx, dy = p.y - fy, dz = p.z - fz
    return dx * dx + dy * dy + dz * dz


cdef void _leaf_count_fresh(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    """A boundary leaf of a count by last-seen alone: branch-free over the leaf.

    Rows seen since the cut-off and surely inside are counted in one pass;
    only fresh rows in the guard band pay for the exact test, in a second.
    """
    cdef int64_t r, inside = 0, band = 0
    cdef float fx = q.fx, fy = q.fy, fz = q.fz, flo2 = q.flo2, fhi2 = q.fhi2
    cdef float d2
    cdef const GtPoint* p = q.pts
    cdef const uint32_t* seen = q.fresh.seen
    cdef uint32_t cut = q.fresh.cut
    cdef bint fresh
    cdef uint32_t k
    for r in range(s, e):
        d2 = _chord2(&p[r], fx, fy, fz)
        fresh = seen[r] >= cut
        inside += (d2 <= flo2) & fresh
        band += (d2 > flo2) & (d2 <= fhi2) & fresh
    q.count += inside
    if band == 0:
        return
    for r in range(s, e):
        d2 = _chord2(&p[r], fx, fy, fz)
        if d2 > flo2 and d2 <= fhi2 and seen[r] >= cut:
            q.exact_checks += 1
            k = p[r].key
            q.count += _haversine_km(q.clat, q.clon, q.lat[k], q.lon[k]) <= q.radius


cdef void _leaf(QueryCtx* q, int64_t s, int64_t e) noexcept nogil:
    """A boundary leaf: a branch-free pass first, the careful pass only if needed.

    Most boundary leaves turn out wholly inside or wholly outside, with no
    point in the guard band; the first loop (which the compiler vectorises)
    settles those with one count, and only mixed leaves pay for run tracking.
    """
    cdef int64_t r, inside = 0, band = 0
    cdef float fx = q.fx, fy = q.fy, fz = q.fz, flo2 = q.flo2, fhi2 = q.fhi2
    cdef float d2
    cdef const GtPoint* p = q.pts
    q.leaf_points += e - s
    if q.lazy and not q.emit:
        _leaf_count_fresh(q, s, e)
        return
    for r in range(s, e):
        d2 = _chord2(&p[r], fx, fy, fz)
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
    cdef float d2
    cdef bint inside
    cdef uint32_t k
    for r in range(s, e):
        d2 = _chord2(&q.pts[r], q.fx, q.fy, q.fz)
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


# What the traversal found, executed afterwards in row order (see _query).
DEF ITEM_RANGE = 0      # inside, filters decide row by row (_emit_range)
DEF ITEM_LEAF = 1       # a boundary leaf (_leaf)
DEF ITEM_RUN = 2        # inside, every row passes (_emit)
DEF ITEM_FRESH = 3      # inside, rows pass by last-seen alone (_emit_fresh)
# Inside subtrees of mixed ages are split no further than this many levels
# above the leaves (16 leaves, ~1000 rows): deeper, the node tests cost more
# than the count they could skip, since with devices reporting every few
# hours nearly every leaf holds a stale one.
DEF FRESH_LEVELS = 4
# An inside subtree of mixed ages of at most this many rows is not walked at
# all: it leaves as fresh runs of FRESH_PIECE rows (big enough that the runs
# cost little, small enough that fill and the groupings, which give a fresh
# run whole to one core, stay balanced).  Larger ones are still walked, so a
# region whose devices are all stale or all fresh is found by its bounds.
# 20 M devices, dense 100 km, 24 h: within 0.195 -> 0.156 ms.
DEF FRESH_WHOLE_MAX = 1 << 16
DEF FRESH_PIECE = 4096
# From this many rows in fresh runs up, a query counts them over every core
# (gt_fresh.hpp) while the calling thread runs its second pass (1 MB of
# coarse last-seen, ~0.05 ms on one core; waking a helper costs microseconds).
# 20 M devices, dense 100 km, 24 h (575 k rows): within 0.155 -> 0.100 ms,
# count 0.097 -> 0.051 ms.
DEF FRESH_PARALLEL_MIN = 1 << 18
cdef int64_t _fresh_parallel_min = FRESH_PARALLEL_MIN


def fresh_parallel_min(value=None):
    """Rows in fresh items from which a query counts them over the cores beside its leaf tests.

    ``value`` first sets it (tests set 0, so that small random queries take
    that path too); returns the value in force.
    """
    global _fresh_parallel_min
    if value is not None:
        if value < 0:
            raise ValueError("fresh_parallel_min: rows are 0 or more")
        _fresh_parallel_min = value
    return _fresh_parallel_min
# Boundary leaves whose points are prefetched ahead of the one being tested.
# At 400 M devices the points are a 6.4 GB mapping and each boundary leaf is a
# cache and TLB miss; with this many in flight the misses overlap.
DEF LEAF_PREFETCH = 12


cdef inline void _defer(vector[int64_t]* items, int64_t kind, int64_t s, int64_t e) noexcept nogil:
    items.push_back(kind)
    items.push_back(s)
    items.push_back(e)


cdef inline void _prefetch_span(const void* start, const void* stop) noexcept nogil:
    """Prefetch every cache line of the bytes [start, stop), the last one included."""
    cdef const char* a = <const char*>start
    cdef const char* z = <const char*>stop
    while a < z:
        __builtin_prefetch(a)
        a += 64
    __builtin_prefetch(z - 1)   # the last line when the bytes straddle one more


cdef struct ItemPass:
    QueryCtx* q
    const int64_t* items      # flat (kind, start, end), in row order
    int64_t m
    const int64_t* kept       # rows kept per fresh item, or NULL to count them here
    bint fresh_elsewhere      # fresh items are counted by the caller (a count)
    bint fresh_later          # fresh items are counted meanwhile: emit (s, e, -1 - item), see _settle_fresh


cdef void _item_pass(void* arg) noexcept nogil:
    """Execute a walk's items in row order, boundary leaves prefetched ahead."""
    cdef ItemPass* ip = <ItemPass*>arg
    cdef QueryCtx* q = ip.q
    cdef const int64_t* items = ip.items
    cdef int64_t i, m = ip.m, pf = 0
    cdef int64_t pending = 0     # boundary leaves in (i, pf) already prefetched
    for i in range(m):
        while pf < m and pending < LEAF_PREFETCH:
            if items[3 * pf] == ITEM_LEAF:
                _prefetch_span(q.pts + items[3 * pf + 1], q.pts + items[3 * pf + 2])
                if q.filter_seen:
                    _prefetch_span(q.fresh.seen + items[3 * pf + 1], q.fresh.seen + items[3 * pf + 2])
                pending += 1
            pf += 1
        if items[3 * i] == ITEM_LEAF:
            pending -= 1
            _leaf(q, items[3 * i + 1], items[3 * i + 2])
        elif items[3 * i] == ITEM_RUN:
            _emit(q, items[3 * i + 1], items[3 * i + 2])
        elif items[3 * i] == ITEM_FRESH:
            if ip.fresh_elsewhere:
                continue
            if ip.fresh_later:
                q.runs.push_back(items[3 * i + 1])
                q.runs.push_back(items[3 * i + 2])
                q.runs.push_back(-1 - i)
            elif ip.kept != NULL:
                _emit_fresh_kept(q, items[3 * i + 1], items[3 * i + 2], ip.kept[i])
            else:
                _emit_fresh(q, items[3 * i + 1], items[3 * i + 2])
        else:
            _emit_range(q, items[3 * i + 1], items[3 * i + 2])


cdef void _settle_fresh(QueryCtx* q, const int64_t* kept_of) noexcept nogil:
    """Give the fresh items an item pass left as ``(s, e, -1 - item)`` their counted rows.

    The runs become those ``_emit_fresh_kept`` would have written in order:
    an item keeping no row is dropped, one keeping every row is a plain run
    (joined to a plain run ending where it starts, as ``_emit`` joins them).
    """
    cdef vector[int64_t]* runs = q.runs
    cdef size_t n = runs.size(), i, w = 0
    cdef int64_t s, e, k
    for i in range(0, n, 3):
        s = runs[0][i]
        e = runs[0][i + 1]
        k = runs[0][i + 2]
        if k < 0:
            k = kept_of[-1 - k]
            if k == 0:
                continue
            q.count += k
            if k < e - s:
                q.fresh_runs += 1
                runs[0][w] = s
                runs[0][w + 1] = e
                runs[0][w + 2] = k
                w += 3
                continue
        if w > 0 and runs[0][w - 2] == s and runs[0][w - 1] == runs[0][w - 2] - runs[0][w - 3]:
            runs[0][w - 2] = e
            runs[0][w - 1] += e - s
        else:
            runs[0][w] = s
            runs[0][w + 1] = e
            runs[0][w + 2] = k
            w += 3
    runs.resize(w)


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
        if q.lazy:
            # leaf-sized pieces, so that materialising them splits over cores
            s = 0
            while s < q.n:
                e = s + 4096 if q.n - s > 4096 else q.n
                _emit_fresh(q, s, e)
                s = e
        else:
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
        if q.filter_seen and q.seen_bounds != NULL and q.seen_bounds[2 * node + 1] < q.fresh.cut:
            continue  # every device here was last seen before the cutoff
        if dmax2 <= q.lo2:
            if not (q.filter_seen or q.filter_app):
                _defer(&items, ITEM_RUN, s, e)
                continue
            if (not q.filter_app and q.seen_bounds != NULL
                    and q.seen_bounds[2 * node] >= q.fresh.cut):
                _defer(&items, ITEM_RUN, s, e)  # inside, and every device here is recent enough
                continue
            # A count wants no runs: the whole subtree is one fresh item
            # (counted in pieces over the cores), with no walk below it.
            if q.lazy and (not q.emit or level + FRESH_LEVELS >= q.depth):
                _defer(&items, ITEM_FRESH, s, e)
                continue
            if q.lazy and e - s <= FRESH_WHOLE_MAX:
                j = s
                while j < e:
                    _defer(&items, ITEM_FRESH, j, j + FRESH_PIECE if e - j > FRESH_PIECE else e)
                    j += FRESH_PIECE
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
    # Counting fresh runs reads 2 or 4 B of last-seen a row inside the circle
    # (an eighth to a quarter of a gigabyte at 400 M devices, dense 500 km),
    # more than the rest of the query: share it over the cores first.
    cdef vector[int64_t] kept_of
    cdef int64_t fresh_rows = 0
    cdef ItemPass ip
    ip.q = q
    ip.items = items.data()
    ip.m = m
    ip.kept = NULL
    ip.fresh_elsewhere = False
    ip.fresh_later = False
    if q.lazy:
        for i in range(m):
            if items[3 * i] == ITEM_FRESH:
                fresh_rows += items[3 * i + 2] - items[3 * i + 1]
        if not q.emit:
            # A count needs no row order: the calling thread tests the
            # boundary leaves while the helpers start on the fresh counts.
            kept_of.resize(m)
            ip.fresh_elsewhere = True
            gt_fresh_counts(items.data(), m, ITEM_FRESH, q.fresh, kept_of.data(),
                            gt_max_threads() if fresh_rows >= _fresh_parallel_min else 1, _item_pass, &ip)
            for i in range(m):
                if items[3 * i] == ITEM_FRESH:
                    q.count += kept_of[i]
            return
        if fresh_rows >= _fresh_parallel_min and gt_max_threads() > 1:
            # The helpers count the fresh items while the calling thread tests
            # the boundary leaves and emits the runs, fresh ones left open.
            kept_of.resize(m)
            ip.fresh_later = True
            gt_fresh_counts(items.data(), m, ITEM_FRESH, q.fresh, kept_of.data(), gt_max_threads(), _item_pass, &ip)
            _settle_fresh(q, kept_of.data())
            return
    _item_pass(&ip)

cdef class Tree:
    """A built index's arrays, acquired once, so that a query only passes its circle.

    ``query`` works in numpy terms as::

        d = haversine_km(clat, clon, lat[keys], lon[keys])
        mask = d <= radius_km
        if seen_min >= 0: mask &= seen >= seen_min
        if app_codes is not None: mask &= np.isin(app, app_codes)
        rows = np.flatnonzero(mask)

    ``runs`` hold these rows: a run ``(s, e, kept)`` with ``kept == e - s``
    holds every row of ``[s, e)``; a *fresh run* (``kept < e - s``, only with
    ``seen_min`` and ``fresh_runs=True``) holds the ``kept`` rows r of
    ``[s, e)`` with ``seen[r] >= seen_min``, all of them inside the circle.
    ``_array_kernels.fresh_rows_runs`` turns fresh runs into plain ones.
    """
    cdef const GtPoint[::1] pts
    cdef const uint32_t[::1] keys
    cdef const float[:, ::1] bounds
    cdef const double[::1] lat
    cdef const double[::1] lon
    cdef const uint32_t[::1] seen
    cdef const int8_t[::1] app
    cdef const uint32_t[:, ::1] seen_bounds
    cdef const uint16_t[::1] coarse
    cdef uint32_t coarse_top
    cdef int depth
    cdef int64_t n

    def __init__(self, const GtPoint[::1] pts, const uint32_t[::1] keys, const float[:, ::1] bounds,
                 int depth, const double[::1] lat, const double[::1] lon, const uint32_t[::1] seen,
                 const int8_t[::1] app, const uint32_t[:, ::1] seen_bounds):
        self.pts, self.keys, self.bounds, self.depth = pts, keys, bounds, depth
        self.lat, self.lon, self.seen, self.app, self.seen_bounds = lat, lon, seen, app, seen_bounds
        self.n = pts.shape[0]

    def set_coarse(self, const uint16_t[::1] coarse, uint32_t top):
        """Count fresh rows from ``coarse`` (``coarse_seen(seen, top)`` of this tree's ``seen``) from now on."""
        if coarse.shape[0] != self.n:
            raise ValueError(f"coarse has {coarse.shape[0]} rows, the tree {self.n}")
        self.coarse, self.coarse_top = coarse, top

    def query(self, double clat, double clon, double radius_km, int64_t seen_min=-1,
              object app_codes=None, bint emit=True, bint fresh_runs=False):
        """Rows within ``radius_km`` of (clat, clon), as sorted disjoint runs.

        Returns ``(runs, kept, count, stats)``: ``runs`` is int64 ``(k, 2)`` of
        ``[start, end)`` row ranges in ascending order (``None`` when
        ``emit=False``); ``kept`` is None when every run keeps all its rows,
        else int64 ``(k,)`` rows kept per run (see the class docstring);
        ``stats`` counts tested nodes, boundary-leaf points and exact
        re-checks.  ``seen_min`` (epoch seconds, -1 for none) and
        ``app_codes`` (int codes, None for all) filter rows.  With
        ``fresh_runs`` a last-seen filter alone leaves inside rows as fresh
        runs instead of splitting them row by row.
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
        phi = clat * GT_DEG2RAD
        lam = clon * GT_DEG2RAD
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
        q.seen_bounds = &self.seen_bounds[0, 0] if self.seen_bounds.shape[0] > 0 else NULL
        # the coarse values where they decide (GtFresh::of, gt_geom.hpp)
        q.fresh = gt_fresh_view(&self.seen[0] if self.seen.shape[0] > 0 else NULL,
                                &self.coarse[0] if self.coarse is not None and self.n > 0 else NULL,
                                self.n, self.coarse_top, <uint32_t>(seen_min if seen_min >= 0 else 0))
        if not q.filter_seen:
            q.fresh.coarse = NULL
        q.filter_app = app_codes is not None
        q.app = &self.app[0] if self.app.shape[0] > 0 else NULL
        q.app_mask[0] = q.app_mask[1] = q.app_mask[2] = q.app_mask[3] = 0
        if q.filter_app:
            for code in app_codes:
                code = code & 255
                q.app_mask[code >> 6] |= (<uint64_t>1) << (code & 63)
        q.emit = emit
        # Counting needs no runs, so it always takes the branch-free pass.
        q.lazy = (q.filter_seen and not q.filter_app and q.fresh.seen != NULL
                  and (fresh_runs or not emit))
        q.fresh_runs = 0
        q.count = 0
        q.exact_checks = 0
        q.nodes = 0
        q.leaf_points = 0
        q.runs = &runs
        with nogil:
            _query(&q)
        stats = {"nodes": q.nodes, "leaf_points": q.leaf_points, "exact_checks": q.exact_checks}
        if not emit:
            return None, None, q.count, stats
        both = np.empty((runs.size() // 3, 3), dtype=np.int64)
        cdef int64_t[:, ::1] ov = both
        if runs.size() > 0:
            memcpy(&ov[0, 0], runs.data(), runs.size() * sizeof(int64_t))
        out = np.ascontiguousarray(both[:, :2])
        kept = np.ascontiguousarray(both[:, 2]) if q.fresh_runs else None
        return out, kept, q.count, stats


def coarse_seen(const uint32_t[::1] seen, uint32_t top):
    """The coarse last-seen of ``seen`` against ``top`` (best: its newest), uint16 ``(n,)``.

    Counting from them is exact whatever ``top`` is; a ``top`` near the
    newest last-seen makes it fast.  In numpy, this operation is equivalent to::

        d = (top - seen.astype(np.int64)) >> COARSE_SHIFT
        coarse = np.where(seen >= top, 65535, 65535 - np.minimum(65535, d)).astype(np.uint16)
    """
    cdef int64_t n = seen.shape[0]
    out = np.empty(n, dtype=np.uint16)
    cdef uint16_t[::1] o = out
    if n:
        with nogil:
            gt_coarse_column(&seen[0], n, top, &o[0], gt_max_threads() if n >= FRESH_PARALLEL_MIN else 1)
    return out


def fresh_count(const uint32_t[::1] seen, uint32_t cut, const uint16_t[::1] coarse=None, uint32_t top=0):
    """How many of ``seen`` are >= ``cut``; from ``coarse`` (``coarse_seen(seen, top)``) where
    given, as a query counts fresh runs.  In numpy, this operation is equivalent to::

        np.count_nonzero(seen >= cut)
    """
    cdef int64_t n = seen.shape[0]
    cdef int64_t kept
    if coarse is not None and coarse.shape[0] != n:
        raise ValueError(f"coarse has {coarse.shape[0]} rows, seen {n}")
    # the coarse values for any top (GtFresh::of would leave them out at either end of their window)
    cdef GtFresh f
    f.seen = &seen[0] if n else NULL
    f.coarse = &coarse[0] if coarse is not None and n else NULL
    f.qc = gt_coarse(cut, top) if coarse is not None else 0
    f.cut = cut
    with nogil:
        kept = gt_fresh_count_rows(f, 0, n) if n else 0
    return kept


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
