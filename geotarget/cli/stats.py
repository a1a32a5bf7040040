"""Figures and reference data: ``stats``, ``divisions`` and ``config show``."""
from __future__ import annotations

import sys

from ..errors import InvalidInputError
from ._common import EXIT_OK, load_settings, open_log, parse_time, write_json, write_line


def cmd_config(args) -> int:
    settings = load_settings(args)
    if args.json:
        write_json(settings.to_dict())
    else:
        sys.stdout.write(settings.to_toml())
    return EXIT_OK


def cmd_stats(args) -> int:
    from ..stats import compute, log_records

    settings = load_settings(args)
    if args.case_type is not None:
        settings.case(args.case_type)
    log = open_log(args.log, standby=True)
    try:
        from ..divisions import Divisions
        s = compute(list(log_records(log)), since=parse_time(args.since, "--since"),
                    until=parse_time(args.until, "--until"), division=args.division,
                    divisions=Divisions.china(), case_type=args.case_type,
                    case_types=tuple(settings.case_types))
    finally:
        log.close()
    if args.json:
        write_json(s)
        return EXIT_OK
    write_line(f"{'published':>10} {'found':>7} {'not found':>10} {'open':>6} {'retracted':>10} {'pending':>8}"
         f"  recovery rate")
    write_line(f"{s['published']:>10,} {s['found']:>7,} {s['not_found']:>10,} {s['open']:>6,} "
         f"{s['retracted']:>10,} {s['pending']:>8,}  {s['recovery_rate_pct']:.2f} % (found / published)")
    outcomes = [(k, v) for k, v in s["by_outcome"].items() if v]
    if outcomes:
        write_line("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in outcomes))
    write_line(f"pushes {s['pushes']:,}, devices reached {s['devices_reached']:,}")
    for div, row in s["by_division"].items():
        write_line(f"  {div} {row.get('name', '')}  published {row['published']:,}  found {row['found']:,}  "
             f"not found {row['not_found']:,}  open {row['open']:,}  retracted {row['retracted']:,}")
    for name, row in s["by_case_type"].items():
        write_line(f"  case type {name}: published {row['published']:,}  found {row['found']:,}  "
             f"not found {row['not_found']:,}  open {row['open']:,}  retracted {row['retracted']:,}  "
             f"recovery rate {row['recovery_rate_pct']:.2f} %")
    return EXIT_OK


def cmd_divisions(args) -> int:
    """Look a division up by code, by name or by point (China's registry)."""
    from ..divisions import Divisions
    divs = Divisions.china()
    if args.point is not None:
        lat, lon = _parse_point(args.point)
        d = divs.locate(lat, lon)
        codes = [d.code] if d is not None else []
        if d is None and not args.json:
            write_line(f"({lat}, {lon}) lies in no division of China")
    elif args.query is None:
        codes = divs.children(None)
    elif args.query.isdigit():
        divs[args.query]   # unknown codes are refused, never guessed
        codes = [args.query]
    else:
        codes = divs.find(args.query)
        if not codes:
            from ..errors import UnknownDivisionError
            raise UnknownDivisionError(f"no division is named like {args.query!r}")
    rows = [{"code": c, "name": divs.name(c), "level": divs.level(c), "parent": divs.parent(c),
             "place": divs.full_name(c), "children": len(divs.children(c))} for c in codes]
    if args.json:
        write_json(rows)
        return EXIT_OK
    for r in rows:
        write_line(f"{r['code']}  {r['level']:<8} {r['place']}"
             + (f"   ({r['children']} divisions under it)" if r["children"] else ""))
    return EXIT_OK


def _parse_point(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidInputError(f"--point={text!r} must be LAT,LON (e.g. 30.25,120.17)") from None


def add_config(verb) -> None:
    sp = verb("config", "the settings in force (defaults overlaid with --config FILE), as TOML", cmd_config)
    csub = sp.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    cp = csub.add_parser("show", help="print the settings in force")
    cp.add_argument("--config", metavar="FILE", help="settings TOML (default: the built-in defaults)")
    cp.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_stats(verb) -> None:
    sp = verb("stats", "published, found, not found, open, recovery rate, outcomes", cmd_stats)
    sp.add_argument("--log", required=True, metavar="LOG")
    sp.add_argument("--since", metavar="ISO")
    sp.add_argument("--until", metavar="ISO")
    sp.add_argument("--division", metavar="CODE", help="only alerts within this division")
    sp.add_argument("--case-type", metavar="NAME", help="only alerts of this case type (child, elderly, ...)")
    sp.add_argument("--config", metavar="FILE", help="settings TOML naming the case types (default: built-in)")


def add_divisions(verb) -> None:
    sp = verb("divisions", "look up China's administrative divisions by code, name or point", cmd_divisions)
    sp.add_argument("query", nargs="?", help="a 6-digit code or a name (part of one); none: the provinces")
    sp.add_argument("--point", metavar="LAT,LON", help="the finest division containing this point")
