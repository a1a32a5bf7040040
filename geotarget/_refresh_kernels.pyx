# cython: language_level=3
# distutils: language = c++
"""Compiled kernels of a refresh: re-targeting the devices a generation
changed against every open alert in one pass, and reading an alert's
notified devices as ranges straight from roaring's portable serialisation.

Every kernel names its NumPy equivalent in its docstring; ``tests/test_kernels.py``
compares the two on hypothesis-generated and adversarial inputs.
"""

import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport cos, sin
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from libcpp.vector cimport vector

from geotarget._roaring cimport RB_BITSET, RB_RUN, RbContainer, RbReader, rb_next, rb_open, rb_u16
from geotarget._geom cimport (GT_DEG2RAD, GtPoint, Thresholds, __builtin_ctzll, _bbox, _box_dist2,
                              _haversine_km, _thresholds, gt_max_threads)

cnp.import_array()


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
        phi = circles[c, 0] * GT_DEG2RAD
        lam = circles[c, 1] * GT_DEG2RAD
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


def bitmap_ranges(const uint8_t[::1] buf):
    """The maximal ``[start, end)`` runs of a roaring bitmap, from its portable serialisation.

    Reads the RoaringFormatSpec layout (cookie, descriptive header, optional
    run flags and offsets, then array, bitmap and run containers) without
    materialising the values, so a 60 M-device audience held as a few
    thousand runs costs a few thousand steps.  Raises ``ValueError`` on bytes
    that are not a well-formed serialisation.  In numpy, this operation is
    equivalent to ``consecutive_ranges(np.asarray(BitMap.deserialize(buf).to_array(), np.uint32))``.
    """
    cdef Py_ssize_t size_b = buf.shape[0], i, j
    cdef RbReader r
    cdef RbContainer ct
    cdef int64_t base, st, ln, t, ones
    cdef uint64_t w, x
    cdef vector[int64_t] v
    rb_open(&r, &buf[0] if size_b > 0 else NULL, size_b)
    cdef const uint8_t* p = r.p
    for i in range(r.size):
        rb_next(&r, i, &ct)
        base = ct.base
        if ct.kind == RB_RUN:
            for j in range(ct.runs):
                st = rb_u16(p + ct.at + 4 * j)
                ln = <int64_t>rb_u16(p + ct.at + 4 * j + 2) + 1
                _push_range(&v, base + st, base + st + ln)
        elif ct.kind == RB_BITSET:
            for j in range(1024):
                memcpy(&w, p + ct.at + 8 * j, 8)
                while w:
                    t = __builtin_ctzll(w)
                    x = ~(w >> t)
                    ones = __builtin_ctzll(x) if x else 64 - t
                    _push_range(&v, base + 64 * j + t, base + 64 * j + t + ones)
                    if t + ones >= 64:
                        w = 0
                    else:
                        w &= ~((((<uint64_t>1) << ones) - 1) << t)
        else:
            for j in range(ct.card):
                st = rb_u16(p + ct.at + 2 * j)
                _push_range(&v, base + st, base + st + 1)
    out = np.empty((v.size() // 2, 2), dtype=np.int64)
    cdef int64_t[:, ::1] o = out
    if v.size():
        memcpy(&o[0, 0], v.data(), v.size() * sizeof(int64_t))
    return out
