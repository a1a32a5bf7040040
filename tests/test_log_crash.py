"""RecipientLog under crashes and damage: SIGKILLed writers, torn WALs, truncated and bit-flipped files.

The promise under test (docs/design.md, Durability): a crash at any instant loses
nothing that was returned; a torn tail is dropped; damage anywhere else is a
clear CorruptFileError -- and never, in any case, a different audience.
"""
import datetime as dt
import importlib.util
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pyroaring import BitMap

from geotarget.errors import CorruptFileError
from geotarget.alerts.log import RecipientLog

pytestmark = pytest.mark.crash

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 5, 1, tzinfo=UTC)
CHILD_PATH = Path(__file__).with_name("_log_crash_child.py")
_spec = importlib.util.spec_from_file_location("_log_crash_child", CHILD_PATH)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


# -- SIGKILL at random instants ----------------------------------------------------------

def _run_and_kill(path, round_no, rng):
    """Start the child, SIGKILL it at a random instant, return what it printed."""
    proc = subprocess.Popen([sys.executable, str(CHILD_PATH), path, str(round_no)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()

    def read():
        for x in proc.stdout:
            lines.put(x.strip())
        lines.put(None)  # the child is gone

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out = []
    try:
        if rng.random() < 0.85:
            # Let it report a random number of durable steps (so every round makes
            # progress however loaded the machine), then kill it a moment later.
            for _ in range(1 + int(rng.integers(0, 8))):
                line = lines.get(timeout=60)
                if line is None:
                    break
                out.append(line)
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            time.sleep(rng.uniform(0.0, 0.5))  # during start-up and WAL recovery
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join()
    err = proc.stderr.read()
    proc.stderr.close()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, f"child failed before the kill:\n{err}"
    assert out[:1] in ([], ["ready"]), out
    while (line := lines.get()) is not None:
        out.append(line)
    return out


class _Expected:
    """Audiences the child must have logged, computed once each."""

    def __init__(self):
        self.cache = {}

    def __call__(self, alert, seq):
        if (alert, seq) not in self.cache:
            self.cache[(alert, seq)] = child.args(alert, seq)
        return self.cache[(alert, seq)]


def _check_after_crash(path, pushed, acked, expected):
    with RecipientLog(path) as log:
        log.verify()
        recs = log.pushes()
        logged = {r.push_id for r in recs}
        assert pushed <= logged, f"returned pushes lost: {sorted(pushed - logged)}"
        for r in recs:
            want = expected(r.alert_id, r.seq)
            assert (r.push_id, r.kind, r.radius_km, r.created_at, r.meta) == (
                want["push_id"], want["kind"], want["radius_km"], want["created_at"], want["meta"])
            assert r.audience == want["audience"], f"{r.push_id}: a different audience"
        for pid in acked:
            assert log.push(pid).acked, f"returned ack of {pid} lost"
        assert {r.push_id for r in log.unacked()} == {r.push_id for r in recs if not r.acked}
        # A retried push comes back as the same record under the same id.
        last = max(recs, key=lambda r: (r.alert_id, r.seq)) if recs else None
        if last is not None:
            again = log.append_push(**expected(last.alert_id, last.seq))
            assert again == log.push(last.push_id)
        return len(recs)


def test_sigkill_at_random_instants_loses_nothing_returned(tmp_path):
    rng = np.random.default_rng(20260501)
    path = str(tmp_path / "log.sqlite")
    expected = _Expected()
    pushed, acked = set(), set()
    rounds = 18
    for round_no in range(rounds):
        for line in _run_and_kill(path, round_no, rng):
            word, _, pid = line.partition(" ")
            if word == "push":
                pushed.add(pid)
            elif word == "acked":
                acked.add(pid)
        # Every other round the next child recovers the crashed log itself
        # (appending over a torn tail); the others are checked from outside.
        if round_no % 2 == 1 or round_no == rounds - 1:
            n = _check_after_crash(path, pushed, acked, expected)
    assert len(pushed) > 20 and len(acked) > 5 and n >= len(pushed), (len(pushed), len(acked))


# -- a crash image with several committed transactions in the WAL --------------------------

def _snapshot(log):
    """Everything a reader can see, audiences included."""
    recs = log.pushes()
    for r in recs:
        assert log.push(r.push_id) == r
    return (tuple(recs), log.alerts(), tuple(e["hash"] for e in log.audit_entries()),
            tuple(r.push_id for r in log.unacked()),
            {a: log.notified(a) for a in sorted({r.alert_id for r in recs})})


def _random_keys(rng, n, base=0):
    bm = BitMap()
    bm.update((base + rng.choice(1 << 20, n, replace=False)).astype(np.uint32))
    return bm


@pytest.fixture(scope="module")
def crash_image(tmp_path_factory):
    """(db bytes, wal bytes, [(wal size after commit, snapshot)]) of a log never closed."""
    d = tmp_path_factory.mktemp("image")
    rng = np.random.default_rng(5)
    log = RecipientLog(d)
    wal = log.path + "-wal"
    states = [(0, _snapshot(log))]

    def commit():
        states.append((os.path.getsize(wal), _snapshot(log)))

    rings = [BitMap(range(1000, 90_000)), _random_keys(rng, 4000, 1 << 21), BitMap(range(5 << 20, (5 << 20) + 7))]
    log.save_alert("A", {"status": "open"})
    commit()
    for seq, ring in enumerate(rings):
        log.append_push(push_id=f"A.{seq}", alert_id="A", seq=seq, kind="alert" if seq == 0 else "expand",
                        radius_km=100.0 * (seq + 1), created_at=T0, audience=ring, meta={"seq": seq})
        commit()
    log.ack("A.0")
    commit()
    log.audit("tick", actor="engine", alert_id="A", count=3)
    commit()
    with log.transaction():
        log.append_push(push_id="B.0", alert_id="B", seq=0, kind="alert", radius_km=100.0,
                        created_at=T0, audience=_random_keys(rng, 30_000, 3 << 22), meta={})
        log.save_alert("B", {"status": "open"})
        log.audit("alert", actor="engine", alert_id="B", count=30_000)
    commit()
    log.ack("A.2")
    commit()
    union = BitMap.union(BitMap(), *rings)
    log.append_push(push_id="A.3", alert_id="A", seq=3, kind="closure", radius_km=300.0, created_at=T0,
                    audience=union, meta={"outcome": "lost"})
    commit()
    with log.transaction():
        log.append_push(push_id="B.1", alert_id="B", seq=1, kind="expand", radius_km=200.0,
                        created_at=T0, audience=_random_keys(rng, 20_000, 4 << 22), meta={})
        log.save_alert("B", {"status": "open", "radius": 200})
    commit()
    db_bytes = open(log.path, "rb").read()
    wal_bytes = open(wal, "rb").read()
    assert len(wal_bytes) == states[-1][0] and len(wal_bytes) < 900 * 4120  # no checkpoint ran
    log.close()
    return db_bytes, wal_bytes, states


def _open_image(tmp_path, db, wal, name):
    d = tmp_path / name
    d.mkdir()
    (d / "recipients.sqlite").write_bytes(db)
    if wal is not None:
        (d / "recipients.sqlite-wal").write_bytes(wal)
    return str(d / "recipients.sqlite")


def _state_at(states, offset):
    return [s for size, s in states if size <= offset][-1]


FRAME = 24 + 4096


def test_the_crash_image_recovers_in_full(tmp_path, crash_image):
    db, wal, states = crash_image
    with RecipientLog(_open_image(tmp_path, db, wal, "full")) as log:
        assert _snapshot(log) == states[-1][1]
        log.verify()


def test_a_wal_torn_at_any_offset_shows_exactly_the_committed_prefix(tmp_path, crash_image):
    db, wal, states = crash_image
    rng = np.random.default_rng(11)
    ends = [size for size, _ in states[1:]]
    offsets = {0, 1, 31, 32, 33, 32 + 24, 32 + FRAME - 1}
    # Every frame boundary (and one byte either side) of the last two transactions ...
    for frame_start in range(ends[-3], len(wal) + 1, FRAME):
        offsets |= {frame_start - 1, frame_start, frame_start + 1, frame_start + 24}
        # ... and some offsets inside each of their frames.
        offsets |= set((frame_start + rng.integers(1, FRAME, 2)).tolist())
    # ... each commit's end, and a sample everywhere else.
    offsets |= {e + d for e in ends for d in (-1, 0, 1)}
    offsets |= set(rng.integers(0, len(wal), 25).tolist())
    offsets = sorted(o for o in offsets if 0 <= o < len(wal))
    assert len(offsets) > 60
    for i, off in enumerate(offsets):
        path = _open_image(tmp_path, db, wal[:off], f"t{i}")
        with RecipientLog(path) as log:
            assert _snapshot(log) == _state_at(states, off), f"WAL torn at byte {off}"
            if i % 5 == 0:
                log.verify()


def test_a_bit_flip_before_the_last_transaction_of_the_wal_is_corruption(tmp_path, crash_image):
    db, wal, states = crash_image
    rng = np.random.default_rng(12)
    before_last = states[-2][0]
    nframes = (before_last - 32) // FRAME
    # the header, every frame's header fields, and random bytes of page content
    positions = list(range(0, 32, 3))
    for f in rng.choice(nframes, min(nframes, 30), replace=False).tolist():
        start = 32 + f * FRAME
        positions += [start + int(rng.integers(0, 24)), start + 24 + int(rng.integers(0, 4096))]
    for i, pos in enumerate(positions):
        damaged = bytearray(wal)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        path = _open_image(tmp_path, db, bytes(damaged), f"f{i}")
        with pytest.raises(CorruptFileError, match="WAL"):
            RecipientLog(path)
        assert open(path + "-wal", "rb").read() == bytes(damaged)  # left as found, for forensics


def test_a_damaged_commit_checksum_before_a_one_frame_transaction_is_corruption(tmp_path):
    # The frame after a damaged stored checksum chains from its recomputed value;
    # without that, a one-frame last transaction would hide the damage.
    live = tmp_path / "live"
    live.mkdir()
    log = RecipientLog(live)
    log.append_push(push_id="A.0", alert_id="A", seq=0, kind="alert", radius_km=1.0, created_at=T0,
                    audience=BitMap(range(0, 10_000, 2)), meta={})
    before = os.path.getsize(log.path + "-wal")
    log.ack("A.0")
    db, wal = open(log.path, "rb").read(), open(log.path + "-wal", "rb").read()
    log.close()
    assert len(wal) - before == FRAME  # the ack is one frame
    commit_frame = before - FRAME
    assert int.from_bytes(wal[commit_frame + 4:commit_frame + 8], "big") != 0
    for i, pos in enumerate(range(commit_frame + 16, commit_frame + 24)):
        damaged = bytearray(wal)
        damaged[pos] ^= 0x04
        with pytest.raises(CorruptFileError, match="middle of the WAL"):
            RecipientLog(_open_image(tmp_path, db, bytes(damaged), f"c{i}"))


def test_a_bit_flip_in_the_last_transaction_drops_it_or_is_refused(tmp_path, crash_image):
    db, wal, states = crash_image
    rng = np.random.default_rng(13)
    start = states[-2][0]
    for i in range(20):
        damaged = bytearray(wal)
        damaged[int(rng.integers(start, len(wal)))] ^= 1 << int(rng.integers(0, 8))
        path = _open_image(tmp_path, db, bytes(damaged), f"l{i}")
        try:
            log = RecipientLog(path)
        except CorruptFileError:
            continue
        with log:
            # indistinguishable from a power loss tearing that transaction
            assert _snapshot(log) == states[-2][1]


def test_a_truncated_database_file_is_refused(tmp_path, crash_image):
    db, wal, states = crash_image
    clean = _open_image(tmp_path, db, wal, "clean")
    RecipientLog(clean).close()  # checkpoint: the file alone now holds everything
    data = open(clean, "rb").read()
    assert not os.path.exists(clean + "-wal") and len(data) % 4096 == 0
    rng = np.random.default_rng(14)
    last = len(data) - 4096
    offsets = {0, 50, 99, 100, 4095, 4096, 4097, len(data) - 1}
    offsets |= set(range(4096, len(data), 4096))
    offsets |= set((last + rng.integers(0, 4096, 10)).tolist())
    for i, off in enumerate(sorted(offsets)):
        path = _open_image(tmp_path, data[:off], None, f"d{i}")
        with pytest.raises(CorruptFileError):
            RecipientLog(path)


def test_a_truncated_database_file_under_a_wal_needs_the_wal_to_cover_it(tmp_path, crash_image):
    db, wal, states = crash_image
    clean = _open_image(tmp_path, db, wal, "clean")
    RecipientLog(clean).close()
    # A checkpointed file plus a WAL holding one small transaction: most pages live only in the file.
    log = RecipientLog(clean)
    log.ack("A.3")
    want = _snapshot(log)
    data, small_wal = open(clean, "rb").read(), open(clean + "-wal", "rb").read()
    log.close()
    opened = refused = 0
    for i, off in enumerate(range(0, len(data) + 1, 4096)):
        path = _open_image(tmp_path, data[:off], small_wal, f"w{i}")
        try:
            log = RecipientLog(path)
        except CorruptFileError as exc:
            assert "truncated" in str(exc) or "not a recipient log" in str(exc)
            refused += 1
            continue
        with log:
            assert _snapshot(log) == want, f"database file truncated at byte {off}"
            opened += 1
    assert opened >= 1 and refused >= 5


def test_bit_flips_in_the_database_file_never_change_what_is_read(tmp_path, crash_image):
    db, wal, states = crash_image
    clean = _open_image(tmp_path, db, wal, "clean")
    RecipientLog(clean).close()
    data = open(clean, "rb").read()
    with RecipientLog(_open_image(tmp_path, data, None, "ref")) as log:
        want = _snapshot(log)
    rng = np.random.default_rng(15)
    positions = rng.integers(0, len(data), 260).tolist() + list(range(0, 100, 7))
    outcomes = {"refused": 0, "same": 0}
    for i, pos in enumerate(positions):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        path = _open_image(tmp_path, bytes(damaged), None, f"b{i}")
        try:
            with RecipientLog(path) as log:
                got = _snapshot(log)
                log.verify()
        except CorruptFileError:
            outcomes["refused"] += 1
            continue
        assert got == want, f"bit flip at byte {pos} changed what the log returns"
        outcomes["same"] += 1
        shutil.rmtree(os.path.dirname(path))
    assert outcomes["refused"] > 50 and outcomes["same"] > 0, outcomes
