"""RecipientLog: round trips, push rules, outbox, audit chain, tampering, retention, a state machine."""
import dataclasses
import datetime as dt
import json
import os
import sqlite3
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pyroaring import BitMap, FrozenBitMap

from geotarget.errors import (AlertStateError, CorruptFileError, GeotargetError, InvalidInputError,
                              UnknownAlertError, UnknownPushError)
from geotarget.log import (FILENAME, SCHEMA_VERSION, PushRecord, RecipientLog, _frame_checksums,
                           _wal_checksum_py)

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _push(log, alert="A", seq=0, kind="alert", audience=(), push_id=None, radius=100.0,
          created=T0, meta=None):
    return log.append_push(push_id=push_id or f"{alert}.{seq}", alert_id=alert, seq=seq, kind=kind,
                           radius_km=radius, created_at=created,
                           audience=audience if isinstance(audience, BitMap) else BitMap(audience),
                           meta={"cap_xml": f"<alert>{alert}.{seq}</alert>"} if meta is None else meta)


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """Where a log lives: a directory (SQLite) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path
    return request.getfixturevalue("pg_url")


@pytest.fixture
def log(where):
    with RecipientLog(where) as lg:
        yield lg


def _raw(path):
    """A plain SQLite connection for tampering (the log must be closed)."""
    return sqlite3.connect(path, isolation_level=None)


# -- round trips --------------------------------------------------------------

def test_append_returns_the_record_and_reads_it_back(log):
    aud = BitMap(range(1000, 5000)) | BitMap([7, 99_000_000])
    created = dt.datetime(2026, 3, 1, 16, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    rec = _push(log, audience=aud, created=created, radius=123.5, meta={"counts": {"amap": 3}})
    assert isinstance(rec, PushRecord)
    assert (rec.push_id, rec.alert_id, rec.seq, rec.kind, rec.radius_km) == ("A.0", "A", 0, "alert", 123.5)
    assert rec.created_at == T0 and rec.created_at.utcoffset() == dt.timedelta(0)
    assert rec.audience == aud and isinstance(rec.audience, FrozenBitMap)
    assert rec.count == len(aud) and rec.meta == {"counts": {"amap": 3}} and not rec.acked
    assert log.push("A.0") == rec
    assert log.pushes() == [rec] and log.pushes("A") == [rec]


def test_the_callers_bitmap_is_not_shared(log):
    aud = BitMap(range(10))
    rec = _push(log, audience=aud)
    aud.add(500)
    assert 500 not in rec.audience and 500 not in log.push("A.0").audience


def test_everything_survives_reopen(tmp_path):
    with RecipientLog(tmp_path) as log:
        a = _push(log, audience=range(0, 100))
        b = _push(log, seq=1, kind="expand", audience=range(100, 300), radius=200.0)
        log.ack("A.0")
        log.save_alert("A", {"status": "open", "lat": 31.2})
        h = log.audit("report", actor="C-1", alert_id="A", radius_km=100.0, count=100)
    with RecipientLog(tmp_path / FILENAME) as log:
        assert log.pushes() == [dataclasses.replace(a, acked=True), b]
        assert log.alerts() == {"A": {"status": "open", "lat": 31.2}}
        assert [e["hash"] for e in log.audit_entries()] == [h]
        assert [p.push_id for p in log.unacked()] == ["A.1"]
        log.verify()


def test_pushes_are_ordered_by_alert_then_seq(log):
    _push(log, alert="B", audience=[1])
    _push(log, alert="A", audience=[2])
    _push(log, alert="B", seq=1, kind="expand", audience=[3])
    _push(log, alert="A", seq=1, kind="topup", audience=[4])
    assert [p.push_id for p in log.pushes()] == ["A.0", "A.1", "B.0", "B.1"]
    assert [p.push_id for p in log.pushes("B")] == ["B.0", "B.1"]
    # the outbox is in log order, not alert order
    assert [p.push_id for p in log.unacked()] == ["B.0", "A.0", "B.1", "A.1"]


def test_a_directory_path_means_a_file_inside_it(tmp_path):
    with RecipientLog(tmp_path):
        pass
    assert os.path.isfile(tmp_path / FILENAME)
    with RecipientLog(str(tmp_path / "other.db")) as log:
        assert log.path == str(tmp_path / "other.db")


# -- re-append, seq rules, delivery rules ---------------------------------------

def test_reappending_an_identical_push_returns_the_stored_one(log):
    first = _push(log, audience=range(50))
    log.ack("A.0")
    again = _push(log, audience=BitMap(range(50)))
    assert again == dataclasses.replace(first, acked=True)
    assert len(log.pushes()) == 1


@pytest.mark.parametrize("change, field", [
    (dict(alert="B"), "alert_id"),
    (dict(kind="expand"), "kind"),
    (dict(radius=100.5), "radius_km"),
    (dict(created=T0 + dt.timedelta(seconds=1)), "created_at"),
    (dict(audience=range(51)), "audience"),
    (dict(meta={"cap_xml": "other"}), "meta"),
])
def test_reappending_a_different_push_is_refused(log, change, field):
    _push(log, audience=range(50))
    kw = dict(push_id="A.0", audience=range(50)) | change
    with pytest.raises(AlertStateError, match=field):
        _push(log, **kw)
    assert [p.push_id for p in log.pushes()] == ["A.0"] and log.push("A.0").audience == BitMap(range(50))


def test_reappending_with_another_seq_is_refused(log):
    _push(log, audience=[1])
    _push(log, seq=1, kind="expand", audience=[2])
    with pytest.raises(AlertStateError, match="seq"):
        _push(log, push_id="A.0", seq=1, kind="alert", audience=[1])


@pytest.mark.parametrize("seq", [1, 2, 5])
def test_the_first_seq_of_an_alert_is_zero(log, seq):
    with pytest.raises(AlertStateError, match="seq 0"):
        _push(log, seq=seq, kind="expand", audience=[1])
    assert log.pushes() == []


def test_seq_must_be_the_next_one_of_that_alert(log):
    _push(log, audience=[1])
    _push(log, alert="B", audience=[1])
    for bad in (0, 2, 3):
        with pytest.raises(AlertStateError, match="seq 1"):
            _push(log, seq=bad, kind="expand", audience=[2], push_id=f"x{bad}")
    _push(log, seq=1, kind="expand", audience=[2])
    assert [p.seq for p in log.pushes("A")] == [0, 1]


@pytest.mark.parametrize("kind", ["alert", "expand", "topup"])
def test_new_device_pushes_may_not_reach_a_notified_device(log, kind):
    _push(log, audience=range(10))
    with pytest.raises(AlertStateError, match="1 devices already notified"):
        _push(log, seq=1, kind=kind, audience=[9, 10, 11])
    assert len(log.pushes()) == 1


@pytest.mark.parametrize("kind", ["update", "closure", "retraction"])
def test_follow_up_pushes_go_to_exactly_the_notified_devices(log, kind):
    _push(log, audience=range(10))
    _push(log, seq=1, kind="expand", audience=range(20, 25))
    for wrong in (BitMap(range(10)), BitMap(range(10)) | BitMap(range(20, 26)), BitMap()):
        with pytest.raises(AlertStateError, match="exactly the 15 devices"):
            _push(log, seq=2, kind=kind, audience=wrong)
    rec = _push(log, seq=2, kind=kind, audience=BitMap(range(10)) | BitMap(range(20, 25)))
    assert rec.count == 15


def test_notified_is_the_union_of_alert_expand_and_topup(log):
    _push(log, audience=range(0, 10))
    _push(log, seq=1, kind="expand", audience=range(100, 110))
    _push(log, seq=2, kind="update", audience=BitMap(range(0, 10)) | BitMap(range(100, 110)))
    _push(log, seq=3, kind="topup", audience=[55, 4_000_000_000])
    want = BitMap(range(0, 10)) | BitMap(range(100, 110)) | BitMap([55, 4_000_000_000])
    assert log.notified("A") == want
    _push(log, seq=4, kind="closure", audience=want)
    assert log.notified("A") == want
    log.save_alert("quiet", {})
    assert log.notified("quiet") == BitMap()
    with pytest.raises(UnknownAlertError, match="nope"):
        log.notified("nope")
    with pytest.raises(UnknownAlertError):
        log.pushes("nope")


# -- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(push_id=""), "push_id"),
    (dict(push_id=5), "push_id"),
    (dict(alert_id=None), "alert_id"),
    (dict(seq=-1), "seq"),
    (dict(seq=True), "seq"),
    (dict(seq=1.0), "seq"),
    (dict(kind="found"), "kind"),
    (dict(radius_km=float("nan")), "radius_km"),
    (dict(radius_km=-1.0), "radius_km"),
    (dict(created_at=dt.datetime(2026, 1, 1)), "created_at"),
    (dict(created_at="2026-01-01"), "created_at"),
    (dict(audience=[1, 2]), "audience"),
    (dict(audience=np.arange(3)), "audience"),
    (dict(meta=[1]), "meta"),
    (dict(meta={"x": float("inf")}), "meta"),
    (dict(meta={"x": object()}), "meta"),
])
def test_bad_push_input_is_refused_and_changes_nothing(log, kw, match):
    args = dict(push_id="A.0", alert_id="A", seq=0, kind="alert", radius_km=1.0, created_at=T0,
                audience=BitMap([1]), meta={}) | kw
    with pytest.raises(InvalidInputError, match=match):
        log.append_push(**args)
    assert log.pushes() == [] and log.stats()["pushes"] == 0


@pytest.mark.parametrize("call, match", [
    (lambda lg: lg.audit("", actor="x"), "action"),
    (lambda lg: lg.audit("report", actor=""), "actor"),
    (lambda lg: lg.audit("report", actor="x", count=-1), "count"),
    (lambda lg: lg.audit("report", actor="x", radius_km=float("inf")), "radius_km"),
    (lambda lg: lg.audit("report", actor="x", at=dt.datetime(2026, 1, 1)), "at"),
    (lambda lg: lg.audit("report", actor="x", detail="lat=1"), "detail"),
    (lambda lg: lg.save_alert("A", ["not", "a", "dict"]), "record"),
    (lambda lg: lg.save_alert("", {}), "alert_id"),
    (lambda lg: lg.push(""), "push_id"),
])
def test_bad_input_elsewhere(log, call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(log)
    assert log.audit_entries() == [] and log.alerts() == {}


def test_unknown_ids(log):
    with pytest.raises(UnknownPushError, match="p9"):
        log.push("p9")
    with pytest.raises(UnknownPushError, match="p9"):
        log.ack("p9")
    with pytest.raises(UnknownAlertError, match="A"):
        log.alert("A")


def test_a_closed_log_refuses_calls(where):
    log = RecipientLog(where)
    log.close()
    log.close()
    with pytest.raises(GeotargetError, match="closed"):
        log.pushes()


# -- outbox ---------------------------------------------------------------------

def test_ack_is_durable_and_reports_whether_it_was_new(where):
    with RecipientLog(where) as log:
        for s in range(4):
            _push(log, seq=s, kind="alert" if s == 0 else "expand", audience=[s])
        assert log.ack("A.1") is True
        assert log.ack("A.1") is False
        assert [p.push_id for p in log.unacked()] == ["A.0", "A.2", "A.3"]
    with RecipientLog(where) as log:
        assert log.push("A.1").acked and not log.push("A.0").acked
        assert log.ack("A.1") is False and log.ack("A.3") is True
        assert [p.push_id for p in log.unacked()] == ["A.0", "A.2"]
        assert log.unacked()[1].audience == BitMap([2])


# -- transactions and threads ----------------------------------------------------

def test_a_transaction_commits_everything_or_nothing(where):
    with RecipientLog(where) as log:
        with log.transaction():
            _push(log, audience=[1, 2])
            log.save_alert("A", {"next_seq": 1})
            log.audit("alert", actor="engine", alert_id="A", count=2)
        with pytest.raises(RuntimeError):
            with log.transaction():
                _push(log, seq=1, kind="expand", audience=[3])
                log.ack("A.0")
                log.save_alert("A", {"next_seq": 2})
                log.audit("expand", actor="engine", alert_id="A", count=1)
                assert log.push("A.1").audience == BitMap([3])  # visible inside
                raise RuntimeError("dispatcher crashed before commit")
        with pytest.raises(UnknownPushError):
            log.push("A.1")
    with RecipientLog(where) as log:
        assert [p.push_id for p in log.pushes()] == ["A.0"] and not log.push("A.0").acked
        assert log.alert("A") == {"next_seq": 1} and len(log.audit_entries()) == 1
        log.verify()


def test_nested_transactions_roll_back_only_the_inner_block(log):
    with log.transaction():
        _push(log, audience=[1])
        with pytest.raises(AlertStateError):
            with log.transaction():
                _push(log, seq=1, kind="expand", audience=[2])
                _push(log, seq=2, kind="expand", audience=[2])  # overlaps: refused
        _push(log, seq=1, kind="expand", audience=[5])
    assert [(p.seq, list(p.audience)) for p in log.pushes()] == [(0, [1]), (1, [5])]
    log.verify()


def test_concurrent_threads_each_append_their_own_alert(log):
    errors = []

    def work(t):
        try:
            for s in range(15):
                with log.transaction():
                    _push(log, alert=f"T{t}", seq=s, kind="alert" if s == 0 else "expand",
                          audience=range(1000 * s, 1000 * s + 10 + t))
                    log.audit("push", actor=f"thread-{t}", alert_id=f"T{t}", count=10 + t)
                if s % 2:
                    log.ack(f"T{t}.{s}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for t in range(4):
        assert [p.seq for p in log.pushes(f"T{t}")] == list(range(15))
        assert len(log.notified(f"T{t}")) == 15 * (10 + t)
    assert len(log.unacked()) == 4 * 8 and len(log.audit_entries()) == 60
    log.verify()


def test_a_second_owner_is_refused_while_the_log_is_open(tmp_path):
    with RecipientLog(tmp_path) as log:
        with pytest.raises(InvalidInputError, match="held by another"):
            RecipientLog(tmp_path, timeout=0.05)
        # not even a plain reader gets in, before or after the first push
        for _ in range(2):
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                sqlite3.connect(log.path, timeout=0.05).execute("SELECT count(*) FROM pushes").fetchall()
            _push(log, audience=[1])
    with RecipientLog(tmp_path) as log:
        assert len(log.pushes()) == 1


# -- audit trail ------------------------------------------------------------------

def test_audit_entries_are_hash_chained(log):
    h0 = log.audit("report", actor="C-0001", alert_id="A", radius_km=None, count=0,
                   at=T0, detail={"lat": 31.23, "lon": 121.47, "division": "310101"})
    h1 = log.audit("approve", actor="P-0001", alert_id="A", at=T0 + dt.timedelta(minutes=3))
    h2 = log.audit("alert", actor="engine", alert_id="B", radius_km=100.0, count=12345)
    entries = log.audit_entries()
    assert [e["hash"] for e in entries] == [h0, h1, h2]
    assert [e["prev_hash"] for e in entries] == ["0" * 64, h0, h1]
    assert entries[0]["at"] == "2026-03-01T08:00:00.000000+00:00"
    assert entries[0]["detail"] == {"lat": 31.23, "lon": 121.47, "division": "310101"}
    assert (entries[2]["radius_km"], entries[2]["count"], entries[2]["actor"]) == (100.0, 12345, "engine")
    assert [e["seq"] for e in log.audit_entries("A")] == [0, 1]
    assert log.audit_entries("C") == []
    log.verify()


@pytest.fixture
def audited(tmp_path):
    with RecipientLog(tmp_path) as log:
        for i in range(4):
            log.audit("tick", actor="engine", alert_id="A", radius_km=100.0 * i, count=i, at=T0)
    return str(tmp_path / FILENAME)


def _rehash(conn, seq):
    """What a careful forger does: recompute the edited entry's own hash."""
    from geotarget.log import _audit_hash
    row = conn.execute("SELECT seq, at, actor, action, alert_id, radius_km, count, detail, prev_hash "
                       "FROM audit WHERE seq=?", (seq,)).fetchone()
    entry = dict(zip(["seq", "at", "actor", "action", "alert_id", "radius_km", "count"], row[:7]))
    entry["detail"] = None if row[7] is None else json.loads(row[7])
    conn.execute("UPDATE audit SET hash=? WHERE seq=?", (_audit_hash(row[8], entry), seq))


