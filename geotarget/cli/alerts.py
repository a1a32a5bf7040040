"""The alert lifecycle on a recipient log: ``alert report|approve|tick|refresh|update|close|retract|renew|confirm|show|purge``."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..errors import GeotargetError, InvalidInputError
from ..spatial.outputs import app_counts, largest_first
from ._common import (EXIT_OK, close_log, iso_or_none, load_settings, nonneg_float, now_of, one_line,
                      open_engine, open_index, open_log, parse_time, place_names, positive_float, positive_int,
                      write_json, write_line)


def _push_doc(p, store=None, replayed=False, files=None) -> dict:
    doc = {"push_id": p.push_id, "alert_id": p.alert_id, "seq": p.seq, "kind": p.kind,
           "radius_km": p.radius_km, "recipients": len(p), "created_at": iso_or_none(p.created_at),
           "replayed": replayed}
    doc["by_app"] = largest_first(p.audience.counts_by_app())
    if files:
        doc.update(files)
    return doc


def _hand_off(engine, pushes, args, replay_ids=()) -> list[dict]:
    """Write CAP and per-push batches to ``--out``, acknowledge with ``--ack``; describe each push."""
    docs = []
    out = Path(args.out) if getattr(args, "out", None) else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for p in pushes:
        files = {}
        if out is not None:
            import pyarrow.parquet as pq

            from ..spatial.outputs import push_table

            cap = out / f"{p.push_id}.xml"
            cap.write_text(p.cap_xml, encoding="utf-8")
            pq.write_table(push_table(p.batches), out / f"{p.push_id}.parquet")
            files = {"cap_file": str(cap), "batches_file": str(out / f"{p.push_id}.parquet")}
            from ..alerts.engine import record_outputs

            record_outputs(engine.log, p.push_id, [os.path.abspath(f) for f in files.values()])
        acked = bool(getattr(args, "ack", False))
        if acked:
            engine.ack(p.push_id)
        doc = _push_doc(p, replayed=p.push_id in replay_ids, files=files)
        doc["acked"] = acked
        docs.append(doc)
    return docs


def _print_pushes(docs: list[dict]) -> None:
    if not docs:
        write_line("no push due")
        return
    for d in docs:
        top = " · ".join(f"{a} {n:,}" for a, n in list(d["by_app"].items())[:3])
        flag = "  [offered again: logged, never acknowledged]" if d.get("replayed") else ""
        write_line(f"push {d['push_id']}  {d['kind']:<10} {d['radius_km']:>6g} km {d['recipients']:>12,} devices"
             f"  ({top}){flag}")
        if d.get("cap_file"):
            write_line(f"  CAP {d['cap_file']}   batches {d['batches_file']}")
    acked = sum(1 for d in docs if d.get("acked"))
    if acked:
        write_line(f"{acked} push{'es' if acked != 1 else ''} acknowledged")
    else:
        write_line("not acknowledged: they will be offered again (same push_id) until "
             "acknowledged with --ack")


def cmd_alert(args) -> int:
    action = args.action
    if action == "show":
        return _alert_show(args)
    if action == "serve":
        return _alert_serve(args)
    if action == "purge":
        return _alert_purge(args)
    engine = open_engine(args, officers_required=action in ("report", "approve", "update", "close", "retract",
                                                         "renew", "confirm"))
    try:
        code = _alert_action(engine, args, action)
    except BaseException:
        close_log(engine.log, args, failed=True)
        raise
    close_log(engine.log, args, failed=False)
    return code


#: A backup's file name in --backup-dir: the time it was taken (UTC), so that names sort by age.
_BACKUP_NAME = re.compile(r"geotarget-log-\d{8}T\d{6}\.\d{6}Z\.sqlite")


def _serve_backup(engine, directory: str, keep: int) -> tuple[str, list[str]]:
    """Copy the log a node leads into ``directory`` (``RecipientLog.backup``: consistent, fsynced,
    linked into place when complete); then remove all but the ``keep`` newest of its backups there.
    Returns the new file and the removed ones (absolute paths).  Only files named as this function
    names them are ever removed."""
    import datetime as _dt

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = engine.log.backup(os.path.join(directory, f"geotarget-log-{stamp}.sqlite"))
    ours = sorted(n for n in os.listdir(directory) if _BACKUP_NAME.fullmatch(n))
    dropped = [os.path.join(directory, name) for name in ours[:max(0, len(ours) - keep)]]
    for old in dropped:
        os.unlink(old)
    return path, dropped


def _alert_serve(args) -> int:
    """A dispatch node: wait to lead the log, then tick every ``--every`` seconds, writing and
    acknowledging each push, until SIGTERM/SIGINT or ``--for`` seconds; several may share a
    postgresql:// log (docs/operations.md, "Two engines on one database")."""
    import signal
    import threading
    import time

    from ..errors import LeaseLostError
    from ..geo import now_or_clock

    args.ack = True
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deadline = None if args.duration is None else time.monotonic() + args.duration

    def left() -> float:
        return float("inf") if deadline is None else deadline - time.monotonic()

    def say(event: str, text: str, **fields) -> None:
        if args.json:
            sys.stdout.write(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str) + "\n")
        else:
            write_line(text)
        sys.stdout.flush()

    engine = open_engine(args, officers_required=False, standby=True)
    replay = {r.push_id for r in engine.log.unacked()} if engine.leader else set()   # SQLite: leads at once
    next_backup = time.monotonic()     # the first backup after the first tick
    try:
        while not stop.is_set() and left() > 0:
            if not engine.leader:
                say("standby", f"standby: waiting to lead {engine.log.path}")
                while not stop.is_set() and left() > 0 and not engine.take_over(timeout=max(0.0, min(0.5, left()))):
                    pass
                if not engine.leader:
                    break
                replay = {r.push_id for r in engine.log.unacked()}
                say("leading", f"leading {engine.log.path} (term {engine.log.term}); "
                    f"{len(replay)} unacknowledged push(es) to offer again", term=engine.log.term,
                    replay=sorted(replay))
            try:
                result = engine.tick(now_or_clock())
                docs = _hand_off(engine, result, args, replay)
            except LeaseLostError as exc:
                say("deposed", f"deposed: {one_line(exc)}", error=one_line(exc))
                continue
            except OSError as exc:   # the database went away: a new connection, as a standby
                say("reconnect", f"lost the log ({one_line(exc)}); reconnecting as a standby",
                    error=one_line(exc))
                engine.log.close()
                stop.wait(min(1.0, max(0.0, left())))
                engine = open_engine(args, officers_required=False, standby=True)
                continue
            if docs:
                if args.json:
                    say("pushes", "", pushes=docs)
                else:
                    _print_pushes(docs)
            for f in result.errors:
                sys.stderr.write(f"geotarget: alert {f.alert_id}: {f.error}\n")
            if args.backup_dir and engine.leader and time.monotonic() >= next_backup:
                next_backup = time.monotonic() + args.backup_every
                try:
                    path, dropped = _serve_backup(engine, args.backup_dir, args.backup_keep)
                    say("backup", f"backup {path}" + (f" ({len(dropped)} older removed)" if dropped else ""),
                        path=path, removed=dropped)
                except (OSError, GeotargetError) as exc:   # a full disk must not stop the ticks
                    say("backup-failed", f"backup failed: {one_line(exc)}; next in {args.backup_every:g} s",
                        error=one_line(exc))
                    sys.stderr.write(f"geotarget: backup failed: {one_line(exc)}\n")
            stop.wait(max(0.0, min(args.every, left())))
    finally:
        if engine.log.backend == "postgresql" and engine.leader:
            engine.step_down()          # a planned hand-over: a standby leads at once
        engine.log.close()
    say("stopped", "stopped")
    return EXIT_OK


