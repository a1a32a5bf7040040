"""Kill -9 the engine at random instants; after reopening nothing returned is lost or changed."""
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import geotarget as gt

sys.path.insert(0, str(Path(__file__).parent))
from crash_child import OFFICERS, digest, world  # noqa: E402

pytestmark = pytest.mark.crash
CHILD = Path(__file__).with_name("crash_child.py")


def _env():
    env = dict(os.environ)
    pkg_root = str(Path(gt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_and_kill(log_path, seed, kill_after):
    proc = subprocess.Popen([sys.executable, str(CHILD), str(log_path), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(10)
    err = proc.stderr.read()
    assert proc.returncode in (0, -signal.SIGKILL), err
    return [ln.split() for ln in lines if ln.strip()], proc.returncode


@pytest.mark.parametrize("seed", range(12))
def test_kill_at_random_instant_loses_nothing(tmp_path, seed):
    rng = np.random.default_rng(seed)
    log_path = tmp_path / "log.sqlite"
    # Child start-up (imports, world build) takes ~1-2 s; kill anywhere from before the
    # first push to after the last one.
    lines, rc = _run_and_kill(log_path, seed, kill_after=float(rng.uniform(0.5, 5.0)))
    printed = {ln[1]: (ln[2], int(ln[3]), ln[4]) for ln in lines if ln[0] == "push"}
    acked = {ln[1] for ln in lines if ln[0] == "acked"}
    if not log_path.exists():
        assert not printed
        return
    log = gt.RecipientLog(log_path)
    log.verify()
    # the generation the child last used is recorded by its pushes; rebuild the latest world
    eng = gt.AlertEngine(world(seed, 3), log=log, authority=gt.Authority(OFFICERS))
    for pid, (kind, count, dig) in printed.items():       # nothing returned is lost or changed
        rec = log.push(pid)
        assert rec.kind == kind and len(rec.audience) == count
        assert digest(eng._to_push(rec)) == dig
    for pid in acked:                                     # nothing acknowledged is lost
        assert log.push(pid).acked
    unacked_before = {r.push_id for r in log.unacked()}
    last = max((a.reported_at for a in eng.alerts()), default=None)
    now = (last or dt.datetime(2026, 11, 23, 8, tzinfo=dt.timezone.utc)) + dt.timedelta(days=1)
    first = eng.tick(now)
    replayed = [p for p in first if p.push_id in unacked_before]
    assert {p.push_id for p in replayed} == unacked_before   # every unacked push is offered again
    for p in replayed:                                        # ... under the same id and audience
        assert digest(p) == digest(eng._to_push(log.push(p.push_id)))
    # rings stay disjoint, and each closure is exactly their union
    for a in eng.alerts():
        rings = [r for r in log.pushes(a.alert_id) if r.kind in ("alert", "expand", "topup")]
        seen = set()
        for r in rings:
            ks = set(r.audience)
            assert not (ks & seen), "a device got the alert twice"
            seen |= ks
        if a.status == "open":
            closure = eng.close(a.alert_id, "mps", outcome="lost", now=now)
        else:
            closure = eng._to_push([r for r in log.pushes(a.alert_id) if r.kind == "closure"][-1])
        assert set(closure.audience.keys().tolist()) == seen
    log.close()


def test_child_runs_to_completion_without_kill(tmp_path):
    lines, rc = _run_and_kill(tmp_path / "log.sqlite", 99, kill_after=60.0)
    assert rc == 0 and lines[-1] == ["done"]
    kinds = [ln[2] for ln in lines if ln[0] == "push"]
    assert kinds.count("closure") == 3 and "expand" in kinds and "topup" in kinds
