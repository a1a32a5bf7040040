"""``geotarget alert serve``: dispatch nodes on one PostgreSQL log, as an operator runs them.

Two real ``serve`` processes share a log; one leads and writes the first ring; it is killed
with SIGKILL and the other takes over; reads (``alert show``, ``stats``, ``audit verify``) work
beside the leader; SIGTERM hands the lease over cleanly.  On a SQLite log a single node leads at
once and ``--for`` ends it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from test_cli import PKG_PARENT, ok, ok_json


def _serve(cwd, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PKG_PARENT, os.environ.get("PYTHONPATH"))
                                                      if p))
    proc = subprocess.Popen([sys.executable, "-m", "geotarget", "alert", "serve", *map(str, args), "--json"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            events.put(json.loads(line))
    threading.Thread(target=read, daemon=True).start()
    return proc, events


def _wait(events, kind, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            ev = events.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            break
        if ev["event"] == kind:
            return ev
    raise AssertionError(f"no {kind!r} event within {timeout} s")


def _report(work, log):
    now = dt.datetime.now(dt.timezone.utc)
    return ok_json("alert", "report", "--log", log, "--index", "st", "--officers", "officers.json",
                   "--officer", "MPS", "--lat", 30.27, "--lon", 120.15, "--division", "330102",
                   "--missing-since", (now - dt.timedelta(minutes=30)).isoformat(), cwd=work)["alert_id"]


def test_two_serve_nodes_on_one_postgresql_log(cli_work, pg_url):
    work = cli_work("serve", "20k")
    aid = _report(work, pg_url)
    common = ("--log", pg_url, "--index", "st", "--every", 0.2, "--lease", 2)
    a, a_events = _serve(work, *common, "--out", "out-a")
    b, b_events = _serve(work, *common, "--out", "out-b")
    try:
        # exactly one leads; it writes the first ring and acknowledges it
        firsts = []
        for proc, events in ((a, a_events), (b, b_events)):
            firsts.append(_wait(events, "standby"))
        lead = None
        end = time.monotonic() + 60
        while lead is None and time.monotonic() < end:
            for name, (proc, events) in {"a": (a, a_events), "b": (b, b_events)}.items():
                try:
                    ev = events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if ev["event"] == "leading":
                    lead, term = name, ev["term"]
                    break
        assert lead is not None, "no node took the lease"
        leader, (other, other_events) = ((a, (b, b_events)) if lead == "a" else (b, (a, a_events)))
        leader_events = a_events if lead == "a" else b_events
        pushes = _wait(leader_events, "pushes")["pushes"]
        assert [(p["alert_id"], p["kind"], p["acked"]) for p in pushes] == [(aid, "alert", True)]
        assert (work / f"out-{lead}" / f"{pushes[0]['push_id']}.xml").exists()
        # reads work beside the leader (they take no lease)
        shown = ok_json("alert", "show", aid, "--log", pg_url, cwd=work)
        assert shown["alert"]["status"] == "open"
        assert [p["push_id"] for p in shown["pushes"]] == [pushes[0]["push_id"]]
        assert ok_json("audit", "verify", "--log", pg_url, cwd=work)["pushes"] == 1
        assert ok_json("stats", "--log", pg_url, cwd=work)["published"] == 1
        # the leader dies: the other node takes over within seconds
        t0 = time.monotonic()
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
        taken = _wait(other_events, "leading", timeout=30)
        assert time.monotonic() - t0 < 10 and taken["term"] == term + 1 and taken["replay"] == []
        # SIGTERM: the node steps down and exits cleanly
        other.send_signal(signal.SIGTERM)
        assert other.wait(30) == 0, other.stderr.read()
        assert _wait(other_events, "stopped", timeout=5)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM owner").fetchone()[0] == 0   # the lease was given up
        # the report's own term (the command line leads while it acts), then the two nodes'
        assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 3 == term + 1


def test_serve_on_a_sqlite_log_leads_at_once_and_stops_after_for(cli_work):
    work = cli_work("serve-sqlite", "20k")
    aid = _report(work, "log.sqlite")
    t0 = time.monotonic()
    p = ok("alert", "serve", "--log", "log.sqlite", "--index", "st", "--out", "out", "--every", 0.2, "--for", 1.5,
           "--json", cwd=work)
    assert time.monotonic() - t0 < 60
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert events[0]["event"] == "pushes" and events[-1]["event"] == "stopped"
    [push] = events[0]["pushes"]
    assert push["alert_id"] == aid and push["acked"] and (work / "out" / f"{push['push_id']}.parquet").exists()
    assert not any(e["event"] == "pushes" for e in events[1:])     # acknowledged: not offered again


def test_serve_backs_up_the_log_it_holds_and_keeps_the_newest(cli_work):
    """A SQLite log is locked to the node serving it; ``--backup-dir`` copies it from inside that
    node after a tick.  Each copy opens as a complete log holding the alert and its push; only the
    newest ``--backup-keep`` of its own copies stay, and a file it did not write is never removed."""
    from geotarget.alerts.log import RecipientLog

    work = cli_work("serve-backup", "20k")
    aid = _report(work, "log.sqlite")
    (work / "bk").mkdir()
    (work / "bk" / "notes.txt").write_text("the operator's own file")
    p = ok("alert", "serve", "--log", "log.sqlite", "--index", "st", "--out", "out", "--every", 0.2, "--for", 2.5,
           "--backup-dir", "bk", "--backup-every", 0.3, "--backup-keep", 2, "--json", cwd=work)
    events = [json.loads(line) for line in p.stdout.splitlines()]
    backups = [e for e in events if e["event"] == "backup"]
    assert len(backups) >= 3 and any(e["removed"] for e in backups)
    [push] = next(e for e in events if e["event"] == "pushes")["pushes"]
    kept = sorted(n for n in os.listdir(work / "bk") if n.endswith(".sqlite"))
    assert len(kept) == 2 and (work / "bk" / "notes.txt").exists()
    assert [os.path.basename(e["path"]) for e in backups[-2:]] == kept      # the newest two
    for name in kept:
        log = RecipientLog(str(work / "bk" / name))
        try:
            log.verify()
            assert aid in log.alerts()
            assert [r.push_id for r in log.pushes(aid)] == [push["push_id"]]
        finally:
            log.close()


def test_serve_keeps_ticking_when_a_backup_fails(cli_work):
    work = cli_work("serve-backup-fails", "20k")
    aid = _report(work, "log.sqlite")
    (work / "taken").write_text("a file where the backup directory should be")
    p = ok("alert", "serve", "--log", "log.sqlite", "--index", "st", "--out", "out", "--every", 0.2, "--for", 1.2,
           "--backup-dir", "taken", "--backup-every", 0.3, "--json", cwd=work)
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert any(e["event"] == "backup-failed" for e in events) and not any(e["event"] == "backup" for e in events)
    [push] = next(e for e in events if e["event"] == "pushes")["pushes"]
    assert push["alert_id"] == aid and push["acked"] and events[-1]["event"] == "stopped"
    assert "backup failed" in p.stderr


def test_serve_backs_up_a_postgresql_log_into_sqlite_files(cli_work, pg_url):
    """On a PostgreSQL log the leading node's backup is a SQLite copy of the whole log."""
    from geotarget.alerts.log import RecipientLog

    work = cli_work("serve-backup-pg", "20k")
    aid = _report(work, pg_url)
    p = ok("alert", "serve", "--log", pg_url, "--index", "st", "--out", "out", "--every", 0.2, "--for", 2.0,
           "--lease", 2, "--backup-dir", "bk", "--backup-every", 0.5, "--json", cwd=work)
    events = [json.loads(line) for line in p.stdout.splitlines()]
    backups = [e for e in events if e["event"] == "backup"]
    assert backups, p.stdout
    [push] = next(e for e in events if e["event"] == "pushes")["pushes"]
    log = RecipientLog(backups[-1]["path"])
    try:
        log.verify()
        assert log.backend == "sqlite" and aid in log.alerts()
        assert [r.push_id for r in log.pushes(aid)] == [push["push_id"]]
    finally:
        log.close()
