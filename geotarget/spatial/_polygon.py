"""Devices inside a polygon: the index's subtrees first, exact tests only at the border.

The contract is ``shapely.contains_xy(polygon, lon, lat)`` over the stored
float64 coordinates (a point on the boundary is outside), the same planar
lon/lat test a GIS applies to a division's polygon.  The index is a KD-tree
over float32 unit vectors whose rows sit in leaf order, so a subtree is one
contiguous range of rows.  Walking the tree level by level:

1. each node's unit-vector box becomes a lon/lat box that surely holds its
   points (padded for the float32 rounding of the vectors, see
   :func:`lonlat_boxes`);
2. a box the polygon contains *properly* (box in the interior, touching no
   edge) puts its whole range of rows in the answer without a per-point test:
   every point of it is strictly inside, so ``contains_xy`` would say True;
3. a box the polygon does not intersect is dropped: its points are outside
   and not on the boundary;
4. other nodes split into their children; at the leaves, the rows of the
   remaining border leaves are tested with ``shapely.contains_xy`` on the
   prepared polygon, in one vectorised call.

The classification is conservative in one direction only: a padded box is
larger than the true one, so it may be called "border" when it was inside or
outside, which costs an exact test and never changes an answer.

A province of China at 20 M devices tests a few thousand node boxes per level
and the points of the border leaves; the interior goes out as row ranges.
"""
from __future__ import annotations

import numpy as np
import shapely

#: Half-width added to float32 unit-vector boxes: float32 rounding moves a
#: component by at most 2^-24 (6e-8); 1e-6 leaves a wide margin.
_PAD = 1e-6


def lonlat_boxes(bounds: np.ndarray) -> np.ndarray:
    """``(m, 4)`` float64 ``lon_min, lat_min, lon_max, lat_max`` holding every unit vector in each xyz box.

    ``bounds`` rows are ``x_min, y_min, z_min, x_max, y_max, z_max`` (float32).
    Latitude depends on z alone (z = sin lat).  Longitude is the angle of
    (x, y): over a rectangle that excludes the origin and does not cross the
    negative x axis (the ±180° cut) the angle is continuous, so its range is
    reached at the corners; a rectangle that meets either gets all
    longitudes, which is conservative.
    """
    b = np.asarray(bounds, dtype=np.float64)
    xlo, ylo, zlo = b[:, 0] - _PAD, b[:, 1] - _PAD, b[:, 2] - _PAD
    xhi, yhi, zhi = b[:, 3] + _PAD, b[:, 4] + _PAD, b[:, 5] + _PAD
    out = np.empty((b.shape[0], 4), dtype=np.float64)
    out[:, 1] = np.degrees(np.arcsin(np.clip(zlo, -1.0, 1.0)))
    out[:, 3] = np.degrees(np.arcsin(np.clip(zhi, -1.0, 1.0)))
    cx = np.stack([xlo, xlo, xhi, xhi], axis=1)
    cy = np.stack([ylo, yhi, ylo, yhi], axis=1)
    ang = np.degrees(np.arctan2(cy, cx))
    # 1e-9 deg: the corner angles are float64, far finer than this
    out[:, 0] = ang.min(axis=1) - 1e-9
    out[:, 2] = ang.max(axis=1) + 1e-9
    wide = (ylo <= 0.0) & (yhi >= 0.0) & (xlo <= 0.0)
    out[wide, 0] = -180.0
    out[wide, 2] = 180.0
    return out