@pytest.mark.parametrize("tamper, where", [
    ("UPDATE audit SET count=99 WHERE seq=1", "audit entry 1"),
    ("UPDATE audit SET actor='someone-else' WHERE seq=2", "audit entry 2"),
    ("UPDATE audit SET at='2025-01-01T00:00:00.000000+00:00' WHERE seq=0", "audit entry 0"),
    ("DELETE FROM audit WHERE seq=1", "audit entry 2"),
    ("rehash:UPDATE audit SET count=99 WHERE seq=1", "audit entry 2"),
])
def test_audit_tampering_is_detected(audited, tamper, where):
    conn = _raw(audited)
    rehash = tamper.startswith("rehash:")
    conn.execute(tamper.removeprefix("rehash:"))
    if rehash:
        _rehash(conn, 1)
    conn.close()
    with RecipientLog(audited) as log:
        with pytest.raises(CorruptFileError, match=where):
            log.verify()
        with pytest.raises(CorruptFileError, match=where):
            log.audit_entries()


# -- push tampering -----------------------------------------------------------------

@pytest.fixture
def logged(tmp_path):
    with RecipientLog(tmp_path) as log:
        _push(log, audience=range(0, 5000, 3))
        _push(log, seq=1, kind="expand", audience=range(10_000, 20_000))
        _push(log, seq=2, kind="expand", audience=[40_000, 40_001])
        log.ack("A.0")
    return str(tmp_path / FILENAME)


