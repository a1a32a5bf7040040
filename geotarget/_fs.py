"""Small durable-filesystem helpers shared by the store, the index and the log."""
from __future__ import annotations

import os
import sys


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