def _alert_purge(args) -> int:
    from ..alerts.engine import purge_expired

    log = open_log(args.log)
    try:
        photo_dir = load_settings(args).photo_dir
        result = purge_expired(log, args.retention_days, now_of(args),
                               photo_dir=None if photo_dir is None else str(photo_dir))
    finally:
        log.close()
    if args.json:
        write_json(result)
        return EXIT_OK
    for aid, n in result["purged"].items():
        write_line(f"alert {aid}: {n} audience(s) dropped")
    for f in result["files"]:
        write_line(f"removed {f}")
    for aid in result["waiting"]:
        write_line(f"alert {aid}: kept, it has unacknowledged pushes")
    if not any(result.values()):
        write_line(f"nothing closed more than {args.retention_days:g} days ago holds recipients")
    return EXIT_OK


def _alert_action(engine, args, action) -> int:
    now = now_of(args)
    if action == "report":
        details = _details(args)
        officer = engine.authority.officer(args.officer)
        division = args.division or officer.division
        alert = engine.report(args.officer, lat=args.lat, lon=args.lon,
                              missing_since=parse_time(args.missing_since, "--missing-since"),
                              division=division, details=details, now=now,
                              case_type=args.case_type, drill=args.drill,
                              division_wide=bool(getattr(args, "division_wide", False)),
                              photos=list(args.photo or []))
        doc = {"alert_id": alert.id, "status": alert.status, "division": alert.division,
               "place": engine.authority.names(alert.division),
               "reporter": alert.reporter, "reported_at": iso_or_none(alert.reported_at),
               "case_type": alert.case_type, "drill": alert.drill,
               "expires_at": iso_or_none(alert.expires_at), "duplicate_of": alert.duplicate_of,
               "photos": [p["digest"] for p in alert.photos]}
        if args.json:
            write_json(doc)
        else:
            state = {"pending": "pending approval", "open": "published",
                     "held": f"HELD as a possible duplicate of {alert.duplicate_of}: an officer "
                             f"confirms with 'alert confirm --distinct' or '--duplicate'"}
            write_line(("DRILL (exercise, not a real alert): " if alert.drill else "")
                 + f"{alert.case_type} alert {alert.id} reported by {alert.reporter} in "
                 f"{engine.place(alert.id)}: {state.get(alert.status, alert.status)}")
        return EXIT_OK
    if action in ("renew", "confirm"):
        if action == "renew":
            alert = engine.renew(args.alert_id, args.officer, now=now, hours=args.hours)
        elif args.distinct:
            alert = engine.confirm_distinct(args.alert_id, args.officer, now=now)
        else:
            alert = engine.confirm_duplicate(args.alert_id, args.officer, now=now)
        doc = {"alert_id": alert.id, "status": alert.status, "expires_at": iso_or_none(alert.expires_at),
               "duplicate_of": alert.duplicate_of}
        if args.json:
            write_json(doc)
        else:
            write_line(f"alert {alert.id}: {alert.status}"
                 + (f", expires {alert.expires_at.isoformat()}" if alert.expires_at else ""))
        return EXIT_OK
    if action == "approve":
        alert = engine.approve(args.alert_id, args.officer, now=now)
        doc = {"alert_id": alert.id, "status": alert.status, "approved_by": alert.approved_by,
               "division": alert.division, "place": engine.authority.names(alert.division),
               "lat": alert.lat, "lon": alert.lon, "published_at": iso_or_none(alert.published_at)}
        if args.json:
            write_json(doc)
        else:
            write_line(f"alert {alert.id} in {engine.place(alert.id)} (last seen {alert.lat:.5f}, "
                 f"{alert.lon:.5f}) approved by {alert.approved_by}: published at "
                 f"{alert.published_at.isoformat()}")
        return EXIT_OK
    replay_ids = {r.push_id for r in engine.log.unacked()} if action in ("tick", "refresh") else set()
    if action == "tick":
        pushes = engine.tick(now)
    elif action == "refresh":
        # the engine was opened on --index; refreshing onto the same generation
        # tops every open alert up with devices now inside and never notified
        pushes = engine.tick(now)
        topups = engine.refresh(engine.index, now)
        pushes.extend(topups)
        pushes.errors.extend(topups.errors)
    elif action == "update":
        details = _details(args)
        photos = [] if args.clear_photos else (list(args.photo) if args.photo else None)
        if args.clear_photos and args.photo:
            raise InvalidInputError("alert update takes --photo or --clear-photos, not both")
        if not details and photos is None:
            raise InvalidInputError("alert update needs --headline, --description, --instruction, "
                                    "--details, --photo or --clear-photos")
        pushes = [engine.update(args.alert_id, args.officer, details or None, now=now, photos=photos)]
    elif action == "close":
        pushes = [engine.close(args.alert_id, args.officer, outcome=args.outcome, now=now)]
    else:  # retract
        p = engine.retract(args.alert_id, args.officer, reason=args.reason or "", now=now)
        pushes = [p] if p is not None else []
    docs = _hand_off(engine, pushes, args, replay_ids)
    if args.json:
        write_json({"pushes": docs})
    else:
        if action == "retract" and not pushes:
            write_line(f"alert {args.alert_id} retracted before anything went out: nothing to send")
        else:
            _print_pushes(docs)
        for f in getattr(pushes, "errors", ()):
            sys.stderr.write(f"geotarget: alert {f.alert_id}: {f.error}"
                             + (" (quarantined until updated or retracted)\n" if f.quarantined
                                else " (tried again on the next tick)\n"))
    return EXIT_OK