def _flip_blob_byte(blob, i):
    b = bytearray(blob)
    b[i % len(b)] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("byte", [0, 5, 17, -1])
def test_an_edited_bitmap_is_never_returned(logged, byte):
    conn = _raw(logged)
    blob = conn.execute("SELECT bitmap FROM audiences WHERE log_seq=2").fetchone()[0]
    conn.execute("UPDATE audiences SET bitmap=? WHERE log_seq=2", (_flip_blob_byte(blob, byte),))
    conn.close()
    with RecipientLog(logged) as log:
        assert log.push("A.0").audience == BitMap(range(0, 5000, 3))
        with pytest.raises(CorruptFileError, match="'A.1'.*SHA-256"):
            log.push("A.1")
        with pytest.raises(CorruptFileError, match="'A.1'"):
            log.notified("A")
        with pytest.raises(CorruptFileError, match="'A.1'"):
            log.verify()


def test_the_notified_set_is_read_once_and_kept_verified(where):
    """Audiences are read, hashed and decoded when an alert's ring rows change, not on every call:
    bytes changed on disk after that cannot change an answer, and verify() still finds them."""
    with RecipientLog(where) as log:
        _push(log, audience=range(0, 5000, 3))
        _push(log, seq=1, kind="expand", audience=range(10_000, 20_000))
        want = BitMap(range(0, 5000, 3)) | BitMap(range(10_000, 20_000))
        assert log.notified("A") == want
        got = log.notified("A")
        got.add(7)                                    # a copy: the caller may change it
        assert log.notified("A") == want
        with log._guard() as conn:                    # one audience edited behind the log's back
            blob = conn.execute("SELECT bitmap FROM audiences WHERE log_seq=2").fetchone()[0]
            conn.execute("BEGIN")
            conn.execute("UPDATE audiences SET bitmap=? WHERE log_seq=2", (BitMap([1, 2]).serialize(),))
            conn.execute("COMMIT")
        assert log.notified("A") == want and bytes(blob) != BitMap([1, 2]).serialize()
        # ... the next ring is still checked against the devices really notified
        with pytest.raises(AlertStateError, match="already notified"):
            _push(log, seq=2, kind="expand", audience=[10_001])
        with pytest.raises(CorruptFileError, match="SHA-256"):
            log.verify()
        # a record edit is seen at once: every record's checksum is checked on every call
        with log._guard() as conn:
            conn.execute("BEGIN")
            conn.execute("UPDATE pushes SET radius_km=900 WHERE push_id='A.1'")
            conn.execute("COMMIT")
        with pytest.raises(CorruptFileError, match="checksum"):
            log.notified("A")


