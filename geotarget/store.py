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

Modules
-------
This module is the generation itself (constructors, lookups, ``with_updates``,
save, open, verify).  Its helpers each have a module: ``_store_checks``
(``check_batch``, the validation every door runs), ``_store_plan``
(``plan_generation``, the key rule both ``with_updates`` paths follow),
``_store_files`` (the on-disk layout, ``install`` and ``StoreWriter``) and
``_fs`` (file helpers shared with the index and the cluster).
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import _array_kernels, _store_kernels
from ._fs import (NpyWriter, check_file_digest, check_file_size, drop_pages, load_npy, map_file, prefetch,
                  private_files, read_sealed, stage_npy)
from ._store_checks import DEFAULT_APP, MAX_APPS, MAX_DEVICES, check_app, check_batch  # noqa: F401 (public names)
from ._store_files import (CHANGED_PREFIX, FORMAT_VERSION, ID_INDEX_FILE, ID_SORTED_FILE, MANIFEST_FILE,
                           MANIFEST_FORMAT, META_KEY, SCHEMA, STORE_FILE, BackgroundIO, BufferPool,
                           OldColumns, StoreWriter, install, new_id, run_jobs)
from ._store_plan import plan_generation, spatial_order
from .errors import CorruptFileError, InvalidInputError

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


