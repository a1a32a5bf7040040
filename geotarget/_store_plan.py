"""Planning a new store generation: which rows change and which keys new devices get.

The rules (docs/design.md, Device keys) are the same whether the new
generation is built in memory or streamed to disk, so both paths of
:meth:`DeviceStore.with_updates` take them from :func:`plan_generation`:

* a device the parent holds keeps its key and gets the batch's values;
* devices the parent does not hold are appended, at keys ``n_old, n_old + 1, ...``,
  taken in batch order and then put in KD leaf order among themselves
  (:func:`spatial_order`), so that close devices get close keys;
* the new generation is ``parent + 1``, continues the parent's lineage and
  records the parent's uid in its ancestry;
* the keys it changed are the moved keys and the new ones.

:func:`plan_generation` reads nothing but its arguments and changes none of
them; the callers do the copying.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _array_kernels, _kernels
from ._store_checks import MAX_DEVICES
from .errors import InvalidInputError

#: Leaf size used to order new devices spatially (the index may use another).
INGEST_LEAF = 64


def spatial_order(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Row order that puts a batch in KD leaf order (close devices, close keys)."""
    n = lat.shape[0]
    pts = np.empty(n, dtype=_kernels.POINT_DTYPE)
    if n:
        _kernels.fill_points(lat, lon, pts)
        # The root on one core: the two-core partition leaves rows in an order
        # that depends on the thread count, and keys must not depend on the machine.
        _kernels.build_tree(pts, INGEST_LEAF, False)
    return pts["key"].astype(np.int64)


@dataclass(frozen=True)
class GenerationPlan:
    """What a batch of updates does to a parent generation of ``n_old`` devices."""

    #: The new generation's number, its parent's number and its ancestry (the parent's uids, oldest first).
    generation: int
    parent: int
    ancestry: tuple
    n_old: int
    n_total: int
    #: Keys of the devices the parent holds, ascending (int64), and the batch row of each (``rows``' dtype).
    moved_keys: np.ndarray
    moved_rows: np.ndarray
    #: Batch rows of the new devices, in the order of their keys ``n_old, n_old + 1, ...``.
    new_rows: np.ndarray

    @property
    def n_new(self) -> int:
        return self.n_total - self.n_old

    def changed_keys(self) -> np.ndarray:
        """The keys the new generation changes (uint32, ascending, distinct)."""
        return np.concatenate([self.moved_keys.astype(np.uint32),
                               np.arange(self.n_old, self.n_total, dtype=np.uint32)])


def plan_generation(keys, lat, lon, *, n_old: int, generation: int, uid: str, ancestry=(),
                    rows=None) -> GenerationPlan:
    """Plan the generation after ``generation`` (uid ``uid``) for a batch of updates.

    ``keys[i]`` is the parent's key of batch row ``rows[i]`` (``rows`` None:
    row ``i``), or -1 for a device the parent does not hold; batch ids are
    distinct, so no key appears twice.  ``lat`` and ``lon`` are the batch's
    coordinates by row; they put the new devices in spatial order.
    :class:`InvalidInputError` when the new devices would not fit in the key space.
    """
    keys = np.asarray(keys, dtype=np.int64)
    # rows keep their dtype: the on-disk path's are uint32, and a copy of them costs 8 bytes a row
    rows = np.arange(keys.shape[0], dtype=np.int64) if rows is None else np.asarray(rows)
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be integers, got {rows.dtype}")
    if rows.shape != keys.shape:
        raise ValueError(f"rows has shape {rows.shape} but keys has {keys.shape}")
    found = keys >= 0
    n_new = keys.shape[0] - int(np.count_nonzero(found))
    n_total = int(n_old) + n_new
    if n_total > MAX_DEVICES:
        raise InvalidInputError(f"device_id: {n_total} devices would exceed the key space")
    moved_keys, perm = _array_kernels.sort_ids(np.ascontiguousarray(keys[found]).view(np.uint64))
    moved_rows = rows[found][perm]
    new_rows = np.sort(rows[~found])
    if n_new:
        new_rows = new_rows[spatial_order(np.asarray(lat)[new_rows], np.asarray(lon)[new_rows])]
    return GenerationPlan(generation=int(generation) + 1, parent=int(generation),
                          ancestry=tuple(ancestry) + (uid,), n_old=int(n_old), n_total=n_total,
                          moved_keys=moved_keys.view(np.int64), moved_rows=moved_rows, new_rows=new_rows)
