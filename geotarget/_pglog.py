"""The PostgreSQL backend of the recipient log (psycopg 3); see docs/design.md, "Log backends".

:class:`RecipientLog` speaks one SQL dialect, SQLite's.  This module adapts it to
PostgreSQL by small substitutions (``?`` placeholders, ``BLOB``/``REAL``/``INTEGER``
column types, ``INSERT OR REPLACE``) in :class:`PgConnection`, which offers the
slice of ``sqlite3.Connection`` the log uses (``execute``, ``in_transaction``,
``close``).  Exclusive ownership, which SQLite gets from its file lock, is here a
lease row with a fencing token: ``owner(token, holder, expires_at)``.  Every
write transaction first renews the lease with ``UPDATE owner ... WHERE token =
mine``; when that touches no row another process took the log over, and the
write fails with :class:`LeaseLostError` before anything is written.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time

from .errors import CorruptFileError, InvalidInputError, LeaseLostError

try:  # an optional extra: geotarget[postgres]
    import psycopg
    from psycopg import pq
    ERRORS: tuple = (psycopg.Error,)
except ImportError:  # pragma: no cover - exercised only without the extra
    psycopg = None
    ERRORS = ()

URL_PREFIXES = ("postgresql://", "postgres://")
#: Marks a database schema as a recipient log's (stands in for SQLite's user_version).
SCHEMA_COMMENT = "geotarget recipient log, schema {version}"
#: The lease row; replaces SQLite's one-column ``owner`` table.
OWNER_TABLE = "CREATE TABLE owner(token TEXT NOT NULL, holder TEXT NOT NULL, expires_at timestamptz NOT NULL)"
TABLES = ("alerts", "audiences", "audit", "lineage", "log_meta", "macs", "owner", "pushes")


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(URL_PREFIXES)


def display(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _require():
    if psycopg is None:
        raise InvalidInputError("a postgresql:// log needs psycopg 3: pip install 'geotarget[postgres]'")


_INSERT_OR_REPLACE = re.compile(r"^INSERT OR REPLACE INTO (\w+)\(([^)]*)\) VALUES\((.*)\)$", re.S)


def translate(sql: str) -> str:
    """SQLite's dialect, as the log writes it, to PostgreSQL's."""
    m = _INSERT_OR_REPLACE.match(sql)
    if m:
        table, cols, values = m.groups()
        names = [c.strip() for c in cols.split(",")]
        sets = ", ".join(f"{c}=EXCLUDED.{c}" for c in names[1:])
        sql = f"INSERT INTO {table}({cols}) VALUES({values}) ON CONFLICT ({names[0]}) DO UPDATE SET {sets}"
    return sql.replace("?", "%s")


def translate_ddl(stmt: str) -> str:
    if stmt.startswith("CREATE TABLE owner("):
        return OWNER_TABLE
    stmt = re.sub(r"\bBLOB\b", "bytea", stmt)
    stmt = re.sub(r"\bREAL\b", "double precision", stmt)
    return re.sub(r"\bINTEGER\b", "bigint", stmt)


class PgConnection:
    """A psycopg connection in autocommit mode with the log's explicit BEGIN/COMMIT, plus the lease."""

    def __init__(self, url: str, lease: float, timeout: float):
        _require()
        self.url = url
        self.lease = float(lease)
        self.token = None
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        try:
            self.raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout) + 1))
        except psycopg.Error as exc:
            raise OSError(f"{display(url)}: cannot connect: {exc}") from None
        # A push is returned only after its commit is durable (docs/operations.md).
        self.raw.execute("SET synchronous_commit = on")

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    def execute(self, sql: str, params=()):
        return self.raw.execute(translate(sql), params or None)

    def close(self) -> None:
        self.raw.close()

    # -- schema -------------------------------------------------------------

    def tables(self) -> list[str]:
        return sorted(r[0] for r in self.raw.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"))

    def create(self, schema, version: int, meta_rows) -> bool:
        """Create the log's tables in an empty schema (False when a log is already there)."""
        with self.raw.transaction():
            # Two processes creating one log at once: the second waits, then finds it made.
            self.raw.execute("SELECT pg_advisory_xact_lock(4754524)")
            have = self.tables()
            if "pushes" in have:
                return False
            if have:  # never mix a log's tables into another application's schema
                raise CorruptFileError(f"{display(self.url)}: the schema holds tables {have[:5]} but no "
                                       f"recipient log; use an empty database or schema")
            for stmt in schema:
                self.raw.execute(translate_ddl(stmt))
            self.raw.execute(f"COMMENT ON TABLE log_meta IS '{SCHEMA_COMMENT.format(version=version)}'")
            for sql, params in meta_rows:
                self.raw.execute(translate(sql), params)
        return True

    def check_schema(self, schema, version: int, where: str) -> None:
        have = self.tables()
        if "log_meta" not in have:
            raise CorruptFileError(f"{where}: no recipient log in this database")
        comment = self.raw.execute("SELECT obj_description('log_meta'::regclass, 'pg_class')").fetchone()[0]
        if comment != SCHEMA_COMMENT.format(version=version):
            raise CorruptFileError(f"{where}: schema marker {comment!r}; this geotarget reads "
                                   f"{SCHEMA_COMMENT.format(version=version)!r}")
        if have != sorted(TABLES):
            raise CorruptFileError(f"{where}: the schema is not a recipient log's (tables {have})")

    # -- the lease ------------------------------------------------------------

    def acquire(self, timeout: float, where: str) -> None:
        """Take the lease: when no one holds it, or its holder let it expire.  Waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.raw.transaction():
                self.raw.execute("LOCK TABLE owner IN EXCLUSIVE MODE")
                row = self.raw.execute("SELECT holder, expires_at > now() FROM owner").fetchone()
                if row is None or not row[1]:
                    token = secrets.token_hex(16)
                    self.raw.execute("DELETE FROM owner")
                    self.raw.execute("INSERT INTO owner(token, holder, expires_at) VALUES "
                                     "(%s, %s, now() + make_interval(secs => %s))",
                                     (token, self.holder, self.lease))
                    self.token = token
                    return
            if time.monotonic() >= deadline:
                raise InvalidInputError(f"path={where!r} is held by another process ({row[0]}, lease "
                                        f"not expired); a recipient log has one owner at a time")
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def fence(self, where: str) -> None:
        """Inside a write transaction: renew the lease, or fail if it is no longer ours."""
        cur = self.raw.execute("UPDATE owner SET expires_at = now() + make_interval(secs => %s) "
                               "WHERE token = %s", (self.lease, self.token))
        if cur.rowcount != 1:
            raise LeaseLostError(f"{where}: this process no longer holds the log's lease (another "
                                 f"process took the log over); nothing was written")

    def release(self) -> None:
        if self.token is not None and not self.raw.closed:
            self.raw.execute("DELETE FROM owner WHERE token = %s", (self.token,))
        self.token = None

    def size(self) -> int:
        return int(self.raw.execute(
            "SELECT coalesce(sum(pg_total_relation_size(quote_ident(table_name))), 0) FROM "
            "information_schema.tables WHERE table_schema = current_schema()").fetchone()[0])
