"""Columnar device-location store (pyarrow), in generations.

Layout
------
One generation is one uncompressed Arrow IPC file (``store.arrow``) holding a
single record batch with the columns

========== ======================================== ==============================
column     type                                      meaning
========== ======================================== ==============================
device_id  uint64                                    the partner's device id
lat, lon   float64                                   the stored coordinates (deg)
app        dictionary<int8, string>                  partner app
last_seen  timestamp[s, tz=UTC]                      time of the location fix
========== ======================================== ==============================

The **device key** (docs/design.md, Device keys) is the row number.  Rows are never
reordered or deleted once written: an update rewrites values in place and a new
device is appended, so a key stays valid for the life of every log that holds
it and ``key -> row`` costs nothing.  At first ingest a batch is written in KD
leaf order, so spatially close devices get close keys and an audience is a few
long runs of keys (which roaring bitmaps compress to almost nothing).

``DeviceStore.open`` memory-maps the file: it reads the footer, not the rows,
and its cost does not grow with the number of devices.

Identity and integrity
----------------------
The schema metadata names the generation: its lineage (random at first
ingest, kept by every later generation), number, parent and a random uid.
``store.json`` beside it is a sealed manifest listing the size and xxh3-128
digest of every file of the generation; open checks the seal, that
store.arrow's identity matches, and the sizes; :meth:`DeviceStore.verify`
hashes the bytes (see docs/design.md, "Integrity").
"""
from __future__ import annotations

import collections
import datetime as _dt
import errno
import json
import mmap
import os
import secrets
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import _kernels, _array_kernels, _store_kernels
from ._fs import DIGEST, canonical_json, file_digest, read_sealed, write_sealed
from ._fs import fsync_dir as _fsync_dir
from ._fs import private_files
from ._fs import start_writeback as _start_writeback
from .errors import CorruptFileError, InvalidInputError
from .geo import check_coordinates, now_or_clock

STORE_FILE = "store.arrow"
ID_INDEX_FILE = "id_index.npy"
ID_SORTED_FILE = "id_sorted.npy"
#: ``changed_since_<parent generation>.npy``: keys this generation changed (uint32, sorted)
CHANGED_PREFIX = "changed_since_"
#: The generation's sealed manifest: identity, lineage and a digest of every file (see ``_install``).
MANIFEST_FILE = "store.json"
#: 2: store.arrow names its lineage, parent and uid; ``store.json`` seals the files.
FORMAT_VERSION = 2
_META_KEY = b"geotarget.store"
#: Keys are uint32 and 2^32 - 1 is reserved as "no key".
MAX_DEVICES = 2**32 - 1
#: App codes are int8 in the index; 127 partner apps is ample (the platform has ~25).
MAX_APPS = 127
DEFAULT_APP = "default"
#: Leaf size used to order a first ingest spatially (the index may use another).
_INGEST_LEAF = 64

