"""One dispatch node of the failover test (tests/test_failover.py): a real engine process.

    python _failover_node.py URL INDEX_DIR OFFICERS_JSON JOURNAL WALL0 SPEED LEASE

It opens the PostgreSQL log as a standby, waits to lead (``AlertEngine.take_over``),
then runs a dispatcher's loop on a simulated clock (``SPEED`` simulated seconds per
wall second since ``WALL0``): it keeps three alerts open, ticks, closes an alert
once it reached 200 km, and acknowledges every push it was handed.  When it is
deposed (``LeaseLostError``) it goes back to waiting.

Every event goes to ``JOURNAL`` as one JSON line, written with one ``write`` on an
O_APPEND descriptor, so a SIGKILL leaves whole lines only:
``leader`` (with the term), ``call`` before a push-producing call, ``push`` for
every push the engine handed over (before it is acknowledged), ``done`` after the
call, ``deposed``.  ``call`` and ``push`` lines also go to stdout, so the test can
kill the node in mid-call, or between a push's hand-over and its acknowledgement.
"""
import datetime as dt
import json
import os
import sys
import time

import geotarget as gt
from geotarget.errors import LeaseLostError, RateLimitError

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HANGZHOU = (30.27, 120.15)


def main(url, index_dir, officers_json, journal, wall0, speed, lease):
    wall0, speed = float(wall0), float(speed)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(event, **kw):
        line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **kw}) + "\n"
        os.write(fd, line.encode())
        if event in ("call", "push", "leader", "standby"):
            sys.stdout.write(line)
            sys.stdout.flush()

    def now():
        return T0 + dt.timedelta(seconds=(time.time() - wall0) * speed)

    with open(officers_json, encoding="utf-8") as f:
        authority = gt.Authority.from_dict(json.load(f))
    index = gt.SpatialIndex.open(index_dir)

    def standby():
        log = gt.RecipientLog(url, standby=True, lease=float(lease), timeout=10)
        return log, gt.AlertEngine(index, log, authority, workers=1)

    log, engine = standby()
    note("standby")

    def handed(pushes, call):
        for p in pushes:
            note("push", push_id=p.push_id, alert_id=p.alert_id, seq=p.seq, kind=p.kind, count=len(p),
                 call=call)
        for p in pushes:
            engine.ack(p.push_id)

    n = 0
    while True:
        engine.take_over()
        note("leader", term=log.term)
        try:
            while True:
                t = now()
                opened = [a for a in engine.alerts() if a.status == "open"]
                if len(opened) < 3:
                    n += 1
                    # a spread of places and of how long ago the child went missing
                    lat = HANGZHOU[0] + ((n * 37) % 21 - 10) * 0.01
                    lon = HANGZHOU[1] + ((n * 53) % 21 - 10) * 0.01
                    try:
                        note("call", what="report")
                        a = engine.report(f"city-{n % 4}", lat=lat, lon=lon, division="330100",
                                          missing_since=t - dt.timedelta(minutes=(n * 17) % 50), now=t,
                                          case_type="child")
                        note("done", what="report", alert_id=a.alert_id)
                    except RateLimitError:
                        pass
                t = now()
                due = sum(1 for a in engine.alerts() if a.status == "open" and (
                    a.next_seq == 0 or gt.RadiusSchedule.from_dict(a.schedule).radius_at(a.missing_since, t)
                    > a.radius_km))
                note("call", what="tick", due=due)
                res = engine.tick(t)
                handed(res, "tick")
                note("done", what="tick", errors=[e.error for e in res.errors])
                for a in engine.alerts():
                    if a.status == "open" and a.radius_km >= 200:
                        note("call", what="close", alert_id=a.alert_id)
                        p = engine.close(a.alert_id, "city-0", outcome="lost", now=now())
                        handed([p], "close")
                        note("done", what="close", alert_id=a.alert_id)
                        break
                time.sleep(0.02)
        except LeaseLostError as exc:
            note("deposed", error=str(exc))
        except OSError as exc:
            # the database ended this session (it hung inside a transaction past its lease):
            # a new connection, as a standby
            note("deposed", error=str(exc))
            log.close()
            log, engine = standby()


if __name__ == "__main__":
    main(*sys.argv[1:])
