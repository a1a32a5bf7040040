"""What an operator and a dispatch service are handed: audiences and pushes as tables, counts by app.

The command line writes these (``query --out``, ``alert tick --out``,
``alert show --index``), but they are library functions so that a service
gets the same columns without going through the CLI.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa


def audience_table(store, keys) -> pa.Table:
    """``device_id`` (uint64), ``key`` (uint32) and ``app`` (dictionary) of these keys of ``store``, in their order."""
    keys = np.asarray(keys, dtype=np.uint32)
    codes = np.asarray(store.app_codes)[keys]
    return pa.table({
        "device_id": pa.array(np.asarray(store.device_id)[keys], type=pa.uint64()),
        "key": pa.array(keys, type=pa.uint32()),
        "app": pa.DictionaryArray.from_arrays(pa.array(codes, type=pa.int8()),
                                              pa.array(list(store.app_names), type=pa.string())),
    })


def push_table(batches: Mapping[str, pa.Table]) -> pa.Table:
    """A push's per-app batches (``{app: Table(device_id, key)}``) as one table with an ``app`` column.

    Apps follow the batches' order; a push without recipients gives an empty
    table with the same three columns.
    """
    tables = [t.append_column("app", pa.array([app] * t.num_rows, type=pa.string())) for app, t in batches.items()]
    if tables:
        return pa.concat_tables(tables)
    return pa.table({"device_id": pa.array([], pa.uint64()), "key": pa.array([], pa.uint32()),
                     "app": pa.array([], pa.string())})


def largest_first(counts: Mapping[str, int]) -> dict:
    """``{app: count}`` ordered by count, largest first, then by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def app_counts(store, keys) -> dict:
    """``{app: devices}`` among these keys of ``store``, largest first (ties in the store's app order).

    :class:`~geotarget.errors.InvalidInputError` if a key lies beyond the store
    (a push logged against a later generation than ``store``).
    """
    from ..errors import InvalidInputError

    keys = np.asarray(keys, dtype=np.uint32)
    if keys.size and int(keys.max()) >= len(store):
        raise InvalidInputError(f"key {int(keys.max())} is beyond the store's {len(store):,} devices")
    counts = np.bincount(np.asarray(store.app_codes)[keys].astype(np.int64) & 0xFF,
                         minlength=len(store.app_names))
    return {store.app_names[i]: int(c) for i, c in sorted(enumerate(counts), key=lambda ic: -ic[1]) if c}
