"""The engine under faults and hostile input, each situation built with real files and processes.

A full disk mid-tick, a poison alert record, two engines on one log, a lost
alert row, two logs, a main file copied without its WAL, a log edited and
re-checksummed by someone without the key, a truncated audit trail, a forged
officers file and a backdated clock.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import geotarget as gt
from geotarget.alerts import log as logmod
from geotarget.alerts.engine import AlertEngine, TickResult, officers_digest, register_officers
from geotarget.errors import (AlertStateError, CorruptFileError, InvalidInputError,
                              UnauthorizedError)

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HZ = (30.27, 120.15)
OFFICERS = [
    gt.Officer("county-1", level="county", division="330102"),
    gt.Officer("city-1", level="city", division="330100"),
    gt.Officer("mps", level="ministry", division="000000"),
]
KEY = b"k" * 32
CENTRES = [(30.27, 120.15), (29.8, 119.68), (29.6, 119.0)]   # Shangcheng, Tonglu, Chun'an: all in Hangzhou
PKG_PARENT = str(Path(gt.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(3)
    n = 6000
    lat = HZ[0] + rng.uniform(-4, 4, n)
    lon = HZ[1] + rng.uniform(-4, 4, n)
    store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) + 7, lat, lon,
                                       last_seen=T0 - dt.timedelta(hours=1))
    return gt.SpatialIndex.build(store)


def engine(index, path, key=None, officers=OFFICERS):
    return AlertEngine(index, log=gt.RecipientLog(path, key=key), authority=gt.Authority(officers))


def report_three(eng, now=T0):
    return [eng.report("city-1", lat=la, lon=lo, division="330100", missing_since=now, now=now).id
            for la, lo in CENTRES]


# -- a full disk in the middle of a tick --------------------------------------------------

def test_enospc_on_the_second_of_three_pushes_strands_nothing(world, tmp_path):
    """The 2nd push's commit fails in the kernel (RLIMIT_FSIZE: a real EFBIG from the WAL write,
    as a full disk gives ENOSPC); the 1st and 3rd go out, the 2nd alert is retried by the next tick."""
    eng = engine(world, tmp_path / "log")
    ids = report_three(eng)
    real_append = eng.log.append_push
    calls = []
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def append_on_a_full_disk(**kw):
        calls.append(kw["push_id"])
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        if len(calls) == 2:
            # The WAL grows at its end when the push's transaction commits: its
            # next frame crosses the limit.
            limit = os.path.getsize(eng.log.path + "-wal")
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
        return real_append(**kw)

    def restore():
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)

    eng.log.append_push = append_on_a_full_disk
    now = T0 + dt.timedelta(minutes=10)
    try:
        first = eng.tick(now)
    finally:
        restore()
    assert isinstance(first, TickResult)
    assert [p.alert_id for p in first] == [ids[0], ids[2]]
    [failure] = first.errors
    assert failure.alert_id == ids[1] and not failure.quarantined
    assert isinstance(failure.exception, OSError) and "I/O error" in failure.error
    assert eng.alert(ids[1]).next_seq == 0  # the failed transaction left nothing behind
    second = eng.tick(now)
    assert [(p.alert_id, p.kind) for p in second] == [(ids[1], "alert")] and not second.errors
    # every logged push was offered exactly once, and the log agrees with the engine
    logged = {r.push_id for r in eng.log.pushes(audiences=False)}
    assert logged == {p.push_id for p in list(first) + list(second)}
    eng.verify()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path) -> None:
    """Write until the disk is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_on_the_second_of_three_pushes(world, small_disk):
    """The same situation with a real ENOSPC: the disk is filled just before the 2nd push."""
    eng = engine(world, small_disk / "log")
    ids = report_three(eng)
    real_append = eng.log.append_push
    calls = []
    filler = small_disk / "filler"

    def append(**kw):
        calls.append(kw["push_id"])
        if len(calls) == 2:
            _fill(filler)
        elif filler.exists():
            filler.unlink()
        return real_append(**kw)

    eng.log.append_push = append
    now = T0 + dt.timedelta(minutes=10)
    first = eng.tick(now)
    assert [p.alert_id for p in first] == [ids[0], ids[2]]
    [failure] = first.errors
    assert failure.alert_id == ids[1] and not failure.quarantined and isinstance(failure.exception, OSError)
    second = eng.tick(now)
    assert [(p.alert_id, p.kind) for p in second] == [(ids[1], "alert")] and not second.errors
    eng.verify()
    eng.shutdown()


