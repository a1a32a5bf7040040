"""The end-to-end demo and alert maps: ``demo`` and ``map``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ._common import (EXIT_CHECK_FAILED, EXIT_OK, nonneg_int, open_index, open_log, parse_count, write_json,
                      write_line)


def cmd_demo(args) -> int:
    from ..demo import format_report, report_json, run_demo

    echo = None if args.json else (lambda s: (write_line(s), sys.stdout.flush()))
    result = run_demo(devices=args.devices, seed=args.seed, city=args.city, workdir=args.workdir,
                      draw_map=not args.no_map, echo=echo)
    if args.json:
        sys.stdout.write(report_json(result) + "\n")
    else:
        write_line()
        write_line(format_report(result))
    return EXIT_OK if result["check"]["ok"] else EXIT_CHECK_FAILED


def cmd_map(args) -> int:
    from ..maps import draw_alert_map

    index = open_index(args.index)
    log = open_log(args.log, standby=True)
    try:
        rec = log.alert(args.alert)
        pushes = log.pushes(args.alert, audiences=False)
    finally:
        log.close()
    out = Path(args.out) if args.out else Path(f"{args.alert}.png")
    t0 = time.perf_counter()
    path = draw_alert_map(index, rec, pushes, out)
    seconds = time.perf_counter() - t0
    if args.json:
        write_json({"map": str(path), "alert_id": args.alert, "pushes": len(pushes), "seconds": round(seconds, 3)})
    else:
        write_line(f"map of {args.alert} ({len(pushes)} pushes) written to {path}")
    return EXIT_OK


def add_demo(verb) -> None:
    sp = verb("demo", "run the whole job end to end on a synthetic national population", cmd_demo)
    sp.add_argument("--devices", type=parse_count, default=20_000_000, metavar="N",
                    help="population size: 20M, 2e6, 500k ... (default 20M)")
    sp.add_argument("--seed", type=nonneg_int, default=0)
    sp.add_argument("--city", default="Hangzhou", help="where the child goes missing (default Hangzhou)")
    sp.add_argument("--workdir", default="geotarget_demo", metavar="DIR",
                    help="where the files go (default ./geotarget_demo/)")
    sp.add_argument("--no-map", action="store_true", help="skip the map PNG")


def add_map(verb) -> None:
    sp = verb("map", "draw the map PNG of an alert in a recipient log", cmd_map)
    sp.add_argument("--log", required=True, metavar="LOG")
    sp.add_argument("--index", required=True, metavar="DIR")
    sp.add_argument("--alert", required=True, metavar="ALERT_ID")
    sp.add_argument("--out", metavar="PNG", help="default: <ALERT_ID>.png")