SCHEMA = pa.schema([
    pa.field("device_id", pa.uint64(), nullable=False),
    pa.field("lat", pa.float64(), nullable=False),
    pa.field("lon", pa.float64(), nullable=False),
    pa.field("app", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    pa.field("last_seen", pa.timestamp("s", tz="UTC"), nullable=False),
])


#: Set to a dict to collect wall seconds per step of the next on-disk ``with_updates``
#: (``benchmarks/scale.py --diagnose`` does); None costs nothing.
update_step_seconds: dict | None = None


class _Laps:
    def __init__(self):
        import time
        self._clock = time.perf_counter
        self.out = update_step_seconds
        self.t = self._clock()

    def __call__(self, step: str) -> None:
        if self.out is not None:
            t = self._clock()
            self.out[step] = self.out.get(step, 0.0) + t - self.t
            self.t = t


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a




# ---------------------------------------------------------------------------
# column validation (public boundary)
# ---------------------------------------------------------------------------

def _check_ids(device_id, *, sort: bool = False):
    """Validated uint64 ids; with ``sort``, ``(ids, sorted ids, their rows)``.

    ``sort`` does the duplicate check with the row-carrying parallel sort,
    whose result a caller that needs the ids in order (a new generation) keeps.
    """
    arr = np.asarray(device_id)
    if arr.ndim != 1:
        raise InvalidInputError(f"device_id must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"device_id must be integers, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and (arr < 0).any():
        i = int(np.flatnonzero(arr < 0)[0])
        raise InvalidInputError(f"device_id[{i}] = {arr[i]} is negative; ids are uint64")
    ids = np.ascontiguousarray(arr, dtype=np.uint64)
    if sort:
        if ids.size > MAX_DEVICES:  # rows are carried as uint32
            raise InvalidInputError(f"device_id: {ids.size} ids exceed the {MAX_DEVICES} key space")
        s, rows = _array_kernels.sort_ids(ids)
        dup = s[1:] == s[:-1]
        if dup.any():
            i = int(rows[1:][dup].min())
            raise InvalidInputError(f"device_id[{i}] = {ids[i]} is a duplicate within this batch")
        return ids, s, rows
    if ids.size > 1:
        s = np.sort(ids)  # SIMD sort; the row-carrying sort only runs to name the culprit
        if (s[1:] == s[:-1]).any():
            sorted_ids, rows = _array_kernels.sort_ids(ids)
            dup = sorted_ids[1:] == sorted_ids[:-1]
            i = int(rows[1:][dup].min())
            raise InvalidInputError(f"device_id[{i}] = {ids[i]} is a duplicate within this batch")
    return ids


def _check_app(app, n: int, names: list[str] | None = None):
    """Return (codes int8, names) with ``names`` extended by any new app.

    Names go through pyarrow's hash-based dictionary encoding (C++), so a
    40 M-row batch of app names costs a second, not a sort of Python strings.
    """
    import pyarrow.compute as pc
    names = list(names) if names is not None else []
    if app is None or isinstance(app, str):
        name = DEFAULT_APP if app is None else app
        if not name:
            raise InvalidInputError("app must be a non-empty name")
        if name not in names:
            names.append(name)
        if len(names) > MAX_APPS:
            raise InvalidInputError(f"app: {len(names)} distinct apps, at most {MAX_APPS} are supported")
        return np.full(n, names.index(name), dtype=np.int8), names
    if not isinstance(app, (pa.Array, pa.ChunkedArray)):
        arr = np.asarray(app)
        if arr.ndim != 1:
            raise InvalidInputError(f"app must be 1-D, got shape {arr.shape}")
        try:
            # a ChunkedArray when the strings overflow one array (20 M numpy names do)
            app = pa.array(arr if arr.dtype.kind in "OUS" else arr.astype(str), type=pa.string())
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InvalidInputError(f"app must be names (strings): {exc}") from None
    if len(app) != n:
        raise InvalidInputError(f"app has {len(app)} rows but device_id has {n}")
    chunks = app.chunks if isinstance(app, pa.ChunkedArray) else [app]
    codes = np.empty(n, dtype=np.int8)
    row0 = 0
    for chunk in chunks:  # each chunk has its own dictionary
        codes[row0:row0 + len(chunk)] = _encode_app_chunk(chunk, names, row0, pc)
        row0 += len(chunk)
    return codes, names


def _encode_app_chunk(app: pa.Array, names: list, row0: int, pc) -> np.ndarray:
    """int8 codes into ``names`` (extended in place) of one pyarrow array of app names."""
    if app.null_count:
        i = int(np.flatnonzero(app.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"app[{row0 + i}] is null")
    if not pa.types.is_dictionary(app.type):
        app = pc.dictionary_encode(app)
    indices = app.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    dict_names = app.dictionary.cast(pa.string()).to_pylist()
    mapping = np.full(max(len(dict_names), 1), -1, dtype=np.int64)
    # bincount, not np.unique: NumPy 2.4's hash-based unique takes seconds on millions of ints
    used = np.bincount(indices, minlength=len(dict_names)) > 0
    for i, name in enumerate(dict_names):
        if not used[i]:
            continue
        if not name or name in ("None", "nan"):
            row = int(np.flatnonzero(indices == i)[0])
            raise InvalidInputError(f"app[{row0 + row}] = {name!r} is not an app name")
        if name not in names:
            names.append(str(name))
            if len(names) > MAX_APPS:
                raise InvalidInputError(f"app: {len(names)} distinct apps, at most {MAX_APPS} are supported")
        mapping[i] = names.index(name)
    return mapping[indices].astype(np.int8)


def _check_last_seen(last_seen, n: int, now: _dt.datetime | None = None) -> np.ndarray:
    """Return int64 epoch seconds."""
    if last_seen is None:
        now = now_or_clock(now)
        return np.full(n, int(now.timestamp()), dtype=np.int64)
    if isinstance(last_seen, _dt.datetime):
        if last_seen.tzinfo is None:
            raise InvalidInputError("last_seen is a naive datetime; pass a timezone-aware one")
        return np.full(n, int(last_seen.timestamp()), dtype=np.int64)
    if isinstance(last_seen, (pa.ChunkedArray, pa.Array)):
        if last_seen.null_count:
            raise InvalidInputError("last_seen has nulls")
        if pa.types.is_timestamp(last_seen.type):
            last_seen = last_seen.cast(pa.timestamp("s", tz=last_seen.type.tz)).cast(pa.int64())
        last_seen = last_seen.to_numpy(zero_copy_only=False)
    arr = np.asarray(last_seen)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInputError(f"last_seen has shape {arr.shape} but device_id has {n} rows")
    if np.issubdtype(arr.dtype, np.datetime64):
        if np.isnat(arr).any():
            i = int(np.flatnonzero(np.isnat(arr))[0])
            raise InvalidInputError(f"last_seen[{i}] is NaT")
        return arr.astype("datetime64[s]").astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise InvalidInputError(f"last_seen[{i}] = {arr[i]!r} is not finite")
        out = np.floor(arr).astype(np.int64)
    else:
        raise InvalidInputError(f"last_seen must be datetimes or epoch seconds, got dtype {arr.dtype}")
    bad = (out < 0) | (out >= 2**32)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(f"last_seen[{i}] = {out[i]} is outside 1970..2106 (epoch seconds)")
    # A fix from the future would pass every freshness filter for years; a day
    # absorbs skewed device clocks and time-zone slips.
    late = np.flatnonzero(out > int(_dt.datetime.now(_dt.timezone.utc).timestamp()) + 86400)
    if late.size:
        i = int(late[0])
        raise InvalidInputError(f"last_seen[{i}] = {out[i]} ({_dt.datetime.fromtimestamp(int(out[i]), _dt.timezone.utc):%Y-%m-%d}) "
                                f"is more than a day in the future")
    return out


def _take(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src[idx]`` gathered over both cores."""
    out = np.empty(idx.shape[0], dtype=src.dtype)
    _array_kernels.take(np.ascontiguousarray(src), np.ascontiguousarray(idx, dtype=np.int64), out)
    return out


def _spatial_order(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Row order that puts a batch in KD leaf order (close devices, close keys)."""
    n = lat.shape[0]
    pts = np.empty(n, dtype=_kernels.POINT_DTYPE)
    if n:
        _kernels.fill_points(lat, lon, pts)
        # The root on one core: the two-core partition leaves rows in an order
        # that depends on the thread count, and keys must not depend on the machine.
        _kernels.build_tree(pts, _INGEST_LEAF, False)
    return pts["key"].astype(np.int64)


# ---------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------

class DeviceStore:
    """One generation of device locations.  Immutable: updates make a new generation."""

    def __init__(self, device_id, lat, lon, app_codes, app_names, last_seen, *,
                 generation=1, path=None, _id_index=None, _table=None, lineage=None, parent=None,
                 uid=None, ancestry=()):
        self.device_id = _readonly(device_id)
        self.lat = _readonly(lat)
        self.lon = _readonly(lon)
        self.app_codes = _readonly(app_codes)
        self.app_names = tuple(app_names)
        self.last_seen_s = _readonly(last_seen)
        self.generation = int(generation)
        self.path = path
        self._id_index = _id_index
        self._sorted_ids = None
        self._table = _table
        #: Keys whose row differs from generation ``parent_generation`` (moved, re-seen or new),
        #: sorted; None when unknown (a first ingest, or a store saved without it).
        self.changed_keys: np.ndarray | None = None
        self.parent_generation: int | None = None
        #: Random id of the store's history, drawn at first ingest and kept by every later generation.
        self.lineage = lineage or _new_id()
        #: The generation this one was made from (None for a first ingest).
        self.parent = None if parent is None else int(parent)
        #: Random id of this generation's contents: two generations with the same number differ here.
        self.uid = uid or _new_id()
        #: The uids of every generation this one descends from, oldest first: a refresh accepts
        #: only a store whose ancestry holds the current one (a fork has the same lineage).
        self.ancestry = tuple(ancestry)
        #: The sealed manifest of the files this store maps (None in memory).
        self.manifest: dict | None = None
        # Arrays built in this process are trusted; mapped files are until verify() hashes them.
        self._verified = path is None

    # -- constructors -----------------------------------------------------

    @classmethod
    def from_arrays(cls, device_id, lat, lon, app=None, last_seen=None, *, generation=1, lineage=None):
        """Ingest one batch of devices.

        Rows are reordered spatially and device ``i`` of the result has key
        ``i``; use :meth:`lookup` to find a device's key.  Bad input raises
        :class:`~geotarget.errors.InvalidInputError` naming the column and the
        first bad row; nothing is ingested.  A first ingest starts a new
        random lineage; ``lineage`` names one instead, for a process that
        re-creates the same population deterministically (tests, replays).
        """
        if lineage is not None and (not isinstance(lineage, str) or not lineage):
            raise InvalidInputError(f"lineage must be a non-empty string, got {lineage!r}")
        ids = _check_ids(device_id)
        n = ids.shape[0]
        lat, lon = check_coordinates(lat, lon)
        if lat.shape[0] != n:
            raise InvalidInputError(f"lat has {lat.shape[0]} rows but device_id has {n}")
        if n > MAX_DEVICES:
            raise InvalidInputError(f"device_id: {n} devices exceed the {MAX_DEVICES} key space")
        codes, names = _check_app(app, n)
        seen = _check_last_seen(last_seen, n)
        order = _spatial_order(lat, lon)
        return cls(_take(ids, order), _take(lat, order), _take(lon, order), _take(codes, order),
                   names, _take(seen, order), generation=generation, lineage=lineage)

    @classmethod
    def from_table(cls, table: pa.Table, *, generation=1):
        """Ingest a pyarrow Table with ``device_id``, ``lat``/``lon`` (or
        ``latitude``/``longitude``) and optional ``app`` and ``last_seen``."""
        cols = {name.lower(): name for name in table.column_names}

        def col(*names):
            for nm in names:
                if nm in cols:
                    c = table.column(cols[nm])
                    if c.null_count:
                        i = int(np.flatnonzero(c.is_null().to_numpy(zero_copy_only=False))[0])
                        raise InvalidInputError(f"{nm}[{i}] is null")
                    return c
            return None

        ids = col("device_id", "id")
        if ids is None:
            raise InvalidInputError(f"no device_id column; columns are {table.column_names}")
        lat = col("lat", "latitude")
        lon = col("lon", "lng", "longitude")
        if lat is None or lon is None:
            lat, lon = _geoparquet_points(table)
        return cls.from_arrays(ids.to_numpy(), np.asarray(lat), np.asarray(lon),
                               app=col("app"), last_seen=col("last_seen"), generation=generation)

    @classmethod
    def from_parquet(cls, path, *, generation=1):
        """Read plain columns or GeoParquet points (WKB or native point encoding)."""
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise CorruptFileError(f"{path}: cannot read Parquet: {exc}") from None
        return cls.from_table(table, generation=generation)

    @classmethod
    def write_chunks(cls, directory, chunks, n: int, app_names, *, generation=1, progress=None):
        """Ingest ``n`` devices from an iterator of column chunks straight to disk.

        Each chunk is a mapping with ``device_id``, ``lat``, ``lon``, ``app``
        (int8 codes into ``app_names``) and ``last_seen`` (epoch seconds).
        Every chunk is validated like :meth:`from_arrays` and written in its
        own spatial order, so keys stay spatially coherent without a global
        sort; duplicates across chunks are caught when the id index is built.
        Memory stays bounded by one chunk.
        """
        from .progress import bar
        app_names = list(app_names)
        writer = StoreWriter(directory, n, app_names, generation)
        start = 0
        try:
            with bar(n, "ingest", unit="dev", enabled=progress, unit_scale=True) as b:
                for chunk in chunks:
                    ids = _check_ids(chunk["device_id"])
                    m = ids.shape[0]
                    lat, lon = check_coordinates(chunk["lat"], chunk["lon"])
                    if lat.shape[0] != m:
                        raise InvalidInputError(f"lat has {lat.shape[0]} rows but device_id has {m}")
                    codes = np.asarray(chunk["app"])
                    if codes.shape != (m,) or not np.issubdtype(codes.dtype, np.integer):
                        raise InvalidInputError(f"app must be {m} integer codes, got {codes.dtype} {codes.shape}")
                    bad = (codes < 0) | (codes >= len(app_names))
                    if bad.any():
                        i = int(np.flatnonzero(bad)[0])
                        raise InvalidInputError(f"app[{start + i}] = {codes[i]} is not a code of app_names")
                    seen = _check_last_seen(chunk["last_seen"], m)
                    if start + m > n:
                        raise InvalidInputError(f"chunks hold more than n={n} rows")
                    order = _spatial_order(lat, lon)
                    writer.write(start, _take(ids, order), _take(lat, order), _take(lon, order),
                                 _take(codes.astype(np.int8), order), _take(seen, order))
                    start += m
                    b.update(m)
            if start != n:
                raise InvalidInputError(f"chunks held {start} rows, expected n={n}")
            return writer.finish()
        except BaseException:
            writer.abort()
            raise

    # -- basic facts ------------------------------------------------------

    def __len__(self):
        return int(self.device_id.shape[0])

    @property
    def n(self) -> int:
        return len(self)

    @property
    def keys(self) -> np.ndarray:
        """Device keys: the row numbers (uint32)."""
        return np.arange(len(self), dtype=np.uint32)

    @property
    def last_seen(self) -> np.ndarray:
        return self.last_seen_s.astype("datetime64[s]")

    def app_code(self, name: str) -> int:
        try:
            return self.app_names.index(name)
        except ValueError:
            raise InvalidInputError(f"app {name!r} is not in this store; apps are {list(self.app_names)}") from None

    def __repr__(self):
        return (f"DeviceStore(n={len(self):,}, generation={self.generation}, "
                f"apps={len(self.app_names)}, path={str(self.path) if self.path else None!r})")

    # -- lookups ----------------------------------------------------------

    def _ids_sorted(self):
        """(sorted device ids, their keys); the permutation is cached and saved with the store."""
        self.verify()
        if self._id_index is None:
            sorted_ids, order = _array_kernels.sort_ids(self.device_id)
            self._id_index = order
            self._sorted_ids = sorted_ids
        if getattr(self, "_sorted_ids", None) is None:
            self._sorted_ids = _take(self.device_id, self._id_index)
        return self._sorted_ids, self._id_index

    def lookup(self, device_id) -> np.ndarray:
        """Keys (int64) of the given device ids; -1 where the device is unknown."""
        ids = np.ascontiguousarray(device_id, dtype=np.uint64)
        shape, ids = ids.shape, ids.reshape(-1)
        if len(self) == 0:
            return np.full(shape, -1, dtype=np.int64)
        # Querying in id order walks the (possibly memory-mapped) sorted ids
        # front to back instead of jumping around them.  The parallel bucket
        # sort pays for its 2^16-bucket set-up only on large batches.
        if (1 << 16) <= ids.size <= MAX_DEVICES:
            q, rows = _array_kernels.sort_ids(ids)
        else:
            rows = np.argsort(ids, kind="stable")
            q = ids[rows]
        out = np.empty(ids.size, dtype=np.int64)
        out[rows] = self._lookup_sorted(q)
        return out.reshape(shape)

    def _lookup_sorted(self, sorted_queries: np.ndarray) -> np.ndarray:
        """Keys (int64, -1 where unknown) of ids given in ascending order."""
        out = np.empty(sorted_queries.shape[0], dtype=np.int64)
        if len(self) == 0:
            out[:] = -1
            return out
        sorted_ids, order = self._ids_sorted()
        _store_kernels.lookup_sorted(sorted_ids, np.ascontiguousarray(order, dtype=np.uint32),
                                     sorted_queries, out)
        return out

    # -- generations ------------------------------------------------------

    def with_updates(self, device_id, lat, lon, last_seen=None, app=None, *, directory=None,
                     progress=None):
        """A new generation with these locations.

        Devices already in the store keep their keys and get the new
        location; new devices are appended with new keys (in spatial order
        among themselves).  ``self`` is unchanged and keeps serving.

        With ``directory`` the new generation is streamed to disk in bounded
        memory (the 400 M-device path) and returned memory-mapped.
        """
        self.verify()  # the id index decides keys: its bytes are checked first
        if directory is not None:
            return self._with_updates_to_disk(directory, device_id, lat, lon, last_seen, app, progress)
        ids = _check_ids(device_id)
        n_up = ids.shape[0]
        lat, lon = check_coordinates(lat, lon)
        if lat.shape[0] != n_up:
            raise InvalidInputError(f"lat has {lat.shape[0]} rows but device_id has {n_up}")
        codes, names = _check_app(app, n_up, list(self.app_names)) if app is not None else (None, list(self.app_names))
        seen = _check_last_seen(last_seen, n_up)
        keys = self.lookup(ids)
        old = keys >= 0
        new = ~old
        n_new = int(new.sum())
        n_total = len(self) + n_new
        if n_total > MAX_DEVICES:
            raise InvalidInputError(f"device_id: {n_total} devices would exceed the key space")
        app_given = codes is not None
        if n_new and codes is None:  # new devices need an app; moved ones keep theirs
            codes, names = _check_app(None, n_up, names)
        order_new = np.flatnonzero(new)
        if n_new:
            order_new = order_new[_spatial_order(lat[order_new], lon[order_new])]

        def grow(col, fresh, dtype):
            out = np.empty(n_total, dtype=dtype)
            out[: len(self)] = col
            k = keys[old]
            out[k] = fresh[old]
            out[len(self):] = fresh[order_new]
            return out

        new_ids = np.empty(n_total, dtype=np.uint64)
        new_ids[: len(self)] = self.device_id
        new_ids[len(self):] = ids[order_new]
        new_lat = grow(self.lat, lat, np.float64)
        new_lon = grow(self.lon, lon, np.float64)
        new_seen = grow(self.last_seen_s, seen, np.int64)
        if app_given:
            new_app = grow(self.app_codes, codes, np.int8)
        else:
            new_app = np.empty(n_total, dtype=np.int8)
            new_app[: len(self)] = self.app_codes
            if n_new:
                new_app[len(self):] = codes[order_new]
        id_index = None
        if n_new == 0 and self._id_index is not None:
            id_index = self._id_index
        out = DeviceStore(new_ids, new_lat, new_lon, new_app, names, new_seen,
                          generation=self.generation + 1, _id_index=id_index, lineage=self.lineage,
                          parent=self.generation, ancestry=self.ancestry + (self.uid,))
        out._set_changed(np.concatenate([keys[old], np.arange(len(self), n_total)]), self.generation)
        return out

    def _set_changed(self, keys, parent: int) -> None:
        changed = _sorted_unique(np.asarray(keys, dtype=np.uint32))
        changed.flags.writeable = False
        self.changed_keys, self.parent_generation = changed, int(parent)

    def _with_updates_to_disk(self, directory, device_id, lat, lon, last_seen, app, progress,
                              chunk_rows: int = 1 << 22):
        from .progress import bar
        lap = _Laps()
        # the lookup walks the whole id index: have the kernel read it ahead while we validate
        _prefetch(self._sorted_ids)
        _prefetch(self._id_index)
        ids, q_ids, q_rows = _check_ids(device_id, sort=True)
        lap("validate ids (parallel sort, duplicates)")
        m = ids.shape[0]
        lat, lon = check_coordinates(lat, lon)
        if lat.shape[0] != m:
            raise InvalidInputError(f"lat has {lat.shape[0]} rows but device_id has {m}")
        names = list(self.app_names)
        codes = None
        if app is not None:
            codes, names = _check_app(app, m, names)
        seen = _check_last_seen(last_seen, m)
        app_given = codes is not None
        n_old = len(self)
        lap("validate coordinates, app, last_seen")
        key_of_q = self._lookup_sorted(q_ids)  # the batch in id order: one forward walk of the index
        found = key_of_q >= 0
        n_new = m - int(np.count_nonzero(found))
        _drop_pages(self._sorted_ids)  # the merge below faults them back one chunk at a time
        _drop_pages(self._id_index)
        lap("lookup (galloping walk of the id index)")
        if n_new and codes is None:  # new devices need an app; moved ones keep theirs
            codes, names = _check_app(None, m, names)
        if n_old + n_new > MAX_DEVICES:
            raise InvalidInputError(f"device_id: {n_old + n_new} devices would exceed the key space")
        n_total = n_old + n_new

        d = Path(directory)
        writer = StoreWriter(d, n_total, names, self.generation + 1, lineage=self.lineage,
                             parent=self.generation, ancestry=self.ancestry + (self.uid,))
        source = _OldColumns(self)
        io = _BackgroundIO()
        bufs = _BufferPool()
        staged = []
        try:
            # The old rows' device ids (and apps, unless given) are unchanged:
            # the disk starts on them now, while the movers are put in order.
            plain = (0,) if app_given else (0, 3)
            for c in plain:
                for s0 in range(0, n_old, 1 << 26):
                    io.submit(_run_jobs, [(source.copy_job(c, s0, min(n_old, s0 + (1 << 26)), writer), None)],
                              None, hold=False)
            # Movers in key order, so output chunk [s, e) patches one contiguous
            # slice of them; their values are gathered once, then read front to back.
            upd_keys, perm = _array_kernels.sort_ids(key_of_q[found].view(np.uint64))
            upd_rows = q_rows[found][perm]
            del perm
            patches = {1: _take(lat, upd_rows), 2: _take(lon, upd_rows), 4: _take(seen, upd_rows)}
            if app_given:
                patches[3] = _take(codes, upd_rows)
            del upd_rows
            lap("movers to key order, gather their values")
            # New devices: in batch order (as the in-memory path sees them), then
            # spatially, at keys n_old, n_old + 1, ...
            new_q = ~found
            del found, key_of_q
            new_rows = np.sort(q_rows[new_q])
            if n_new:
                new_rows = new_rows[_spatial_order(lat[new_rows], lon[new_rows])]
            new_keys = np.arange(n_old, n_old + n_new, dtype=np.uint32)
            changed = np.concatenate([upd_keys.astype(np.uint32), new_keys])  # both parts sorted, disjoint
            # the id-index additions: new ids in id order, with their keys
            key_of_row = np.empty(m, dtype=np.uint32)
            key_of_row[new_rows] = new_keys
            add_ids = q_ids[new_q]
            add_keys = key_of_row[q_rows[new_q]]
            del key_of_row, new_q, q_ids, q_rows
            at_key = upd_keys.astype(np.int64)
            del upd_keys
            lap("new devices: spatial order, keys, changed keys")

            # The new id index is the old one with the new ids merged in (ids of
            # existing devices never change): one forward pass, chunk by chunk,
            # done before the store's chunks while the lookup's pages of the old
            # index are still in the page cache (at 400 M, 13 GB of store would
            # pass through it in between).
            source.prefetch(patches, 0, min(n_old, chunk_rows))  # the store loop's first chunk
            old_sorted, old_order = self._ids_sorted()
            f_ids = _NpyWriter(d / ID_SORTED_FILE, np.uint64, n_total)
            f_keys = _NpyWriter(d / ID_INDEX_FILE, np.uint32, n_total)
            staged += [f_ids, f_keys]
            j = 0
            for i0 in range(0, max(n_old, 1), chunk_rows):
                i1 = min(n_old, i0 + chunk_rows)
                # new ids below a[i1 - 1] go in this chunk; ties cannot occur (new ids are not in a)
                j1 = n_new if i1 == n_old else int(np.searchsorted(add_ids, old_sorted[i1 - 1]))
                size = (i1 - i0) + (j1 - j)
                out_ids, out_keys = bufs.get(np.uint64, size), bufs.get(np.uint32, size)
                _store_kernels.merge_sorted(old_sorted[i0:i1], np.ascontiguousarray(old_order[i0:i1], np.uint32),
                                            add_ids[j:j1], add_keys[j:j1], out_ids, out_keys)
                io.submit(_run_jobs, [(f_ids.write_job(i0 + j, out_ids), out_ids),
                                      (f_keys.write_job(i0 + j, out_keys), out_keys)], bufs)
                _drop_pages(old_sorted, i0, i1)
                _drop_pages(old_order, i0, i1)
                j = j1
            lap("id index: merge chunks (I/O thread writing behind)")
            with bar(n_total, "new generation", unit="dev", enabled=progress, unit_scale=True) as b:
                lo = 0
                for s0 in range(0, n_old, chunk_rows):
                    e0 = min(n_old, s0 + chunk_rows)
                    source.prefetch(patches, e0, min(n_old, e0 + chunk_rows))
                    hi = int(np.searchsorted(at_key, e0))
                    at = at_key[lo:hi] - s0
                    jobs = []
                    for c, vals in patches.items():
                        buf = bufs.get(source.dtype(c), e0 - s0)
                        source.read(c, s0, e0, buf)
                        buf[at] = vals[lo:hi]
                        jobs.append((writer.write_job(c, s0, buf), buf))
                    io.submit(_run_jobs, jobs, bufs)
                    lo = hi
                    if not source.direct:
                        self.release()
                    b.update(e0 - s0)
                if n_new:
                    cols = (ids[new_rows], lat[new_rows], lon[new_rows], codes[new_rows], seen[new_rows])
                    io.submit(_run_jobs, [(writer.write_job(c, n_old, a), None) for c, a in enumerate(cols)], None)
                    b.update(n_new)
            del patches, at_key
            lap("store.arrow: read + patch chunks (I/O thread writing behind)")
            f_changed = _NpyWriter(d / f"{CHANGED_PREFIX}{self.generation}.npy", np.uint32, changed.size)
            staged.append(f_changed)
            io.submit(_run_jobs, [(f_changed.write_job(0, changed), None)], None)
            io.drain()
            lap("wait for the I/O thread")
            for f in staged:
                f.close()
            source.close()
            lap("fsync id files")
            out = writer.finish(id_index=False, staged=[(f.tmp, f.path) for f in staged])
            lap("fsync store.arrow, renames, open")
            return out
        except BaseException:
            io.abort()
            source.close()
            for f in staged:
                f.abort()
            writer.abort()
            raise
        finally:
            io.shutdown()
            _drop_pages(self._sorted_ids)
            _drop_pages(self._id_index)

    # -- Arrow I/O --------------------------------------------------------

    def to_table(self) -> pa.Table:
        """The generation as a pyarrow Table (zero-copy where possible), plus ``key``."""
        if self._table is not None:
            t = self._table
        else:
            t = pa.table(self._arrow_columns(), schema=SCHEMA)
        return t.append_column("key", pa.array(self.keys))

    def _arrow_columns(self):
        dictionary = pa.array(list(self.app_names), type=pa.string())
        app = pa.DictionaryArray.from_arrays(pa.array(self.app_codes, type=pa.int8()), dictionary)
        return [
            pa.array(self.device_id, type=pa.uint64()),
            pa.array(self.lat, type=pa.float64()),
            pa.array(self.lon, type=pa.float64()),
            app,
            pa.array(self.last_seen_s, type=pa.int64()).view(pa.timestamp("s", tz="UTC")),
        ]

    def _file_meta(self) -> dict:
        """What store.arrow's schema metadata says about the generation it holds."""
        return {"version": FORMAT_VERSION, "generation": self.generation, "rows": len(self),
                "lineage": self.lineage, "parent": self.parent, "uid": self.uid,
                "ancestry": list(self.ancestry)}

    @private_files
    def save(self, directory) -> Path:
        """Write this generation to ``directory`` (store.arrow, id index, changed keys, store.json).

        Every file is staged and fsynced first; the old manifest goes before
        any file is replaced and the new one comes last, so a crash leaves a
        directory whose store either opens as one whole generation or is
        refused (no manifest, or one naming another uid).
        """
        self.verify()  # a copy must not launder damaged bytes under a fresh digest
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        schema = SCHEMA.with_metadata({_META_KEY: json.dumps(self._file_meta()).encode()})
        batch = pa.record_batch(self._arrow_columns(), schema=schema)
        tmp = d / (STORE_FILE + ".tmp")
        staged = []
        try:
            with pa.OSFile(str(tmp), "wb") as sink:
                with pa.ipc.new_file(sink, schema) as writer:
                    writer.write_batch(batch)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            staged.append((tmp, d / STORE_FILE))
            if self._id_index is not None:
                sorted_ids, order = self._ids_sorted()
                staged.append(_stage_npy(d / ID_SORTED_FILE, sorted_ids))
                staged.append(_stage_npy(d / ID_INDEX_FILE, order))
            if self.changed_keys is not None:
                staged.append(_stage_npy(d / f"{CHANGED_PREFIX}{self.parent_generation}.npy", self.changed_keys))
            manifest = _install(d, self._file_meta(), staged)
        except BaseException:
            for t, _ in staged:
                Path(t).unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            raise
        self.path = d
        self.manifest = manifest
        return d

    @property
    def digest(self) -> str | None:
        """Content digest of the saved generation (over every file's digest), or None in memory."""
        return None if self.manifest is None else self.manifest["digest"]

    @property
    def identity(self) -> dict:
        """Lineage, generation, parent, uid and content digest: what an index and a log bind to."""
        return {"lineage": self.lineage, "generation": self.generation, "parent": self.parent,
                "uid": self.uid, "digest": self.digest}

    def verify(self) -> None:
        """Hash every file of a mapped generation against its manifest (once per object).

        Also checks that keys read from the files (the id index, the changed
        keys) lie inside this store's key space, so no kernel fed from them
        can read out of bounds.  :class:`CorruptFileError` names the file.
        A store built in memory has nothing to check.
        """
        if self._verified:
            return
        d = Path(self.path)
        for name, entry in self.manifest["files"].items():
            _check_file_digest(d / name, entry)
        n = len(self)
        if self._id_index is not None and n and int(np.max(self._id_index)) >= n:
            raise CorruptFileError(f"{d / ID_INDEX_FILE}: holds keys beyond the store's {n} rows")
        c = self.changed_keys
        if c is not None and c.size and (int(c[-1]) >= n or not bool(np.all(c[1:] > c[:-1]))):
            raise CorruptFileError(f"{d}: the changed keys are not a sorted key list of this store")
        self._verified = True

    @classmethod
    def open(cls, directory) -> "DeviceStore":
        """Memory-map a saved generation (reads the footer and the manifest, not the rows).

        Checks that store.arrow and every file its manifest lists belong to
        one generation (uid, lineage, sizes); the bytes themselves are hashed
        by :meth:`verify`, which runs before anything uses them to pick devices.
        """
        d = Path(directory)
        f = d / STORE_FILE
        if not f.exists():
            raise CorruptFileError(f"{d}: no {STORE_FILE} here; is this a geotarget store directory?")
        manifest = read_sealed(d / MANIFEST_FILE, "a geotarget store directory (a crash before the "
                                                  "manifest was written also leaves none)")
        files = manifest.get("files")
        if (manifest.get("format") != _MANIFEST_FORMAT or manifest.get("version") != FORMAT_VERSION
                or not isinstance(files, dict) or STORE_FILE not in files):
            raise CorruptFileError(f"{d / MANIFEST_FILE}: not a geotarget store manifest of version "
                                   f"{FORMAT_VERSION}")
        changed_files = [nm for nm in files if nm.startswith(CHANGED_PREFIX)]
        for name, entry in files.items():
            if not (name in (STORE_FILE, ID_INDEX_FILE, ID_SORTED_FILE) or name in changed_files[:1]):
                raise CorruptFileError(f"{d / MANIFEST_FILE}: lists an unexpected file {name!r}")
            _check_file_size(d / name, entry)
        try:
            identity: list = []
            mm = _map_file(f, identity)
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mm)))
            schema = reader.schema
            meta = json.loads((schema.metadata or {}).get(_META_KEY, b"null"))
            if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
                version = meta.get("version") if isinstance(meta, dict) else None
                raise CorruptFileError(f"{f}: not a geotarget store of format {FORMAT_VERSION} (found "
                                       f"{version!r}; format 1 stores predate lineage: re-ingest them)")
            if not schema.remove_metadata().equals(SCHEMA):
                raise CorruptFileError(f"{f}: unexpected schema {schema.remove_metadata()}")
            if reader.num_record_batches != 1:
                raise CorruptFileError(f"{f}: expected one record batch, found {reader.num_record_batches}")
            batch = reader.get_batch(0)
        except CorruptFileError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptFileError(f"{f}: cannot read Arrow IPC file: {exc}") from None
        for key in ("version", "generation", "rows", "lineage", "parent", "uid", "ancestry"):
            if manifest.get(key) != meta.get(key):
                raise CorruptFileError(
                    f"{d}: {STORE_FILE} and {MANIFEST_FILE} are of different generations ({key} "
                    f"{meta.get(key)!r} against {manifest.get(key)!r}): the store was replaced or a "
                    f"write was cut short")
        if (not isinstance(meta["generation"], int) or meta["generation"] < 1
                or not isinstance(meta["lineage"], str) or not isinstance(meta["uid"], str)
                or not (meta["parent"] is None or (isinstance(meta["parent"], int)
                                                   and 1 <= meta["parent"] < meta["generation"]))
                or not isinstance(meta.get("ancestry"), list)
                or not all(isinstance(u, str) for u in meta["ancestry"])
                or len(meta["ancestry"]) > meta["generation"] - 1
                or (meta["parent"] is None) != (len(meta["ancestry"]) == 0)):
            raise CorruptFileError(f"{f}: malformed generation identity {meta!r}")
        if batch.num_rows != meta.get("rows"):
            raise CorruptFileError(f"{f}: {batch.num_rows} rows but the header says {meta.get('rows')}")
        for i, name in enumerate(SCHEMA.names):
            if batch.column(i).null_count:
                raise CorruptFileError(f"{f}: column {name} has nulls")
        app = batch.column(3)
        names = app.dictionary.to_pylist()
        try:
            ids = batch.column(0).to_numpy(zero_copy_only=True)
            lat = batch.column(1).to_numpy(zero_copy_only=True)
            lon = batch.column(2).to_numpy(zero_copy_only=True)
            codes = app.indices.to_numpy(zero_copy_only=True)
            seen = batch.column(4).view(pa.int64()).to_numpy(zero_copy_only=True)
        except pa.ArrowException as exc:
            raise CorruptFileError(f"{f}: columns are not plain buffers: {exc}") from None
        if not 1 <= len(names) <= MAX_APPS:
            raise CorruptFileError(f"{f}: {len(names)} app names, expected 1..{MAX_APPS}")
        id_index = sorted_ids = None
        if ID_INDEX_FILE in files:
            id_index = load_npy(d / ID_INDEX_FILE, np.uint32, (batch.num_rows,))
            if ID_SORTED_FILE in files:
                sorted_ids = load_npy(d / ID_SORTED_FILE, np.uint64, (batch.num_rows,))
        store = cls(ids, lat, lon, codes, names, seen, generation=meta["generation"], path=d,
                    _id_index=id_index, _table=pa.Table.from_batches([batch]).replace_schema_metadata(None),
                    lineage=meta["lineage"], parent=meta["parent"], uid=meta["uid"],
                    ancestry=meta["ancestry"])
        store.manifest = manifest
        store._sorted_ids = sorted_ids
        store._mmap = mm
        # which file the columns map, so a new generation can copy column
        # bytes from it kernel-side only if store.arrow was not replaced since
        store._file_identity = tuple(identity)
        if changed_files:
            path = d / changed_files[0]
            try:
                parent = int(path.stem[len(CHANGED_PREFIX):])
            except ValueError:
                raise CorruptFileError(f"{path}: not a changed-keys file name") from None
            if parent != meta["parent"]:
                raise CorruptFileError(f"{path}: changed keys since generation {parent}, but the parent "
                                       f"is {meta['parent']}")
            try:
                changed = np.load(path, mmap_mode="r")
            except Exception as exc:  # see load_npy
                raise CorruptFileError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
            if changed.dtype != np.uint32 or changed.ndim != 1 or (
                    changed.size and int(changed[-1]) >= batch.num_rows):
                raise CorruptFileError(f"{path}: not a sorted key list of this store")
            store.changed_keys, store.parent_generation = changed, parent
        return store

    def release(self) -> None:
        """Drop this process's resident pages of a memory-mapped store.

        The data stays in the page cache and on disk and is faulted back on
        the next access; this only keeps a one-off full scan (an index build)
        from counting the whole file in the process's RSS.
        """
        mm = getattr(self, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def _map_file(path: Path, identity: list | None = None) -> mmap.mmap:
    """Map ``path`` read-only; ``identity`` (a list) receives the file's (st_dev, st_ino)."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size == 0:
            raise CorruptFileError(f"{path}: empty file")
        if identity is not None:
            identity[:] = [st.st_dev, st.st_ino]
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


_MANIFEST_FORMAT = "geotarget.store"


def _new_id() -> str:
    """A random 128-bit id (lineages, generation uids)."""
    return secrets.token_hex(16)


def _check_file_size(path: Path, entry) -> None:
    """A file the manifest lists exists with the listed size (cheap: one stat)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(
            entry.get(DIGEST), str):
        raise CorruptFileError(f"{path}: malformed manifest entry {entry!r}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: listed in the manifest but missing") from None
    if size != entry["bytes"]:
        raise CorruptFileError(f"{path}: {size} bytes, the manifest says {entry['bytes']}: "
                               f"truncated, extended or replaced")


def _check_file_digest(path: Path, entry) -> None:
    """A listed file's bytes hash to the manifest's digest."""
    _check_file_size(path, entry)
    size, digest = file_digest(path)
    if size != entry["bytes"] or digest != entry[DIGEST]:
        raise CorruptFileError(f"{path}: content digest mismatch: the file was damaged or replaced "
                               f"since its manifest was written")


def manifest_entries(staged) -> dict:
    """``{name: {bytes, digest}}`` of (tmp, final) staged files, named by their final names."""
    files = {}
    for tmp, final in staged:
        size, digest = file_digest(tmp)
        files[Path(final).name] = {"bytes": size, DIGEST: digest}
    return files


def content_digest(files: dict) -> str:
    """One digest of a generation's contents: over the canonical listing of its files' digests."""
    import xxhash
    return xxhash.xxh3_128_hexdigest(canonical_json(files).encode())


def _install(d: Path, meta: dict, staged) -> dict:
    """Hash staged (tmp, final) files, then move them into place under a new manifest.

    The old manifest and companions go first and the new manifest last, each
    step after an fsync of the directory: at no instant does the directory
    hold a manifest that lists files of another generation.
    """
    files = manifest_entries(staged)
    doc = {"format": _MANIFEST_FORMAT, **meta, "files": files, "digest": content_digest(files)}
    (d / MANIFEST_FILE).unlink(missing_ok=True)
    for stale in (ID_INDEX_FILE, ID_SORTED_FILE):
        (d / stale).unlink(missing_ok=True)
    for stale in d.glob(f"{CHANGED_PREFIX}*.npy"):
        stale.unlink()
    _fsync_dir(d)
    for tmp, final in staged:
        os.replace(tmp, final)
    _fsync_dir(d)
    write_sealed(d / MANIFEST_FILE, doc)
    _fsync_dir(d)
    return doc


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` of uint32 keys by radix sort and compare (NumPy 2.4's hash-based
    unique is ~30x slower on millions of distinct ints: 12 s for 4 M uint32)."""
    s = np.array(a, dtype=np.uint32, copy=True)
    _array_kernels.sort_inplace(s)
    if s.size > 1:
        keep = np.empty(s.size, dtype=bool)
        keep[0] = True
        np.not_equal(s[1:], s[:-1], out=keep[1:])
        if not keep.all():
            s = s[keep]
    return s


def load_json(path: Path, what: str):
    """Parse a small JSON metadata file, or raise CorruptFileError saying which file is missing or bad."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{Path(path).parent}: no {Path(path).name}; is this {what}?") from None
    except (ValueError, OSError) as exc:
        raise CorruptFileError(f"{path}: {exc}") from None


def load_npy(path: Path, dtype, shape) -> np.ndarray:
    """Memory-map a ``.npy`` file, or raise CorruptFileError unless it has this dtype and shape."""
    try:
        a = np.load(path, mmap_mode="r")
    except Exception as exc:  # a damaged header surfaces as ValueError, SyntaxError, tokenize.TokenError...
        raise CorruptFileError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape) or not a.flags.c_contiguous:
        raise CorruptFileError(f"{path}: expected {np.dtype(dtype)} {tuple(shape)}, found {a.dtype} {a.shape}")
    return a


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, fsynced, atomically renamed into place."""
    os.replace(*_stage_npy(path, array))


def _pwrite_all(fd: int, arr: np.ndarray, pos: int) -> None:
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], pos + done)


def _pread_into(fd: int, buf: np.ndarray, pos: int, what: str = "store file") -> None:
    """Fill the contiguous ``buf`` from ``fd`` at ``pos``; CorruptFileError if the file ends first."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + (1 << 30)]], pos + done)
        if got == 0:
            raise CorruptFileError(f"{what} ended early: read {done} of {len(view)} bytes at {pos}")
        done += got


def _offset_in(mm, arr: np.ndarray) -> int:
    """Byte offset of ``arr``'s data inside the mapping ``mm`` (ValueError if the mapping is closed)."""
    return arr.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data


def _drop_pages(arr, start: int = 0, stop: int | None = None) -> None:
    """Drop this process's resident pages of elements [start, stop) of a memory-mapped .npy.

    As in DeviceStore.release: the data stays in the page cache, only the
    process's RSS forgets it (at 400 M devices the old id index is 4.5 GiB).
    """
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        at = _offset_in(mm, arr)
        lo = (at + start * arr.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(mm), at + (arr.shape[0] if stop is None else stop) * arr.itemsize)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError):  # a closed mapping, or a platform without madvise
        pass


def _advise_mapping(arr, advice: int) -> None:
    """``madvise`` the whole mapping of a memory-mapped .npy (no-op for other arrays).

    Advice is a hint: a kernel without it, or a closed mapping, is ignored.
    """
    mm = getattr(arr, "_mmap", None)
    if mm is not None:
        try:
            mm.madvise(advice)
        except (ValueError, OSError):
            pass


def _prefetch(arr) -> None:
    """Ask the kernel to read a memory-mapped .npy ahead, asynchronously (no-op for other arrays)."""
    if hasattr(mmap, "MADV_WILLNEED"):
        _advise_mapping(arr, mmap.MADV_WILLNEED)


def _stage_npy(path: Path, array: np.ndarray):
    """Write ``array`` as ``path`` + ".tmp" (fsynced, not yet renamed); return (tmp, path).

    The ".tmp" suffix keeps half-written files out of the ``*.npy`` globs that open uses.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array))
        fh.flush()
        os.fsync(fh.fileno())
    return tmp, path


class _NpyWriter:
    """A 1-D ``.npy`` file of ``n`` elements, written in pieces at any offset, staged as ``path.tmp``."""

    def __init__(self, path: Path, dtype, n: int):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), int(n)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        with open(self.tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)})
            self.data_offset = fh.tell()
            fh.truncate(self.data_offset + self.n * self.dtype.itemsize)
        self.fd = os.open(self.tmp, os.O_WRONLY)

    def write_job(self, start: int, arr: np.ndarray):
        a = np.ascontiguousarray(arr, dtype=self.dtype)
        if start < 0 or start + a.shape[0] > self.n:
            raise ValueError(f"{self.path.name}: rows [{start}, {start + a.shape[0]}) outside [0, {self.n})")
        pos = self.data_offset + start * self.dtype.itemsize

        def job():
            _pwrite_all(self.fd, a, pos)
            _start_writeback(self.fd, pos, a.nbytes)
        return job

    def close(self) -> None:
        """fsync and close (the file stays staged under its .tmp name)."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


class _BufferPool:
    """Reusable chunk buffers: a fresh 32 MB array costs ~8 k page faults at first touch,
    which over a 13 GB generation adds up to seconds."""

    def __init__(self):
        self._free: dict = {}
        self._lock = threading.Lock()

    def get(self, dtype, n: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        with self._lock:
            free = self._free.setdefault(dtype, [])
            for i, b in enumerate(free):
                if b.shape[0] >= n:
                    return free.pop(i)[:n]
            # Too small for this request, and requests barely vary (merge chunks grow by
            # the new ids they take in): forget them, or the pool would grow chunk by chunk.
            free.clear()
        return np.empty(n + n // 8, dtype=dtype)[:n]

    def put(self, view: np.ndarray) -> None:
        base = view.base if isinstance(view.base, np.ndarray) else view
        with self._lock:
            self._free.setdefault(base.dtype, []).append(base)


def _run_jobs(jobs, pool) -> None:
    for job, buf in jobs:
        job()
        if buf is not None and pool is not None:
            pool.put(buf)


class _BackgroundIO:
    """One thread doing a new generation's file I/O, in submission order.

    pread, pwrite, copy_file_range and fsync release the GIL, so the disk
    works while the calling thread reads and patches the next chunk.  At most
    ``depth`` batches wait, which bounds the buffers in flight.
    """

    def __init__(self, depth: int = 3):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="geotarget-io")
        self._pending: collections.deque = collections.deque()
        self._held: collections.deque = collections.deque()
        self.depth = depth

    def submit(self, fn, *args, hold: bool = True) -> None:
        """Queue ``fn(*args)``; ``hold``: it holds buffers, so wait while ``depth`` such jobs are queued."""
        if hold:
            while len(self._held) >= self.depth:
                self._held.popleft().result()  # re-raises the I/O thread's error here
        f = self._pool.submit(fn, *args)
        self._pending.append(f)
        if hold:
            self._held.append(f)
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        self._held.clear()

    def abort(self) -> None:
        """Cancel what has not started and wait for what has (its file must not close under it)."""
        from concurrent.futures import wait
        for f in self._pending:
            f.cancel()
        wait(list(self._pending))
        self._pending.clear()
        self._held.clear()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class _OldColumns:
    """The old generation's columns, as the source of a new one.

    When the store maps a store.arrow that has not been replaced since it was
    opened, column bytes come from that file: pread into a buffer for the
    columns that get patched, copy_file_range for the unchanged ones (the
    kernel copies page cache to page cache, no pass through Python).  Either
    way the old mapping gains no resident pages.  Otherwise they come from
    the arrays.
    """

    def __init__(self, store: "DeviceStore"):
        self.arrays = (store.device_id, store.lat, store.lon, store.app_codes, store.last_seen_s)
        self.fd, self.offsets, self.direct = -1, None, False
        self.kernel_copy = hasattr(os, "copy_file_range")
        mm, ident = getattr(store, "_mmap", None), getattr(store, "_file_identity", None)
        if mm is None or not ident or store.path is None or len(store) == 0:
            return
        try:
            fd = os.open(Path(store.path) / STORE_FILE, os.O_RDONLY)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            offs = [_offset_in(mm, a) for a in self.arrays]
            ok = ((st.st_dev, st.st_ino) == tuple(ident) and st.st_size == len(mm)
                  and all(0 <= o and o + a.nbytes <= len(mm) for o, a in zip(offs, self.arrays)))
        except (ValueError, OSError):  # a closed mapping
            ok = False
        if ok:
            self.fd, self.offsets, self.direct = fd, offs, True
        else:
            os.close(fd)

    def dtype(self, c: int):
        return self.arrays[c].dtype

    def prefetch(self, columns, s0: int, e0: int) -> None:
        """Start reading rows [s0, e0) of these columns into the page cache (asynchronously)."""
        if self.direct and e0 > s0 and hasattr(os, "posix_fadvise"):
            for c in columns:
                isz = self.arrays[c].itemsize
                os.posix_fadvise(self.fd, self.offsets[c] + s0 * isz, (e0 - s0) * isz, os.POSIX_FADV_WILLNEED)

    def read(self, c: int, s0: int, e0: int, buf: np.ndarray) -> None:
        if self.direct:
            _pread_into(self.fd, buf, self.offsets[c] + s0 * buf.itemsize)
        else:
            np.copyto(buf, self.arrays[c][s0:e0])

    def copy_job(self, c: int, s0: int, e0: int, writer: "StoreWriter"):
        """A job that copies rows [s0, e0) of column ``c`` to the same rows of the new file."""
        if not (self.direct and self.kernel_copy):
            return writer.write_job(c, s0, self.arrays[c][s0:e0])
        isz = self.arrays[c].itemsize
        src, dst, n = self.offsets[c] + s0 * isz, writer.offsets[c] + s0 * isz, (e0 - s0) * isz

        def job():
            done = 0
            while done < n and self.kernel_copy:
                try:
                    got = os.copy_file_range(self.fd, writer.fd, n - done, src + done, dst + done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.kernel_copy = False  # this kernel or filesystem cannot; copy through memory
                    break
                if got == 0:
                    raise CorruptFileError(f"store file ended early while copying column {c}")
                done += got
            if done < n:
                rest = self.arrays[c][s0:e0].view(np.uint8)[done:]
                _pwrite_all(writer.fd, rest, dst + done)
            _start_writeback(writer.fd, dst, n)
        return job

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _SparseSink:
    """A write-only file for pyarrow that turns large (column body) writes into holes.

    The store writer first lays out an Arrow IPC file of the right size with
    pyarrow (so the format is pyarrow's, not ours), writing metadata for real
    and skipping the all-zero column bodies, then fills the bodies with pwrite.
    """

    def __init__(self, path):
        self.f = open(path, "wb")
        self.pos = 0
        self.closed = False

    def write(self, data):
        mv = memoryview(data)
        n = mv.nbytes
        if n >= (1 << 16):
            self.f.seek(n, 1)
        else:
            self.f.write(mv)
        self.pos += n
        return n

    def tell(self):
        return self.pos

    def flush(self):
        self.f.flush()

    def writable(self):
        return True

    def close(self):
        if not self.closed:
            self.f.truncate(self.pos)
            self.f.close()
            self.closed = True


class StoreWriter:
    """Write a store generation of ``n`` rows to disk chunk by chunk, in bounded memory.

    Rows are written with ``pwrite`` straight into the Arrow IPC file, so a
    400 M-row generation never exists in anonymous memory.
    """

    _COLS = (("device_id", np.uint64), ("lat", np.float64), ("lon", np.float64),
             ("app", np.int8), ("last_seen", np.int64))

    @private_files
    def __init__(self, directory, n: int, app_names, generation: int = 1, *, lineage: str | None = None,
                 parent: int | None = None, ancestry=()):
        if n > MAX_DEVICES:
            raise InvalidInputError(f"n={n} exceeds the {MAX_DEVICES} key space")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = int(n)
        self.app_names = [str(a) for a in app_names]
        if not self.app_names or len(self.app_names) > MAX_APPS:
            raise InvalidInputError(f"app_names: between 1 and {MAX_APPS} apps, got {len(self.app_names)}")
        self.generation = int(generation)
        self.tmp = self.dir / (STORE_FILE + ".tmp")
        # a first ingest starts a lineage; a new generation continues its parent's
        self.meta = {"version": FORMAT_VERSION, "generation": self.generation, "rows": self.n,
                     "lineage": lineage or _new_id(), "parent": None if parent is None else int(parent),
                     "uid": _new_id(), "ancestry": [str(u) for u in ancestry]}
        schema = SCHEMA.with_metadata({_META_KEY: json.dumps(self.meta).encode()})
        zeros = {dt: np.zeros(self.n, dtype=dt) for dt in (np.uint64, np.float64, np.int8, np.int64)}
        cols = [pa.array(zeros[np.uint64]), pa.array(zeros[np.float64]), pa.array(zeros[np.float64]),
                pa.DictionaryArray.from_arrays(pa.array(zeros[np.int8]), pa.array(self.app_names, pa.string())),
                pa.array(zeros[np.int64]).view(pa.timestamp("s", tz="UTC"))]
        sink = _SparseSink(self.tmp)
        with pa.PythonFile(sink, mode="w") as f, pa.ipc.new_file(f, schema) as w:
            w.write_batch(pa.record_batch(cols, schema=schema))
        del zeros, cols
        mm = _map_file(self.tmp)
        try:
            buf = pa.py_buffer(mm)
            batch = pa.ipc.open_file(pa.BufferReader(buf)).get_batch(0)
            arrays = [batch.column(i) for i in range(5)]
            arrays[3] = arrays[3].indices
            self.offsets = [a.buffers()[1].address - buf.address for a in arrays]
            del batch, arrays, buf
        finally:
            mm.close()
        self.fd = os.open(self.tmp, os.O_WRONLY)
        self.written = 0

    def write(self, start: int, device_id, lat, lon, app, last_seen) -> None:
        """Write rows ``[start, start + len(device_id))`` (clean arrays; validated by the caller)."""
        m = len(device_id)
        if start < 0 or start + m > self.n:
            raise InvalidInputError(f"rows [{start}, {start + m}) fall outside [0, {self.n})")
        for (name, dtype), off, arr in zip(self._COLS, self.offsets, (device_id, lat, lon, app, last_seen)):
            a = np.ascontiguousarray(arr, dtype=dtype)
            if a.shape != (m,):
                raise InvalidInputError(f"{name} has shape {a.shape}, expected ({m},)")
            _pwrite_all(self.fd, a, off + start * a.itemsize)
        self.written += m

    def write_job(self, c: int, start: int, arr):
        """A callable that writes rows ``[start, start + len(arr))`` of column ``c`` (for an I/O thread)."""
        name, dtype = self._COLS[c]
        a = np.ascontiguousarray(arr, dtype=dtype)
        if a.ndim != 1 or start < 0 or start + a.shape[0] > self.n:
            raise InvalidInputError(f"{name}: rows [{start}, {start + a.shape[0]}) fall outside [0, {self.n})")
        pos = self.offsets[c] + start * a.itemsize

        def job():
            _pwrite_all(self.fd, a, pos)
            _start_writeback(self.fd, pos, a.nbytes)
        return job

    @private_files
    def finish(self, id_index: bool = True, staged=()) -> "DeviceStore":
        """Check ids are unique, fsync, move into place with the id lookup files, and open.

        ``staged``: (tmp, final) paths of companion files already written and
        fsynced.  Every file is durable and hashed before the first rename,
        and the manifest naming them goes last (see :func:`_install`): a crash
        leaves a directory that opens as the previous generation, as the new
        one, or not at all, never as a mixture.
        """
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        staged = list(staged)
        try:
            return self._finish(id_index, staged)
        except BaseException:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)
            raise

    def _finish(self, id_index: bool, staged: list) -> "DeviceStore":
        sorted_ids = order = None
        if id_index and self.n:
            mm = _map_file(self.tmp)
            try:
                ids = np.frombuffer(mm, dtype=np.uint64, count=self.n, offset=self.offsets[0])
                sorted_ids, order = _array_kernels.sort_ids(ids)
                del ids
            finally:
                mm.close()
            dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
            if dup.size:
                raise InvalidInputError(f"device_id {sorted_ids[dup[0]]} appears twice (rows "
                                        f"{order[dup[0]]} and {order[dup[0] + 1]})")
        if sorted_ids is not None:
            staged.append(_stage_npy(self.dir / ID_SORTED_FILE, sorted_ids))
            staged.append(_stage_npy(self.dir / ID_INDEX_FILE, order))
            del sorted_ids, order
        _install(self.dir, self.meta, [(self.tmp, self.dir / STORE_FILE)] + staged)
        _fsync_dir(self.dir.parent)  # the directory itself may be new
        out = DeviceStore.open(self.dir)
        out._verified = True  # _install just hashed these very files
        return out

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def _geoparquet_points(table: pa.Table):
    """(lat, lon) from a GeoParquet point column (WKB or native 'point' encoding)."""
    meta = table.schema.metadata or {}
    if b"geo" not in meta:
        raise InvalidInputError(
            f"no lat/lon columns and no GeoParquet 'geo' metadata; columns are {table.column_names}")
    try:
        geo = json.loads(meta[b"geo"])
        colname = geo["primary_column"]
        encoding = geo["columns"][colname].get("encoding", "WKB").lower()
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"GeoParquet 'geo' metadata is malformed: {exc}") from None
    col = table.column(colname).combine_chunks()
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"{colname}[{i}] is null")
    if encoding == "point":
        return (col.field("y").to_numpy(zero_copy_only=False), col.field("x").to_numpy(zero_copy_only=False))
    if encoding != "wkb":
        raise InvalidInputError(f"GeoParquet encoding {encoding!r} is not supported (WKB or point)")
    col = col.cast(pa.binary())
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset: col.offset + len(col) + 1]
    lengths = np.diff(offsets)
    if len(col) and (lengths != 21).any():
        i = int(np.flatnonzero(lengths != 21)[0])
        raise InvalidInputError(f"{colname}[{i}] is not a 2-D WKB point ({lengths[i]} bytes)")
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]].reshape(-1, 21)
    order, gtype = data[:, 0], np.ascontiguousarray(data[:, 1:5]).view("<u4").ravel()
    be = order == 0
    gtype = np.where(be, np.ascontiguousarray(data[:, 1:5]).view(">u4").ravel(), gtype)
    if len(col) and (gtype != 1).any():
        i = int(np.flatnonzero(gtype != 1)[0])
        raise InvalidInputError(f"{colname}[{i}] has WKB geometry type {gtype[i]}, expected Point (1)")
    xy = np.ascontiguousarray(data[:, 5:21])
    le_vals = xy.view("<f8").reshape(-1, 2)
    be_vals = xy.view(">f8").reshape(-1, 2).astype("<f8")
    vals = np.where(be[:, None], be_vals, le_vals)
    return vals[:, 1], vals[:, 0]