def _details(args) -> dict:
    details = {}
    if args.details:
        try:
            details = json.loads(args.details)
        except ValueError as exc:
            raise InvalidInputError(f"--details is not valid JSON: {exc}") from None
        if not isinstance(details, dict):
            raise InvalidInputError(f"--details must be a JSON object, got {args.details!r}")
    for key in ("headline", "description", "instruction"):
        if getattr(args, key):
            details[key] = getattr(args, key)
    return details


def _alert_show(args) -> int:
    import numpy as np

    log = open_log(args.log, standby=True)
    try:
        if not args.alert_id:
            rows = []
            for aid, rec in log.alerts().items():
                rows.append({"alert_id": aid, "status": rec.get("status"), "division": rec.get("division"),
                             "radius_km": rec.get("radius_km"), "reached": rec.get("reached"),
                             "pushes": rec.get("pushes"), "outcome": rec.get("outcome")})
            if args.json:
                write_json({"alerts": rows})
            else:
                if not rows:
                    write_line("no alerts in this log")
                for r in rows:
                    write_line(f"{r['alert_id']}  {r['status']:<9} {r['division']}  {r['radius_km'] or 0:>5g} km "
                         f"{r['reached'] or 0:>12,} devices  {r['pushes'] or 0} pushes"
                         + (f"  outcome {r['outcome']}" if r["outcome"] else ""))
            return EXIT_OK
        rec = log.alert(args.alert_id)
        store = open_index(args.index).store if args.index else None
        pushes = log.pushes(args.alert_id, audiences=store is not None)
        prows = []
        for p in pushes:
            row = {"push_id": p.push_id, "seq": p.seq, "kind": p.kind, "radius_km": p.radius_km,
                   "recipients": p.count, "created_at": iso_or_none(p.created_at), "acked": p.acked,
                   "purged": p.purged}
            if store is not None and p.audience is not None:
                keys = np.frombuffer(p.audience.to_array(), dtype=np.uint32) if len(p.audience) else \
                    np.empty(0, np.uint32)
                if keys.size and int(keys[-1]) >= len(store):
                    raise InvalidInputError(
                        f"--index {args.index!r} has {len(store):,} devices but push {p.push_id} holds "
                        f"key {int(keys[-1])}; use the index generation the alert ran on (or a later one)")
                row["by_app"] = app_counts(store, keys)
            prows.append(row)
        doc = {"alert": rec, "pushes": prows}
        if args.json:
            write_json(doc)
            return EXIT_OK
        write_line(f"alert {rec['alert_id']}  status {rec['status']}"
             + (f" (outcome {rec['outcome']})" if rec.get("outcome") else ""))
        write_line(f"  centre {rec['lat']:.5f}, {rec['lon']:.5f}   division {rec['division']} "
             f"{place_names(rec['division'])}" + ("  (the whole division)" if rec.get("division_wide") else "")
             + "   "
             f"reporter {rec['reporter']}" + (f"   approved by {rec['approved_by']}" if rec.get("approved_by") else ""))
        write_line(f"  missing since {rec['missing_since']}   published {rec.get('published_at') or '-'}"
             + (f"   closed {rec['closed_at']} by {rec['closed_by']}" if rec.get("closed_at") else ""))
        write_line(f"  radius {rec.get('radius_km') or 0:g} km   reached {rec.get('reached') or 0:,} devices   "
             f"{rec.get('pushes') or 0} pushes")
        for k, v in (rec.get("details") or {}).items():
            write_line(f"  {k}: {v}")
        if prows:
            write_line(f"  {'seq':>3} {'kind':<10} {'km':>6} {'recipients':>12}  {'acked':<5}  created_at"
                 + ("   top apps" if store is not None else ""))
        for r in prows:
            top = ""
            if "by_app" in r:
                top = "   " + ", ".join(f"{a} {n:,}" for a, n in list(r["by_app"].items())[:3])
            write_line(f"  {r['seq']:>3} {r['kind']:<10} {r['radius_km']:>6g} {r['recipients']:>12,}  "
                 f"{'yes' if r['acked'] else 'no':<5}  {r['created_at']}{top}")
        return EXIT_OK
    finally:
        log.close()