def _take(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src[idx]`` gathered over both cores."""
    out = np.empty(idx.shape[0], dtype=src.dtype)
    _array_kernels.take(np.ascontiguousarray(src), np.ascontiguousarray(idx, dtype=np.int64), out)
    return out


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
        self.lineage = lineage or new_id()
        #: The generation this one was made from (None for a first ingest).
        self.parent = None if parent is None else int(parent)
        #: Random id of this generation's contents: two generations with the same number differ here.
        self.uid = uid or new_id()
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
        b = check_batch(device_id, lat, lon, app, last_seen)
        order = spatial_order(b.lat, b.lon)
        return cls(_take(b.ids, order), _take(b.lat, order), _take(b.lon, order), _take(b.codes, order),
                   b.names, _take(b.seen, order), generation=generation, lineage=lineage)

    @classmethod
    def from_table(cls, table: pa.Table, *, generation=1):
        """Ingest a pyarrow Table with ``device_id``, ``lat``/``lon`` (or
        ``latitude``/``longitude``, or a GeoParquet point column) and optional ``app`` and ``last_seen``."""
        ids, lat, lon, app, last_seen = _table_columns(table)
        return cls.from_arrays(ids, lat, lon, app=app, last_seen=last_seen, generation=generation)

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
                    c = check_batch(chunk["device_id"], chunk["lat"], chunk["lon"], chunk["app"],
                                    chunk["last_seen"], names=app_names, app_codes=True, row0=start)
                    m = len(c)
                    if start + m > n:
                        raise InvalidInputError(f"chunks hold more than n={n} rows")
                    order = spatial_order(c.lat, c.lon)
                    writer.write(start, _take(c.ids, order), _take(c.lat, order), _take(c.lon, order),
                                 _take(c.codes, order), _take(c.seen, order))
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
        b = check_batch(device_id, lat, lon, app, last_seen, names=self.app_names, app_required=False)
        plan = plan_generation(self.lookup(b.ids), b.lat, b.lon, n_old=len(self), generation=self.generation,
                               uid=self.uid, ancestry=self.ancestry)
        codes, names = b.codes, b.names
        if plan.n_new and codes is None:  # new devices need an app; moved ones keep theirs
            codes, names = check_app(None, len(b), names)
        n_old, n_total = plan.n_old, plan.n_total

        def grow(col, fresh, dtype):
            out = np.empty(n_total, dtype=dtype)
            out[:n_old] = col
            if fresh is not None:
                out[plan.moved_keys] = fresh[plan.moved_rows]
                out[n_old:] = fresh[plan.new_rows]
            return out

        new_ids = grow(self.device_id, None, np.uint64)
        new_ids[n_old:] = b.ids[plan.new_rows]
        new_app = grow(self.app_codes, codes if b.codes is not None else None, np.int8)
        if b.codes is None and plan.n_new:  # only the new devices take the default app
            new_app[n_old:] = codes[plan.new_rows]
        id_index = None
        if plan.n_new == 0 and self._id_index is not None:
            id_index = self._id_index
        out = DeviceStore(new_ids, grow(self.lat, b.lat, np.float64), grow(self.lon, b.lon, np.float64), new_app,
                          names, grow(self.last_seen_s, b.seen, np.int64), generation=plan.generation,
                          _id_index=id_index, lineage=self.lineage, parent=plan.parent, ancestry=plan.ancestry)
        out.changed_keys, out.parent_generation = _readonly(plan.changed_keys()), plan.parent
        return out

    def with_updates_from_table(self, table: pa.Table, *, directory=None, progress=None):
        """:meth:`with_updates` with the rows of a pyarrow Table, read as :meth:`from_table` reads them.

        Absent ``app`` and ``last_seen`` columns mean what absent arguments mean
        to :meth:`with_updates`: moved devices keep their app, and are seen now.
        """
        ids, lat, lon, app, last_seen = _table_columns(table)
        return self.with_updates(ids, lat, lon, last_seen=last_seen, app=app, directory=directory,
                                 progress=progress)

    def _with_updates_to_disk(self, directory, device_id, lat, lon, last_seen, app, progress,
                              chunk_rows: int = 1 << 22):
        from .progress import bar
        lap = _Laps()
        # the lookup walks the whole id index: have the kernel read it ahead while we validate
        prefetch(self._sorted_ids)
        prefetch(self._id_index)
        b = check_batch(device_id, lat, lon, app, last_seen, names=self.app_names, app_required=False, sort=True)
        ids, lat, lon, codes, names, seen, q_ids, q_rows = (b.ids, b.lat, b.lon, b.codes, b.names, b.seen,
                                                            b.sorted_ids, b.sorted_rows)
        del b
        m = ids.shape[0]
        app_given = codes is not None
        n_old = len(self)
        lap("validate the batch (ids: parallel sort, duplicates; coordinates, app, last_seen)")
        key_of_q = self._lookup_sorted(q_ids)  # the batch in id order: one forward walk of the index
        drop_pages(self._sorted_ids)  # the merge below faults them back one chunk at a time
        drop_pages(self._id_index)
        lap("lookup (galloping walk of the id index)")
        # Movers in key order, so output chunk [s, e) patches one contiguous slice of
        # them; new devices in batch order, then spatially, at keys n_old, n_old + 1, ...
        plan = plan_generation(key_of_q, lat, lon, rows=q_rows, n_old=n_old, generation=self.generation,
                               uid=self.uid, ancestry=self.ancestry)
        n_new, n_total = plan.n_new, plan.n_total
        if n_new and codes is None:  # new devices need an app; moved ones keep theirs
            codes, names = check_app(None, m, names)
        lap("plan: movers to key order, new devices in spatial order")

        d = Path(directory)
        writer = StoreWriter(d, n_total, names, plan.generation, lineage=self.lineage,
                             parent=plan.parent, ancestry=plan.ancestry)
        source = OldColumns(self)
        io = BackgroundIO()
        bufs = BufferPool()
        staged = []
        try:
            # The old rows' device ids (and apps, unless given) are unchanged:
            # the disk starts on them now, while the movers' values are gathered.
            plain = (0,) if app_given else (0, 3)
            for c in plain:
                for s0 in range(0, n_old, 1 << 26):
                    io.submit(run_jobs, [(source.copy_job(c, s0, min(n_old, s0 + (1 << 26)), writer), None)],
                              None, hold=False)
            # their values are gathered once, then read front to back
            upd_rows, at_key, new_rows = plan.moved_rows, plan.moved_keys, plan.new_rows
            changed = plan.changed_keys()
            del plan
            patches = {1: _take(lat, upd_rows), 2: _take(lon, upd_rows), 4: _take(seen, upd_rows)}
            if app_given:
                patches[3] = _take(codes, upd_rows)
            del upd_rows
            lap("gather the movers' values")
            # the id-index additions: new ids in id order, with their keys
            new_q = key_of_q < 0
            del key_of_q
            key_of_row = np.empty(m, dtype=np.uint32)
            key_of_row[new_rows] = np.arange(n_old, n_total, dtype=np.uint32)
            add_ids = q_ids[new_q]
            add_keys = key_of_row[q_rows[new_q]]
            del key_of_row, new_q, q_ids, q_rows
            lap("new devices: id-index additions")

            # The new id index is the old one with the new ids merged in (ids of
            # existing devices never change): one forward pass, chunk by chunk,
            # done before the store's chunks while the lookup's pages of the old
            # index are still in the page cache (at 400 M, 13 GB of store would
            # pass through it in between).
            source.prefetch(patches, 0, min(n_old, chunk_rows))  # the store loop's first chunk
            old_sorted, old_order = self._ids_sorted()
            f_ids = NpyWriter(d / ID_SORTED_FILE, np.uint64, n_total)
            f_keys = NpyWriter(d / ID_INDEX_FILE, np.uint32, n_total)
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
                io.submit(run_jobs, [(f_ids.write_job(i0 + j, out_ids), out_ids),
                                      (f_keys.write_job(i0 + j, out_keys), out_keys)], bufs)
                drop_pages(old_sorted, i0, i1)
                drop_pages(old_order, i0, i1)
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
                    io.submit(run_jobs, jobs, bufs)
                    lo = hi
                    if not source.direct:
                        self.release()
                    b.update(e0 - s0)
                if n_new:
                    cols = (ids[new_rows], lat[new_rows], lon[new_rows], codes[new_rows], seen[new_rows])
                    io.submit(run_jobs, [(writer.write_job(c, n_old, a), None) for c, a in enumerate(cols)], None)
                    b.update(n_new)
            del patches, at_key
            lap("store.arrow: read + patch chunks (I/O thread writing behind)")
            f_changed = NpyWriter(d / f"{CHANGED_PREFIX}{self.generation}.npy", np.uint32, changed.size)
            staged.append(f_changed)
            io.submit(run_jobs, [(f_changed.write_job(0, changed), None)], None)
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
            drop_pages(self._sorted_ids)
            drop_pages(self._id_index)

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
        schema = SCHEMA.with_metadata({META_KEY: json.dumps(self._file_meta()).encode()})
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
                staged.append(stage_npy(d / ID_SORTED_FILE, sorted_ids))
                staged.append(stage_npy(d / ID_INDEX_FILE, order))
            if self.changed_keys is not None:
                staged.append(stage_npy(d / f"{CHANGED_PREFIX}{self.parent_generation}.npy", self.changed_keys))
            manifest = install(d, self._file_meta(), staged)
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
            check_file_digest(d / name, entry)
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
        if (manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != FORMAT_VERSION
                or not isinstance(files, dict) or STORE_FILE not in files):
            raise CorruptFileError(f"{d / MANIFEST_FILE}: not a geotarget store manifest of version "
                                   f"{FORMAT_VERSION}")
        changed_files = [nm for nm in files if nm.startswith(CHANGED_PREFIX)]
        for name, entry in files.items():
            if not (name in (STORE_FILE, ID_INDEX_FILE, ID_SORTED_FILE) or name in changed_files[:1]):
                raise CorruptFileError(f"{d / MANIFEST_FILE}: lists an unexpected file {name!r}")
            check_file_size(d / name, entry)
        try:
            identity: list = []
            mm = map_file(f, identity)
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mm)))
            schema = reader.schema
            meta = json.loads((schema.metadata or {}).get(META_KEY, b"null"))
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


def _table_columns(table: pa.Table):
    """``(device_id, lat, lon, app, last_seen)`` of an input table; app and last_seen None when absent.

    Column names are matched without regard to case (``id``, ``latitude``,
    ``lng``, ``longitude`` are accepted); without lat/lon columns the points
    come from GeoParquet metadata.  A null in any of them is refused.
    """
    if not isinstance(table, pa.Table):
        raise InvalidInputError(f"table must be a pyarrow Table, got {type(table).__name__}")
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
    return ids.to_numpy(), np.asarray(lat), np.asarray(lon), col("app"), col("last_seen")


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