def test_a_leader_that_wakes_sees_the_rings_another_logged(pg_url):
    with RecipientLog(pg_url) as first, RecipientLog(pg_url, standby=True) as second:
        _push(first, audience=[1, 2])
        assert first.notified("A") == BitMap([1, 2])
        first.step_down()
        assert second.take_lease(timeout=5)
        _push(second, seq=1, kind="expand", audience=[3])
        second.step_down()
        assert first.take_lease(timeout=5)
        assert first.notified("A") == BitMap([1, 2, 3])
        with pytest.raises(AlertStateError, match="already notified"):
            _push(first, seq=2, kind="expand", audience=[3, 4])
        _push(first, seq=2, kind="expand", audience=[4])
        assert first.notified("A") == second.notified("A") == BitMap([1, 2, 3, 4])


@pytest.mark.parametrize("sql, match", [
    ("UPDATE pushes SET count=count+1 WHERE push_id='A.1'", "checksum"),
    ("UPDATE pushes SET radius_km=500 WHERE push_id='A.1'", "checksum"),
    ("UPDATE pushes SET kind='topup' WHERE push_id='A.1'", "checksum"),
    ("UPDATE pushes SET meta='{}' WHERE push_id='A.1'", "checksum"),
    ("UPDATE pushes SET acked_at='2026-03-01T00:00:00.000000+00:00' WHERE push_id='A.1'", "state"),
    ("UPDATE pushes SET acked_at=NULL WHERE push_id='A.0'", "state"),
    ("UPDATE pushes SET purged_at='2026-03-01T00:00:00.000000+00:00' WHERE push_id='A.1'", "state"),
])
def test_an_edited_push_row_is_never_returned(logged, sql, match):
    conn = _raw(logged)
    conn.execute(sql)
    conn.close()
    with RecipientLog(logged) as log:
        with pytest.raises(CorruptFileError, match=match):
            log.unacked()
        with pytest.raises(CorruptFileError, match=match):
            log.pushes()
        with pytest.raises(CorruptFileError):
            log.verify()


def test_swapped_audiences_are_detected(logged):
    conn = _raw(logged)
    conn.execute("UPDATE audiences SET log_seq=-log_seq WHERE log_seq IN (1, 3)")
    conn.execute("UPDATE audiences SET log_seq=4-(-log_seq) WHERE log_seq<0")
    conn.close()
    with RecipientLog(logged) as log:
        with pytest.raises(CorruptFileError, match="'A.0'"):
            log.push("A.0")
        with pytest.raises(CorruptFileError):
            log.verify()


@pytest.mark.parametrize("sql, match", [
    ("DELETE FROM pushes WHERE push_id='A.1'", "chain"),
    ("DELETE FROM audiences WHERE log_seq=3", "missing"),
    ("INSERT INTO audiences VALUES(9, x'00')", "belong to no"),
])
def test_missing_or_extra_rows_are_detected_by_verify(logged, sql, match):
    conn = _raw(logged)
    conn.execute(sql)
    conn.close()
    with RecipientLog(logged) as log:
        with pytest.raises(CorruptFileError, match=match):
            log.verify()


def test_an_edited_alert_record_is_detected(tmp_path):
    with RecipientLog(tmp_path) as log:
        log.save_alert("A", {"status": "open"})
    conn = _raw(str(tmp_path / FILENAME))
    conn.execute("""UPDATE alerts SET record='{"status":"closed"}'""")
    conn.close()
    with RecipientLog(tmp_path) as log:
        with pytest.raises(CorruptFileError, match="alert record 'A'"):
            log.alert("A")
        with pytest.raises(CorruptFileError, match="alert record 'A'"):
            log.verify()


# -- files that are not (or no longer) a log ---------------------------------------------

def test_an_unknown_schema_version_is_refused(tmp_path):
    RecipientLog(tmp_path).close()
    conn = _raw(str(tmp_path / FILENAME))
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(CorruptFileError, match=f"schema version {SCHEMA_VERSION + 1}"):
        RecipientLog(tmp_path)


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    conn = _raw(str(other))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(x)")
    conn.close()
    with pytest.raises(CorruptFileError, match="application id"):
        RecipientLog(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"definitely not a database" * 100)
    with pytest.raises(CorruptFileError, match="not a recipient log"):
        RecipientLog(junk)
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="0 bytes"):
        RecipientLog(empty)


def test_a_changed_schema_is_refused(tmp_path):
    RecipientLog(tmp_path).close()
    conn = _raw(str(tmp_path / FILENAME))
    conn.execute("CREATE INDEX extra ON pushes(kind)")
    conn.close()
    with pytest.raises(CorruptFileError, match="schema"):
        RecipientLog(tmp_path)


def test_a_missing_directory_is_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        RecipientLog(tmp_path / "no" / "such" / "log.sqlite")
    with pytest.raises(InvalidInputError, match="path"):
        RecipientLog(42)


# -- retention ----------------------------------------------------------------------

def _closed_alert(log, alert="A"):
    _push(log, alert=alert, audience=range(0, 3000, 7))
    _push(log, alert=alert, seq=1, kind="expand", audience=[1_000_003, 1_000_011])
    want = BitMap(range(0, 3000, 7)) | BitMap([1_000_003, 1_000_011])
    _push(log, alert=alert, seq=2, kind="closure", audience=want)
    return want


