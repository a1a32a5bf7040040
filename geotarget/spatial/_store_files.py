"""The on-disk layout of a store generation and the code that writes it.

One generation is ``store.arrow`` (an uncompressed Arrow IPC file, see
:mod:`geotarget.spatial.store`), the id index (``id_sorted.npy``, ``id_index.npy``),
the keys it changed since its parent (``changed_since_<parent>.npy``) and the
sealed manifest ``store.json`` listing every file's size and digest.
:func:`install` moves staged files into place under a new manifest;
:class:`StoreWriter` streams a generation to disk in bounded memory, with
:class:`BackgroundIO` doing the file I/O on one thread while the caller
prepares the next chunk.
"""
from __future__ import annotations

import collections
import errno
import json
import os
import secrets
import threading
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import _array_kernels
from .._fs import (content_digest, fsync_dir, manifest_entries, map_file, offset_in, pread_into,
                  private_files, pwrite_all, stage_npy, start_writeback, write_sealed)
from ._store_checks import MAX_APPS, MAX_DEVICES
from ..errors import CorruptFileError, InvalidInputError

if TYPE_CHECKING:
    from .store import DeviceStore

STORE_FILE = "store.arrow"
ID_INDEX_FILE = "id_index.npy"
ID_SORTED_FILE = "id_sorted.npy"
#: ``changed_since_<parent generation>.npy``: keys this generation changed (uint32, sorted)
CHANGED_PREFIX = "changed_since_"
#: The generation's sealed manifest: identity, lineage and a digest of every file (see :func:`install`).
MANIFEST_FILE = "store.json"
#: 2: store.arrow names its lineage, parent and uid; ``store.json`` seals the files.
FORMAT_VERSION = 2
#: The schema metadata key of store.arrow's generation identity.
META_KEY = b"geotarget.store"

SCHEMA = pa.schema([
    pa.field("device_id", pa.uint64(), nullable=False),
    pa.field("lat", pa.float64(), nullable=False),
    pa.field("lon", pa.float64(), nullable=False),
    pa.field("app", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    pa.field("last_seen", pa.timestamp("s", tz="UTC"), nullable=False),
])

MANIFEST_FORMAT = "geotarget.store"


def new_id() -> str:
    """A random 128-bit id (lineages, generation uids)."""
    return secrets.token_hex(16)


def install(d: Path, meta: dict, staged) -> dict:
    """Hash staged (tmp, final) files, then move them into place under a new manifest.

    The old manifest and companions go first and the new manifest last, each
    step after an fsync of the directory: at no instant does the directory
    hold a manifest that lists files of another generation.
    """
    files = manifest_entries(staged)
    doc = {"format": MANIFEST_FORMAT, **meta, "files": files, "digest": content_digest(files)}
    (d / MANIFEST_FILE).unlink(missing_ok=True)
    for stale in (ID_INDEX_FILE, ID_SORTED_FILE):
        (d / stale).unlink(missing_ok=True)
    for stale in d.glob(f"{CHANGED_PREFIX}*.npy"):
        stale.unlink()
    fsync_dir(d)
    for tmp, final in staged:
        os.replace(tmp, final)
    fsync_dir(d)
    write_sealed(d / MANIFEST_FILE, doc)
    fsync_dir(d)
    return doc


class BufferPool:
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


def run_jobs(jobs, pool) -> None:
    for job, buf in jobs:
        job()
        if buf is not None and pool is not None:
            pool.put(buf)


class BackgroundIO:
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


class OldColumns:
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
            offs = [offset_in(mm, a) for a in self.arrays]
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
            pread_into(self.fd, buf, self.offsets[c] + s0 * buf.itemsize)
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
                pwrite_all(writer.fd, rest, dst + done)
            start_writeback(writer.fd, dst, n)
        return job

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SparseSink:
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
                     "lineage": lineage or new_id(), "parent": None if parent is None else int(parent),
                     "uid": new_id(), "ancestry": [str(u) for u in ancestry]}
        schema = SCHEMA.with_metadata({META_KEY: json.dumps(self.meta).encode()})
        zeros = {dt: np.zeros(self.n, dtype=dt) for dt in (np.uint64, np.float64, np.int8, np.int64)}
        cols = [pa.array(zeros[np.uint64]), pa.array(zeros[np.float64]), pa.array(zeros[np.float64]),
                pa.DictionaryArray.from_arrays(pa.array(zeros[np.int8]), pa.array(self.app_names, pa.string())),
                pa.array(zeros[np.int64]).view(pa.timestamp("s", tz="UTC"))]
        sink = SparseSink(self.tmp)
        with pa.PythonFile(sink, mode="w") as f, pa.ipc.new_file(f, schema) as w:
            w.write_batch(pa.record_batch(cols, schema=schema))
        del zeros, cols
        mm = map_file(self.tmp)
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
            pwrite_all(self.fd, a, off + start * a.itemsize)
        self.written += m

    def write_job(self, c: int, start: int, arr):
        """A callable that writes rows ``[start, start + len(arr))`` of column ``c`` (for an I/O thread)."""
        name, dtype = self._COLS[c]
        a = np.ascontiguousarray(arr, dtype=dtype)
        if a.ndim != 1 or start < 0 or start + a.shape[0] > self.n:
            raise InvalidInputError(f"{name}: rows [{start}, {start + a.shape[0]}) fall outside [0, {self.n})")
        pos = self.offsets[c] + start * a.itemsize

        def job():
            pwrite_all(self.fd, a, pos)
            start_writeback(self.fd, pos, a.nbytes)
        return job

    @private_files
    def finish(self, id_index: bool = True, staged=()) -> "DeviceStore":
        """Check ids are unique, fsync, move into place with the id lookup files, and open.

        ``staged``: (tmp, final) paths of companion files already written and
        fsynced.  Every file is durable and hashed before the first rename,
        and the manifest naming them goes last (see :func:`install`): a crash
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
            mm = map_file(self.tmp)
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
            staged.append(stage_npy(self.dir / ID_SORTED_FILE, sorted_ids))
            staged.append(stage_npy(self.dir / ID_INDEX_FILE, order))
            del sorted_ids, order
        install(self.dir, self.meta, [(self.tmp, self.dir / STORE_FILE)] + staged)
        fsync_dir(self.dir.parent)  # the directory itself may be new
        from .store import DeviceStore
        out = DeviceStore.open(self.dir)
        out._verified = True  # install just hashed these very files
        return out

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)
