"""The recipient log: the durable record of every push, written before any hand-off.

What it stores
--------------
* **Pushes.**  One row per push (ids, kind, radius, time, per-app metadata)
  plus its audience.  The audience is a serialised roaring bitmap of device
  keys, run-optimised first: keys are assigned in spatial order, so a circle's
  audience is a few thousand runs whatever its size (a 90 M-recipient push is
  tens of kilobytes).  Every row carries a SHA-256 checksum over a canonical
  encoding of *all* its fields, including the digest and length of the bitmap
  bytes and the checksum of the previous push (so the pushes form a hash
  chain: a row that vanishes is noticed).  The acknowledged and purged flags
  are mutable, so they carry a second, small checksum of their own.  A read
  re-checks both checksums, the bitmap digest and the cardinality: an audience
  is never silently different; a damaged one raises :class:`CorruptFileError`.
* **Alert state.**  Opaque JSON per alert, replaced wholesale, checksummed.
* **The audit trail.**  Append-only and hash-chained:
  ``hash = sha256(prev_hash + canonical JSON of the entry)``.  It has no API
  that takes device coordinates; only alert metadata goes in.  The alert's
  centre (where the child went missing, not where any device is) may appear in
  ``detail`` of a report action.

The log also guards the delivery rules it is the only durable witness of: an
``alert``/``expand``/``topup`` audience must be disjoint from every device
already notified for that alert, and an ``update``/``closure``/``retraction``
audience must equal exactly that union (docs/design.md, Pushes).

Storage and durability
----------------------
One SQLite file (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``:
every commit fsyncs the WAL before it returns.  ``path`` names that file; if
``path`` is an existing directory the file is ``<path>/recipients.sqlite``.
A new log is built under a temporary name and linked into place, so a file at
``path`` is always a complete, empty-or-better log.  The connection runs in
EXCLUSIVE locking mode and holds SQLite's exclusive lock from open to close:
one process owns the log (a second one gets :class:`InvalidInputError`; plain
SQLite readers are locked out too), and no ``-shm`` file exists, so a crashed
process never leaves shared state behind.

Torn tails versus corruption
----------------------------
SQLite recovers a WAL by reading frames while their checksum chain holds and
keeping everything up to the last commit frame in that valid prefix.  That is
exactly "a torn tail is dropped" (docs/design.md, Durability) -- but SQLite applies the
same rule to a frame damaged in the *middle* of the WAL and would silently drop
every transaction after it.  So before SQLite touches the files, :func:`_scan_wal`
re-validates the WAL itself and refuses (:class:`CorruptFileError`) when an
intact frame of the current WAL generation follows a commit frame that lies
after the first bad frame.  SQLite writes a transaction's frames only after
the previous commit was fsynced, so such a frame proves that the damaged
transaction had been committed: the damage is corruption, not a tear.  A
damaged frame inside the *last* transaction is indistinguishable from a power
loss tearing that transaction, and is dropped as a torn tail, as SQLite does.
The scan also refuses a main file shorter than the pages it must hold.

What open checks (cheap, metadata only): the file header and application id,
the WAL as above, the file length against the page count, the schema version
(``PRAGMA user_version``; an unknown one is an error), the schema itself, and
``PRAGMA integrity_check`` of the small tables (pushes, alerts, audit), which
catches an index that disagrees with its rows.  What :meth:`RecipientLog.verify`
adds (reads everything): a full ``integrity_check``, every push checksum, the
push chain, every audience (digest, decoding, cardinality, the delivery
rules), every alert checksum and the whole audit chain.  Like any hash chain
without an outside anchor, the chains cannot tell their newest entries being
cut off from those entries never having been written.

Keys, copies and identity
-------------------------
A ``macs`` table holds ``HMAC-SHA256(key, checksum)`` of every push (record
and ack/purge state checksums), alert, audit entry (its chain hash) and
``log_meta`` value.  The key is kept outside the log (``key=``,
``$GEOTARGET_LOG_KEY`` or the file named by ``$GEOTARGET_LOG_KEY_FILE``); the
log records only a key id.  With the key every read checks the MACs, so an
edit whose checksums were recomputed is caught; without it a keyed log reads
and verifies unkeyed (``verify()`` says ``authenticated: False``) and refuses
writes.  :meth:`RecipientLog.anchor` gives the audit chain's head for an
outside witness, and ``verify(anchor)`` detects entries cut off since.

``log_meta`` also holds a random ``instance_id`` (part of every alert id, so
two logs never share a CAP identifier) and a persistent alert counter.  While
a process owns the log, an ``owner`` row is checkpointed into the main file
and removed at a clean close: a main file that has it but no ``-wal`` file was
copied without its WAL while in use, and is refused instead of silently lacking
the pushes since the last checkpoint (copy a live log with :meth:`backup`).
A second :class:`RecipientLog` on the same file in one process is refused too.

Retention
---------
:meth:`RecipientLog.purge_audiences` drops the bitmaps of a closed alert,
keeping counts, digests of the dropped bytes and the audit.  ``secure_delete``
zeroes the freed pages and the WAL is truncated afterwards, so the device keys
leave the file, not just the index.  Reading a purged audience raises
:class:`AlertStateError`.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import functools
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import struct
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
from pyroaring import AbstractBitMap, BitMap, FrozenBitMap

from . import _pglog
from .._fs import fsync_dir as _fsync_dir
from ..errors import (AlertStateError, CorruptFileError, GeotargetError, InvalidInputError, LeaseLostError,
                     UnknownAlertError, UnknownPushError)
from ..geo import check_aware, check_int, check_radius, iso_utc
from .model import FOLLOW_UP_KINDS, KINDS, RING_KINDS

__all__ = ["PushRecord", "RecipientLog", "KINDS", "NEW_DEVICE_KINDS", "NOTIFIED_KINDS", "load_key",
           "KEY_ENV", "KEY_FILE_ENV"]

#: Kinds that reach only devices never notified for the alert; their union is the closure audience.
NEW_DEVICE_KINDS = RING_KINDS
#: Kinds that reach exactly the devices notified so far.
NOTIFIED_KINDS = FOLLOW_UP_KINDS

FILENAME = "recipients.sqlite"
#: Alerts whose verified notified set a log keeps in memory (the most recently used).
_NOTIFIED_CACHE_ALERTS = 64
#: 2: log_meta, macs, owner and lineage tables, and a per-push ``generation`` (no migration from 1).
SCHEMA_VERSION = 2
#: ``PRAGMA application_id``: "GTRL", so a foreign SQLite file is refused, not misread.
APPLICATION_ID = 0x4754524C
_ZERO_HASH = bytes(32)
_AUDIT_GENESIS = "0" * 64
# A WAL larger than this is cut back after a checkpoint; bounds the open-time WAL scan.
_JOURNAL_SIZE_LIMIT = 64 << 20

_SCHEMA = (
    """CREATE TABLE pushes(
    log_seq INTEGER PRIMARY KEY,
    push_id TEXT NOT NULL UNIQUE,
    alert_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    radius_km REAL NOT NULL,
    created_at TEXT NOT NULL,
    count INTEGER NOT NULL,
    meta TEXT NOT NULL,
    audience_sha256 BLOB NOT NULL,
    audience_bytes INTEGER NOT NULL,
    prev BLOB NOT NULL,
    checksum BLOB NOT NULL,
    acked_at TEXT,
    purged_at TEXT,
    state_sum BLOB NOT NULL,
    generation INTEGER,
    UNIQUE(alert_id, seq))""",
    # Bitmaps apart from the metadata: scanning or integrity-checking pushes stays cheap.
    "CREATE TABLE audiences(log_seq INTEGER PRIMARY KEY, bitmap BLOB NOT NULL)",
    "CREATE TABLE alerts(alert_id TEXT PRIMARY KEY, record TEXT NOT NULL, checksum BLOB NOT NULL)",
    """CREATE TABLE audit(
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    alert_id TEXT,
    radius_km REAL,
    count INTEGER,
    detail TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL)""",
    "CREATE INDEX audit_by_alert ON audit(alert_id, seq)",
    # Named values of the log itself (instance id, alert counter, clock, key id, officers digest).
    "CREATE TABLE log_meta(name TEXT PRIMARY KEY, value TEXT NOT NULL, checksum BLOB NOT NULL)",
    # Keyed MACs of push, alert, audit and log_meta records, apart from the rows they cover.
    "CREATE TABLE macs(record TEXT PRIMARY KEY, mac BLOB NOT NULL)",
    # One row while a process owns the log; see "Copies and backups" in the module docstring.
    "CREATE TABLE owner(token TEXT NOT NULL)",
    # The store lineage the pushes were computed on, fixed at the first push (docs/design.md, Integrity).
    "CREATE TABLE lineage(id INTEGER PRIMARY KEY CHECK (id = 1), lineage TEXT NOT NULL, checksum BLOB NOT NULL)",
)
_METADATA_TABLES = ("pushes", "alerts", "audit", "log_meta", "macs")

# SQLite's own failures; a damaged schema can make even its error message undecodable.
_SQLITE_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError) + _pglog.ERRORS

_PUSH_COLUMNS = ("log_seq, push_id, alert_id, seq, kind, radius_km, created_at, count, meta, "
                 "audience_sha256, audience_bytes, prev, checksum, acked_at, purged_at, state_sum, generation")
_AUDIT_COLUMNS = "seq, at, actor, action, alert_id, radius_km, count, detail, prev_hash, hash"


@dataclass(frozen=True)
class PushRecord:
    """One logged push.  ``audience`` is a :class:`FrozenBitMap` of device keys.

    ``count`` is the audience size, kept after a purge.  ``audience`` is None
    only when the caller asked for records without audiences.
    """

    push_id: str
    alert_id: str
    seq: int
    kind: str
    radius_km: float
    created_at: _dt.datetime
    audience: FrozenBitMap | None
    meta: dict
    acked: bool
    count: int
    purged: bool = False
    #: The store generation the push was computed on (None when the writer did not say).
    generation: int | None = None


# ---------------------------------------------------------------------------
# canonical encodings and checksums
# ---------------------------------------------------------------------------

def _canon(obj) -> str:
    """Canonical JSON: sorted keys, no spaces, floats by repr, NaN refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _now_iso() -> str:
    """The wall clock as the log stores times: UTC, to the microsecond."""
    return iso_utc(_dt.datetime.now(_dt.timezone.utc), "microseconds")