def test_a_push_logged_by_a_failed_call_is_offered_by_the_next_tick(world, tmp_path):
    eng = engine(world, tmp_path / "log")
    [a, *_] = report_three(eng)
    eng.tick(T0 + dt.timedelta(minutes=5))
    real = eng._to_push
    state = {"fail": True}

    def to_push_once(rec, timings=None):
        if state.pop("fail", False):
            raise MemoryError("out of memory building the push")
        return real(rec, timings)

    eng._to_push = to_push_once
    with pytest.raises(MemoryError):
        eng.update(a, "city-1", {"headline": "Wearing a red coat"}, now=T0 + dt.timedelta(minutes=6))
    [logged] = [r for r in eng.log.pushes(a, audiences=False) if r.kind == "update"]
    offered = eng.tick(T0 + dt.timedelta(minutes=7))
    assert [p.push_id for p in offered] == [logged.push_id]
    assert eng.tick(T0 + dt.timedelta(minutes=7)) == []   # offered once within the process


# -- a poison alert --------------------------------------------------------------------

def test_poison_headline_is_quarantined_and_the_others_keep_going(world, tmp_path):
    path = tmp_path / "log"
    eng = engine(world, path)
    ids = report_three(eng)
    with pytest.raises(InvalidInputError, match="non-printable character U\\+000B"):
        eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0,
                   details={"headline": "bad\x0bline"})
    # A record written before texts were checked (the log API takes any JSON).
    rec = eng.log.alert(ids[1])
    rec["details"] = {"headline": "bad\x0bline"}
    eng.log.save_alert(ids[1], rec)
    eng.shutdown()
    eng = engine(world, path)
    now = T0 + dt.timedelta(minutes=10)
    out = eng.tick(now)
    assert sorted(p.alert_id for p in out) == sorted([ids[0], ids[2]])
    [failure] = out.errors
    assert failure.alert_id == ids[1] and failure.quarantined and "XML" in failure.error
    assert eng.alert(ids[1]).quarantine
    [entry] = [e for e in eng.log.audit_entries(ids[1]) if e["action"] == "quarantine"]
    assert "XML" in entry["detail"]["error"]
    # skipped from now on, without raising; the healthy alerts expand
    later = eng.tick(T0 + dt.timedelta(hours=1, minutes=30))
    assert {p.alert_id for p in later} == {ids[0], ids[2]} and not later.errors
    # an officer repairs the text: the alert is pushed again
    eng.update(ids[1], "city-1", {"headline": "Missing boy, 7"}, now=T0 + dt.timedelta(hours=1, minutes=31))
    assert eng.alert(ids[1]).quarantine is None
    repaired = eng.tick(T0 + dt.timedelta(hours=1, minutes=32))
    # the update went out first (to nobody yet), so the first ring follows it as an expansion
    assert [(p.alert_id, p.kind) for p in repaired] == [(ids[1], "expand")] and len(repaired[0]) > 0
    eng.shutdown()


def test_a_quarantined_poison_alert_can_be_retracted(world, tmp_path):
    path = tmp_path / "log"
    eng = engine(world, path)
    ids = report_three(eng)
    eng.tick(T0 + dt.timedelta(minutes=1))
    rec = eng.log.alert(ids[2])
    rec["details"] = {"headline": "bad\x0bline", "description": "blue coat"}
    eng.log.save_alert(ids[2], rec)
    eng.shutdown()
    eng = engine(world, path)
    assert eng.tick(T0 + dt.timedelta(hours=1, minutes=5)).errors[0].alert_id == ids[2]
    p = eng.retract(ids[2], "city-1", reason="duplicate report", now=T0 + dt.timedelta(hours=1, minutes=6))
    assert p.kind == "retraction" and "duplicate report" in p.cap_xml and "bad" not in p.cap_xml
    eng.shutdown()


