"""Small durable-filesystem helpers shared by the store, the index, the cluster and the log.

Durable writes (fsync, staged files renamed into place), private file modes,
the content digests and sealed metadata of the integrity chain, and the
memory-mapped ``.npy`` files the store and the index are made of.  Every file
read here is untrusted: a bad one raises :class:`~geotarget.errors.CorruptFileError`
naming it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .errors import CorruptFileError


def fsync_dir(path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range():
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a just-written range to disk, without waiting (Linux; elsewhere a no-op).

    A large file written ahead of one final fsync otherwise sits dirty in the
    page cache until the kernel's background threshold (10 % of RAM) is
    crossed, so the disk idles at first and the fsync then waits for gigabytes.
    Not a durability step: the fsync still follows.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_private_lock = threading.Lock()
_private_depth = 0
_private_saved = 0


@contextlib.contextmanager
def _private_umask():
    global _private_depth, _private_saved
    with _private_lock:
        if _private_depth == 0:
            _private_saved = os.umask(0o077)
        _private_depth += 1
    try:
        yield
    finally:
        with _private_lock:
            _private_depth -= 1
            if _private_depth == 0:
                os.umask(_private_saved)


def private_files(fn=None):
    """Files and directories created inside are 0600 and 0700 (umask 077): they hold device
    locations or ids.  A context manager, or a decorator of a function that writes them.

    The umask is per process, so other threads creating files meanwhile get the
    same private modes: more private, never less.
    """
    if fn is None:
        return _private_umask()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _private_umask():
            return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------
# digests and sealed metadata (the integrity chain; see docs/design.md, "Integrity")
# ---------------------------------------------------------------------------

#: The content hash of every data file: xxh3-128 of each 64 MiB chunk, then
#: xxh3-128 over the file size and those chunk digests (so chunks hash on
#: both cores).  xxh3 runs at memory speed (22 GB/s on one core of the 2-core
#: reference machine, against 0.6 GB/s for blake2b), so a 400 M-device
#: generation verifies in seconds from memory.  It detects damage and
#: mix-ups, not a forger who rewrites the manifest too (the manifests are not keyed).
DIGEST = "xxh3_128_chunks64m"
_DIGEST_CHUNK = 1 << 26
#: Chunks are hashed on this many threads (xxhash releases the GIL).
DIGEST_WORKERS = min(2, os.cpu_count() or 1)


def file_digest(path, workers: int | None = None) -> tuple[int, str]:
    """``(size, hex digest)`` of a file's bytes (see :data:`DIGEST`), read through a read-only mapping.

    Each chunk's pages leave the process's resident set once hashed (the
    page cache keeps them), so verifying a large generation does not grow RSS.
    """
    import mmap
    import xxhash

    workers = DIGEST_WORKERS if workers is None else max(1, int(workers))
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        top = xxhash.xxh3_128(size.to_bytes(8, "little"))
        if size == 0:
            return 0, top.hexdigest()
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    try:
        def chunk(off: int) -> bytes:
            n = min(_DIGEST_CHUNK, size - off)
            digest = xxhash.xxh3_128_digest(view[off:off + n])
            if hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED, off, n)
            return digest

        offsets = range(0, size, _DIGEST_CHUNK)
        if workers > 1 and len(offsets) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(workers, len(offsets)), thread_name_prefix="geotarget-digest") as pool:
                digests = list(pool.map(chunk, offsets))
        else:
            digests = [chunk(off) for off in offsets]
    finally:
        view.release()
        mm.close()
    for d in digests:
        top.update(d)
    return size, top.hexdigest()


def canonical_json(doc) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def seal(doc: dict) -> dict:
    """``doc`` with a ``checksum`` over the canonical JSON of everything else in it."""
    import xxhash

    body = {k: v for k, v in doc.items() if k != "checksum"}
    return {**body, "checksum": xxhash.xxh3_128_hexdigest(canonical_json(body).encode())}


def read_sealed(path, what: str) -> dict:
    """Parse a sealed JSON file; :class:`CorruptFileError` if missing, unparsable or its checksum fails."""
    import xxhash

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{p.parent}: no {p.name}; is this {what}?") from None
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{p}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("checksum"), str):
        raise CorruptFileError(f"{p}: not sealed metadata (no checksum); written by an older "
                               f"geotarget or not {what}")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    try:
        ok = xxhash.xxh3_128_hexdigest(canonical_json(body).encode()) == doc["checksum"]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CorruptFileError(f"{p}: checksum mismatch: the metadata was altered or damaged")
    return body


def write_sealed(path, doc: dict) -> None:
    """Write ``seal(doc)`` to ``path`` atomically (fsynced tmp file renamed; the caller fsyncs the directory)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(canonical_json(seal(doc)))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