def test_purging_needs_a_closed_and_fully_acknowledged_alert(log):
    _push(log, audience=[1, 2])
    with pytest.raises(AlertStateError, match="not closed"):
        log.purge_audiences("A")
    _push(log, seq=1, kind="retraction", audience=[1, 2])
    log.ack("A.0")
    with pytest.raises(AlertStateError, match=r"unacknowledged pushes \['A.1'\]"):
        log.purge_audiences("A")
    log.ack("A.1")
    assert log.purge_audiences("A") == 2
    assert log.purge_audiences("A") == 0
    with pytest.raises(UnknownAlertError):
        log.purge_audiences("Z")


def test_purged_audiences_are_gone_but_counts_and_audit_stay(where):
    with RecipientLog(where) as log:
        want = _closed_alert(log)
        keep = _closed_alert(log, alert="B")
        for p in log.unacked():
            log.ack(p.push_id)
        assert log.purge_audiences("A", actor="retention-job") == 3
        with pytest.raises(AlertStateError, match="purged"):
            log.push("A.1")
        with pytest.raises(AlertStateError, match="purged"):
            log.notified("A")
        with pytest.raises(AlertStateError, match="purged"):
            log.pushes("A")
        with pytest.raises(AlertStateError, match="purged"):
            _push(log, seq=3, kind="update", audience=want)
        summary = log.pushes("A", audiences=False)
        assert [(p.seq, p.count, p.purged, p.audience) for p in summary] == [
            (0, 429, True, None), (1, 2, True, None), (2, 431, True, None)]
        assert log.notified("B") == keep
        entry = log.audit_entries("A")[-1]
        assert (entry["action"], entry["actor"], entry["count"]) == ("purge_audiences", "retention-job", 862)
        assert log.stats()["purged"] == 3
        log.verify()
    with RecipientLog(where) as log:
        log.verify()
        with pytest.raises(AlertStateError, match="purged"):
            log.push("A.0")


def test_purged_keys_leave_the_file(tmp_path):
    # A recognisable, incompressible audience: its serialised bytes must not survive.
    rng = np.random.default_rng(7)
    aud = BitMap(rng.choice(1 << 20, 3000, replace=False).astype(np.uint32))
    with RecipientLog(tmp_path) as log:
        _push(log, audience=aud)
        _push(log, seq=1, kind="closure", audience=aud)
        log.ack("A.0")
        log.ack("A.1")
        blob = aud.serialize()
        raw = open(tmp_path / FILENAME, "rb").read() + open(str(tmp_path / FILENAME) + "-wal", "rb").read()
        assert blob[-200:] in raw
        log.purge_audiences("A")
        assert os.path.getsize(log.path + "-wal") == 0  # old frames held the keys too
        raw = open(tmp_path / FILENAME, "rb").read()
        assert blob[-200:] not in raw and blob[:200] not in raw
    raw = open(tmp_path / FILENAME, "rb").read()
    assert blob[-200:] not in raw and blob[:200] not in raw


def test_stats(log):
    _push(log, audience=range(1_000_000))
    s = log.stats()
    assert s["pushes"] == 1 and s["recipients_logged"] == 1_000_000
    assert 0 < s["audience_bytes"] < 1000  # 16 containers of one run each, not 4 MB of keys
    assert s["bytes_on_disk"] >= s["audience_bytes"]
    assert s["bytes_per_recipient"] == s["bytes_on_disk"] / 1_000_000


# -- the WAL checksum -----------------------------------------------------------------

@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("page_size", [512, 4096])
def test_vectorised_wal_checksum_matches_the_reference(big_endian, page_size):
    rng = np.random.default_rng(page_size + big_endian)
    frames = rng.integers(0, 256, (5, 24 + page_size), dtype=np.uint8)
    seeds = rng.integers(0, 2**32, (5, 2), dtype=np.uint64)
    got = _frame_checksums(frames, seeds, big_endian)
    for f in range(5):
        data = frames[f, :8].tobytes() + frames[f, 24:].tobytes()
        assert tuple(int(v) for v in got[f]) == _wal_checksum_py(data, int(seeds[f, 0]),
                                                                 int(seeds[f, 1]), big_endian)


def test_sqlite_written_wal_frames_validate(tmp_path):
    with RecipientLog(tmp_path) as log:
        for s in range(5):
            _push(log, seq=s, kind="alert" if s == 0 else "expand", audience=range(s * 10_000, s * 10_000 + 999, 2))
        data = open(log.path + "-wal", "rb").read()
        magic, _, page_size, _, _, _, h1, h2 = struct.unpack(">8I", data[:32])
        nframes = (len(data) - 32) // (24 + page_size)
        frames = np.frombuffer(data, np.uint8, nframes * (24 + page_size), 32).reshape(nframes, -1)
        stored = frames[:, 16:24].copy().view(">u4").astype(np.uint64)
        seeds = np.vstack([[h1, h2], stored[:-1]]).astype(np.uint64)
        assert nframes > 5
        np.testing.assert_array_equal(_frame_checksums(frames, seeds, bool(magic & 1)), stored)


# -- state machine ------------------------------------------------------------------------

ALERTS = ("A", "B", "C", "D")
keysets = st.sets(st.integers(0, 120), max_size=25).map(BitMap)


