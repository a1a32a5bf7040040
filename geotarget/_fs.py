"""Small durable-filesystem helpers shared by the store, the index and the log."""
from __future__ import annotations

import os


def fsync_dir(path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
