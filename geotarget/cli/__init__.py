"""The ``geotarget`` command line: thin verbs over the library.

One module per verb group, each registering its own subcommands and options
(``add_*``) and holding their ``cmd_*`` functions: :mod:`.data` (generate,
ingest, build, query, bench), :mod:`.alerts` (the alert lifecycle),
:mod:`.records` (log, audit, officers), :mod:`.stats` (stats, divisions,
config) and :mod:`.demo` (demo, map); :mod:`._common` holds the exit codes,
argument types and openers they share.  Tables, counts and statistics
records come from the library (:mod:`geotarget.outputs`,
:func:`geotarget.stats.log_records`, :meth:`DeviceStore.with_updates_from_table`).

Verbs
-----
``demo``                  the whole job end to end on a national population (no arguments needed)
``generate``              a synthetic population into a store directory
``ingest``                Parquet or CSV into a store directory
``build``                 the spatial index of a store directory (written next to the store)
``query``                 devices within a circle: counts by app, or ids to Parquet
``alert report|approve|tick|refresh|update|close|retract|show``   the alert lifecycle on a log
``stats``                 published, found, recovery rate, outcomes
``audit verify|list|anchor``  check the log and its hash-chained audit trail; list the trail;
                          print the chain head for an outside witness
``log backup``            copy a recipient log, WAL included, with SQLite's online backup
``officers register``     register (or change) the officers registry of a log: a ministry officer
``alert purge``           apply the retention setting: drop closed alerts' recipients and outputs
``bench``                 in-process timings of within/count on an index
``map``                   the map PNG of any alert in a log
``divisions``             China's administrative divisions by code, name or point

A store and its index share one directory (``--store DIR`` where it is
written, ``--index DIR`` where it is read).

Officers file (``--officers``)
------------------------------
JSON, either a list of officers or an object with ``officers`` and an
optional approval ``policy``::

    [{"officer_id": "C-330102", "level": "county", "division": "330102", "name": "..."},
     {"officer_id": "S-330100", "level": "city", "division": "330100"}]

    {"officers": [...], "policy": {"needs_approval": ["county"],
                                    "approver_levels": ["city", "province", "ministry"]}}

or CSV with a header ``officer_id,level,division[,name]``.  Levels are
ministry, province, city, county; a division is a 6-digit code
(``000000`` ministry, ``330000`` province, ``330100`` city, ``330102``
county), kept as text (write ``000000``, not ``0``).

Conventions
-----------
* ``--json`` on every verb whose output machines read; JSON goes to stdout.
* Exit codes: 0 ok; 1 usage error (the command line cannot be parsed: unknown
  verb or option, a missing or malformed argument); 2 refused or invalid
  input (any :class:`~geotarget.errors.GeotargetError`, or a file that cannot
  be read), with one line on stderr and never a traceback; 3 the demo's
  self-check failed.
* Times are ISO 8601 with an offset (``2026-11-23T08:10:00+08:00`` or
  ``...Z``); a time without one is refused, as in the library.
* Progress bars (tqdm) go to stderr when it is a terminal, never otherwise
  (``GEOTARGET_PROGRESS=0/1`` overrides).
* Every file and directory a verb creates is private (0600 / 0700): stores,
  indexes, logs and per-push outputs hold device locations or ids.
* A keyed log needs its MAC key in ``GEOTARGET_LOG_KEY`` or a file named by
  ``GEOTARGET_LOG_KEY_FILE``; without it the log is read and verified unkeyed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import GeotargetError
from . import alerts, data, demo, records, stats
from ._common import EXIT_OK, EXIT_REFUSED, Parser, load_officers, one_line, parse_count

__all__ = ["main", "build_parser", "parse_count", "load_officers"]

#: The verbs in the order ``geotarget --help`` lists them.
_VERBS = (demo.add_demo, data.add_generate, data.add_ingest, data.add_build, data.add_query, alerts.add_alert,
          stats.add_config, stats.add_stats, records.add_audit, records.add_log, records.add_officers,
          data.add_bench, stats.add_divisions, demo.add_map)

_EPILOG = """\
a store and its index share one directory: --store DIR writes it, --index DIR reads it.

officers file (--officers), JSON:
  [{"officer_id": "C-330102", "level": "county", "division": "330102"},
   {"officer_id": "S-330100", "level": "city", "division": "330100"}]
or {"officers": [...], "policy": {"needs_approval": ["county"]}}, or CSV with the
header officer_id,level,division[,name]. Levels: ministry, province, city, county;
divisions are 6-digit codes kept as text (000000, 330000, 330100, 330102).

times are ISO 8601 with an offset: 2026-11-23T08:10:00+08:00 or ...Z.
exit codes: 0 ok, 1 usage error, 2 refused or invalid input (one line on stderr),
3 the demo's self-check failed.
"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = Parser(prog="geotarget",
               description="Geospatial targeting for missing-child alerts. Start with: geotarget demo",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"geotarget {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name, help_, func, json_=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        if json_:
            sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return sp

    for add in _VERBS:
        add(verb)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; return the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (1)
        return int(exc.code or 0)
    try:
        from .._fs import private_files

        with private_files():
            return int(args.func(args) or 0)
    except GeotargetError as exc:
        sys.stderr.write(f"geotarget: error: {one_line(exc)}\n")
        return EXIT_REFUSED
    except BrokenPipeError:
        # the reader went away (``| head``): not a failure of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        # a file the user named cannot be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        sys.stderr.write(f"geotarget: error: {where}{exc.strerror or one_line(exc)}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        sys.stderr.write("geotarget: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