def _framed_sha256(tag: bytes, *fields) -> bytes:
    """SHA-256 over type-tagged, length-prefixed fields.

    Cheaper than JSON for the kilobytes of CAP XML in ``meta``, and as exact: a
    value whose type changed on disk (an integer read back as a float, a blob
    as text) no longer matches.
    """
    h = hashlib.sha256(tag)
    for v in fields:
        if v is None:
            b = b"n"
        elif isinstance(v, str):
            b = b"s" + v.encode()
        elif isinstance(v, bytes):
            b = b"b" + v
        elif isinstance(v, float):
            b = b"f" + v.hex().encode()
        elif isinstance(v, int) and not isinstance(v, bool):
            b = b"i" + str(v).encode()
        else:
            raise TypeError(f"unexpected stored value of type {type(v).__name__}")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def _push_checksum(push_id, alert_id, seq, kind, radius_km, created_at, count, meta,
                   digest, nbytes, prev, generation) -> bytes:
    return _framed_sha256(b"geotarget.push/2", push_id, alert_id, seq, kind, radius_km, created_at,
                          count, meta, digest, nbytes, prev, generation)


def _lineage_checksum(lineage) -> bytes:
    return _framed_sha256(b"geotarget.lineage/1", lineage)


def _state_sum(checksum, acked_at, purged_at) -> bytes:
    return _framed_sha256(b"geotarget.push-state/1", checksum, acked_at, purged_at)


def _alert_checksum(alert_id, record_text) -> bytes:
    return _framed_sha256(b"geotarget.alert/1", alert_id, record_text)


def _audit_hash(prev_hash: str, entry: dict) -> str:
    return hashlib.sha256((prev_hash + _canon(entry)).encode()).hexdigest()


def _meta_checksum(name, value) -> bytes:
    return _framed_sha256(b"geotarget.meta/1", name, value)


# ---------------------------------------------------------------------------
# the MAC key, kept outside the log
# ---------------------------------------------------------------------------

#: The key itself (text, at least 16 bytes) ...
KEY_ENV = "GEOTARGET_LOG_KEY"
#: ... or the path of a file holding it (raw bytes; one trailing newline is ignored).
KEY_FILE_ENV = "GEOTARGET_LOG_KEY_FILE"
# 128 bits: below that an HMAC-SHA256 key is guessable offline from one MAC and its record.
_MIN_KEY_BYTES = 16


def _checked_key(key: bytes, where: str) -> bytes:
    if len(key) < _MIN_KEY_BYTES:
        raise InvalidInputError(f"{where}: the log key has {len(key)} bytes; at least "
                                f"{_MIN_KEY_BYTES} are needed")
    return key


def load_key(key=None) -> bytes | None:
    """The MAC key: ``key`` if given, else ``$GEOTARGET_LOG_KEY``, else the file named by
    ``$GEOTARGET_LOG_KEY_FILE``; None when none is set (the log is then unkeyed)."""
    if key is not None:
        if isinstance(key, str):
            key = key.encode()
        if not isinstance(key, (bytes, bytearray)):
            raise InvalidInputError(f"key must be bytes or str, got {type(key).__name__}")
        return _checked_key(bytes(key), "key")
    text = os.environ.get(KEY_ENV)
    if text:
        return _checked_key(text.encode(), KEY_ENV)
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidInputError(f"{KEY_FILE_ENV}={path!r}: cannot read the key file "
                                    f"({exc.strerror})") from None
        return _checked_key(data[:-1] if data.endswith(b"\n") else data, f"{KEY_FILE_ENV}={path!r}")
    return None


