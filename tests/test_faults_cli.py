"""The command line under faults: private files, retention, backups, anchors, officers, refusals.

Each case drives ``python -m geotarget`` in a subprocess on real files, as an operator would.
"""
from __future__ import annotations

import json
import os
import stat
import sqlite3

import pytest

from geotarget.alerts.log import RecipientLog
from test_cli import HZ, OFFICERS, T, ok, ok_json, run

KEY = "an operator key of 32 characters"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def work(cli_work):
    return cli_work("faults_cli", "5k")


def common(log="log.sqlite"):
    return ("--log", log, "--index", "st", "--officers", "officers.json")


def report(work, log="log.sqlite", now="08:25", **extra):
    args = ["alert", "report", *common(log), "--officer", "S-330100", "--lat", HZ["lat"], "--lon", HZ["lon"],
            "--missing-since", T.format("08:10"), "--now", T.format(now)]
    for k, v in extra.items():
        args += [f"--{k}", v]
    return ok_json(*args, cwd=work)["alert_id"]


def test_files_with_device_data_are_private(work):
    assert mode(work / "st") == 0o700
    for f in (work / "st").iterdir():
        assert mode(f) & 0o077 == 0, f"{f.name} is {oct(mode(f))}"
    aid = report(work, "modes.sqlite")
    ok("alert", "tick", *common("modes.sqlite"), "--now", T.format("08:30"), "--out", "out", cwd=work)
    assert mode(work / "out") == 0o700
    files = list((work / "out").iterdir())
    assert {f.suffix for f in files} == {".xml", ".parquet"}
    assert all(mode(f) == 0o600 for f in files)
    assert mode(work / "modes.sqlite") == 0o600
    assert aid


def test_a_refused_report_on_a_new_log_leaves_no_file(work):
    p = run("alert", "report", *common("fresh.sqlite"), "--officer", "S-330100", "--lat", HZ["lat"],
            "--lon", HZ["lon"], "--missing-since", T.format("08:10"), "--now", T.format("08:25"),
            "--headline", "bad\x0bline", cwd=work)
    assert p.returncode == 2 and "U+000B" in p.stderr and "Traceback" not in p.stderr
    assert not list(work.glob("fresh.sqlite*"))


def test_a_forged_officers_file_is_refused_and_a_ministry_officer_changes_it(work):
    aid = report(work, "officers.sqlite")
    forged = OFFICERS + [{"officer_id": "X", "level": "ministry", "division": "000000"}]
    (work / "forged.json").write_text(json.dumps(forged))
    p = run("alert", "close", aid, "--log", "officers.sqlite", "--index", "st", "--officers", "forged.json",
            "--officer", "X", "--outcome", "lost", "--now", T.format("09:00"), cwd=work)
    assert p.returncode == 2 and "not the one registered" in p.stderr
    p = run("officers", "register", "--log", "officers.sqlite", "--officers", "forged.json", "--officer",
            "S-330100", cwd=work)
    assert p.returncode == 2 and "ministry-level" in p.stderr
    ok("officers", "register", "--log", "officers.sqlite", "--officers", "forged.json", "--officer", "MPS",
       "--now", T.format("08:40"), cwd=work)
    ok("alert", "close", aid, "--log", "officers.sqlite", "--index", "st", "--officers", "forged.json",
       "--officer", "X", "--outcome", "lost", "--now", T.format("09:00"), cwd=work)
    entries = ok_json("audit", "list", "--log", "officers.sqlite", cwd=work)["entries"]
    assert [e["actor"] for e in entries if e["action"] == "officers-change"] == ["MPS"]


