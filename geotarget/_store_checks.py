"""Validation of a batch of device columns, the store's public boundary.

Every way rows enter a store (:meth:`DeviceStore.from_arrays`,
:meth:`DeviceStore.write_chunks`, both paths of :meth:`DeviceStore.with_updates`)
runs :func:`check_batch`, so a column is checked the same way whichever door it
comes through.  Bad input raises :class:`~geotarget.errors.InvalidInputError`
naming the column and the first bad row.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import _array_kernels
from .errors import InvalidInputError
from .geo import check_coordinates, now_or_clock

#: Keys are uint32 and 2^32 - 1 is reserved as "no key".
MAX_DEVICES = 2**32 - 1
#: App codes are int8 in the index; 127 partner apps is ample (the platform has ~25).
MAX_APPS = 127
DEFAULT_APP = "default"


def check_ids(device_id, *, sort: bool = False):
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


def check_app(app, n: int, names: list[str] | None = None):
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


def check_last_seen(last_seen, n: int, now: _dt.datetime | None = None) -> np.ndarray:
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


@dataclass
class Batch:
    """A validated batch of device columns, by batch row."""

    ids: np.ndarray          # uint64
    lat: np.ndarray          # float64
    lon: np.ndarray          # float64
    codes: np.ndarray | None  # int8 codes into ``names``; None: no app given and none required
    names: list              # the app names, extended by the batch's new ones
    seen: np.ndarray         # int64 epoch seconds
    #: With ``sort``: the ids ascending and the batch row of each (uint32).
    sorted_ids: np.ndarray | None = None
    sorted_rows: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def check_batch(device_id, lat, lon, app=None, last_seen=None, *, names=(), app_required: bool = True,
                app_codes: bool = False, row0: int = 0, sort: bool = False) -> Batch:
    """Validate one batch of device columns, in a fixed order: ids, coordinates, rows, app, last_seen.

    ``names``: the app names already in use (a store's); new names in ``app``
    are appended to a copy.  ``app`` None means :data:`DEFAULT_APP` unless
    ``app_required`` is false, when ``codes`` is None (existing devices keep
    their app).  With ``app_codes``, ``app`` is integer codes into ``names``
    rather than names (the bulk writer's chunks; ``row0`` is the chunk's first
    row, for the messages).  With ``sort``, the duplicate check keeps the
    ids in order with their rows (``sorted_ids``, ``sorted_rows``).
    """
    checked = check_ids(device_id, sort=sort)
    ids, sorted_ids, sorted_rows = checked if sort else (checked, None, None)
    n = ids.shape[0]
    lat, lon = check_coordinates(lat, lon)
    if lat.shape[0] != n:
        raise InvalidInputError(f"lat has {lat.shape[0]} rows but device_id has {n}")
    if n > MAX_DEVICES:
        raise InvalidInputError(f"device_id: {n} devices exceed the {MAX_DEVICES} key space")
    names = list(names)
    if app_codes:
        codes = np.asarray(app)
        if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
            raise InvalidInputError(f"app must be {n} integer codes, got {codes.dtype} {codes.shape}")
        bad = (codes < 0) | (codes >= len(names))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidInputError(f"app[{row0 + i}] = {codes[i]} is not a code of app_names")
        codes = codes.astype(np.int8)
    elif app is None and not app_required:
        codes = None
    else:
        codes, names = check_app(app, n, names)
    seen = check_last_seen(last_seen, n)
    return Batch(ids, lat, lon, codes, names, seen, sorted_ids, sorted_rows)
