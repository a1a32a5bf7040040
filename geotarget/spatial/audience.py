"""Audience: the set of devices a query or a push reaches.

An audience straight from :meth:`SpatialIndex.within` is a list of row runs in
the index (``[start, end)``, ascending, disjoint): its size is arithmetic on
runs and materialising it is ``memcpy`` of key ranges.  Set operations (the
expansion rings, the closure union) work on device keys through roaring
bitmaps and give an audience backed by a bitmap.  Both forms answer the same
questions; no Python list appears on either path.
"""
from __future__ import annotations

from array import array

import numpy as np
import pyarrow as pa
from pyroaring import AbstractBitMap, BitMap

from .. import _array_kernels


def gather_runs(keys: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """``keys[start:stop]`` of every ``(start, stop)`` row of ``runs``, concatenated (uint32)."""
    lengths = runs[:, 1] - runs[:, 0] if runs.shape[0] else np.zeros(0, dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.uint32)
    if runs.shape[0]:
        offsets = np.zeros(runs.shape[0], dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        _array_kernels.gather_runs_u32(keys, runs, offsets, out)
    return out


def _bitmap_from_keys(keys: np.ndarray) -> BitMap:
    """A roaring bitmap of keys given in any order.

    Audiences are mostly long runs of consecutive keys (keys are assigned in
    spatial order), so they are turned into ranges and written straight into
    roaring's portable serialisation as run containers (NumPy, no per-range
    Python call), then deserialised by CRoaring.  Scattered keys go through
    pyroaring's buffer path (``array('I')``: CRoaring's bulk add, fastest on
    sorted input -- 6 M sorted keys in 35 ms; a NumPy array would be iterated
    element by element).
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint32)
    if keys.size == 0:
        return BitMap()
    runs, ascending = _array_kernels.count_runs(keys)
    if runs * 4 <= keys.size:
        return _bitmap_from_ranges(_array_kernels.consecutive_ranges(keys))
    if not ascending and keys.size >= _SORT_MIN:
        key_space = int(keys.max()) + 1
        if _dense(keys.size, key_space):
            return _bitmap_from_runs(keys, np.array([[0, keys.size]], dtype=np.int64), key_space)
        # Index order can interleave keys of different ingest batches (at 400 M
        # a leaf holds keys from ~80 batches), hiding runs the key *set* has;
        # a radix sort brings them back, and sorted input is what the bulk add
        # is fastest on.
        keys = keys.copy()
        _array_kernels.sort_inplace(keys)
        if _array_kernels.count_runs(keys)[0] * 4 <= keys.size:
            return _bitmap_from_ranges(_array_kernels.consecutive_ranges(keys))
    buf = array("I")
    buf.frombytes(keys.tobytes())
    bm = BitMap(buf)
    bm.run_optimize()
    return bm


#: From this many scattered keys up, sorting first beats inserting them in index order.
_SORT_MIN = 1 << 16


def _dense(count: int, key_space: int) -> bool:
    """Whether a dense bitset of the key space is the cheaper way to a bitmap of ``count`` keys.

    The bitset costs one bit per key of the space (50 MB at 400 M devices) and
    a scan of it; from one key in 256 of the space that is less than sorting.
    """
    return count >= _SORT_MIN and count * 256 >= key_space


def _bitmap_from_runs(src: np.ndarray, runs: np.ndarray, key_space: int) -> BitMap:
    """The keys ``src[s:e]`` of every run as a roaring bitmap, through a dense bitset (no sort).

    At 400 M devices the 61.8 M keys of a dense 500 km audience, interleaved
    from 80 ingest chunks, took 1.23 s by radix sort and ranges; the bitset
    takes 0.25 s, and writes each container in its smallest form.
    """
    return BitMap.deserialize(_array_kernels.roaring_from_runs(np.ascontiguousarray(src, dtype=np.uint32),
                                                               runs, key_space))


# RoaringFormatSpec: the cookie of a bitmap with run containers, and the container count from which
# it has an offset header (geotarget/_roaring.pxd owns the format).
_SERIAL_COOKIE = _array_kernels.ROARING_COOKIE_RUNS
_NO_OFFSET_THRESHOLD = _array_kernels.ROARING_OFFSETS_FROM


def _bitmap_from_ranges(ranges: np.ndarray) -> BitMap:
    """Roaring bitmap of disjoint ``[start, end)`` ranges (any order), via the portable format."""
    r = ranges[np.argsort(ranges[:, 0], kind="stable")]
    start, end = r[:, 0], r[:, 1]
    # merge ranges that touch (consecutive in key order though not in input order)
    new_group = np.ones(len(r), dtype=bool)
    new_group[1:] = start[1:] != end[:-1]
    idx = np.flatnonzero(new_group)
    start = start[idx]
    end = np.r_[end[idx[1:] - 1], end[-1]]
    # split at container (2^16) boundaries
    first, last = start >> 16, (end - 1) >> 16
    pieces = last - first + 1
    owner = np.repeat(np.arange(len(start)), pieces)
    k = np.arange(owner.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    high = first[owner] + k
    p_start = np.maximum(start[owner], high << 16)
    p_end = np.minimum(end[owner], (high + 1) << 16)
    # containers: one per distinct high 16 bits, each a run container
    bounds = np.flatnonzero(np.r_[True, high[1:] != high[:-1]])
    c_key = high[bounds]
    c_runs = np.diff(np.r_[bounds, high.size])
    c_card = np.add.reduceat(p_end - p_start, bounds)
    size = c_key.size
    runflags = np.zeros((size + 7) // 8, dtype=np.uint8)
    np.bitwise_or.at(runflags, np.arange(size) // 8, (1 << (np.arange(size) % 8)).astype(np.uint8))
    descriptive = np.empty(2 * size, dtype="<u2")
    descriptive[0::2] = c_key
    descriptive[1::2] = c_card - 1
    header = 4 + runflags.size + 4 * size + (4 * size if size >= _NO_OFFSET_THRESHOLD else 0)
    c_bytes = 2 + 4 * c_runs
    body = np.empty(int(c_bytes.sum()) // 2, dtype="<u2")
    pos = np.r_[0, np.cumsum(c_bytes // 2)[:-1]]
    body[pos] = c_runs
    run_at = np.repeat(pos + 1, c_runs) + 2 * (np.arange(high.size) - np.repeat(bounds, c_runs))
    body[run_at] = p_start & 0xFFFF
    body[run_at + 1] = p_end - p_start - 1
    parts = [np.array([_SERIAL_COOKIE | ((size - 1) << 16)], dtype="<u4").tobytes(),
             runflags.tobytes(), descriptive.tobytes()]
    if size >= _NO_OFFSET_THRESHOLD:
        parts.append((header + np.r_[0, np.cumsum(c_bytes)[:-1]]).astype("<u4").tobytes())
    parts.append(body.tobytes())
    bm = BitMap.deserialize(b"".join(parts))
    bm.run_optimize()
    return bm


def bitmap_to_keys(bm: BitMap) -> np.ndarray:
    """Sorted uint32 keys of a roaring bitmap."""
    if len(bm) == 0:
        return np.empty(0, dtype=np.uint32)
    return np.frombuffer(bm.to_array(), dtype=np.uint32).copy()


class Audience:
    """A set of devices, identified by their stable 32-bit keys."""

    __slots__ = ("_index", "_runs", "_count", "_store", "_bitmap", "_keys", "_kept", "_seen_min", "_plain")

    def __init__(self, *, index=None, runs=None, count=None, store=None, bitmap=None, kept=None,
                 seen_min=-1):
        self._index = index
        self._runs = runs
        self._store = store if store is not None else (index.store if index is not None else None)
        self._bitmap = bitmap
        self._keys = None
        # Fresh runs (a query's seen_since filter): run i keeps kept[i] rows,
        # those with index.seen >= seen_min; see _kernels.Tree.query.
        self._kept = kept
        self._seen_min = int(seen_min)
        self._plain = None
        if runs is not None:
            runs.flags.writeable = False
            if kept is not None:
                kept.flags.writeable = False
                self._count = int(count if count is not None else kept.sum())
            else:
                self._count = int(count if count is not None else (runs[:, 1] - runs[:, 0]).sum())
        elif bitmap is not None:
            self._count = len(bitmap)
        else:
            raise TypeError("Audience needs runs (with an index) or a bitmap")

    # -- constructors -----------------------------------------------------

    @classmethod
    def from_keys(cls, keys, store) -> "Audience":
        """An audience of explicit keys (validated against ``store``)."""
        from ..errors import InvalidInputError
        k = np.asarray(keys)
        if k.size and (not np.issubdtype(k.dtype, np.integer) or k.min() < 0 or k.max() >= len(store)):
            raise InvalidInputError(f"keys must be integers in [0, {len(store)})")
        return cls(store=store, bitmap=_bitmap_from_keys(k.astype(np.uint32)))

    @classmethod
    def empty(cls, store) -> "Audience":
        return cls(store=store, bitmap=BitMap())

    # -- size and materialisation ----------------------------------------

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    @property
    def runs(self):
        """Row runs in the index (``(k, 2)`` int64, every row of each run), or None for a bitmap audience."""
        if self._kept is None:
            return self._runs
        if self._plain is None:
            self._plain = _array_kernels.plain_runs(self._runs, self._kept, self._seen_col(), self._seen_min)
            self._plain.flags.writeable = False
        return self._plain

    def _seen_col(self) -> np.ndarray:
        return np.ascontiguousarray(self._index.seen)

    @property
    def store(self):
        return self._store

    def fill(self, out: np.ndarray) -> int:
        """Write the keys into ``out`` (a reused uint32 buffer); return how many.

        This is the dispatch hot path: runs are copied with ``memcpy`` over both
        cores, in index order (not sorted), or written as ranges when the index's
        rows are its keys.  Use :meth:`keys` for sorted keys.
        """
        if out.dtype != np.uint32 or not out.flags.c_contiguous or not out.flags.writeable:
            raise TypeError("out must be a writeable, C-contiguous uint32 array")
        if out.shape[0] < self._count:
            raise ValueError(f"out holds {out.shape[0]} keys but the audience has {self._count}")
        if self._runs is None:
            out[: self._count] = self.keys()
            return self._count
        runs = self._runs
        if self._kept is not None:
            offsets = np.zeros(runs.shape[0], dtype=np.int64)
            np.cumsum(self._kept[:-1], out=offsets[1:])
            src = None if self._index.keys_are_rows else self._index.keys
            _array_kernels.fill_fresh(src, runs, self._kept, offsets, self._seen_col(), self._seen_min, out)
            return self._count
        if runs.shape[0]:
            lengths = runs[:, 1] - runs[:, 0]
            offsets = np.zeros(runs.shape[0], dtype=np.int64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            if self._index.keys_are_rows:
                _array_kernels.fill_rows(runs, offsets, out)
            else:
                _array_kernels.gather_runs_u32(self._index.keys, runs, offsets, out)
        return self._count

    def keys(self) -> np.ndarray:
        """Sorted uint32 device keys."""
        if self._keys is None:
            if self._bitmap is not None:
                k = bitmap_to_keys(self._bitmap)
            else:
                k = np.empty(self._count, dtype=np.uint32)
                self.fill(k)
                if not self._index.keys_are_rows:  # else ascending runs of rows: sorted already
                    _array_kernels.sort_inplace(k)
            k.flags.writeable = False
            self._keys = k
        return self._keys

    def _unordered_keys(self) -> np.ndarray:
        """Keys in whatever order is cheapest (index order for a query result)."""
        if self._keys is not None or self._runs is None:
            return self.keys()
        k = np.empty(self._count, dtype=np.uint32)
        self.fill(k)
        return k

    def device_ids(self, sort: bool = True) -> np.ndarray:
        """uint64 device ids: sorted (one gather, one radix sort), or with ``sort=False``
        in the cheapest order (one gather: index order for a query result, key
        order for a set-algebra result)."""
        keys = self._unordered_keys()
        out = np.empty(keys.shape[0], dtype=np.uint64)
        _array_kernels.take(self._store.device_id, keys, out)
        if sort:
            _array_kernels.sort_inplace(out)
        return out

    def by_app(self, sort: bool = False) -> dict:
        """One pyarrow Table (``device_id``, ``key``) per partner app.

        A dispatcher needs each app's devices, not sorted ids: one stable
        counting pass by app over both cores (linear, no sort) groups the
        audience, and every app's table is a zero-copy slice of one table.
        Rows keep the cheapest order (index order for a query result, key
        order for a set-algebra result such as a push's ring).  ``sort=True``
        sorts each app's rows by device id as well (one id sort per app).
        """
        store = self._store
        index = self._index
        app = getattr(index, "app", None)   # a SpatialIndex's leaf-ordered app codes
        if (self._runs is not None and self._keys is None
                and app is not None and app.shape[0] == index.keys.shape[0]):
            # A query result: straight from its runs, app codes read by row, no
            # key array written first (docs/design.md, Dispatch path).
            fresh = self._kept is not None
            coarse = getattr(index, "seen_coarse", None) if fresh else None
            ids, k, starts = _array_kernels.group_runs_by_app(
                None if index.keys_are_rows else np.ascontiguousarray(index.keys), self._runs, self._kept,
                self._seen_col() if fresh else None, max(self._seen_min, 0),
                np.ascontiguousarray(app), np.ascontiguousarray(store.device_id),
                coarse, index.seen_coarse_top if coarse is not None else 0, len(store.app_names))
        elif self._keys is None and self._bitmap is not None:
            # a set-algebra result: straight from the bitmap's containers, no key array first
            ids, k, starts = _array_kernels.group_bitmap_by_app(
                self._bitmap.serialize(), np.ascontiguousarray(store.device_id),
                np.ascontiguousarray(store.app_codes))
        else:
            keys = self._unordered_keys()
            ids, k, starts = _array_kernels.group_by_app(keys, np.ascontiguousarray(store.device_id),
                                                         np.ascontiguousarray(store.app_codes))
        table = pa.table({"device_id": pa.array(ids, type=pa.uint64()), "key": pa.array(k, type=pa.uint32())})
        out = {}
        for code in np.flatnonzero(np.diff(starts)):
            s, e = int(starts[code]), int(starts[code + 1])
            if sort:
                app_ids, rows = _array_kernels.sort_ids(ids[s:e])
                app_keys = np.empty(e - s, dtype=np.uint32)
                _array_kernels.take(k[s:e], rows, app_keys)
                out[store.app_names[int(code)]] = pa.table(
                    {"device_id": pa.array(app_ids, type=pa.uint64()), "key": pa.array(app_keys, type=pa.uint32())})
            else:
                out[store.app_names[int(code)]] = table.slice(s, e - s)
        return out

    def counts_by_app(self) -> dict:
        """Number of devices per partner app."""
        keys = self.keys()
        counts = np.bincount(self._store.app_codes[keys].astype(np.int64) & 0xFF,
                             minlength=len(self._store.app_names))
        return {name: int(counts[i]) for i, name in enumerate(self._store.app_names) if counts[i]}

    # -- set algebra ------------------------------------------------------

    def bitmap(self) -> BitMap:
        """The keys as a roaring bitmap (cached; do not mutate)."""
        if self._bitmap is None:
            if self._kept is not None and _dense(self._count, len(self._store)):
                # fresh runs straight into the bitset: no plain runs, no key array
                src = None if self._index.keys_are_rows else self._index.keys
                self._bitmap = BitMap.deserialize(_array_kernels.roaring_from_runs(
                    src, self._runs, len(self._store), self._kept, self._seen_col(), self._seen_min))
            elif self._runs is not None and self._index.keys_are_rows:
                # runs of rows are runs of keys
                self._bitmap = _bitmap_from_ranges(self.runs) if self._runs.shape[0] else BitMap()
            elif self._runs is not None and _dense(self._count, len(self._store)):
                self._bitmap = _bitmap_from_runs(self._index.keys, self.runs, len(self._store))
            else:
                # roaring takes keys in any order; no sort needed
                self._bitmap = _bitmap_from_keys(self._unordered_keys())
        return self._bitmap

    def _other(self, other) -> BitMap:
        if isinstance(other, Audience):
            return other.bitmap()
        if isinstance(other, AbstractBitMap):  # BitMap or a log's FrozenBitMap
            return other
        return NotImplemented

    def _wrap(self, bm: BitMap, other) -> "Audience":
        store = self._store
        if isinstance(other, Audience) and other._store is not None and (
                store is None or len(other._store) > len(store)):
            store = other._store  # later generation: knows every earlier key
        return Audience(store=store, bitmap=bm)

    def union(self, other) -> "Audience":
        o = self._other(other)
        if o is NotImplemented:
            return o
        return self._wrap(self.bitmap() | o, other)

    def difference(self, other) -> "Audience":
        o = self._other(other)
        if o is NotImplemented:
            return o
        return self._wrap(self.bitmap() - o, other)

    def intersection(self, other) -> "Audience":
        o = self._other(other)
        if o is NotImplemented:
            return o
        return self._wrap(self.bitmap() & o, other)

    __or__ = union
    __sub__ = difference
    __and__ = intersection

    def __contains__(self, key) -> bool:
        return int(key) in self.bitmap()

    def __eq__(self, other):
        o = self._other(other)
        if o is NotImplemented:
            return NotImplemented
        return self.bitmap() == o

    __hash__ = None

    def __repr__(self):
        form = "runs" if self._runs is not None else "bitmap"
        return f"Audience({self._count:,} devices, {form})"