class LogMachine(RuleBasedStateMachine):
    """The log side by side with dicts and sets, across reopen."""

    @initialize()
    def start(self):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="logsm-")
        self.log = RecipientLog(self.dir)
        self.pushes = {}          # push_id -> dict of fields
        self.order = []           # log order
        self.acked = set()
        self.purged = set()       # alert ids
        self.alerts = {}
        self.audit = []
        self.counter = 0

    def teardown(self):
        import shutil
        if hasattr(self, "log"):
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers
    def _of(self, alert):
        return [p for p in (self.pushes[i] for i in self.order) if p["alert_id"] == alert]

    def _notified(self, alert):
        out = BitMap()
        for p in self._of(alert):
            if p["kind"] in ("alert", "expand", "topup"):
                out |= p["audience"]
        return out

    def _args(self, alert, kind, audience, seq=None):
        self.counter += 1
        return dict(push_id=f"p{self.counter}", alert_id=alert,
                    seq=len(self._of(alert)) if seq is None else seq, kind=kind,
                    radius_km=float(self.counter % 7) * 50.0,
                    created_at=T0 + dt.timedelta(seconds=self.counter), audience=audience,
                    meta={"n": self.counter})

    def _record(self, args):
        self.pushes[args["push_id"]] = dict(args, audience=BitMap(args["audience"]))
        self.order.append(args["push_id"])

    # -- rules
    @rule(alert=st.sampled_from(ALERTS), kind=st.sampled_from(["alert", "expand", "topup"]), keys=keysets)
    def append_new_devices(self, alert, kind, keys):
        args = self._args(alert, kind, keys - self._notified(alert) if alert not in self.purged else keys)
        if alert in self.purged:
            with pytest.raises(AlertStateError, match="purged"):
                self.log.append_push(**args)
            return
        rec = self.log.append_push(**args)
        assert rec.audience == args["audience"] and rec.seq == args["seq"]
        self._record(args)

    @rule(alert=st.sampled_from(ALERTS), kind=st.sampled_from(["update", "closure", "retraction"]))
    def append_follow_up(self, alert, kind):
        assume(alert not in self.purged)
        args = self._args(alert, kind, self._notified(alert))
        self.log.append_push(**args)
        self._record(args)

    @rule(alert=st.sampled_from(ALERTS), keys=keysets)
    def overlap_is_refused(self, alert, keys):
        notified = self._notified(alert)
        assume(alert not in self.purged and len(notified) and len(keys - notified))
        bad = (keys - notified) | BitMap([notified.min()])
        with pytest.raises(AlertStateError):
            self.log.append_push(**self._args(alert, "expand", bad))

    @rule(alert=st.sampled_from(ALERTS), delta=st.sampled_from([-1, 1, 2]))
    def wrong_seq_is_refused(self, alert, delta):
        args = self._args(alert, "expand", BitMap([10_000 + self.counter]))
        args["seq"] += delta
        assume(args["seq"] >= 0)
        with pytest.raises(AlertStateError, match="seq"):
            self.log.append_push(**args)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def reappend(self, data):
        pid = data.draw(st.sampled_from(self.order))
        args = dict(self.pushes[pid])
        if args["alert_id"] in self.purged:
            with pytest.raises(AlertStateError, match="purged"):
                self.log.append_push(**args)
            return
        if data.draw(st.booleans()):
            rec = self.log.append_push(**args)
            assert rec.audience == args["audience"] and rec.acked == (pid in self.acked)
        else:
            args["radius_km"] += 1.0
            with pytest.raises(AlertStateError, match="radius_km"):
                self.log.append_push(**args)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def ack(self, data):
        pid = data.draw(st.sampled_from(self.order))
        assert self.log.ack(pid) == (pid not in self.acked)
        self.acked.add(pid)

    @rule(alert=st.sampled_from(ALERTS))
    def ack_all_of(self, alert):
        for p in self._of(alert):
            assert self.log.ack(p["push_id"]) == (p["push_id"] not in self.acked)
            self.acked.add(p["push_id"])

    @rule(alert=st.sampled_from(ALERTS), status=st.sampled_from(["open", "closed", "pending"]))
    def save_alert(self, alert, status):
        rec = {"status": status, "n": self.counter, "lat": 31.2}
        self.log.save_alert(alert, rec)
        self.alerts[alert] = rec

    @rule(alert=st.one_of(st.none(), st.sampled_from(ALERTS)), count=st.integers(0, 10**9))
    def audit(self, alert, count):
        self.log.audit("tick", actor="engine", alert_id=alert, count=count, detail={"c": count})
        self.audit.append(("tick", alert, count))

    @rule(alert=st.sampled_from(ALERTS))
    def purge(self, alert):
        mine = self._of(alert)
        if not mine and alert not in self.alerts:
            with pytest.raises(UnknownAlertError):
                self.log.purge_audiences(alert)
            return
        if not any(p["kind"] in ("closure", "retraction") for p in mine) or any(
                p["push_id"] not in self.acked for p in mine):
            with pytest.raises(AlertStateError):
                self.log.purge_audiences(alert)
            return
        n = self.log.purge_audiences(alert)
        assert n == (0 if alert in self.purged else len(mine))
        if alert not in self.purged:
            self.audit.append(("purge_audiences", alert, sum(len(p["audience"]) for p in mine)))
        self.purged.add(alert)

    @rule(alert=st.sampled_from(ALERTS))
    def close_acknowledge_and_purge(self, alert):
        assume(alert not in self.purged and self._of(alert))
        self.append_follow_up(alert, "closure")
        self.ack_all_of(alert)
        self.purge(alert)
        assert alert in self.purged

    @rule(alert=st.sampled_from(ALERTS), keys=keysets)
    def rolled_back_transaction(self, alert, keys):
        assume(alert not in self.purged)
        with pytest.raises(KeyError):
            with self.log.transaction():
                self.log.append_push(**self._args(alert, "topup", keys - self._notified(alert)))
                self.log.save_alert(alert, {"status": "never"})
                self.log.audit("never", actor="x")
                if self.order:
                    self.log.ack(self.order[-1])
                raise KeyError("abort")

    @rule(alert=st.sampled_from(ALERTS), keys=keysets)
    def committed_transaction(self, alert, keys):
        assume(alert not in self.purged)
        with self.log.transaction():
            args = self._args(alert, "topup", keys - self._notified(alert))
            self.log.append_push(**args)
            self.log.save_alert(alert, {"status": "grouped"})
            self.log.audit("topup", actor="engine", alert_id=alert, count=len(args["audience"]))
        self._record(args)
        self.alerts[alert] = {"status": "grouped"}
        self.audit.append(("topup", alert, len(args["audience"])))

    @rule()
    def reopen(self):
        self.log.close()
        self.log = RecipientLog(self.dir)

    # -- the model must match after every step
    @invariant()
    def matches_the_model(self):
        if not hasattr(self, "log"):
            return
        log = self.log
        by_alert = sorted(self.order, key=lambda i: (self.pushes[i]["alert_id"], self.pushes[i]["seq"]))
        got = log.pushes(audiences=False)
        assert [(p.push_id, p.alert_id, p.seq, p.kind, p.radius_km, p.created_at, p.meta, p.acked,
                 p.count, p.purged) for p in got] == [
            (i, m["alert_id"], m["seq"], m["kind"], m["radius_km"], m["created_at"], m["meta"],
             i in self.acked, len(m["audience"]), m["alert_id"] in self.purged)
            for i in by_alert for m in [self.pushes[i]]]
        for alert in ALERTS:
            if alert in self.purged:
                continue
            assert [p.audience for p in (log.pushes(alert) if self._of(alert) or alert in self.alerts
                                         else [])] == [p["audience"] for p in self._of(alert)]
            if self._of(alert) or alert in self.alerts:
                assert log.notified(alert) == self._notified(alert)
        assert [p.push_id for p in log.unacked()] == [i for i in self.order if i not in self.acked]
        assert log.alerts() == self.alerts
        assert [(e["action"], e["alert_id"], e["count"]) for e in log.audit_entries()] == self.audit
        log.verify()


LogMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.filter_too_much])
test_log_state_machine = LogMachine.TestCase


def test_nothing_is_logged_after_a_purge_even_without_ring_pushes(tmp_path):
    """Regression (found by the state machine): an alert whose only push was an update, closed,
    acknowledged and purged, took a new empty 'alert' push because no ring row was purged."""
    with RecipientLog(tmp_path / "p.sqlite") as log:
        common = dict(radius_km=100.0, meta={})
        log.append_push(push_id="u", alert_id="D", seq=0, kind="update", created_at=T0,
                        audience=BitMap(), **common)
        log.append_push(push_id="c", alert_id="D", seq=1, kind="closure", created_at=T0,
                        audience=BitMap(), **common)
        log.ack("u")
        log.ack("c")
        assert log.purge_audiences("D") == 2
        with pytest.raises(AlertStateError, match="purged"):
            log.append_push(push_id="a", alert_id="D", seq=2, kind="alert", created_at=T0,
                            audience=BitMap(), **common)


# -- the PostgreSQL backend: lease, fencing, copies between backends -----------

def test_a_second_owner_of_a_postgresql_log_is_refused_until_the_lease_is_free(pg_url):
    with RecipientLog(pg_url) as log:
        _push(log, audience=[1])
        with pytest.raises(InvalidInputError, match="held by another"):
            RecipientLog(pg_url, timeout=0.05)
        r = _other_process(pg_url, "print('opened')")
        assert r.returncode == 3 and "held by another process" in r.stdout
    # closing released the lease: the next owner gets in at once, and sees the push
    r = _other_process(pg_url, "print([p.push_id for p in log.pushes()])")
    assert r.returncode == 0 and "['A.0']" in r.stdout, r.stdout + r.stderr


def _other_process(url, code):
    """Run ``code`` with ``log`` open on ``url`` in another process (as another host would)."""
    import subprocess
    import sys

    script = ("import sys, datetime as dt\nfrom pyroaring import BitMap\nfrom geotarget.log import RecipientLog\n"
              "try:\n    log = RecipientLog(sys.argv[1], timeout=0.2)\n"
              "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n"
              "with log:\n" + "".join(f"    {line}\n" for line in code.splitlines()))
    import tempfile

    import geotarget

    # The package under test, wherever it is installed, run from outside the checkout: `-c` puts
    # the working directory first on sys.path, and a CI checkout's sources are unbuilt.
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(geotarget.__file__))))
    return subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tempfile.gettempdir())


def test_a_deposed_owner_cannot_write_after_its_lease_was_taken_over(pg_url):
    import psycopg

    from geotarget.errors import LeaseLostError

    log = RecipientLog(pg_url, lease=30)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        _push(log, audience=[1, 2])
        # while the lease is live another process is refused
        r = _other_process(pg_url, "print('opened')")
        assert r.returncode == 3 and "InvalidInputError" in r.stdout and "held by another process" in r.stdout
        # the owner stalls past its lease (its heartbeat stops, and its 30 s pass: moved here by
        # the clock in the row)
        log._conn.stop_heartbeat()
        admin.execute("UPDATE owner SET expires_at = now() - interval '1 second'")
        # a standby process takes over and writes
        r = _other_process(pg_url, "assert [p.push_id for p in log.unacked()] == ['A.0']\n"
                                   "log.append_push(push_id='A.1', alert_id='A', seq=1, kind='expand', "
                                   "radius_km=100.0, created_at=dt.datetime.now(dt.timezone.utc), "
                                   "audience=BitMap([3]), meta={})\nprint('pushed')")
        assert r.returncode == 0 and "pushed" in r.stdout, r.stdout + r.stderr
        # the deposed owner's late writes fail, typed, and change nothing
        with pytest.raises(LeaseLostError, match="no longer holds"):
            _push(log, seq=1, kind="expand", audience=[4])
        # ... and from then on it is a standby, which writes nothing until it takes the lease again
        assert not log.leader
        for write in (lambda: _push(log, seq=1, kind="expand", audience=[4]), lambda: log.ack("A.0"),
                      lambda: log.save_alert("A", {"x": 1}), lambda: log.audit("x", actor="old")):
            with pytest.raises(LeaseLostError, match="standby and does not hold"):
                write()
        assert [p.push_id for p in log.pushes()] == ["A.0", "A.1"]  # reads still work
        assert not log.push("A.0").acked and log.alerts() == {} and log.audit_entries() == []
        assert admin.execute("SELECT count(*) FROM pushes").fetchone()[0] == 2
        log.verify()
    finally:
        log.close()
        admin.close()


def test_a_standby_reads_the_leaders_log_and_writes_nothing(pg_url, tmp_path):
    from geotarget.errors import LeaseLostError

    with RecipientLog(pg_url) as leader, RecipientLog(pg_url, standby=True) as standby:
        _push(leader, audience=[1, 2])
        leader.audit("alert", actor="engine", alert_id="A", count=2)
        assert leader.leader and leader.term == 1 and not standby.leader and standby.term is None
        # reads see what the leader committed
        assert [p.push_id for p in standby.pushes()] == ["A.0"] and standby.notified("A") == BitMap([1, 2])
        assert standby.verify()["keyed"] == leader.verify()["keyed"]
        assert standby.audit_entries() == leader.audit_entries() and standby.stats() == leader.stats()
        _push(leader, seq=1, kind="expand", audience=[3])
        assert standby.notified("A") == BitMap([1, 2, 3])
        # every write is refused, typed, and changes nothing
        before = (leader.stats(), leader.anchor())
        for write in (lambda: _push(standby, seq=2, kind="expand", audience=[4]), lambda: standby.ack("A.0"),
                      lambda: standby.save_alert("B", {"x": 1}, new=True),
                      lambda: standby.audit("x", actor="standby"), lambda: standby.set_meta_value("n", "1"),
                      lambda: standby.purge_audiences("A")):
            with pytest.raises(LeaseLostError, match="standby"):
                write()
        assert (leader.stats(), leader.anchor()) == before
        # a live leader keeps the lease: the standby's bounded wait ends without it
        assert standby.take_lease(timeout=0.3) is False and not standby.leader
    # a SQLite log has no standbys
    with pytest.raises(InvalidInputError, match="postgresql"):
        RecipientLog(tmp_path, standby=True)
    with RecipientLog(tmp_path) as log:
        assert log.leader and log.term is None
        with pytest.raises(InvalidInputError, match="postgresql"):
            log.take_lease(0)
        with pytest.raises(InvalidInputError, match="timeout"):
            log.take_lease(-1)