def test_keyed_log_anchor_and_truncation(work):
    env_key = {"GEOTARGET_LOG_KEY": KEY}
    os.environ.update(env_key)
    try:
        report(work, "keyed.sqlite")
        ok("alert", "tick", *common("keyed.sqlite"), "--now", T.format("08:30"), "--ack", cwd=work)
        anchor = ok("audit", "anchor", "--log", "keyed.sqlite", cwd=work).stdout.strip()
        doc = ok_json("audit", "verify", "--log", "keyed.sqlite", "--anchor", anchor, cwd=work)
        assert doc["authenticated"] and doc["anchored"]
    finally:
        os.environ.pop("GEOTARGET_LOG_KEY")
    out = ok("audit", "verify", "--log", "keyed.sqlite", cwd=work).stdout
    assert "UNKEYED CHECK ONLY" in out
    conn = sqlite3.connect(work / "keyed.sqlite")
    conn.execute("DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
    conn.commit()
    conn.close()
    p = run("audit", "verify", "--log", "keyed.sqlite", "--anchor", anchor, cwd=work)
    assert p.returncode == 2 and "does not extend the anchor" in p.stderr


def test_backup_verb_copies_a_log_that_opens_whole(work):
    report(work, "b.sqlite")
    ok("alert", "tick", *common("b.sqlite"), "--now", T.format("08:30"), cwd=work)
    doc = ok_json("log", "backup", "b.sqlite", "b-copy.sqlite", cwd=work)
    assert doc["pushes"] == 1 and doc["ok"]
    p = run("log", "backup", "b.sqlite", "b-copy.sqlite", cwd=work)
    assert p.returncode == 2 and "never overwrites" in p.stderr
    with RecipientLog(work / "b.sqlite") as a, RecipientLog(work / "b-copy.sqlite") as b:
        assert [r.push_id for r in a.pushes()] == [r.push_id for r in b.pushes()]
        assert [r.audience for r in a.pushes()] == [r.audience for r in b.pushes()]


def test_retention_purges_audiences_and_outputs(work):
    aid = report(work, "ret.sqlite")
    ok("alert", "tick", *common("ret.sqlite"), "--now", T.format("08:30"), "--out", "ret-out", "--ack",
       cwd=work)
    ok("alert", "close", aid, *common("ret.sqlite"), "--officer", "S-330100", "--outcome", "lost",
       "--now", T.format("10:00"), "--out", "ret-out", "--ack", cwd=work)
    written = sorted(p.name for p in (work / "ret-out").iterdir())
    assert len(written) == 4
    doc = ok_json("alert", "purge", "--log", "ret.sqlite", "--retention-days", "30",
                  "--now", "2026-12-01T00:00:00+08:00", cwd=work)
    assert doc == {"purged": {}, "files": [], "waiting": []}       # 8 days: still kept
    doc = ok_json("alert", "purge", "--log", "ret.sqlite", "--retention-days", "30",
                  "--now", "2026-12-24T00:00:00+08:00", cwd=work)
    assert doc["purged"] == {aid: 2} and len(doc["files"]) == 4
    assert list((work / "ret-out").iterdir()) == []
    with RecipientLog(work / "ret.sqlite") as log:
        assert all(r.purged for r in log.pushes(aid, audiences=False))
        actions = [e["action"] for e in log.audit_entries(aid)]
        assert "purge_audiences" in actions and "purge_outputs" in actions
        log.verify()


def test_engine_retention_setting_purges_on_tick(work):
    import datetime as dt

    import geotarget as gt
    from geotarget.alerts.authority import Authority, Officer

    aid = report(work, "ret2.sqlite")
    ok("alert", "tick", *common("ret2.sqlite"), "--now", T.format("08:30"), "--ack", cwd=work)
    ok("alert", "close", aid, *common("ret2.sqlite"), "--officer", "S-330100", "--outcome", "lost",
       "--now", T.format("10:00"), "--ack", cwd=work)
    auth = Authority([Officer(o["officer_id"], o["level"], o["division"], o.get("name", "")) for o in OFFICERS])
    eng = gt.AlertEngine(gt.SpatialIndex.open(work / "st"), log=RecipientLog(work / "ret2.sqlite"),
                         authority=auth, retention_days=7)
    t = dt.datetime.fromisoformat(T.format("10:00"))
    assert eng.tick(t + dt.timedelta(days=6)).purged == {"purged": {}, "files": [], "waiting": []}
    assert eng.tick(t + dt.timedelta(days=7, minutes=1)).purged["purged"] == {aid: 2}
    with pytest.raises(gt.errors.AlertStateError, match="purged"):
        eng.notified(aid)
    eng.shutdown()
