"""Small durable-filesystem helpers shared by the store, the index and the log."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading


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