def test_quarantine_is_persisted(world, tmp_path):
    path = tmp_path / "log"
    eng = engine(world, path)
    ids = report_three(eng)
    rec = eng.log.alert(ids[0])
    rec["details"] = {"description": "x\x00y"}
    eng.log.save_alert(ids[0], rec)
    eng.shutdown()
    eng = engine(world, path)
    assert eng.tick(T0 + dt.timedelta(minutes=1)).errors
    eng.shutdown()
    eng = engine(world, path)
    out = eng.tick(T0 + dt.timedelta(minutes=2))
    assert not out.errors and ids[0] not in {p.alert_id for p in out}


@pytest.mark.parametrize("details, match", [
    ({"headline": "x" * 161}, "'headline'\\] has 161 characters"),
    ({"description": "d" * (8 << 20)}, "'description'\\] has 8,388,608 characters"),
    ({"headline": "two\nlines"}, "U\\+000A"),
    ({"instruction": "call\u202e110"}, "U\\+202E"),
    ({"photo": b"\x89PNG"}, "must be a string"),
    ({"age": float("nan")}, "must be a string"),
    ({"": "x"}, "non-empty"),
])
def test_bad_texts_are_refused_at_report_and_update_and_change_nothing(world, tmp_path, details, match):
    eng = engine(world, tmp_path / "log")
    before = eng.log.stats()
    with pytest.raises(InvalidInputError, match=match):
        eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0,
                   details=details)
    assert eng.log.stats() == before and eng.alerts() == []
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0).id
    before = eng.log.stats()
    with pytest.raises(InvalidInputError, match=match):
        eng.update(a, "city-1", details, now=T0)
    assert eng.log.stats() == before


def test_multiline_description_in_chinese_is_accepted(world, tmp_path):
    eng = engine(world, tmp_path / "log")
    text = "身高120厘米，穿红色外套。\n最后出现在西湖边。\t请拨打110。"
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0,
                   details={"headline": "寻找走失儿童", "description": text})
    [p] = eng.tick(T0 + dt.timedelta(minutes=1))
    assert p.alert_id == a.id and "西湖" in p.cap_xml


# -- ids never reused ------------------------------------------------------------------

def test_two_engines_on_one_log_are_refused(world, tmp_path):
    log = gt.RecipientLog(tmp_path / "log")
    eng = AlertEngine(world, log=log, authority=gt.Authority(OFFICERS))
    with pytest.raises(InvalidInputError, match="already owned by another engine"):
        AlertEngine(world, log=log, authority=gt.Authority(OFFICERS))
    with pytest.raises(InvalidInputError, match="held by another RecipientLog in this process"):
        gt.RecipientLog(tmp_path / "log")
    eng.shutdown()
    AlertEngine(world, log=gt.RecipientLog(tmp_path / "log"), authority=gt.Authority(OFFICERS)).shutdown()


def test_a_second_process_cannot_own_the_log(world, tmp_path):
    eng = engine(world, tmp_path / "log")
    code = ("import sys, geotarget as gt\n"
            "try:\n    gt.RecipientLog(sys.argv[1], timeout=0.2)\n"
            "except gt.GeotargetError as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "log")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": PKG_PARENT}, timeout=60)
    assert out.stdout.startswith("InvalidInputError") and "held by another process" in out.stdout
    eng.shutdown()


def test_a_lost_alert_row_does_not_free_its_id(world, tmp_path):
    path = tmp_path / "log"
    eng = engine(world, path)
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0).id
    b = eng.report("city-1", lat=29.8, lon=119.68, division="330100", missing_since=T0, now=T0).id
    eng.tick(T0 + dt.timedelta(minutes=1))
    eng.shutdown()
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM alerts WHERE alert_id=?", (b,))   # the state row is lost
    conn.commit()
    conn.close()
    eng = engine(world, path)
    c = eng.report("city-1", lat=29.6, lon=119.0, division="330100", missing_since=T0, now=T0).id
    assert c not in (a, b) and c.endswith("-000003")
    with pytest.raises(AlertStateError, match="never reused"):
        eng.log.save_alert(b, {"status": "open"}, new=True)   # its pushes still hold the id