def test_a_standby_takes_over_as_soon_as_the_leader_process_dies(pg_url):
    import signal
    import subprocess
    import sys
    import time

    import geotarget

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(geotarget.__file__))))
    code = ("import sys, time\nfrom geotarget.log import RecipientLog\n"
            "log = RecipientLog(sys.argv[1], lease=60)\nprint('leading', flush=True)\ntime.sleep(600)\n")
    import tempfile

    proc = subprocess.Popen([sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=tempfile.gettempdir())
    try:
        assert proc.stdout.readline().strip() == "leading"
        with RecipientLog(pg_url, standby=True, lease=60) as standby:
            assert standby.take_lease(timeout=0.5) is False     # alive, lease 60 s
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t0 = time.monotonic()
            assert standby.take_lease(timeout=30) is True
            # not the 60 s lease: its database session ended with it
            assert time.monotonic() - t0 < 5
            assert standby.leader and standby.term == 2
            _push(standby, audience=[1])
            with standby._guard() as conn:
                terms = conn.execute("SELECT term, reason, first_log_seq FROM leases ORDER BY term").fetchall()
            assert [t[0] for t in terms] == [1, 2] and "session" in terms[1][1] and terms[1][2] == 1
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_idle_leader_keeps_its_lease_and_can_hand_it_over(pg_url):
    import time

    from geotarget.errors import LeaseLostError

    with RecipientLog(pg_url, lease=1.0) as leader, RecipientLog(pg_url, standby=True, lease=1.0) as standby:
        _push(leader, audience=[1])
        time.sleep(2.5)                       # no writes for 2.5 leases: the heartbeat renewed it
        assert leader.leader and standby.take_lease(timeout=0) is False
        leader.step_down()                    # a planned hand-over
        assert not leader.leader
        assert standby.take_lease(timeout=5) is True and standby.term == 2
        _push(standby, seq=1, kind="expand", audience=[2])
        with pytest.raises(LeaseLostError, match="standby"):
            _push(leader, seq=2, kind="expand", audience=[3])
        assert [p.push_id for p in leader.pushes()] == ["A.0", "A.1"]


def test_a_foreign_postgresql_schema_is_refused_and_left_alone(pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("CREATE TABLE invoices(id bigint)")
        with pytest.raises(CorruptFileError, match="no recipient log"):
            RecipientLog(pg_url)
        tables = other.execute("SELECT table_name FROM information_schema.tables "
                               "WHERE table_schema = current_schema()").fetchall()
        assert tables == [("invoices",)]
        # a log whose schema marker is not this version's is refused too
        other.execute("DROP TABLE invoices")
    RecipientLog(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("COMMENT ON TABLE log_meta IS 'geotarget recipient log, schema 1'")
    with pytest.raises(CorruptFileError, match="schema 1"):
        RecipientLog(pg_url)


def test_lease_must_be_positive(where):
    for bad in (0, -1, True, "10", float("nan")):
        with pytest.raises(InvalidInputError, match="lease"):
            RecipientLog(where, lease=bad)


def _busy_log(log):
    log.save_alert("A", {"next_seq": 3}, new=True)
    want = _closed_alert(log)
    _push(log, alert="B", audience=[7, 8, 9])
    log.ack("A.0")
    log.bind_lineage("lineage-1")
    log.set_meta_value("alert_counter", "2")
    log.audit("alert", actor="engine", alert_id="A", count=len(want), radius_km=100.0, detail={"n": 1})
    log.audit("expand", actor="engine", alert_id="B", count=3)
    return want


@pytest.mark.parametrize("direction", ["sqlite->postgresql", "postgresql->sqlite"])
def test_log_copy_moves_a_log_between_backends(tmp_path, pg_url, direction, monkeypatch):
    monkeypatch.setenv("GEOTARGET_LOG_KEY", "k" * 32)
    src, dst = (str(tmp_path / "src.sqlite"), pg_url) if direction.startswith("sqlite") else (
        pg_url, str(tmp_path / "dst.sqlite"))
    with RecipientLog(src) as log:
        want = _busy_log(log)
        before = (log.pushes(), log.unacked(), log.audit_entries(), log.alerts(), log.instance_id,
                  log.anchor(), log.lineage(), log.meta_value("alert_counter"))
        copied = log.copy_to(dst)
        with pytest.raises(InvalidInputError, match="never overwrite"):
            log.copy_to(dst)
    assert copied == (dst if dst.endswith(".sqlite") else copied)
    with RecipientLog(dst) as copy:
        assert copy.authenticated and copy.verify(anchor=before[5]["text"])["anchored"]
        after = (copy.pushes(), copy.unacked(), copy.audit_entries(), copy.alerts(), copy.instance_id,
                 copy.anchor(), copy.lineage(), copy.meta_value("alert_counter"))
        assert after == before and copy.notified("A") == want
        # the copy is a working log: it takes the next push of the chain
        _push(copy, alert="B", seq=1, kind="closure", audience=[7, 8, 9])
        copy.verify()


def test_log_copy_on_the_command_line(tmp_path, pg_url, capsys):
    from geotarget.cli import main

    src = str(tmp_path / "a.sqlite")
    with RecipientLog(src) as log:
        _busy_log(log)
    assert main(["log", "copy", src, pg_url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["pushes"] == 4
    # every --log takes the URL: verify the copy where it lives
    assert main(["audit", "verify", "--log", pg_url]) == 0
    assert "4 pushes" in capsys.readouterr().out
    back = str(tmp_path / "back.sqlite")
    assert main(["log", "copy", pg_url, back]) == 0
    assert "4 pushes" in capsys.readouterr().out
    with RecipientLog(src) as a, RecipientLog(back) as b:
        assert a.pushes() == b.pushes() and a.anchor() == b.anchor() and a.instance_id == b.instance_id
    # a destination that already holds a log is refused, and nothing changes
    assert main(["log", "copy", src, pg_url]) == 2
    assert "already holds a recipient log" in capsys.readouterr().err
