"""The PostgreSQL backend of the recipient log (psycopg 3); see docs/design.md, "Log backends".

:class:`RecipientLog` speaks one SQL dialect, SQLite's.  This module adapts it to
PostgreSQL by small substitutions (``?`` placeholders, ``BLOB``/``REAL``/``INTEGER``
column types, ``INSERT OR REPLACE``) in :class:`PgConnection`, which offers the
slice of ``sqlite3.Connection`` the log uses (``execute``, ``in_transaction``,
``close``).  Exclusive ownership, which SQLite gets from its file lock, is here a
lease row with a fencing token: ``owner(token, holder, expires_at, term,
backend_pid)``.  Every write transaction first renews the lease with ``UPDATE
owner ... WHERE token = mine``; when that touches no row another process took the
log over, and the write fails with :class:`LeaseLostError` before anything is
written.  A :class:`Heartbeat` thread renews the lease of an idle leader; a
standby takes the lease over when it expired or when the holder's database
session ended (the holder died), and every term is recorded in ``leases``.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
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
SCHEMA_COMMENT = "geotarget recipient log, schema {version}, leases 2"
#: The lease row; replaces SQLite's one-column ``owner`` table.  ``backend_pid`` is the
#: holder's database session: when it has ended, the holder is gone (docs/design.md).
OWNER_TABLE = ("CREATE TABLE owner(token TEXT NOT NULL, holder TEXT NOT NULL, expires_at timestamptz NOT NULL, "
               "term bigint NOT NULL, backend_pid bigint NOT NULL)")
#: One row per leadership term: who led from which push and audit entry on.
LEASES_TABLE = ("CREATE TABLE leases(term bigint PRIMARY KEY, holder TEXT NOT NULL, acquired_at timestamptz "
                "NOT NULL, first_log_seq bigint NOT NULL, first_audit_seq bigint NOT NULL, reason TEXT NOT NULL)")
TABLES = ("alerts", "audiences", "audit", "leases", "lineage", "log_meta", "macs", "owner", "pushes")


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
        self.timeout = float(timeout)
        self.token = None
        self.term = None
        self.blocker = None
        self.heartbeat = None
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        try:
            self.raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout) + 1))
        except psycopg.Error as exc:
            raise OSError(f"{display(url)}: cannot connect: {exc}") from None
        # A push is returned only after its commit is durable (docs/operations.md).
        self.raw.execute("SET synchronous_commit = on")
        # A process frozen inside a transaction (a hung host) would hold its locks, and
        # the lease row, for ever: the server ends such a session after the lease.
        self.raw.execute(f"SET idle_in_transaction_session_timeout = {max(1, int(self.lease * 1000))}")

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    def execute(self, sql: str, params=()):
        return self.raw.execute(translate(sql), params or None)

    def close(self) -> None:
        self.stop_heartbeat()
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
            self.raw.execute(LEASES_TABLE)
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

    def acquire(self, timeout: float, where: str) -> str:
        """Take the lease, waiting up to ``timeout`` s for it to be free; returns why it was free."""
        deadline = time.monotonic() + timeout
        while True:
            reason = self.try_acquire()
            if reason is not None:
                return reason
            if time.monotonic() >= deadline:
                raise InvalidInputError(f"path={where!r} is held by another process ({self.blocker}, lease "
                                        f"not expired); a recipient log has one owner at a time")
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def try_acquire(self) -> str | None:
        """One attempt: take the lease if no one holds it, its holder let it expire, or the
        holder's database session ended.  Returns that reason, or None (``blocker`` says who holds it).

        ``LOCK TABLE owner IN EXCLUSIVE MODE`` conflicts with the row lock of a writer's
        fencing ``UPDATE``: a takeover waits for the holder's write in flight to end, and
        after it that holder's token matches no row.
        """
        with self.raw.transaction():
            self.raw.execute("SET LOCAL lock_timeout = '1s'")
            try:
                with self.raw.transaction():   # a savepoint: a lock timeout ends the attempt only
                    self.raw.execute("LOCK TABLE owner IN EXCLUSIVE MODE")
            except psycopg.errors.LockNotAvailable:
                self.blocker = "a writer inside a transaction"
                return None
            row = self.raw.execute("SELECT holder, expires_at > now(), backend_pid FROM owner").fetchone()
            if row is None:
                reason = "free"
            elif not row[1]:
                reason = f"the lease of {row[0]} expired"
            elif row[2] != self.raw.info.backend_pid and not self.raw.execute(
                    "SELECT EXISTS(SELECT 1 FROM pg_stat_activity WHERE pid = %s)", (row[2],)).fetchone()[0]:
                reason = f"the database session of {row[0]} ended"
            else:
                self.blocker = row[0]
                return None
            token = secrets.token_hex(16)
            term = self.raw.execute("SELECT coalesce(max(term), 0) + 1 FROM leases").fetchone()[0]
            self.raw.execute("DELETE FROM owner")
            self.raw.execute("INSERT INTO owner(token, holder, expires_at, term, backend_pid) VALUES "
                             "(%s, %s, now() + make_interval(secs => %s), %s, %s)",
                             (token, self.holder, self.lease, term, self.raw.info.backend_pid))
            self.raw.execute("INSERT INTO leases(term, holder, acquired_at, first_log_seq, first_audit_seq, reason) "
                             "SELECT %s, %s, now(), (SELECT coalesce(max(log_seq), 0) + 1 FROM pushes), "
                             "(SELECT coalesce(max(seq), -1) + 1 FROM audit), %s",
                             (term, self.holder, reason))
            self.token, self.term = token, term
        return reason

    def fence(self, where: str) -> None:
        """Inside a write transaction: renew the lease, or fail if it is no longer ours."""
        if self.token is None:
            raise LeaseLostError(f"{where}: this process is a standby and does not hold the log's lease; "
                                 f"nothing was written")
        cur = self.raw.execute("UPDATE owner SET expires_at = now() + make_interval(secs => %s) "
                               "WHERE token = %s", (self.lease, self.token))
        if cur.rowcount != 1:
            self.token = None      # a standby from now on: it must take the lease again to write
            self.stop_heartbeat()
            raise LeaseLostError(f"{where}: this process no longer holds the log's lease (another "
                                 f"process took the log over); nothing was written")

    def release(self) -> None:
        self.stop_heartbeat()
        if self.token is not None and not self.raw.closed:
            self.raw.execute("DELETE FROM owner WHERE token = %s", (self.token,))
        self.token = None

    def start_heartbeat(self) -> None:
        self.stop_heartbeat()
        self.heartbeat = Heartbeat(self.url, self.token, self.lease, self.timeout)
        self.heartbeat.start()

    def stop_heartbeat(self) -> None:
        hb, self.heartbeat = self.heartbeat, None
        if hb is not None:
            hb.stop()

    @property
    def leading(self) -> bool:
        """Holds a lease that no one is known to have taken over."""
        return self.token is not None and not (self.heartbeat is not None and self.heartbeat.lost)

    def size(self) -> int:
        return int(self.raw.execute(
            "SELECT coalesce(sum(pg_total_relation_size(quote_ident(table_name))), 0) FROM "
            "information_schema.tables WHERE table_schema = current_schema()").fetchone()[0])


class Heartbeat(threading.Thread):
    """Renews a leader's lease every third of its length, on a connection of its own.

    It keeps an idle leader's lease alive; the holder's writes renew it too.  When
    the renewal finds the token gone (another process took over) it sets ``lost``
    and stops; when the database cannot be reached it retries, and the lease
    expires on its own if that lasts.
    """

    def __init__(self, url: str, token: str, lease: float, timeout: float):
        super().__init__(name="geotarget-lease", daemon=True)
        self.url, self.token, self.lease, self.timeout = url, token, lease, timeout
        self.lost = False
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self is not threading.current_thread():
            self.join(timeout=self.timeout + 5)

    def run(self) -> None:
        conn = None
        try:
            while not self._stop_event.wait(self.lease / 3):
                try:
                    if conn is None:
                        conn = psycopg.connect(self.url, autocommit=True,
                                               connect_timeout=max(1, int(self.timeout) + 1))
                        conn.execute("SET synchronous_commit = off")  # a lost renewal only shortens it
                    cur = conn.execute("UPDATE owner SET expires_at = now() + make_interval(secs => %s) "
                                       "WHERE token = %s", (self.lease, self.token))
                    if cur.rowcount != 1:
                        self.lost = True
                        return
                except psycopg.Error:
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()