def test_two_logs_never_hand_out_the_same_cap_identifier(world, tmp_path):
    ids = []
    for name in ("one", "two"):
        eng = engine(world, tmp_path / name)
        eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
        [p] = eng.tick(T0 + dt.timedelta(minutes=1))
        assert f"<identifier>{p.push_id}</identifier>" in p.cap_xml
        ids.append(p.push_id)
        eng.shutdown()
    assert ids[0] != ids[1]


# -- a copy of the main file alone --------------------------------------------------------

CHILD = """
import datetime as dt, sys, geotarget as gt
sys.path.insert(0, sys.argv[2])
from test_faults import OFFICERS, CENTRES, T0, make_world
eng = gt.AlertEngine(make_world(), log=gt.RecipientLog(sys.argv[1]), authority=gt.Authority(OFFICERS))
for la, lo in CENTRES:
    eng.report("city-1", lat=la, lon=lo, division="330100", missing_since=T0, now=T0)
for p in eng.tick(T0 + dt.timedelta(minutes=1)):
    eng.ack(p.push_id)
print("ready", flush=True)
sys.stdin.read()
"""


def make_world():
    rng = np.random.default_rng(3)
    store = gt.DeviceStore.from_arrays(np.arange(2000, dtype=np.uint64) + 1, HZ[0] + rng.uniform(-3, 3, 2000),
                                       HZ[1] + rng.uniform(-3, 3, 2000))
    return gt.SpatialIndex.build(store)


def test_a_main_file_copied_without_its_wal_is_refused_and_backup_is_whole(tmp_path):
    path = tmp_path / "live.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(Path(__file__).parent)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": PKG_PARENT})
    try:
        assert child.stdout.readline().strip() == "ready"
        shutil.copyfile(path, tmp_path / "copy.sqlite")     # what a file backup tool takes
    finally:
        child.stdin.close()
        child.wait(60)
    assert child.returncode == 0
    with pytest.raises(CorruptFileError, match="write-ahead log copy.sqlite-wal is missing"):
        gt.RecipientLog(tmp_path / "copy.sqlite")
    # the cleanly closed original opens, and its online backup holds every push
    with gt.RecipientLog(path) as log:
        acked = {r.push_id for r in log.pushes(audiences=False) if r.acked}
        assert len(acked) == 3
        log.backup(tmp_path / "backup.sqlite")
    with gt.RecipientLog(tmp_path / "backup.sqlite") as copy:
        copy.verify()
        assert {r.push_id for r in copy.pushes(audiences=False) if r.acked} == acked


def test_backup_of_an_open_log_refuses_an_existing_destination(world, tmp_path):
    eng = engine(world, tmp_path / "log")
    report_three(eng)
    eng.tick(T0 + dt.timedelta(minutes=1))
    eng.log.backup(tmp_path / "b.sqlite")
    with pytest.raises(InvalidInputError, match="exists"):
        eng.log.backup(tmp_path / "b.sqlite")
    with gt.RecipientLog(tmp_path / "b.sqlite") as copy:
        assert len(copy.pushes(audiences=False)) == 3 and copy.instance_id == eng.log.instance_id


# -- keyed tamper evidence -------------------------------------------------------------

def _keyed_log_with_history(world, path):
    eng = engine(world, path, key=KEY)
    ids = report_three(eng)
    for p in eng.tick(T0 + dt.timedelta(minutes=1)):
        eng.ack(p.push_id)
    eng.shutdown()
    return ids