# ---------------------------------------------------------------------------
# files listed in a manifest
# ---------------------------------------------------------------------------

def map_file(path: Path, identity: list | None = None) -> mmap.mmap:
    """Map ``path`` read-only; ``identity`` (a list) receives the file's (st_dev, st_ino)."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size == 0:
            raise CorruptFileError(f"{path}: empty file")
        if identity is not None:
            identity[:] = [st.st_dev, st.st_ino]
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def check_file_size(path: Path, entry) -> None:
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


def check_file_digest(path: Path, entry) -> None:
    """A listed file's bytes hash to the manifest's digest."""
    check_file_size(path, entry)
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


# ---------------------------------------------------------------------------
# memory-mapped .npy files and positioned I/O
# ---------------------------------------------------------------------------

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


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, fsynced, atomically renamed into place."""
    os.replace(*stage_npy(path, array))


def pwrite_all(fd: int, arr: np.ndarray, pos: int) -> None:
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], pos + done)


def pread_into(fd: int, buf: np.ndarray, pos: int, what: str = "store file") -> None:
    """Fill the contiguous ``buf`` from ``fd`` at ``pos``; CorruptFileError if the file ends first."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + (1 << 30)]], pos + done)
        if got == 0:
            raise CorruptFileError(f"{what} ended early: read {done} of {len(view)} bytes at {pos}")
        done += got


def offset_in(mm, arr: np.ndarray) -> int:
    """Byte offset of ``arr``'s data inside the mapping ``mm`` (ValueError if the mapping is closed)."""
    return arr.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data


def drop_pages(arr, start: int = 0, stop: int | None = None) -> None:
    """Drop this process's resident pages of elements [start, stop) of a memory-mapped .npy.

    As in DeviceStore.release: the data stays in the page cache, only the
    process's RSS forgets it (at 400 M devices the old id index is 4.5 GiB).
    """
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        at = offset_in(mm, arr)
        lo = (at + start * arr.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(mm), at + (arr.shape[0] if stop is None else stop) * arr.itemsize)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError):  # a closed mapping, or a platform without madvise
        pass


def advise_mapping(arr, advice: int) -> None:
    """``madvise`` the whole mapping of a memory-mapped .npy (no-op for other arrays).

    Advice is a hint: a kernel without it, or a closed mapping, is ignored.
    """
    mm = getattr(arr, "_mmap", None)
    if mm is not None:
        try:
            mm.madvise(advice)
        except (ValueError, OSError):
            pass


def prefetch(arr) -> None:
    """Ask the kernel to read a memory-mapped .npy ahead, asynchronously (no-op for other arrays)."""
    if hasattr(mmap, "MADV_WILLNEED"):
        advise_mapping(arr, mmap.MADV_WILLNEED)


def stage_npy(path: Path, array: np.ndarray):
    """Write ``array`` as ``path`` + ".tmp" (fsynced, not yet renamed); return (tmp, path).

    The ".tmp" suffix keeps half-written files out of the ``*.npy`` globs that open uses.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array))
        fh.flush()
        os.fsync(fh.fileno())
    return tmp, path


class NpyWriter:
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
            pwrite_all(self.fd, a, pos)
            start_writeback(self.fd, pos, a.nbytes)
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