def add_alert(verb) -> None:
    sp = verb("alert", "the alert lifecycle on a recipient log", cmd_alert, json_=False)
    asub = sp.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name, help_, index=True, officers=True, alert_id=True, officer=True, now=True):
        ap = asub.add_parser(name, help=help_, description=help_)
        ap.add_argument("--log", required=True, metavar="LOG",
                        help="recipient log (SQLite file, or a postgresql:// URL)")
        if index:
            ap.add_argument("--index", required=True, metavar="DIR")
        if officers:
            ap.add_argument("--officers", metavar="FILE", help="officers JSON or CSV (see geotarget --help)")
        if alert_id:
            ap.add_argument("alert_id", metavar="ALERT_ID")
        if officer:
            ap.add_argument("--officer", required=True, metavar="ID", help="the acting officer")
        if now:
            ap.add_argument("--now", metavar="ISO", help="the time of the action (default: the clock)")
        if index:
            ap.add_argument("--config", metavar="FILE", help="settings TOML (see 'geotarget config show')")
            ap.add_argument("--max-location-age", type=nonneg_float, metavar="HOURS",
                            help="only devices seen this recently get rings (0: all; default: settings)")
        ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return ap

    def handoff(ap):
        ap.add_argument("--out", metavar="DIR", help="write <push_id>.xml (CAP) and <push_id>.parquet")
        ap.add_argument("--ack", action="store_true",
                        help="acknowledge the pushes (handed on); otherwise they are offered again")

    def texts(ap):
        ap.add_argument("--headline")
        ap.add_argument("--description")
        ap.add_argument("--instruction")
        ap.add_argument("--details", metavar="JSON", help="more details as a JSON object")

    ap = action("report", "report a missing child (published at once unless approval is needed)",
                alert_id=False)
    ap.add_argument("--lat", type=float, required=True)
    ap.add_argument("--lon", type=float, required=True)
    ap.add_argument("--missing-since", required=True, metavar="ISO")
    ap.add_argument("--division", metavar="CODE", help="6-digit division (default: the officer's)")
    ap.add_argument("--case-type", default="child", metavar="TYPE",
                    help="child (default), elderly, other, or a type the settings add")
    ap.add_argument("--drill", action="store_true",
                    help="an exercise: CAP status Exercise, test devices only, never in statistics")
    ap.add_argument("--division-wide", action="store_true",
                    help="target the whole division's area instead of a growing circle")
    ap.add_argument("--photo", action="append", metavar="PATH",
                    help="a photo of the person (.jpg, .png or .webp; repeatable); every CAP carries it")
    texts(ap)
    action("approve", "approve a pending report")
    for ap in (action("tick", "send what is due: first rings, expansions, the unacknowledged outbox",
                      alert_id=False, officer=False),
               action("refresh", "top up open alerts with devices now inside (after a new --index "
                      "generation)", alert_id=False, officer=False)):
        handoff(ap)
        ap.add_argument("--retention-days", type=nonneg_float, metavar="DAYS",
                        help="also apply the retention setting (see alert purge)")
    ap = action("update", "new details or photos, to everyone notified so far")
    texts(ap)
    ap.add_argument("--photo", action="append", metavar="PATH",
                    help="replace the photos with these (repeatable); earlier messages keep theirs")
    ap.add_argument("--clear-photos", action="store_true", help="remove the photos from this push on")
    handoff(ap)
    ap = action("close", "the child is found (or the search ends): closure to everyone notified")
    ap.add_argument("--outcome", required=True, metavar="OUTCOME",
                    help="rescued_trafficking, runaway, lost, drowned, killed, accident, "
                         "visiting_friends, other, not_found")
    handoff(ap)
    ap = action("retract", "withdraw an erroneous or false report")
    ap.add_argument("--reason", default="")
    handoff(ap)
    ap = action("renew", "extend an open alert's expiry (an expired alert resumes its rings)")
    ap.add_argument("--hours", type=nonneg_float, metavar="H", help="default: the case type's expiry")
    ap = action("confirm", "decide a report held as a possible duplicate")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--distinct", action="store_true", help="another person: it goes on")
    which.add_argument("--duplicate", action="store_true", help="the same person: merged, never sent")
    ap = action("show", "an alert's state and pushes (all alerts without ALERT_ID)", index=False,
                officers=False, alert_id=False, officer=False, now=False)
    ap.add_argument("alert_id", metavar="ALERT_ID", nargs="?")
    ap.add_argument("--index", metavar="DIR", help="also split each push by app")
    ap = action("serve", "a dispatch node: wait to lead the log, then tick every --every seconds, writing "
                "and acknowledging each push (several nodes may share one postgresql:// log)",
                alert_id=False, officer=False, now=False)
    ap.add_argument("--out", required=True, metavar="DIR", help="write <push_id>.xml (CAP) and <push_id>.parquet")
    ap.add_argument("--every", type=positive_float, default=10.0, metavar="SECONDS",
                    help="seconds between ticks (default 10)")
    ap.add_argument("--for", dest="duration", type=nonneg_float, metavar="SECONDS",
                    help="stop after this long (default: until SIGTERM or SIGINT)")
    ap.add_argument("--lease", type=positive_float, metavar="SECONDS",
                    help="PostgreSQL lease: how long a hung leader keeps the log (default 10)")
    ap.add_argument("--backup-dir", metavar="DIR",
                    help="while leading, copy the log into DIR after a tick every --backup-every seconds "
                         "(a SQLite log is locked to its node: this is how it is backed up while it serves)")
    ap.add_argument("--backup-every", type=positive_float, default=3600.0, metavar="SECONDS",
                    help="seconds between backups (default 3600)")
    ap.add_argument("--backup-keep", type=positive_int, default=24, metavar="N",
                    help="newest backups kept in --backup-dir; older ones are removed (default 24)")
    ap = action("purge", "retention: drop the recipients of alerts closed more than DAYS ago, and every "
                "output file written for them", index=False, officers=False, alert_id=False, officer=False)
    ap.add_argument("--retention-days", type=nonneg_float, required=True, metavar="DAYS")
    ap.add_argument("--config", metavar="FILE", help="settings TOML (its [photos] dir; default: next to the log)")