def _rechecksummed_edit(path, alert_id):
    """Move an alert to another division and re-compute its checksum: no key needed."""
    conn = sqlite3.connect(path)
    (text,) = conn.execute("SELECT record FROM alerts WHERE alert_id=?", (alert_id,)).fetchone()
    rec = json.loads(text)
    rec["division"] = "310000"
    new = logmod._canon(rec)
    conn.execute("UPDATE alerts SET record=?, checksum=? WHERE alert_id=?",
                 (new, logmod._alert_checksum(alert_id, new), alert_id))
    conn.commit()
    conn.close()


def test_a_rechecksummed_edit_passes_unkeyed_and_is_caught_with_the_key(world, tmp_path):
    path = tmp_path / "log"
    ids = _keyed_log_with_history(world, path)
    with gt.RecipientLog(path, key=KEY) as log:
        assert log.verify() == {"keyed": True, "authenticated": True, "anchored": False}
    _rechecksummed_edit(path, ids[1])
    with gt.RecipientLog(path) as log:          # without the key: readable, and says so
        assert log.verify() == {"keyed": True, "authenticated": False, "anchored": False}
        assert log.alert(ids[1])["division"] == "310000"
        with pytest.raises(InvalidInputError, match="needs its key"):
            log.save_alert("X", {})
    with gt.RecipientLog(path, key=KEY) as log:
        with pytest.raises(CorruptFileError, match="keyed MAC does not match"):
            log.verify()
        with pytest.raises(CorruptFileError, match="keyed MAC"):
            log.alert(ids[1])


def test_key_from_the_environment_and_a_wrong_key(world, tmp_path, monkeypatch):
    path = tmp_path / "log"
    _keyed_log_with_history(world, path)
    (tmp_path / "key").write_bytes(KEY + b"\n")
    monkeypatch.setenv(logmod.KEY_FILE_ENV, str(tmp_path / "key"))
    with gt.RecipientLog(path) as log:
        assert log.verify()["authenticated"]
    monkeypatch.delenv(logmod.KEY_FILE_ENV)
    monkeypatch.setenv(logmod.KEY_ENV, "another key of enough bytes")
    with pytest.raises(InvalidInputError, match="not this log's key"):
        gt.RecipientLog(path)
    monkeypatch.setenv(logmod.KEY_ENV, "short")
    with pytest.raises(InvalidInputError, match="at least 16"):
        gt.RecipientLog(path)


def test_a_removed_key_record_is_caught_with_the_key(world, tmp_path):
    path = tmp_path / "log"
    _keyed_log_with_history(world, path)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM log_meta WHERE name='key_id'")
    conn.commit()
    conn.close()
    with pytest.raises(CorruptFileError, match="records no key"):
        gt.RecipientLog(path, key=KEY)


def test_truncated_audit_is_caught_by_the_anchor(world, tmp_path):
    path = tmp_path / "log"
    _keyed_log_with_history(world, path)
    with gt.RecipientLog(path, key=KEY) as log:
        anchor = log.anchor()
        assert anchor["text"] == f"{anchor['count']}:{anchor['head']}"
        log.verify(anchor["text"])
    conn = sqlite3.connect(path)
    n = conn.execute("SELECT max(seq) FROM audit").fetchone()[0]
    conn.execute("DELETE FROM audit WHERE seq >= ?", (n - 2,))   # cut the newest entries, and their MACs
    conn.execute("DELETE FROM macs WHERE record IN (?,?,?)", *[[f"audit:{s}" for s in (n - 2, n - 1, n)]])
    conn.commit()
    conn.close()
    with gt.RecipientLog(path, key=KEY) as log:
        log.verify()                                 # the chain alone cannot see a cut end
        with pytest.raises(CorruptFileError, match="does not extend the anchor"):
            log.verify(anchor["text"])
    with pytest.raises(InvalidInputError, match="anchor must be"):
        with gt.RecipientLog(path, key=KEY) as log:
            log.verify("12:abc")


# -- officers ---------------------------------------------------------------------------