def _mac_of(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (the record's existing checksums)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _key_id(key: bytes) -> str:
    """Names the key without revealing it, so a wrong key is told apart from a forged record."""
    return hmac.new(key, b"geotarget.log-key-id", hashlib.sha256).hexdigest()[:16]


def _parse_anchor(anchor) -> tuple[int, str]:
    """``(count, head)`` from a tuple, a dict or the text ``COUNT:HEAD`` printed by ``audit anchor``."""
    if isinstance(anchor, dict):
        anchor = (anchor.get("count"), anchor.get("head"))
    if isinstance(anchor, str):
        anchor = tuple(anchor.strip().split(":", 1)) if ":" in anchor else (None, None)
        try:
            anchor = (int(anchor[0]), anchor[1])
        except (TypeError, ValueError):
            anchor = (None, None)
    if (not isinstance(anchor, tuple) or len(anchor) != 2 or isinstance(anchor[0], bool)
            or not isinstance(anchor[0], int) or anchor[0] < 1 or not isinstance(anchor[1], str)
            or len(anchor[1]) != 64):
        raise InvalidInputError(f"anchor must be 'COUNT:HEAD' as printed by `geotarget audit anchor` "
                                f"(count >= 1, a 64-digit hash), got {anchor!r}")
    return anchor


# One RecipientLog per file in a process: SQLite's exclusive lock already keeps
# other processes out, and this keeps a second object in the same process out
# with a clear error instead of a lock timeout.
_OPEN_LOGS: dict[str, "weakref.ref"] = {}
_OPEN_LOGS_LOCK = threading.Lock()


# ---------------------------------------------------------------------------
# validation at the public boundary
# ---------------------------------------------------------------------------

def _check_id(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_json_dict(value, name: str) -> str:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        return _canon(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be JSON-serialisable with finite numbers: {exc}") from None


# ---------------------------------------------------------------------------
# file-level checks, before SQLite opens anything
# ---------------------------------------------------------------------------

_DB_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)  # bit 0 set: checksum words are big-endian
_WAL_VERSION = 3007000
_U32 = np.uint64(0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def _wal_powers(n: int):
    """``M**j mod 2**32`` for j = n-1 .. 0 and ``M**n``, M = [[1, 1], [1, 2]].

    SQLite's WAL checksum steps ``s1 += x + s2; s2 += y + s1`` over 32-bit word
    pairs.  That is the affine map ``s' = M s + (x, x + y)`` mod 2**32, so a
    whole frame is ``M**n s0 + sum_i M**(n-1-i) b_i``: one matrix product per
    frame in NumPy instead of a Python loop over every word.  uint64 products
    and sums wrap mod 2**64, which is harmless because 2**32 divides 2**64.
    """
    powers = np.empty((n + 1, 4), dtype=np.uint64)
    a, b, c, d = 1, 0, 0, 1
    for j in range(n + 1):
        powers[j] = (a, b, c, d)
        a, b, c, d = (a + c) & 0xFFFFFFFF, (b + d) & 0xFFFFFFFF, (a + 2 * c) & 0xFFFFFFFF, (b + 2 * d) & 0xFFFFFFFF
    rev = np.ascontiguousarray(powers[n - 1::-1].T)  # row r: entry r of M**(n-1-i), i = 0..n-1
    return rev, tuple(int(v) for v in powers[n])


def _wal_checksum_py(data: bytes, s1: int, s2: int, big_endian: bool):
    """The WAL checksum in plain Python (used for the 24-byte header and as the test oracle)."""
    fmt = ">" if big_endian else "<"
    words = struct.unpack(f"{fmt}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def _frame_checksums(frames: np.ndarray, seeds: np.ndarray, big_endian: bool) -> np.ndarray:
    """Checksum of each frame (first 8 header bytes + page) from its seed, shape (F, 2)."""
    body = np.concatenate([frames[:, :8], frames[:, 24:]], axis=1)
    words = body.view(">u4" if big_endian else "<u4").astype(np.uint64)
    x = words[:, 0::2]
    y = (x + words[:, 1::2]) & _U32
    n = x.shape[1]
    rev, (p, q, r, s) = _wal_powers(n)
    c1 = x @ rev[0] + y @ rev[1]
    c2 = x @ rev[2] + y @ rev[3]
    s1 = seeds[:, 0]
    s2 = seeds[:, 1]
    out = np.empty((frames.shape[0], 2), dtype=np.uint64)
    out[:, 0] = (np.uint64(p) * s1 + np.uint64(q) * s2 + c1) & _U32
    out[:, 1] = (np.uint64(r) * s1 + np.uint64(s) * s2 + c2) & _U32
    return out


@dataclass(frozen=True)
class _WalState:
    frames: int           # frames SQLite will use (up to the last valid commit frame)
    db_pages: int         # database size in pages after that commit
    pages: frozenset      # page numbers held by those frames


def _scan_wal(wal_path: str, page_size: int):
    """Validate a WAL file the way SQLite recovers it, and tell a torn tail from corruption.

    Returns None when the WAL holds no committed frame, else a :class:`_WalState`.
    Raises :class:`CorruptFileError` when damage precedes frames that were
    provably committed after it (see the module docstring).
    """
    try:
        with open(wal_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < 32:
        return None  # a WAL torn while its header was first written has no frames
    magic, version, wal_page_size, _ckpt, salt1, salt2, hs1, hs2 = struct.unpack(">8I", data[:32])
    frame_size = 24 + page_size
    nframes = (len(data) - 32) // frame_size
    big_endian = bool(magic & 1)
    header_ok = (magic in _WAL_MAGICS and version == _WAL_VERSION and wal_page_size == page_size
                 and _wal_checksum_py(data[:24], 0, 0, big_endian) == (hs1, hs2))
    if not header_ok:
        # SQLite writes the 32-byte header in one write, before any frame of
        # that generation: a bad header in front of whole frames is damage,
        # and SQLite would silently ignore every frame behind it.
        if nframes:
            raise CorruptFileError(
                f"{wal_path}: the WAL header is damaged but {nframes} frame(s) follow it")
        return None
    if nframes == 0:
        return None
    frames = np.frombuffer(data, dtype=np.uint8, count=nframes * frame_size, offset=32)
    frames = frames.reshape(nframes, frame_size)
    head = frames[:, :24].copy().view(">u4").astype(np.uint64)  # (F, 6)
    pgno, commit = head[:, 0], head[:, 1]
    salt_ok = (head[:, 2] == salt1) & (head[:, 3] == salt2)
    stored = head[:, 4:6]
    seeds = np.empty_like(stored)
    seeds[0] = (hs1, hs2)
    seeds[1:] = stored[:-1]
    # Each frame is checked against the stored checksum of the frame before it
    # ("locally valid"); inside SQLite's valid prefix that equals its chain.
    cand = salt_ok & (pgno != 0)
    sums = np.zeros_like(stored)
    idx = np.flatnonzero(cand)
    for start in range(0, idx.size, 1024):  # bounded memory for a large WAL
        sel = idx[start:start + 1024]
        sums[sel] = _frame_checksums(frames[sel], seeds[sel], big_endian)
    local_ok = cand & (sums == stored).all(axis=1)
    bad = np.flatnonzero(~local_ok)
    first_bad = int(bad[0]) if bad.size else nframes
    if first_bad < nframes:
        later_commits = np.flatnonzero(salt_ok[first_bad:] & (commit[first_bad:] != 0))
        if later_commits.size:
            c = first_bad + int(later_commits[0])
            tail = np.arange(c + 1, nframes)
            tail = tail[cand[tail]]
            intact = local_ok[tail]
            # After a frame whose stored checksum itself is damaged, the next
            # frame chains from the checksum its intact content recomputes to.
            retry = tail[~intact & cand[tail - 1]]
            if retry.size:
                alt = _frame_checksums(frames[retry], sums[retry - 1], big_endian)
                intact[~intact & cand[tail - 1]] = (alt == stored[retry]).all(axis=1)
            if intact.any():
                raise CorruptFileError(
                    f"{wal_path}: WAL frame {first_bad} is damaged, yet intact frame "
                    f"{int(tail[intact][0])} was written after commit frame {c}: corruption in "
                    f"the middle of the WAL, not a torn tail (later transactions would be lost)")
    commits = np.flatnonzero(commit[:first_bad] != 0)
    if commits.size == 0:
        return None
    used = int(commits[-1]) + 1
    return _WalState(frames=used, db_pages=int(commit[used - 1]),
                     pages=frozenset(int(p) for p in np.unique(pgno[:used])))


def _check_files(path: str) -> None:
    """Header, WAL and length checks on the raw files; raises CorruptFileError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or head[:16] != _DB_MAGIC:
        raise CorruptFileError(
            f"{path}: not a recipient log ({size} bytes, no SQLite header); truncated or foreign file")
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CorruptFileError(f"{path}: invalid page size {page_size} in the file header")
    if head[18:20] != b"\x02\x02":
        raise CorruptFileError(f"{path}: the file header does not mark WAL mode (bytes 18-19 = "
                               f"{head[18:20].hex()}); damaged or not a recipient log")
    if struct.unpack(">I", head[68:72])[0] != APPLICATION_ID:
        raise CorruptFileError(f"{path}: application id {head[68:72].hex()} is not a geotarget "
                               f"recipient log's")
    wal = _scan_wal(path + "-wal", page_size)
    if wal is not None:
        needed = (p for p in range(size // page_size + 1, wal.db_pages + 1) if p not in wal.pages)
        missing = next(needed, None)
        if missing is not None:
            raise CorruptFileError(
                f"{path}: the file is {size} bytes but page {missing} of {wal.db_pages} is neither "
                f"in it nor in the WAL: the database file is truncated")
        return
    change_counter, npages = struct.unpack(">II", head[24:32])
    valid_for = struct.unpack(">I", head[92:96])[0]
    if change_counter != valid_for or npages == 0:
        raise CorruptFileError(f"{path}: the header's page count is not valid (change counter "
                               f"{change_counter}, valid-for {valid_for}); damaged header")
    if size < npages * page_size:
        raise CorruptFileError(f"{path}: the file is {size} bytes but its header says "
                               f"{npages} pages of {page_size}: the database file is truncated")




# ---------------------------------------------------------------------------
# the log
# ---------------------------------------------------------------------------


def _new_file(dst, what: str, kinds: str) -> tuple[str, str]:
    """The path of a log file ``dst`` names (a directory: its ``FILENAME``) that does not exist
    yet, and its existing parent directory; bad values are refused as :class:`InvalidInputError`."""
    try:
        d = os.fsdecode(os.fspath(dst))
    except TypeError:
        raise InvalidInputError(f"dst must be {kinds}, got {dst!r}") from None
    if os.path.isdir(d):
        d = os.path.join(d, FILENAME)
    if os.path.lexists(d):
        raise InvalidInputError(f"dst={d!r} exists; {what} never overwrites a file")
    parent = os.path.dirname(os.path.abspath(d))
    if not os.path.isdir(parent):
        raise InvalidInputError(f"dst={d!r}: directory {parent!r} does not exist")
    return d, parent


def check_wait(timeout, poll) -> None:
    """Check ``take_lease``'s waiting times: ``timeout`` None or >= 0 s, ``poll`` in (0, 60] s."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):
        raise InvalidInputError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 < poll <= 60:
        raise InvalidInputError(f"poll must be a number of seconds in (0, 60], got {poll!r}")


class RecipientLog:
    """Durable, append-only log of pushes, alert state and the audit trail.

    ``path`` is the SQLite file (created if missing); an existing directory
    means ``<dir>/recipients.sqlite``.  ``timeout`` is how long to wait for a
    previous owner (another process) to let go before :class:`InvalidInputError`.
    Thread-safe: every call takes one lock, and :meth:`transaction` holds it
    for the whole block.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 5.0, key=None, lease: float = 10.0,
                 standby: bool = False):
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease < 1e6:
            raise InvalidInputError(f"lease must be a number of seconds > 0, got {lease!r}")
        self._lease = float(lease)
        if not isinstance(standby, bool):
            raise InvalidInputError(f"standby must be True or False, got {standby!r}")
        self._reading = 0
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise InvalidInputError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self._timeout = float(timeout)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = None
        self._key = load_key(key)
        self._owner_engine = None
        #: alert id -> (the key of its ring rows, their verified union), least recently used first.
        self._notified_cache: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self._pg = _pglog.is_url(path)
        if self._pg:
            self._init_pg(path, standby)
            return
        if standby:
            raise InvalidInputError("standby=True needs a postgresql:// log: a SQLite log has one owner, "
                                    "and no other process reads it")
        try:
            p = os.fspath(path)
        except TypeError:
            raise InvalidInputError(f"path must be a str or os.PathLike, got {path!r}") from None
        if not isinstance(p, str):
            p = os.fsdecode(p)
        if os.path.isdir(p):
            p = os.path.join(p, FILENAME)
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise InvalidInputError(f"path={p!r}: directory {parent!r} does not exist")
        self._path = p
        real = os.path.realpath(p)
        with _OPEN_LOGS_LOCK:
            self._refuse_if_held(real)
            created = not os.path.exists(p)
            if created:
                _create(p, _initial_meta(self._key))
            self._conn = self._connect()
            _OPEN_LOGS[real] = weakref.ref(self)
        # A log dropped without close() (or left open at interpreter exit) is
        # closed cleanly too, or its next open would see an owner without a WAL.
        self._finalizer = weakref.finalize(self, _close_connection, self._conn)
        self._real = real
        try:
            self._load_identity()
        except BaseException:
            self.close()
            raise

    def _init_pg(self, url: str, standby: bool) -> None:
        self._path = _pglog.display(url)
        self._real = url
        with _OPEN_LOGS_LOCK:
            if not standby:   # a standby may share a process with the leader: it never writes unless it leads
                self._refuse_if_held(url)
            conn = _pglog.PgConnection(url, self._lease, self._timeout)
            try:
                conn.create(_SCHEMA, SCHEMA_VERSION, _initial_meta(self._key))
                conn.check_schema(_SCHEMA, SCHEMA_VERSION, self._path)
                if not standby:
                    conn.acquire(self._timeout, self._path)
                    conn.start_heartbeat()
            except BaseException as exc:
                conn.close()
                if isinstance(exc, _SQLITE_ERRORS):
                    raise self._db_error(exc) from exc
                raise
            self._conn = conn
            if not standby:
                _OPEN_LOGS[url] = weakref.ref(self)
        self._finalizer = weakref.finalize(self, _close_connection, self._conn)
        try:
            self._load_identity()
        except BaseException:
            self.close()
            raise

    def _refuse_if_held(self, real: str) -> None:
        """Refuse a log another open RecipientLog of this process owns (call under ``_OPEN_LOGS_LOCK``)."""
        other = _OPEN_LOGS.get(real)
        other = other() if other is not None else None
        if other is not None and other._conn is not None:
            raise InvalidInputError(f"path={self._path!r} is held by another RecipientLog in this process "
                                    f"({other!r}); a recipient log has one owner at a time")

    @property
    def leader(self) -> bool:
        """Whether this handle may write: an open SQLite log always; a PostgreSQL log while it
        holds the lease (False for a standby, and once another process is known to have taken over)."""
        if self._conn is None:
            return False
        return self._conn.leading if self._pg else True

    @property
    def term(self) -> int | None:
        """The PostgreSQL leadership term this handle holds (1, 2, ... in the ``leases`` table), or None."""
        return self._conn.term if self._pg and self._conn is not None and self._conn.token else None

    def take_lease(self, timeout: float | None = None, *, poll: float = 0.2) -> bool:
        """A standby waits to lead: True once this handle holds the lease, False after ``timeout`` s.

        The lease is free when no one holds it, when its holder let it expire
        (``lease`` s after its last renewal: a host that died or lost the network),
        or at once when the holder's database session ended (a process that died).
        ``None`` waits for ever.  See docs/design.md, "Several engines, one log".
        """
        check_wait(timeout, poll)
        if not self._pg:
            raise InvalidInputError("take_lease() is for a postgresql:// log; a SQLite log's owner is the "
                                    "process that opened it")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                conn = self._conn
                if conn is None:
                    raise GeotargetError(f"{self._path}: the recipient log is closed")
                if self._depth or self._reading:
                    raise GeotargetError(f"{self._path}: take_lease() called inside a transaction")
                if conn.leading:
                    return True
                conn.stop_heartbeat()
                conn.token = None
                try:
                    taken = conn.try_acquire() is not None
                except _SQLITE_ERRORS as exc:
                    raise self._db_error(exc) from exc
                if taken:
                    conn.start_heartbeat()
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            left = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            time.sleep(left)

    def step_down(self) -> None:
        """Give the lease up (a PostgreSQL leader becomes a standby; a planned failover)."""
        if not self._pg:
            raise InvalidInputError("step_down() is for a postgresql:// log")
        with self._guard() as conn:
            if self._depth:
                raise GeotargetError(f"{self._path}: step_down() called inside a transaction")
            conn.release()

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return "postgresql" if self._pg else "sqlite"

    # -- lifecycle ----------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"RecipientLog({self._path!r}, {state})"

    def __enter__(self) -> "RecipientLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Checkpoint and close; the WAL is folded into the file and removed.  Idempotent."""
        with self._lock:
            if self._conn is None:
                return
            if self._depth:
                raise GeotargetError(f"{self._path}: close() called inside a transaction")
            conn, self._conn = self._conn, None
            with _OPEN_LOGS_LOCK:
                if _OPEN_LOGS.get(self._real) is not None and _OPEN_LOGS[self._real]() is self:
                    del _OPEN_LOGS[self._real]
            self._finalizer.detach()
            try:
                _close_connection(conn)
            except _SQLITE_ERRORS as exc:
                raise self._db_error(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        # Everything SQLite would act on is validated first: once connected, a
        # close would checkpoint the WAL into the file.
        _check_files(self._path)
        wal_present = os.path.exists(self._path + "-wal")
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                   timeout=self._timeout)
        except _SQLITE_ERRORS as exc:
            raise self._db_error(exc) from exc
        try:
            # Before the first read, so SQLite never creates a -shm file.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                raise CorruptFileError(f"{self._path}: journal mode is {mode!r}, expected 'wal'")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            # SQLite's EXCLUSIVE lock, which exclusive locking mode keeps until
            # close: no other process reads the log or checkpoints its WAL.
            conn.execute("BEGIN EXCLUSIVE")
            try:
                self._check_schema(conn)
                owned = conn.execute("SELECT count(*) FROM owner").fetchone()[0]
            finally:
                conn.execute("ROLLBACK")
            if owned and not wal_present:
                raise CorruptFileError(
                    f"{self._path}: the log was in use by a process when this file was written, and "
                    f"its write-ahead log {os.path.basename(self._path)}-wal is missing: pushes "
                    f"acknowledged after the last checkpoint would be silently lost.  Copy a live log "
                    f"with `geotarget log backup`, or copy both files together")
            # Mark the main file as owned, and checkpoint so that the mark (and
            # everything before it) is in the main file itself.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM owner")
            conn.execute("INSERT INTO owner(token) VALUES(?)", (secrets.token_hex(8),))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, _SQLITE_ERRORS):
                raise self._db_error(exc) from exc
            raise
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            older = (" (version 1 predates lineage binding; start a new log for this store)"
                     if version == 1 else "")
            raise CorruptFileError(f"{self._path}: schema version {version}; this geotarget reads "
                                   f"version {SCHEMA_VERSION}{older}")
        encoding = conn.execute("PRAGMA encoding").fetchone()[0]
        if encoding != "UTF-8":
            raise CorruptFileError(f"{self._path}: text encoding {encoding!r}, expected 'UTF-8'")
        have = sorted(r[0] for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
        if have != sorted(_SCHEMA):
            raise CorruptFileError(f"{self._path}: the schema is not a recipient log's")
        for table in _METADATA_TABLES:
            rows = [r[0] for r in conn.execute(f"PRAGMA integrity_check({table})")]
            if rows != ["ok"]:
                raise CorruptFileError(f"{self._path}: integrity check of table {table!r} "
                                       f"failed: {'; '.join(rows[:5])}")

    def _db_error(self, exc: Exception) -> Exception:
        if _pglog.ERRORS and isinstance(exc, _pglog.ERRORS):
            if isinstance(exc, _pglog.psycopg.OperationalError):
                return OSError(f"{self._path}: {exc}")
            return CorruptFileError(f"{self._path}: {exc}")
        if isinstance(exc, UnicodeDecodeError):
            return CorruptFileError(f"{self._path}: undecodable text in the file ({exc})")
        name = getattr(exc, "sqlite_errorname", "") or ""
        text = str(exc)
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
            return InvalidInputError(f"path={self._path!r} is held by another process; a recipient "
                                     f"log has one owner at a time ({text})")
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM",
                            "SQLITE_READONLY", "SQLITE_NOMEM")) or any(
                                m in text for m in ("disk I/O error", "disk is full",
                                                    "unable to open", "readonly database")):
            return OSError(f"{self._path}: {text}")
        return CorruptFileError(f"{self._path}: {text}")

    @contextlib.contextmanager
    def _guard(self):
        """Hold the lock on an open log and turn SQLite errors into typed ones.

        A PostgreSQL standby reads in one read-only snapshot per outermost block:
        the leader's commits in between never show a half-written state.
        """
        with self._lock:
            if self._conn is None:
                raise GeotargetError(f"{self._path}: the recipient log is closed")
            conn = self._conn
            snapshot = (self._pg and not self._depth and not self._reading and conn.token is None
                        and not conn.in_transaction)
            try:
                if snapshot:
                    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                self._reading += 1
                try:
                    yield conn
                finally:
                    self._reading -= 1
                    if snapshot and not conn.raw.closed and conn.in_transaction:
                        conn.execute("COMMIT")
            except _SQLITE_ERRORS as exc:
                raise self._db_error(exc) from exc

    @contextlib.contextmanager
    def transaction(self):
        """Group the calls in the block into one atomic commit, fsynced when the block ends.

        Outside a transaction every mutating call commits (and fsyncs) on its
        own.  Blocks nest (as savepoints); an exception rolls the block back
        and propagates.  Other threads wait until the outermost block ends.
        """
        if self._pg and self._conn is not None and self._conn.token is None and not self._depth:
            raise LeaseLostError(f"{self._path}: this process is a standby and does not hold the log's "
                                 f"lease (RecipientLog.take_lease); nothing was written")
        with self._guard() as conn:
            depth = self._depth
            conn.execute("BEGIN IMMEDIATE" if depth == 0 and not self._pg else
                         "BEGIN" if depth == 0 else f"SAVEPOINT s{depth}")
            self._depth = depth + 1
            try:
                if depth == 0 and self._pg:
                    conn.fence(self._path)  # every write transaction checks the lease is still ours
                yield self
            except BaseException:
                self._depth = depth
                if conn.in_transaction:  # SQLite may already have rolled back (I/O errors)
                    if depth == 0:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute(f"ROLLBACK TO s{depth}")
                        conn.execute(f"RELEASE s{depth}")
                raise
            self._depth = depth
            try:
                conn.execute("COMMIT" if depth == 0 else f"RELEASE s{depth}")
            except BaseException:
                if depth == 0 and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- copies -------------------------------------------------------------

    def backup(self, dst) -> str:
        """Copy the whole log, WAL included, into a new file ``dst`` with SQLite's online backup.

        The copy is consistent (taken between transactions), fsynced, linked
        into place only when complete, and carries no owner mark: it opens as a
        cleanly closed log with the same instance id and key.  Returns its path.
        """
        d, parent = _new_file(dst, "a backup", "a str or os.PathLike")
        if self._pg:
            return self.copy_to(d)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(d)}.", suffix=".backup", dir=parent)
        os.close(fd)
        try:
            with self._guard() as conn:
                if self._depth:
                    raise GeotargetError(f"{self._path}: backup() called inside a transaction")
                target = sqlite3.connect(tmp, isolation_level=None)
                try:
                    conn.backup(target)
                    target.execute("PRAGMA journal_mode=WAL")
                    target.execute("DELETE FROM owner")
                finally:
                    target.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, d)
            _fsync_dir(parent)
        except FileExistsError:
            raise InvalidInputError(f"dst={d!r} exists; a backup never overwrites a file") from None
        finally:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        return d

    def _dump(self, conn) -> dict:
        """Every row of every table but ``owner``, in a backend-neutral order (for copy and its check)."""
        out = {}
        for table, cols in _COPY_TABLES:
            rows = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                    for r in conn.execute(f"SELECT {cols} FROM {table}").fetchall()]
            out[table] = sorted(rows, key=lambda r: (r[0],))
        return out

    def copy_to(self, dst) -> str:
        """Copy the whole log into a new log ``dst`` of either backend (a SQLite path or a
        ``postgresql://`` URL to a database with no log), then verify the copy.

        Every row is copied as stored (checksums, audit chain and MACs included, not
        recomputed), so the copy has this log's instance id and key.  The check reopens the
        copy, runs :meth:`verify` anchored at this log's audit head, and compares every row of
        both.  A SQLite destination is linked into place only after it verified; a PostgreSQL
        one is written in one transaction.  Returns the copy's path (or URL without password).
        """
        if self._depth:
            raise GeotargetError(f"{self._path}: copy_to() called inside a transaction")
        if _pglog.is_url(dst):
            target, d, parent = dst, _pglog.display(dst), None
        else:
            d, parent = _new_file(dst, "a copy", "a str, os.PathLike or postgresql:// URL")
            fd, target = tempfile.mkstemp(prefix=f".{os.path.basename(d)}.", suffix=".copying", dir=parent)
            os.close(fd)
            os.unlink(target)
        with self._guard() as conn:
            rows = self._dump(conn)
        head = self.anchor()
        anchor = head["text"] if head["count"] else None  # an empty trail has nothing to anchor
        try:
            if parent is None:
                pg = _pglog.PgConnection(target, self._lease, self._timeout)
                try:
                    if not pg.create(_SCHEMA, SCHEMA_VERSION, _copy_statements(rows)):
                        raise InvalidInputError(f"dst={d!r} already holds a recipient log; a copy never "
                                                f"overwrites one")
                except _pglog.ERRORS as exc:
                    raise OSError(f"{d}: {exc}") from exc
                finally:
                    pg.close()
            else:
                _create(target, _copy_statements(rows))
            with RecipientLog(target, key=self._key) as copy:
                copy.verify(anchor=anchor)
                with copy._guard() as cconn:
                    if copy._dump(cconn) != rows:
                        raise CorruptFileError(f"{d}: the copy's rows differ from {self._path}'s")
            if parent is not None:
                os.link(target, d)
                _fsync_dir(parent)
        except FileExistsError:
            raise InvalidInputError(f"dst={d!r} exists; a copy never overwrites a file") from None
        finally:
            if parent is not None:
                for leftover in (target, target + "-wal", target + "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
        return d

    # -- identity, keyed MACs and named values --------------------------------

    def _load_identity(self) -> None:
        with self._guard() as conn:
            rows = {r[0]: r for r in conn.execute("SELECT name, value, checksum FROM log_meta")}
        for name in ("instance_id", "key_id"):
            if name in rows and _meta_checksum(name, rows[name][1]) != rows[name][2]:
                raise CorruptFileError(f"{self._path}: log value {name!r}: checksum mismatch")
        if "instance_id" not in rows:
            raise CorruptFileError(f"{self._path}: the log has no instance id")
        key_id = rows["key_id"][1] if "key_id" in rows else None
        if self._key is not None:
            if key_id is None:
                raise CorruptFileError(
                    f"{self._path}: a MAC key is set but the log records no key: it was written "
                    f"unkeyed, or its key record was removed; its records cannot be authenticated")
            if key_id != _key_id(self._key):
                raise InvalidInputError(f"{self._path}: the MAC key given is not this log's key "
                                        f"(key id {_key_id(self._key)}, the log's is {key_id})")
            with self._guard() as conn:
                self._check_mac(conn, "meta:key_id", rows["key_id"][2], where="log value 'key_id'")
                self._check_mac(conn, "meta:instance_id", rows["instance_id"][2],
                                where="log value 'instance_id'")
        self._key_id = key_id
        self._instance_id = rows["instance_id"][1]

    @property
    def instance_id(self) -> str:
        """Random id of this log, drawn at creation; part of every alert id it hands out."""
        return self._instance_id

    @property
    def keyed(self) -> bool:
        """Whether the log was created with a MAC key (whether or not this object holds it)."""
        return self._key_id is not None

    @property
    def authenticated(self) -> bool:
        """Whether reads check the keyed MACs (the key is held)."""
        return self._key is not None

    def claim(self, owner) -> None:
        """Make ``owner`` (an engine) the one user of this log in this process.

        A second live owner gets :class:`InvalidInputError`: two engines on one
        log would each hand out pushes from their own view of the alerts.
        """
        with self._lock:
            current = self._owner_engine() if self._owner_engine is not None else None
            if current is not None and current is not owner:
                raise InvalidInputError(f"log {self._path!r} is already owned by another engine "
                                        f"({current!r}); one engine owns a log at a time")
            self._owner_engine = weakref.ref(owner)

    def release(self, owner) -> None:
        """Undo :meth:`claim` (when ``owner`` holds it)."""
        with self._lock:
            if self._owner_engine is not None and self._owner_engine() is owner:
                self._owner_engine = None

    def _mac(self, *parts: bytes) -> bytes:
        return _mac_of(self._key, *parts)

    def _put_mac(self, conn, record: str, *parts: bytes) -> None:
        if self._key_id is not None and self._key is None:
            raise InvalidInputError(
                f"{self._path} is a keyed log: writing to it needs its key ({KEY_ENV} or "
                f"{KEY_FILE_ENV}); without the key it can only be read")
        if self._key is not None:
            conn.execute("INSERT OR REPLACE INTO macs(record, mac) VALUES(?,?)",
                         (record, self._mac(*parts)))

    def _check_mac(self, conn, record: str, *parts: bytes, where: str) -> None:
        if self._key is None:
            return
        row = conn.execute("SELECT mac FROM macs WHERE record=?", (record,)).fetchone()
        if row is None or not isinstance(row[0], bytes) or not hmac.compare_digest(row[0], self._mac(*parts)):
            raise CorruptFileError(f"{self._path}: {where}: the keyed MAC does not match: the record "
                                   f"was altered by someone without the log's key")

    def meta_value(self, name: str) -> str | None:
        """A named value of the log (checked like every record), or None if never set."""
        name = _check_id(name, "name")
        with self._guard() as conn:
            row = conn.execute("SELECT value, checksum FROM log_meta WHERE name=?", (name,)).fetchone()
            if row is None:
                return None
            if _meta_checksum(name, row[0]) != row[1]:
                raise CorruptFileError(f"{self._path}: log value {name!r}: checksum mismatch")
            self._check_mac(conn, f"meta:{name}", row[1], where=f"log value {name!r}")
            return row[0]

    def set_meta_value(self, name: str, value: str) -> None:
        """Set a named value (in the caller's transaction, if any)."""
        name = _check_id(name, "name")
        if not isinstance(value, str):
            raise InvalidInputError(f"value must be a str, got {type(value).__name__}")
        with self.transaction() as log:
            checksum = _meta_checksum(name, value)
            log._put_mac(log._conn, f"meta:{name}", checksum)
            log._conn.execute("INSERT OR REPLACE INTO log_meta(name, value, checksum) VALUES(?,?,?)",
                              (name, value, checksum))

    def next_alert_number(self) -> int:
        """Draw the next alert number from the log's persistent counter (1, 2, ...).

        The counter only grows, so a number is never drawn twice, whatever
        happens to alert rows; call it inside the transaction that saves the alert.
        """
        with self.transaction() as log:
            n = int(log.meta_value("alert_counter") or 0) + 1
            log.set_meta_value("alert_counter", str(n))
        return n

    def anchor(self) -> dict:
        """The audit chain's head: ``{"count", "head"}`` (and ``"text"``, ``COUNT:HEAD``).

        Kept by an outside witness, it lets :meth:`verify` detect the newest
        entries being cut off, which no chain can detect from inside.
        """
        entries = self.audit_entries()
        head = entries[-1]["hash"] if entries else _AUDIT_GENESIS
        return {"count": len(entries), "head": head, "text": f"{len(entries)}:{head}"}

    # -- alerts -------------------------------------------------------------

    def save_alert(self, alert_id: str, record: dict, *, new: bool = False) -> None:
        """Store the engine's state of one alert (JSON-able), replacing any earlier one.

        ``new=True`` refuses (:class:`AlertStateError`) an id the log already holds,
        as an alert or in any push, so that a new alert never takes over another's id.
        """
        alert_id = _check_id(alert_id, "alert_id")
        text = _check_json_dict(record, "record")
        with self.transaction() as log:
            conn = log._conn
            if new and (conn.execute("SELECT 1 FROM alerts WHERE alert_id=?", (alert_id,)).fetchone()
                        or conn.execute("SELECT 1 FROM pushes WHERE alert_id=? LIMIT 1",
                                        (alert_id,)).fetchone()):
                raise AlertStateError(f"alert_id={alert_id!r} is already used in {self._path}; "
                                      f"an alert id is never reused")
            checksum = _alert_checksum(alert_id, text)
            log._put_mac(conn, f"alert:{alert_id}", checksum)
            conn.execute("INSERT OR REPLACE INTO alerts(alert_id, record, checksum) VALUES(?,?,?)",
                         (alert_id, text, checksum))

    def _decode_alert(self, alert_id, text, checksum) -> dict:
        try:
            if _alert_checksum(alert_id, text) != checksum:
                raise ValueError("checksum mismatch")
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("record is not an object")
        except (TypeError, ValueError, AttributeError) as exc:
            raise CorruptFileError(f"{self._path}: alert record {alert_id!r}: {exc}") from None
        with self._guard() as conn:
            self._check_mac(conn, f"alert:{alert_id}", checksum, where=f"alert record {alert_id!r}")
        return record

    def alerts(self) -> dict[str, dict]:
        """Every saved alert record, by alert id."""
        with self._guard() as conn:
            rows = conn.execute("SELECT alert_id, record, checksum FROM alerts ORDER BY alert_id").fetchall()
        return {r[0]: self._decode_alert(*r) for r in rows}

    def alert(self, alert_id: str) -> dict:
        alert_id = _check_id(alert_id, "alert_id")
        with self._guard() as conn:
            row = conn.execute("SELECT alert_id, record, checksum FROM alerts WHERE alert_id=?",
                               (alert_id,)).fetchone()
        if row is None:
            raise UnknownAlertError(f"alert_id={alert_id!r}: no such alert in {self._path}")
        return self._decode_alert(*row)

    def _known_alert(self, conn, alert_id: str) -> None:
        if (conn.execute("SELECT 1 FROM alerts WHERE alert_id=?", (alert_id,)).fetchone() is None
                and conn.execute("SELECT 1 FROM pushes WHERE alert_id=? LIMIT 1",
                                 (alert_id,)).fetchone() is None):
            raise UnknownAlertError(f"alert_id={alert_id!r}: no such alert in {self._path}")

    # -- pushes -------------------------------------------------------------

    def _decode(self, row, audience: bool) -> PushRecord:
        (log_seq, push_id, alert_id, seq, kind, radius, created, count, meta, digest, nbytes,
         prev, checksum, acked_at, purged_at, state_sum, generation) = row
        where = f"{self._path}: push {push_id!r} (log row {log_seq})"
        try:
            if _push_checksum(push_id, alert_id, seq, kind, radius, created, count, meta,
                              digest, nbytes, prev, generation) != checksum:
                raise ValueError("record checksum mismatch")
            if _state_sum(checksum, acked_at, purged_at) != state_sum:
                raise ValueError("acknowledged/purged state checksum mismatch")
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            created_at = _dt.datetime.fromisoformat(created)
            meta_obj = json.loads(meta)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CorruptFileError(f"{where}: {exc}") from None
        self._check_mac(self._conn, f"push:{log_seq}", checksum, state_sum, where=where)
        bm = self._row_audience(row) if audience else None
        return PushRecord(push_id=push_id, alert_id=alert_id, seq=seq, kind=kind, radius_km=radius,
                          created_at=created_at, audience=bm, meta=meta_obj,
                          acked=acked_at is not None, count=count, purged=purged_at is not None,
                          generation=generation)

    def _row_audience(self, row) -> FrozenBitMap:
        """The audience of a push row whose record ``_decode`` has checked."""
        log_seq, push_id, alert_id, count, digest, nbytes, purged_at = (row[0], row[1], row[2], row[7], row[9],
                                                                        row[10], row[14])
        if purged_at is not None:
            raise AlertStateError(
                f"the audience of push {push_id!r} (alert {alert_id!r}) was purged at "
                f"{purged_at} under the retention setting; its {count} recipients are no "
                f"longer stored")
        return self._read_audience(log_seq, digest, nbytes, count,
                                   f"{self._path}: push {push_id!r} (log row {log_seq})")

    def _read_audience(self, log_seq, digest, nbytes, count, where) -> FrozenBitMap:
        row = self._conn.execute("SELECT bitmap FROM audiences WHERE log_seq=?", (log_seq,)).fetchone()
        if row is None:
            raise CorruptFileError(f"{where}: its audience row is missing")
        blob = row[0]
        if not isinstance(blob, bytes) or len(blob) != nbytes or hashlib.sha256(blob).digest() != digest:
            raise CorruptFileError(f"{where}: audience bytes do not match their SHA-256 digest")
        try:
            bm = FrozenBitMap.deserialize(blob)
        except Exception as exc:  # pyroaring raises ValueError or its own errors on bad bytes
            raise CorruptFileError(f"{where}: audience bitmap does not decode: {exc}") from None
        if len(bm) != count:
            raise CorruptFileError(f"{where}: audience holds {len(bm)} keys, the record says {count}")
        return bm

    def _rows(self, conn, where: str = "", params=()):
        return conn.execute(f"SELECT {_PUSH_COLUMNS} FROM pushes {where}", params).fetchall()

    def _notified(self, conn, alert_id: str):
        """The alert's notified devices (a FrozenBitMap) and the key of the rows they came from.

        Every ring record's checksum (and MAC) is checked on each call.  The audiences'
        bytes are read, hashed and decoded only when the rows changed since this
        process last did so: the union it verified is kept, keyed by each row's log
        position, audience digest and purge state (docs/design.md, "Durability").
        """
        rows = self._rows(conn, "WHERE alert_id=? AND kind IN (?,?,?) ORDER BY seq",
                          (alert_id, *NEW_DEVICE_KINDS))
        for r in rows:
            self._decode(r, False)
        key = tuple((r[0], bytes(r[9]), r[14]) for r in rows)
        hit = self._notified_cache.get(alert_id)
        if hit is not None and hit[0] == key:
            self._notified_cache.move_to_end(alert_id)
            return hit[1], key
        union = FrozenBitMap(BitMap.union(BitMap(), *(self._row_audience(r) for r in rows)))
        self._remember_notified(alert_id, key, union)
        return union, key

    def _remember_notified(self, alert_id: str, key: tuple, union: FrozenBitMap) -> None:
        self._notified_cache[alert_id] = (key, union)
        self._notified_cache.move_to_end(alert_id)
        while len(self._notified_cache) > _NOTIFIED_CACHE_ALERTS:
            self._notified_cache.popitem(last=False)

    def append_push(self, *, push_id: str, alert_id: str, seq: int, kind: str, radius_km: float,
                    created_at: _dt.datetime, audience: AbstractBitMap, meta: dict,
                    generation: int | None = None) -> PushRecord:
        """Log one push durably (fsynced before returning, or at the end of the transaction).

        Re-appending a logged ``push_id`` with an identical record returns the
        stored record; with any difference it raises :class:`AlertStateError`,
        as does a ``seq`` other than the alert's next one (0, 1, 2, ...), an
        alert/expand/topup audience that overlaps the devices already notified,
        or an update/closure/retraction audience other than exactly them.
        """
        push_id = _check_id(push_id, "push_id")
        alert_id = _check_id(alert_id, "alert_id")
        seq = check_int(seq, "seq")
        if kind not in KINDS:
            raise InvalidInputError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
        radius = check_radius(radius_km)
        created = iso_utc(check_aware(created_at, "created_at"), "microseconds")
        if not isinstance(audience, AbstractBitMap):
            raise InvalidInputError(f"audience must be a pyroaring BitMap of 32-bit device keys, "
                                    f"got {type(audience).__name__}")
        meta_text = _check_json_dict(meta, "meta")
        if generation is not None:
            generation = check_int(generation, "generation")
        # The heavy part runs before taking the lock.
        bm = BitMap(audience)
        bm.run_optimize()
        blob = bm.serialize()
        digest = hashlib.sha256(blob).digest()
        count = len(bm)
        with self.transaction() as log:
            conn = log._conn
            row = conn.execute(f"SELECT {_PUSH_COLUMNS} FROM pushes WHERE push_id=?",
                               (push_id,)).fetchone()
            if row is not None:
                stored = self._decode(row, True)
                diff = [name for name, a, b in (
                    ("alert_id", stored.alert_id, alert_id), ("seq", stored.seq, seq),
                    ("kind", stored.kind, kind), ("radius_km", stored.radius_km, radius),
                    ("created_at", iso_utc(stored.created_at, "microseconds"), created),
                    ("meta", _canon(stored.meta), meta_text), ("audience", stored.audience, bm),
                    ("generation", stored.generation, generation))
                    if a != b]
                if diff:
                    raise AlertStateError(f"push_id={push_id!r} is already logged with a different "
                                          f"{', '.join(diff)}; a push id names one record forever")
                return stored
            last = conn.execute("SELECT max(seq) FROM pushes WHERE alert_id=?", (alert_id,)).fetchone()[0]
            expected = 0 if last is None else last + 1
            if seq != expected:
                raise AlertStateError(f"seq={seq} for alert {alert_id!r}: the next push of that "
                                      f"alert must have seq {expected}")
            # Once an alert's audiences are purged its notified set is gone: nothing can be checked
            # against it, so nothing more is logged for it (even when no ring push was ever purged).
            purged = conn.execute("SELECT push_id FROM pushes WHERE alert_id=? AND purged_at IS NOT NULL "
                                  "LIMIT 1", (alert_id,)).fetchone()
            if purged is not None:
                raise AlertStateError(f"alert {alert_id!r}: its audiences were purged under the retention "
                                      f"setting; nothing more can be logged for it")
            notified, key = self._notified(conn, alert_id)
            if kind in NEW_DEVICE_KINDS:
                overlap = bm.intersection_cardinality(notified)
                if overlap:
                    raise AlertStateError(
                        f"{kind} push {push_id!r} of alert {alert_id!r} reaches {overlap} devices "
                        f"already notified; a device receives an alert at most once")
            elif bm != notified:
                raise AlertStateError(
                    f"{kind} push {push_id!r} of alert {alert_id!r} has {count} recipients but must "
                    f"go to exactly the {len(notified)} devices notified so far "
                    f"({len(bm - notified)} extra, {len(notified - bm)} missing)")
            prev = conn.execute("SELECT checksum FROM pushes ORDER BY log_seq DESC LIMIT 1").fetchone()
            prev = _ZERO_HASH if prev is None else prev[0]
            checksum = _push_checksum(push_id, alert_id, seq, kind, radius, created, count,
                                      meta_text, digest, len(blob), prev, generation)
            state_sum = _state_sum(checksum, None, None)
            # The row id SQLite would pick (one past the largest), explicit so both backends agree.
            log_seq = conn.execute("SELECT coalesce(max(log_seq), 0) + 1 FROM pushes").fetchone()[0]
            conn.execute(
                f"INSERT INTO pushes({_PUSH_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,?,?)",
                (log_seq, push_id, alert_id, seq, kind, radius, created, count, meta_text, digest, len(blob),
                 prev, checksum, state_sum, generation))
            log._put_mac(conn, f"push:{log_seq}", checksum, state_sum)
            conn.execute("INSERT INTO audiences(log_seq, bitmap) VALUES(?,?)", (log_seq, blob))
            outermost = self._depth == 1
        if kind in NEW_DEVICE_KINDS and outermost:   # committed: the next push of the alert starts from here
            self._remember_notified(alert_id, key + ((log_seq, digest, None),), FrozenBitMap(notified | bm))
        return PushRecord(push_id=push_id, alert_id=alert_id, seq=seq, kind=kind, radius_km=radius,
                          created_at=_dt.datetime.fromisoformat(created), audience=FrozenBitMap(bm),
                          meta=json.loads(meta_text), acked=False, count=count, generation=generation)

    # -- lineage ------------------------------------------------------------

    def lineage(self) -> str | None:
        """The store lineage this log's pushes were computed on (None before the first push)."""
        with self._guard() as conn:
            row = conn.execute("SELECT lineage, checksum FROM lineage WHERE id=1").fetchone()
            if row is None:
                return None
            if not isinstance(row[0], str) or _lineage_checksum(row[0]) != row[1]:
                raise CorruptFileError(f"{self._path}: the recorded store lineage fails its checksum")
            self._check_mac(conn, "lineage", row[1], where="the recorded store lineage")
        return row[0]

    def bind_lineage(self, lineage: str) -> None:
        """Record ``lineage`` if none is yet; refuse (:class:`CorruptFileError`) another one."""
        lineage = _check_id(lineage, "lineage")
        with self.transaction() as log:
            have = log.lineage()
            if have is None:
                checksum = _lineage_checksum(lineage)
                log._conn.execute("INSERT INTO lineage(id, lineage, checksum) VALUES(1,?,?)",
                                  (lineage, checksum))
                log._put_mac(log._conn, "lineage", checksum)
            elif have != lineage:
                raise CorruptFileError(f"{self._path}: the log belongs to store lineage {have}, not "
                                       f"{lineage}: its device keys mean other devices in that store")

    def max_generation(self) -> int | None:
        """The newest store generation any logged push was computed on (None if none says)."""
        with self._guard() as conn:
            # every row is decoded: a damaged generation must fail its checksum, not lower the max
            gens = [self._decode(r, False).generation for r in self._rows(conn, "ORDER BY log_seq")]
        gens = [g for g in gens if g is not None]
        return max(gens) if gens else None

    def push(self, push_id: str) -> PushRecord:
        push_id = _check_id(push_id, "push_id")
        with self._guard() as conn:
            rows = self._rows(conn, "WHERE push_id=?", (push_id,))
            if not rows:
                raise UnknownPushError(f"push_id={push_id!r}: no such push in {self._path}")
            return self._decode(rows[0], True)

    def pushes(self, alert_id: str | None = None, *, audiences: bool = True) -> list[PushRecord]:
        """Logged pushes ordered by (alert, seq); one alert's, or all.

        ``audiences=False`` skips reading the bitmaps (``audience`` is None), which
        also lists pushes whose audiences were purged.
        """
        with self._guard() as conn:
            if alert_id is None:
                rows = self._rows(conn, "ORDER BY alert_id, seq")
            else:
                alert_id = _check_id(alert_id, "alert_id")
                self._known_alert(conn, alert_id)
                rows = self._rows(conn, "WHERE alert_id=? ORDER BY seq", (alert_id,))
            return [self._decode(r, audiences) for r in rows]

    def notified(self, alert_id: str, *, frozen: bool = False) -> AbstractBitMap:
        """Union of the alert/expand/topup audiences of the alert: the closure audience.

        A BitMap of its own; ``frozen=True`` returns the log's verified FrozenBitMap
        itself, without copying (what the engine reads before every ring).
        """
        alert_id = _check_id(alert_id, "alert_id")
        if not isinstance(frozen, bool):
            raise InvalidInputError(f"frozen must be True or False, got {frozen!r}")
        with self._guard() as conn:
            self._known_alert(conn, alert_id)
            union = self._notified(conn, alert_id)[0]
            return union if frozen else BitMap(union)

    def ack(self, push_id: str) -> bool:
        """Record durably that the dispatcher took the push; True if it was not acknowledged yet."""
        push_id = _check_id(push_id, "push_id")
        with self.transaction() as log:
            rows = self._rows(log._conn, "WHERE push_id=?", (push_id,))
            if not rows:
                raise UnknownPushError(f"push_id={push_id!r}: no such push in {self._path}")
            if self._decode(rows[0], False).acked:
                return False
            log_seq, checksum, purged_at = rows[0][0], rows[0][12], rows[0][14]
            at = _now_iso()
            state_sum = _state_sum(checksum, at, purged_at)
            log._put_mac(log._conn, f"push:{log_seq}", checksum, state_sum)
            log._conn.execute("UPDATE pushes SET acked_at=?, state_sum=? WHERE push_id=?",
                              (at, state_sum, push_id))
        return True

    def unacked(self) -> list[PushRecord]:
        """Logged but unacknowledged pushes, in log order: the outbox to offer again."""
        with self._guard() as conn:
            # Every row is decoded, not filtered in SQL: a damaged acked_at must
            # fail its checksum rather than hide a push from the outbox.
            metas = [(r, self._decode(r, False)) for r in self._rows(conn, "ORDER BY log_seq")]
            return [self._decode(r, True) for r, rec in metas if not rec.acked]

    def purge_audiences(self, alert_id: str, *, actor: str = "retention") -> int:
        """Drop the stored audiences of a closed alert once its retention period is over.

        Counts, digests of the dropped bytes and the audit stay; the purge is
        audited.  The alert must have a closure or retraction push and every
        push must be acknowledged (else :class:`AlertStateError`).  Returns the
        number of audiences dropped (0 when already purged).
        """
        alert_id = _check_id(alert_id, "alert_id")
        actor = _check_id(actor, "actor")
        with self._guard(), self.transaction() as log:
            conn = log._conn
            log._known_alert(conn, alert_id)
            rows = self._rows(conn, "WHERE alert_id=? ORDER BY seq", (alert_id,))
            recs = [self._decode(r, False) for r in rows]
            if not any(r.kind in ("closure", "retraction") for r in recs):
                raise AlertStateError(f"alert {alert_id!r} is not closed (no closure or retraction "
                                      f"push); its audiences are still needed")
            pending = [r.push_id for r in recs if not r.acked]
            if pending:
                raise AlertStateError(f"alert {alert_id!r} has unacknowledged pushes {pending}; "
                                      f"they must be delivered before their audiences are purged")
            todo = [(row, rec) for row, rec in zip(rows, recs) if not rec.purged]
            at = _now_iso()
            for row, rec in todo:
                log_seq, checksum, acked_at = row[0], row[12], row[13]
                state_sum = _state_sum(checksum, acked_at, at)
                log._put_mac(conn, f"push:{log_seq}", checksum, state_sum)
                conn.execute("UPDATE pushes SET purged_at=?, state_sum=? WHERE log_seq=?",
                             (at, state_sum, log_seq))
                conn.execute("DELETE FROM audiences WHERE log_seq=?", (log_seq,))
            if todo:
                log.audit("purge_audiences", actor=actor, alert_id=alert_id,
                          count=sum(rec.count for _, rec in todo),
                          detail={"pushes": [rec.push_id for _, rec in todo]})
        if todo:
            with self._guard() as conn:
                if self._depth == 0 and not self._pg:
                    # Old WAL frames still hold the bitmap pages: fold them in and cut the WAL.
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return len(todo)

    # -- audit trail --------------------------------------------------------

    def audit(self, action: str, *, actor: str, alert_id: str | None = None,
              radius_km: float | None = None, count: int | None = None,
              at: _dt.datetime | None = None, detail: dict | None = None) -> str:
        """Append one entry to the hash-chained audit trail; returns its hash.

        Holds who, what, when, the alert, the radius and the count.  No API here
        takes device coordinates; ``detail`` is alert metadata (it may hold the
        alert centre, which is where the child went missing, not a device).
        """
        action = _check_id(action, "action")
        actor = _check_id(actor, "actor")
        if alert_id is not None:
            alert_id = _check_id(alert_id, "alert_id")
        radius = None if radius_km is None else check_radius(radius_km)
        count = None if count is None else check_int(count, "count")
        when = _now_iso() if at is None else iso_utc(check_aware(at, "at"), "microseconds")
        detail_text = None if detail is None else _check_json_dict(detail, "detail")
        with self.transaction() as log:
            conn = log._conn
            last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hash = (0, _AUDIT_GENESIS) if last is None else (last[0] + 1, last[1])
            entry = {"seq": seq, "at": when, "actor": actor, "action": action, "alert_id": alert_id,
                     "radius_km": radius, "count": count,
                     "detail": None if detail_text is None else json.loads(detail_text)}
            digest = _audit_hash(prev_hash, entry)
            log._put_mac(conn, f"audit:{seq}", digest.encode())
            conn.execute(f"INSERT INTO audit({_AUDIT_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?,?)",
                         (seq, when, actor, action, alert_id, radius, count, detail_text,
                          prev_hash, digest))
        return digest

    def _decode_audit(self, row) -> dict:
        seq, at, actor, action, alert_id, radius, count, detail, prev_hash, digest = row
        try:
            entry = {"seq": seq, "at": at, "actor": actor, "action": action, "alert_id": alert_id,
                     "radius_km": radius, "count": count,
                     "detail": None if detail is None else json.loads(detail)}
            if not isinstance(prev_hash, str) or _audit_hash(prev_hash, entry) != digest:
                raise ValueError("hash mismatch")
        except (TypeError, ValueError) as exc:
            raise CorruptFileError(f"{self._path}: audit entry {seq}: {exc}") from None
        with self._guard() as conn:
            self._check_mac(conn, f"audit:{seq}", digest.encode(), where=f"audit entry {seq}")
        entry["prev_hash"] = prev_hash
        entry["hash"] = digest
        return entry

    def _audit_chain(self, entries: list[dict]) -> None:
        prev = _AUDIT_GENESIS
        for i, e in enumerate(entries):
            if e["seq"] != i or e["prev_hash"] != prev:
                raise CorruptFileError(f"{self._path}: audit entry {e['seq']} breaks the hash "
                                       f"chain (expected seq {i} after hash {prev[:12]}...)")
            prev = e["hash"]

    def audit_entries(self, alert_id: str | None = None) -> list[dict]:
        """Audit entries in order (all, or one alert's); each hash is re-checked.

        Keys: seq, at (UTC ISO string), actor, action, alert_id, radius_km,
        count, detail, prev_hash, hash.
        """
        with self._guard() as conn:
            if alert_id is None:
                rows = conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq").fetchall()
            else:
                alert_id = _check_id(alert_id, "alert_id")
                rows = conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE alert_id=? "
                                    f"ORDER BY seq", (alert_id,)).fetchall()
        entries = [self._decode_audit(r) for r in rows]
        if alert_id is None:
            self._audit_chain(entries)
        return entries

    # -- whole-log checks and sizes -----------------------------------------

    def verify(self, anchor=None) -> dict:
        """Check everything; raise :class:`CorruptFileError` naming the first bad record.

        Full SQLite integrity check, every push checksum and the push chain,
        every stored audience (digest, decoding, cardinality) and the delivery
        rules between them, every alert checksum and the audit hash chain; with
        the key, every record's keyed MAC too.  ``anchor`` (``COUNT:HEAD`` from
        :meth:`anchor`, kept outside) must still be on the audit chain: entries
        cut off the end are detected.  Returns what was checked: ``keyed`` (the
        log has a key), ``authenticated`` (the MACs were checked), ``anchored``.
        """
        if anchor is not None:
            anchor = _parse_anchor(anchor)
        with self._guard() as conn:
            rows = ["ok"] if self._pg else [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                raise CorruptFileError(f"{self._path}: integrity check failed: {'; '.join(rows[:5])}")
            prev = _ZERO_HASH
            next_seq: dict[str, int] = {}
            notified: dict[str, BitMap] = {}
            stored = 0
            for row in self._rows(conn, "ORDER BY log_seq"):
                rec = self._decode(row, False)
                where = f"{self._path}: push {rec.push_id!r} (log row {row[0]})"
                if row[11] != prev:
                    raise CorruptFileError(f"{where}: breaks the push chain (a push before it is "
                                           f"missing or was altered)")
                prev = row[12]
                if rec.seq != next_seq.get(rec.alert_id, 0):
                    raise CorruptFileError(f"{where}: seq {rec.seq} out of order for alert "
                                           f"{rec.alert_id!r}")
                next_seq[rec.alert_id] = rec.seq + 1
                if rec.purged:
                    notified[rec.alert_id] = None
                    continue
                stored += 1
                bm = self._read_audience(row[0], row[9], row[10], row[7], where)
                seen = notified.setdefault(rec.alert_id, BitMap())
                if seen is None:
                    raise CorruptFileError(f"{where}: audience kept after earlier ones were purged")
                if rec.kind in NEW_DEVICE_KINDS:
                    if not bm.isdisjoint(seen):
                        raise CorruptFileError(f"{where}: reaches devices already notified")
                    seen |= bm
                elif bm != seen:
                    raise CorruptFileError(f"{where}: {rec.kind} audience differs from the union "
                                           f"of devices notified before it")
            orphans = conn.execute("SELECT count(*) FROM audiences").fetchone()[0] - stored
            if orphans:
                raise CorruptFileError(f"{self._path}: {orphans} audience row(s) belong to no "
                                       f"logged push")
            for r in conn.execute("SELECT alert_id, record, checksum FROM alerts").fetchall():
                self._decode_alert(*r)
            entries = [self._decode_audit(r) for r in conn.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq").fetchall()]
            self._audit_chain(entries)
            self.lineage()  # re-checks the lineage row's checksum (and MAC)
            for (name,) in conn.execute("SELECT name FROM log_meta").fetchall():
                self.meta_value(name)
        if anchor is not None:
            count, head = anchor
            if len(entries) < count or entries[count - 1]["hash"] != head:
                have = f"{len(entries)} entries" + (f", entry {count - 1} has hash "
                                                    f"{entries[count - 1]['hash'][:16]}..."
                                                    if len(entries) >= count else "")
                raise CorruptFileError(
                    f"{self._path}: the audit trail does not extend the anchor {count}:{head[:16]}... "
                    f"({have}): entries were cut off or rewritten")
        return {"keyed": self.keyed, "authenticated": self.authenticated, "anchored": anchor is not None}

    def stats(self) -> dict:
        """Sizes: pushes, recipients logged, audience bytes, bytes on disk, bytes per recipient."""
        with self._guard() as conn:
            n, acked, purged, recipients, kept = conn.execute(
                "SELECT count(*), count(acked_at), count(purged_at), coalesce(sum(count), 0), "
                "coalesce(sum(CASE WHEN purged_at IS NULL THEN audience_bytes END), 0) "
                "FROM pushes").fetchone()
            alerts = conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
            audits = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
            on_disk = self._conn.size() if self._pg else sum(
                os.path.getsize(p) for p in (self._path, self._path + "-wal") if os.path.exists(p))
        recipients, kept = int(recipients), int(kept)
        return {"pushes": n, "acked": acked, "purged": purged, "alerts": alerts,
                "audit_entries": audits, "recipients_logged": recipients,
                "audience_bytes": kept, "bytes_on_disk": on_disk,
                "bytes_per_recipient": on_disk / recipients if recipients else None}


def _close_connection(conn) -> None:
    """Clear the owner mark, then close (SQLite checkpoints and removes the WAL)."""
    if isinstance(conn, _pglog.PgConnection):
        try:
            if not conn.raw.closed:
                # a lost server: the lease row stays and simply expires
                with contextlib.suppress(*_pglog.ERRORS):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.release()
        finally:
            conn.close()
        return
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    with contextlib.suppress(sqlite3.OperationalError):  # a full disk: the mark stays, and so does the WAL
        conn.execute("DELETE FROM owner")
    conn.close()


_COPY_TABLES = (("pushes", _PUSH_COLUMNS), ("audiences", "log_seq, bitmap"),
                ("alerts", "alert_id, record, checksum"), ("audit", _AUDIT_COLUMNS),
                ("log_meta", "name, value, checksum"), ("macs", "record, mac"),
                ("lineage", "id, lineage, checksum"))


def _copy_statements(rows: dict) -> list:
    out = []
    for table, cols in _COPY_TABLES:
        marks = ",".join("?" * len(cols.split(",")))
        out += [(f"INSERT INTO {table}({cols}) VALUES({marks})", r) for r in rows[table]]
    return out


def _initial_meta(key: bytes | None) -> list:
    """The statements that give a new log its identity (and key id, with the key's MACs)."""
    # Random, so that two logs never hand out the same CAP identifiers.
    meta = {"instance_id": secrets.token_hex(4)}
    if key is not None:
        meta["key_id"] = _key_id(key)
    out = []
    for name, value in meta.items():
        checksum = _meta_checksum(name, value)
        out.append(("INSERT INTO log_meta(name, value, checksum) VALUES(?,?,?)", (name, value, checksum)))
        if key is not None:
            out.append(("INSERT INTO macs(record, mac) VALUES(?,?)", (f"meta:{name}", _mac_of(key, checksum))))
    return out


def _create(path: str, statements: list) -> None:
    """Build a log from the schema and ``statements`` (a new log's identity, or a copy's rows)
    under a temporary name, then link it into place atomically."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".creating", dir=parent)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()  # checkpoints: the file alone now holds the whole log
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a log another process just created
        except FileExistsError:
            pass
        _fsync_dir(parent)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