def node_ranges(nodes: np.ndarray, level: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges ``[start, end)`` of ``nodes`` at tree ``level`` (the build's split rule)."""
    j = nodes.astype(np.int64) - ((1 << level) - 1)
    return (j * n) >> level, ((j + 1) * n) >> level


def _aranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def rows_to_runs(rows: np.ndarray) -> np.ndarray:
    """Maximal ``(k, 2)`` int64 runs of a sorted array of distinct rows."""
    if rows.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    brk = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate(([0], brk))]
    ends = rows[np.concatenate((brk - 1, [rows.size - 1]))] + 1
    return np.stack([starts, ends], axis=1).astype(np.int64)


def merge_runs(runs: np.ndarray) -> np.ndarray:
    """Sorted, disjoint runs merged where they touch."""
    if runs.shape[0] == 0:
        return runs.reshape(0, 2).astype(np.int64)
    runs = runs[np.argsort(runs[:, 0], kind="stable")]
    keep = np.ones(runs.shape[0], dtype=bool)
    keep[1:] = runs[1:, 0] != runs[:-1, 1]
    starts = runs[keep, 0]
    idx = np.flatnonzero(keep)
    ends = runs[np.concatenate((idx[1:] - 1, [runs.shape[0] - 1])), 1]
    return np.stack([starts, ends], axis=1)


def polygon_runs(index, geom, seen_min: int, codes) -> tuple[np.ndarray, int]:
    """Sorted row runs of the devices of ``index`` inside ``geom`` passing the filters, and their count.

    ``seen_min`` < 0 means no freshness filter; ``codes`` None means all apps.
    Queries on one polygon from several threads take turns (see ``GEOS_LOCK``).
    """
    from .divisions import GEOS_LOCK
    with GEOS_LOCK:
        return _polygon_runs(index, geom, seen_min, codes)


def _polygon_runs(index, geom, seen_min: int, codes) -> tuple[np.ndarray, int]:
    n = len(index)
    if n == 0:
        return np.empty((0, 2), dtype=np.int64), 0
    shapely.prepare(geom)
    gx0, gy0, gx1, gy1 = shapely.bounds(geom)
    bounds = np.asarray(index.bounds)
    seen_bounds = np.asarray(index.seen_bounds)
    inside: list[np.ndarray] = []      # (k, 2) row ranges wholly inside
    inside_fresh: list[np.ndarray] = []  # whether all of that node passes the freshness filter
    border_s: list[np.ndarray] = []
    border_e: list[np.ndarray] = []
    nodes = np.zeros(1, dtype=np.int64)
    for level in range(index.depth + 1):
        if nodes.size == 0:
            break
        s, e = node_ranges(nodes, level, n)
        alive = e > s
        if seen_min >= 0 and seen_bounds.shape[0]:
            alive &= seen_bounds[nodes, 1] >= seen_min
        nodes, s, e = nodes[alive], s[alive], e[alive]
        box = lonlat_boxes(bounds[nodes])
        near = (box[:, 0] <= gx1) & (box[:, 2] >= gx0) & (box[:, 1] <= gy1) & (box[:, 3] >= gy0)
        nodes, s, e, box = nodes[near], s[near], e[near], box[near]
        boxes = shapely.box(box[:, 0], box[:, 1], box[:, 2], box[:, 3])
        full = shapely.contains_properly(geom, boxes)
        inside.append(np.stack([s[full], e[full]], axis=1))
        if seen_min >= 0 and seen_bounds.shape[0]:
            # a subtree seen no earlier than the cutoff passes whole, like in ``within``
            inside_fresh.append(seen_bounds[nodes[full], 0] >= seen_min)
        else:
            inside_fresh.append(np.zeros(int(full.sum()), dtype=bool))
        rest = ~full
        rest[rest] = shapely.intersects(geom, boxes[rest])
        if level == index.depth:
            border_s.append(s[rest])
            border_e.append(e[rest])
            break
        nodes = np.stack([2 * nodes[rest] + 1, 2 * nodes[rest] + 2], axis=1).ravel()

    filtered = seen_min >= 0 or codes is not None
    seen = np.asarray(index.seen)
    app = np.asarray(index.app)
    keys = np.asarray(index.keys)
    store = index.store

    def passes(rows):
        m = np.ones(rows.shape[0], dtype=bool)
        if seen_min >= 0:
            m &= seen[rows] >= seen_min
        if codes is not None:
            m &= np.isin(app[rows], np.asarray(codes, dtype=np.int8))
        return m

    inside_runs = np.concatenate(inside) if inside else np.empty((0, 2), dtype=np.int64)
    parts = []
    if filtered and inside_runs.shape[0]:
        whole = np.concatenate(inside_fresh) if codes is None else np.zeros(inside_runs.shape[0], dtype=bool)
        parts.append(inside_runs[whole])
        rest = inside_runs[~whole]
        rest = rest[np.argsort(rest[:, 0], kind="stable")]   # disjoint ranges: rows come out sorted
        rows = _aranges(rest[:, 0], rest[:, 1])
        parts.append(rows_to_runs(rows[passes(rows)]))
    else:
        parts.append(inside_runs)
    if border_s:
        rows = _aranges(np.concatenate(border_s), np.concatenate(border_e))
        if rows.size:
            k = keys[rows]
            hit = shapely.contains_xy(geom, np.asarray(store.lon)[k], np.asarray(store.lat)[k])
            if filtered:
                hit &= passes(rows)
            # border leaves come level by level in node order, which is row order
            parts.append(rows_to_runs(rows[hit]))
    runs = merge_runs(np.concatenate(parts).astype(np.int64))
    count = int((runs[:, 1] - runs[:, 0]).sum()) if runs.shape[0] else 0
    return runs, count


def within_polygon_reference(store, geom, seen_since_s: int | None = None, codes=None) -> np.ndarray:
    """Sorted keys the contract selects: one ``shapely.contains_xy`` over every stored coordinate."""
    m = shapely.contains_xy(geom, np.asarray(store.lon), np.asarray(store.lat))
    if seen_since_s is not None:
        m &= np.asarray(store.last_seen_s) >= seen_since_s
    if codes is not None:
        m &= np.isin(np.asarray(store.app_codes), np.asarray(codes, dtype=np.int8))
    return np.flatnonzero(m).astype(np.uint32)