def test_a_forged_officers_registry_is_refused(world, tmp_path):
    path = tmp_path / "log"
    engine(world, path).shutdown()
    forged = OFFICERS + [gt.Officer("intruder", level="ministry", division="000000")]
    with pytest.raises(UnauthorizedError, match="not the one registered"):
        engine(world, path, officers=forged)
    with gt.RecipientLog(path) as log:
        with pytest.raises(UnauthorizedError, match="ministry-level"):
            register_officers(log, gt.Authority(forged), "city-1", now=T0)
        with pytest.raises(gt.errors.UnknownOfficerError):
            register_officers(log, gt.Authority(forged), "intruder", now=T0)   # not in the registered one
        digest = register_officers(log, gt.Authority(forged), "mps", now=T0)
        assert digest == officers_digest(gt.Authority(forged))
        [entry] = [e for e in log.audit_entries() if e["action"] == "officers-change"]
        assert entry["actor"] == "mps" and entry["detail"]["new_digest"] == digest
    engine(world, path, officers=forged).shutdown()
    with pytest.raises(UnauthorizedError):
        engine(world, path)                          # the old registry is now the stranger


# -- the clock -----------------------------------------------------------------------

def test_backdating_is_refused(world, tmp_path):
    eng = engine(world, tmp_path / "log")
    a = eng.report("county-1", lat=HZ[0], lon=HZ[1], division="330102", missing_since=T0,
                   now=T0 + dt.timedelta(hours=1))
    with pytest.raises(InvalidInputError, match="may not precede its report"):
        eng.approve(a.id, "city-1", now=T0 + dt.timedelta(minutes=59, seconds=30))
    eng.approve(a.id, "city-1", now=T0 + dt.timedelta(hours=1, minutes=1))
    [p] = eng.tick(T0 + dt.timedelta(hours=1, minutes=30))
    with pytest.raises(InvalidInputError, match="may not precede the alert's first push"):
        eng.close(a.id, "mps", outcome="lost", now=T0 + dt.timedelta(hours=1, minutes=29))
    with pytest.raises(InvalidInputError, match="backwards"):
        eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100",
                   missing_since=T0 - dt.timedelta(days=7 * 365), now=T0 - dt.timedelta(days=7 * 365))
    stale = eng.tick(T0)                              # a late poll: nothing new, nothing written
    assert stale == [] and stale.stale
    # within the tolerance a second host's clock may lag
    eng.close(a.id, "mps", outcome="lost", now=T0 + dt.timedelta(hours=1, minutes=30, seconds=30))
    times = [e["at"] for e in eng.log.audit_entries() if e["action"] != "officers-register"]
    assert times == sorted(times)


def test_the_clock_survives_a_restart(world, tmp_path):
    eng = engine(world, tmp_path / "log")
    eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0 + dt.timedelta(days=1))
    eng.shutdown()
    eng = engine(world, tmp_path / "log")
    with pytest.raises(InvalidInputError, match="backwards"):
        eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)


# -- the outbox as a state machine --------------------------------------------------------

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402


