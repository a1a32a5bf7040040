"""The recipient log's files and trails: ``log backup|copy``, ``audit verify|anchor|list``, ``officers register``."""
from __future__ import annotations

import time

from ._common import EXIT_OK, load_officers, now_of, open_log, write_json, write_line


def _cmd_log_copy(args) -> int:
    from .._pglog import display, is_url

    log = open_log(args.src, standby=True)
    try:
        dst = log.copy_to(args.dst)  # verifies the copy: verify() anchored at SRC's head, and every row
        pushes = log.stats()["pushes"]
        keyed, authenticated = log.keyed, log.authenticated
    finally:
        log.close()
    src = display(args.src) if is_url(args.src) else str(args.src)
    doc = {"ok": True, "src": src, "dst": dst, "pushes": pushes, "keyed": keyed,
           "authenticated": authenticated}
    if args.json:
        write_json(doc)
    else:
        write_line(f"copied {src} to {dst}: {pushes} pushes, every row compared, verified"
             + ("" if authenticated else " (unkeyed)" if not keyed
                else " (keyed log, MACs not checked: no key set)"))
    return EXIT_OK


def cmd_log(args) -> int:
    if args.log_action == "copy":
        return _cmd_log_copy(args)
    log = open_log(args.src, standby=True)
    try:
        dst = log.backup(args.dst)
    finally:
        log.close()
    from ..log import RecipientLog

    with RecipientLog(dst) as copy:
        checked = copy.verify()
        pushes = copy.stats()["pushes"]
    doc = {"ok": True, "src": str(args.src), "dst": dst, "pushes": pushes, **checked}
    if args.json:
        write_json(doc)
    else:
        write_line(f"backed up {args.src} to {dst}: {pushes} pushes, verified"
             + ("" if checked["authenticated"] else " (unkeyed)" if not checked["keyed"]
                else " (keyed log, MACs not checked: no key set)"))
    return EXIT_OK


def cmd_officers(args) -> int:
    from ..engine import register_officers

    authority = load_officers(args.officers)
    log = open_log(args.log)
    try:
        digest = register_officers(log, authority, args.officer, now_of(args))
    finally:
        log.close()
    if args.json:
        write_json({"ok": True, "digest": digest, "officers": len(authority)})
    else:
        write_line(f"officers registry of {args.log}: {len(authority)} officers, digest {digest[:16]}")
    return EXIT_OK


def _key_note(checked: dict) -> str:
    if checked["authenticated"]:
        return "keyed MACs checked"
    if checked["keyed"]:
        return "UNKEYED CHECK ONLY: this log is keyed but no key is set (GEOTARGET_LOG_KEY[_FILE])"
    return "unkeyed log: checksums and chains only, no MACs"


def cmd_audit(args) -> int:
    log = open_log(args.log, standby=True)
    try:
        if args.audit_action == "anchor":
            a = log.anchor()
            if args.json:
                write_json({"count": a["count"], "head": a["head"], "anchor": a["text"]})
            else:
                write_line(a["text"])
            return EXIT_OK
        if args.audit_action == "verify":
            t0 = time.perf_counter()
            checked = log.verify(args.anchor)
            seconds = time.perf_counter() - t0
            sizes = log.stats()
            entries = log.audit_entries()
            doc = {"ok": True, "log": str(log.path), "pushes": sizes["pushes"], "alerts": sizes["alerts"],
                   "audit_entries": len(entries), "head": entries[-1]["hash"] if entries else None,
                   "seconds": round(seconds, 3), **checked}
            if args.json:
                write_json(doc)
            else:
                write_line(f"OK {log.path}: {doc['pushes']} pushes (checksums, chain, audiences, delivery rules) "
                     f"and {doc['audit_entries']} audit entries verified"
                     + (f"; chain head {doc['head'][:16]}" if doc["head"] else "")
                     + f"; {_key_note(checked)}" + ("; anchor extended" if checked["anchored"] else ""))
            return EXIT_OK
        entries = log.audit_entries(args.alert) if args.alert else log.audit_entries()
        if args.json:
            write_json({"entries": entries})
            return EXIT_OK
        for e in entries:
            radius = f"{e['radius_km']:g} km" if e["radius_km"] is not None else ""
            count = f"{e['count']:,}" if e["count"] is not None else ""
            write_line(f"{e['seq']:>5} {e['at'][:19]} {e['actor']:<12} {e['action']:<12} "
                 f"{e['alert_id'] or '-':<26} {radius:>7} {count:>11}  {e['hash'][:10]}")
        return EXIT_OK
    finally:
        log.close()


def add_audit(verb) -> None:
    sp = verb("audit", "check the recipient log and its audit trail, or list the trail", cmd_audit,
              json_=False)
    aud = sp.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    ap = aud.add_parser("verify", help="check every push, audience, delivery rule and the hash chain")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--anchor", metavar="COUNT:HEAD",
                    help="a head printed earlier by audit anchor: entries cut off since are detected")
    ap.add_argument("--json", action="store_true")
    ap = aud.add_parser("anchor", help="the audit chain's head (count and hash), for an outside witness")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--json", action="store_true")
    ap = aud.add_parser("list", help="the audit trail, oldest first")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--alert", metavar="ALERT_ID")
    ap.add_argument("--json", action="store_true")


def add_log(verb) -> None:
    sp = verb("log", "recipient log files", cmd_log, json_=False)
    lsub = sp.add_subparsers(dest="log_action", required=True, metavar="ACTION")
    ap = lsub.add_parser("backup", help="copy a log (WAL included) with SQLite's online backup")
    ap.add_argument("src", metavar="SRC", help="the recipient log")
    ap.add_argument("dst", metavar="DST", help="a new file (never overwritten)")
    ap.add_argument("--json", action="store_true")
    ap = lsub.add_parser("copy", help="copy a log to another backend (SQLite file <-> postgresql:// URL), "
                                      "then verify the copy row by row")
    ap.add_argument("src", metavar="SRC", help="the recipient log (a file or a postgresql:// URL)")
    ap.add_argument("dst", metavar="DST", help="a new file, or a postgresql:// database holding no log")
    ap.add_argument("--json", action="store_true")


def add_officers(verb) -> None:
    sp = verb("officers", "the officers registry bound to a log", cmd_officers, json_=False)
    osub = sp.add_subparsers(dest="officers_action", required=True, metavar="ACTION")
    ap = osub.add_parser("register", help="register or change a log's officers registry (ministry officer)")
    ap.add_argument("--log", required=True, metavar="LOG")
    ap.add_argument("--officers", required=True, metavar="FILE")
    ap.add_argument("--officer", required=True, metavar="ID",
                    help="a ministry-level officer of the registry registered now (of FILE the first time)")
    ap.add_argument("--now", metavar="ISO")
    ap.add_argument("--json", action="store_true")