class OutboxUnderFaults(RuleBasedStateMachine):
    """Reports, ticks, acks and closures, with faults injected before and after commits.

    Model: the set of push ids this process handed to a caller.  After every
    tick, every logged push has been handed out exactly once (no stranded push,
    no duplicate), and no call but the faulty one ever raised.
    """

    index = None

    @initialize()
    def start(self):
        import tempfile

        if OutboxUnderFaults.index is None:
            rng = np.random.default_rng(9)
            store = gt.DeviceStore.from_arrays(np.arange(1500, dtype=np.uint64) + 1, HZ[0] + rng.uniform(-6, 6, 1500),
                                               HZ[1] + rng.uniform(-6, 6, 1500))
            OutboxUnderFaults.index = gt.SpatialIndex.build(store)
        self.dir = tempfile.mkdtemp(prefix="outbox_")
        self.eng = engine(self.index, os.path.join(self.dir, "log"))
        self.now = T0
        self.handed: list[str] = []
        self.fault = None                     # "before" (the commit fails) or "after" (it succeeded)
        real_append, real_to_push = self.eng.log.append_push, self.eng._to_push

        def append(**kw):
            if self.fault == "before":
                self.fault = None
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_append(**kw)

        def to_push(rec, timings=None):
            if self.fault == "after" and timings is not None:   # only the call that logged it
                self.fault = None
                raise MemoryError("after the commit")
            return real_to_push(rec, timings)

        self.eng.log.append_push = append
        self.eng._to_push = to_push

    def teardown(self):
        if hasattr(self, "eng"):
            self.eng.shutdown()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _advance(self, minutes):
        self.now += dt.timedelta(minutes=minutes)

    @rule(k=st.integers(0, 2), minutes=st.integers(0, 50))
    def report(self, k, minutes):
        self._advance(minutes)
        la, lo = CENTRES[k]
        self.eng.report("city-1", lat=la, lon=lo, division="330100", missing_since=self.now - dt.timedelta(minutes=5),
                        now=self.now)

    @rule(minutes=st.integers(0, 90), fault=st.sampled_from([None, None, "before", "after"]))
    def tick(self, minutes, fault):
        self._advance(minutes)
        self.fault = fault
        out = self.eng.tick(self.now)
        self.fault = None
        self.handed += [p.push_id for p in out]
        for f in out.errors:
            assert not f.quarantined and isinstance(f.exception, (OSError, MemoryError))

    @rule(data=st.data(), fault=st.sampled_from([None, "before", "after"]))
    def close_one(self, data, fault):
        open_ = [a.alert_id for a in self.eng.alerts() if a.status == "open" and a.next_seq > 0]
        if not open_:
            return
        aid = data.draw(st.sampled_from(open_))
        self.fault = fault
        try:
            p = self.eng.close(aid, "mps", outcome="lost", now=self.now)
        except (OSError, MemoryError):
            assert fault is not None
        else:
            self.handed.append(p.push_id)
        finally:
            self.fault = None

    @rule(data=st.data())
    def ack_one(self, data):
        if self.handed:
            self.eng.ack(data.draw(st.sampled_from(self.handed)))

    @invariant()
    def nothing_stranded_after_a_tick(self):
        if not hasattr(self, "eng"):
            return
        out = self.eng.tick(self.now)            # same now: only what is owed
        self.handed += [p.push_id for p in out]
        logged = [r.push_id for r in self.eng.log.pushes(audiences=False)]
        assert sorted(self.handed) == sorted(logged)
        assert len(set(self.handed)) == len(self.handed)


TestOutboxUnderFaults = OutboxUnderFaults.TestCase
TestOutboxUnderFaults.settings = settings(max_examples=25, stateful_step_count=12, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])


def test_a_halved_ring_with_a_recomputed_push_chain_is_caught_with_the_key(world, tmp_path):
    """Halve the first ring's radius and recompute every push checksum after it (the chain)."""
    path = tmp_path / "log"
    _keyed_log_with_history(world, path)
    conn = sqlite3.connect(path)
    rows = conn.execute(f"SELECT {logmod._PUSH_COLUMNS} FROM pushes ORDER BY log_seq").fetchall()
    prev = logmod._ZERO_HASH
    for i, row in enumerate(rows):
        (log_seq, push_id, alert_id, seq, kind, radius, created, count, meta, digest, nbytes,
         _, _, acked_at, purged_at, _, generation) = row
        radius = radius / 2 if i == 0 else radius
        checksum = logmod._push_checksum(push_id, alert_id, seq, kind, radius, created, count, meta,
                                         digest, nbytes, prev, generation)
        conn.execute("UPDATE pushes SET radius_km=?, prev=?, checksum=?, state_sum=? WHERE log_seq=?",
                     (radius, prev, checksum, logmod._state_sum(checksum, acked_at, purged_at), log_seq))
        prev = checksum
    conn.commit()
    conn.close()
    with gt.RecipientLog(path) as log:
        log.verify()                                  # every unkeyed check passes
        assert log.pushes(audiences=False)[0].radius_km == rows[0][5] / 2
    with gt.RecipientLog(path, key=KEY) as log:
        with pytest.raises(CorruptFileError, match="keyed MAC does not match"):
            log.verify()
