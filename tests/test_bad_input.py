"""One door for bad input: every public entry point refuses wrong types with a typed error.

A table of bad values (strings for numbers, bools, complex numbers, wrong
containers, None where a value is required) is walked over every parameter of
every public function and method, and every CLI verb gets its wrong arguments.
Each call must raise a :class:`GeotargetError` naming the parameter, and leave
the log exactly as it was.
"""
from __future__ import annotations

import datetime as dt
import json
import sys

import numpy as np
import pytest

import geotarget as gt
from geotarget.engine import purge_expired, register_officers
from geotarget.errors import GeotargetError

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
OFFICERS = [gt.Officer("city-1", level="city", division="330100"),
            gt.Officer("mps", level="ministry", division="000000")]

#: kind -> a value of that kind
BAD = {
    "str": "30.5",
    "bool": True,
    "complex": 1 + 2j,
    "list": ["x"],
    "dict": {"a": 1},
    "none": None,
    "bytes": b"x",
    "naive": dt.datetime(2026, 11, 23, 8, 0),
    "float": 2.5,
    "int": 7,
}
NUMBER = ("str", "bool", "complex", "list", "dict", "none", "bytes")
TEXT_ID = ("bool", "complex", "list", "dict", "none", "bytes", "float", "int")
TIME = ("str", "bool", "complex", "list", "naive", "float", "int")
OPT_TIME = ("str", "bool", "complex", "list", "naive", "float", "int")


class World:
    def __init__(self, tmp_path):
        rng = np.random.default_rng(1)
        n = 3000
        self.store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) + 1, 30.27 + rng.uniform(-3, 3, n),
                                                120.15 + rng.uniform(-3, 3, n), last_seen=T0)
        self.index = gt.SpatialIndex.build(self.store)
        self.log = gt.RecipientLog(tmp_path / "log")
        self.authority = gt.Authority(OFFICERS)
        self.engine = gt.AlertEngine(self.index, log=self.log, authority=self.authority)
        self.alert = self.engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0,
                                        now=T0).id
        [self.push] = self.engine.tick(T0 + dt.timedelta(minutes=1))

    def state(self):
        return (self.log.stats(), [e["hash"] for e in self.log.audit_entries()],
                [(a.alert_id, a.status, a.next_seq, a.quarantine) for a in self.engine.alerts()])


def _kw(**kw):
    return kw


# (label, parameter name as the message names it, kinds, call(world, value))
CASES = [
    ("haversine_km", "lat1", ("str", "complex", "dict", "none", "bytes"),
     lambda w, v: gt.haversine_km(v, 120.0, 30.0, 121.0)),
    ("DeviceStore.from_arrays", "lat", ("str", "complex", "dict", "none", "bytes"),
     lambda w, v: gt.DeviceStore.from_arrays(np.arange(3, dtype=np.uint64), v, np.zeros(3))),
    ("DeviceStore.from_arrays", "last_seen", ("str", "complex", "dict", "naive", "bytes"),
     lambda w, v: gt.DeviceStore.from_arrays(np.arange(3, dtype=np.uint64), np.zeros(3), np.zeros(3),
                                             last_seen=v)),
    ("DeviceStore.with_updates_from_table", "table", ("str", "complex", "list", "dict", "none", "int"),
     lambda w, v: w.store.with_updates_from_table(v)),
    ("SpatialIndex.within", "lat", NUMBER, lambda w, v: w.index.within(v, 120.15, 10.0)),
    ("SpatialIndex.within", "lon", NUMBER, lambda w, v: w.index.within(30.27, v, 10.0)),
    ("SpatialIndex.within", "radius_km", NUMBER, lambda w, v: w.index.within(30.27, 120.15, v)),
    ("SpatialIndex.within", "seen_since", ("str", "bool", "complex", "list", "naive", "float", "int"),
     lambda w, v: w.index.within(30.27, 120.15, 10.0, seen_since=v)),
    ("SpatialIndex.count", "radius_km", NUMBER, lambda w, v: w.index.count(30.27, 120.15, v)),
    ("SpatialIndex.changed_within", "circles", ("str", "bool", "complex", "list", "dict", "none", "bytes", "int"),
     lambda w, v: w.index.changed_within(v, [])),
    ("SpatialIndex.changed_within", "notified", ("str", "bool", "complex", "list", "dict", "none", "bytes", "int"),
     lambda w, v: w.index.changed_within([], v)),
    ("RecipientLog", "timeout", ("str", "bool", "complex", "list", "dict"),
     lambda w, v: gt.RecipientLog(w.log.path + ".other", timeout=v)),
    ("RecipientLog", "path", ("bool", "complex", "list", "dict", "none", "float", "int"),
     lambda w, v: gt.RecipientLog(v)),
    ("RecipientLog", "key", ("bool", "complex", "list", "dict", "float", "int"),
     lambda w, v: gt.RecipientLog(w.log.path + ".other", key=v)),
    ("RecipientLog", "lease", ("str", "bool", "complex", "list", "dict", "none"),
     lambda w, v: gt.RecipientLog(w.log.path + ".other", lease=v)),
    ("RecipientLog", "standby", ("str", "complex", "list", "dict", "none", "int", "float"),
     lambda w, v: gt.RecipientLog(w.log.path + ".other", standby=v)),
    ("take_over", "timeout", ("str", "bool", "complex", "list", "dict", "bytes"),
     lambda w, v: w.engine.take_over(v)),
    ("take_over", "poll", ("str", "bool", "complex", "list", "dict", "none", "bytes"),
     lambda w, v: w.engine.take_over(poll=v)),
    ("AlertEngine", "workers", ("str", "bool", "complex", "list", "dict", "none", "float"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, workers=v)),
    ("AlertEngine", "index", ("str", "bool", "complex", "list", "dict", "none", "int"),
     lambda w, v: gt.AlertEngine(v, log=w.log, authority=w.authority)),
    ("AlertEngine", "log", ("str", "bool", "complex", "list", "dict", "none", "int"),
     lambda w, v: gt.AlertEngine(w.index, log=v, authority=w.authority)),
    ("AlertEngine", "authority", ("str", "bool", "complex", "list", "dict", "none", "int"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=v)),
    ("AlertEngine", "schedule", ("str", "bool", "complex", "list", "dict", "int"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, schedule=v)),
    ("AlertEngine", "sender", ("bool", "complex", "list", "dict", "int"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, sender=v)),
    ("AlertEngine", "max_location_age", ("str", "bool", "complex", "list", "dict", "int", "float"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, max_location_age=v)),
    ("AlertEngine", "retention_days", ("str", "bool", "complex", "list", "dict"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, retention_days=v)),
    ("AlertEngine", "signer", ("str", "bool", "complex", "list", "dict", "int", "bytes"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, signer=v)),
    ("AlertEngine", "settings", ("str", "bool", "complex", "list", "dict", "int", "bytes"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, settings=v)),
    ("AlertEngine", "metrics", ("str", "bool", "complex", "list", "dict", "int", "bytes"),
     lambda w, v: gt.AlertEngine(w.index, log=w.log, authority=w.authority, metrics=v)),
    ("report", "case_type", ("bool", "complex", "list", "dict", "bytes", "int", "none", "str"),
     lambda w, v: w.engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0,
                                  now=T0, case_type=v)),
    ("report", "drill", ("str", "complex", "list", "dict", "bytes", "int", "none"),
     lambda w, v: w.engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0,
                                  now=T0, drill=v)),
    ("report", "photos", ("str", "bool", "complex", "list", "dict", "bytes", "int"),
     lambda w, v: w.engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0,
                                  now=T0, photos=v)),
    ("report", "photos[0]", ("bool", "complex", "list", "dict", "bytes", "int", "str", "none"),
     lambda w, v: w.engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0,
                                  now=T0, photos=[v])),
    ("report", "division_wide", ("str", "complex", "list", "dict", "bytes", "int", "none"),
     lambda w, v: w.engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0,
                                  now=T0, division_wide=v)),
    ("renew", "alert_id", TEXT_ID, lambda w, v: w.engine.renew(v, "mps", now=T0)),
    ("renew", "hours", ("str", "bool", "complex", "list", "dict", "bytes"),
     lambda w, v: w.engine.renew(w.alert, "mps", now=T0 + dt.timedelta(minutes=2), hours=v)),
    ("confirm_distinct", "alert_id", TEXT_ID, lambda w, v: w.engine.confirm_distinct(v, "mps", now=T0)),
    ("confirm_duplicate", "alert_id", TEXT_ID, lambda w, v: w.engine.confirm_duplicate(v, "mps", now=T0)),
    ("place", "alert_id", TEXT_ID, lambda w, v: w.engine.place(v)),
    ("report", "lat", NUMBER, lambda w, v: w.engine.report(
        "city-1", lat=v, lon=120.15, division="330100", missing_since=T0, now=T0)),
    ("report", "lon", NUMBER, lambda w, v: w.engine.report(
        "city-1", lat=30.27, lon=v, division="330100", missing_since=T0, now=T0)),
    ("report", "missing_since", TIME + ("none",), lambda w, v: w.engine.report(
        "city-1", lat=30.27, lon=120.15, division="330100", missing_since=v, now=T0)),
    ("report", "now", OPT_TIME, lambda w, v: w.engine.report(
        "city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0, now=v)),
    ("report", "division", TEXT_ID, lambda w, v: w.engine.report(
        "city-1", lat=30.27, lon=120.15, division=v, missing_since=T0, now=T0)),
    ("report", "officer_id", TEXT_ID, lambda w, v: w.engine.report(
        v, lat=30.27, lon=120.15, division="330100", missing_since=T0, now=T0)),
    ("report", "details", ("str", "bool", "complex", "list", "bytes", "int"), lambda w, v: w.engine.report(
        "city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0, now=T0, details=v)),
    ("report", "schedule", ("str", "bool", "complex", "list", "dict", "int"), lambda w, v: w.engine.report(
        "city-1", lat=30.27, lon=120.15, division="330100", missing_since=T0, now=T0, schedule=v)),
    ("approve", "alert_id", TEXT_ID, lambda w, v: w.engine.approve(v, "mps", now=T0)),
    ("tick", "now", TIME + ("none",), lambda w, v: w.engine.tick(v)),
    ("ack", "push_id", TEXT_ID, lambda w, v: w.engine.ack(v)),
    ("update", "alert_id", TEXT_ID, lambda w, v: w.engine.update(v, "city-1", {"headline": "x"}, now=T0)),
    ("update", "details", ("str", "bool", "complex", "list", "bytes", "int", "none"),
     lambda w, v: w.engine.update(w.alert, "city-1", v, now=T0 + dt.timedelta(minutes=2))),
    ("update", "now", OPT_TIME, lambda w, v: w.engine.update(w.alert, "city-1", {"headline": "x"}, now=v)),
    ("close", "alert_id", TEXT_ID, lambda w, v: w.engine.close(v, "mps", outcome="lost", now=T0)),
    ("close", "outcome", TEXT_ID, lambda w, v: w.engine.close(w.alert, "mps", outcome=v,
                                                              now=T0 + dt.timedelta(minutes=2))),
    ("close", "officer_id", TEXT_ID, lambda w, v: w.engine.close(w.alert, v, outcome="lost",
                                                                 now=T0 + dt.timedelta(minutes=2))),
    ("close", "now", OPT_TIME, lambda w, v: w.engine.close(w.alert, "mps", outcome="lost", now=v)),
    ("retract", "reason", ("bool", "complex", "list", "dict", "bytes", "int", "none"),
     lambda w, v: w.engine.retract(w.alert, "mps", reason=v, now=T0 + dt.timedelta(minutes=2))),
    ("refresh", "new_index", ("str", "bool", "complex", "list", "dict", "none", "int"),
     lambda w, v: w.engine.refresh(v, T0 + dt.timedelta(minutes=2))),
    ("refresh", "now", TIME + ("none",), lambda w, v: w.engine.refresh(w.index, v)),
    ("stats", "since", ("str", "bool", "complex", "list", "naive", "int"), lambda w, v: w.engine.stats(since=v)),
    ("stats", "division", ("bool", "complex", "list", "dict", "int"), lambda w, v: w.engine.stats(division=v)),
    ("stats", "case_type", ("str", "bool", "complex", "list", "dict", "bytes", "int"),
     lambda w, v: w.engine.stats(case_type=v)),
    ("pushes", "alert_id", TEXT_ID, lambda w, v: w.engine.pushes(v)),
    ("notified", "alert_id", TEXT_ID, lambda w, v: w.engine.notified(v)),
    ("Officer", "level", TEXT_ID, lambda w, v: gt.Officer("x", level=v, division="330100")),
    ("Officer", "division", TEXT_ID, lambda w, v: gt.Officer("x", level="city", division=v)),
    ("Authority", "officers", ("str", "bool", "complex", "dict", "none", "int", "list"),
     lambda w, v: gt.Authority(v)),
    ("RecipientLog.verify", "anchor", ("str", "bool", "complex", "list", "dict", "int", "float"),
     lambda w, v: w.log.verify(v)),
    ("RecipientLog.backup", "dst", ("bool", "complex", "list", "dict", "none", "float", "int"),
     lambda w, v: w.log.backup(v)),
    ("RecipientLog.copy_to", "dst", ("bool", "complex", "list", "dict", "none", "float", "int"),
     lambda w, v: w.log.copy_to(v)),
    ("purge_expired", "retention_days", ("str", "bool", "complex", "list", "dict", "none"),
     lambda w, v: purge_expired(w.log, v, T0)),
    ("purge_expired", "photo_dir", ("bool", "complex", "list", "dict", "int"),
     lambda w, v: purge_expired(w.log, 30, T0, photo_dir=v)),
    ("register_officers", "officer_id", TEXT_ID, lambda w, v: register_officers(w.log, w.authority, v, T0)),
    ("register_officers", "authority", ("str", "bool", "complex", "list", "dict", "none"),
     lambda w, v: register_officers(w.log, v, "mps", T0)),
]

PARAMS = [pytest.param(label, name, kind, call, id=f"{label}-{name}-{kind}")
          for label, name, kinds, call in CASES for kind in kinds]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("bad"))
    yield w
    w.engine.shutdown()


@pytest.mark.parametrize("label, name, kind, call", PARAMS)
def test_bad_value_is_refused_with_a_typed_error_and_changes_nothing(world, label, name, kind, call):
    before = world.state()
    with pytest.raises(GeotargetError) as info:
        call(world, BAD[kind])
    message = str(info.value)
    aliases = {"lat1": "lat", "new_index": "new_index", "officers": "officers", "path": "path"}
    assert name in message or aliases.get(name, name) in message or (
        kind in ("naive",) and "naive" in message) or repr(BAD[kind])[:20] in message, message
    assert world.state() == before


# -- the command line ---------------------------------------------------------------

CLI_CASES = {
    "query-lat-text": (["query", "--index", "{st}", "--lat", "north", "--lon", "120", "--radius", "10"], 1),
    "query-radius-complex": (["query", "--index", "{st}", "--lat", "30", "--lon", "120", "--radius", "1+2j"], 1),
    "report-lat-bool": (["alert", "report", "--log", "{log}", "--index", "{st}", "--officers", "{off}",
                         "--officer", "city-1", "--lat", "True", "--lon", "120", "--missing-since",
                         "2026-11-23T08:00:00Z"], 1),
    "report-naive-time": (["alert", "report", "--log", "{log}", "--index", "{st}", "--officers", "{off}",
                           "--officer", "city-1", "--lat", "30.27", "--lon", "120.15", "--missing-since",
                           "2026-11-23T08:00:00"], 2),
    "report-headline-control": (["alert", "report", "--log", "{log}", "--index", "{st}", "--officers", "{off}",
                                 "--officer", "city-1", "--lat", "30.27", "--lon", "120.15", "--missing-since",
                                 "2026-11-23T08:00:00Z", "--headline", "a\x07b"], 2),
    "report-details-list": (["alert", "report", "--log", "{log}", "--index", "{st}", "--officers", "{off}",
                             "--officer", "city-1", "--lat", "30.27", "--lon", "120.15", "--missing-since",
                             "2026-11-23T08:00:00Z", "--details", "[1, 2]"], 2),
    "tick-now-text": (["alert", "tick", "--log", "{log}", "--index", "{st}", "--now", "soon"], 2),
    "serve-every-zero": (["alert", "serve", "--log", "{log}", "--index", "{st}", "--out", "{tmp}/o", "--every",
                          "0"], 1),
    "serve-lease-text": (["alert", "serve", "--log", "{log}", "--index", "{st}", "--out", "{tmp}/o", "--lease",
                          "long"], 1),
    "serve-for-negative": (["alert", "serve", "--log", "{log}", "--index", "{st}", "--out", "{tmp}/o", "--for",
                            "-1"], 1),
    "purge-days-text": (["alert", "purge", "--log", "{log}", "--retention-days", "ten"], 1),
    "purge-days-negative": (["alert", "purge", "--log", "{log}", "--retention-days", "-1"], 1),
    "verify-anchor-text": (["audit", "verify", "--log", "{log}", "--anchor", "latest"], 2),
    "backup-onto-itself": (["log", "backup", "{log}", "{log}"], 2),
    "copy-onto-itself": (["log", "copy", "{log}", "{log}"], 2),
    "officers-unknown": (["officers", "register", "--log", "{log}", "--officers", "{off}", "--officer",
                          "nobody"], 2),
    "report-photo-missing": (["alert", "report", "--log", "{log}", "--index", "{st}", "--officers", "{off}",
                              "--officer", "city-1", "--lat", "30.27", "--lon", "120.15", "--missing-since",
                              "2026-11-23T08:00:00Z", "--photo", "{tmp}/nope.jpg"], 2),
    "report-photo-not-an-image": (["alert", "report", "--log", "{log}", "--index", "{st}", "--officers",
                                   "{off}", "--officer", "city-1", "--lat", "30.27", "--lon", "120.15",
                                   "--missing-since", "2026-11-23T08:00:00Z", "--photo", "{off}"], 2),
    "stats-since-naive": (["stats", "--log", "{log}", "--since", "2026-11-23"], 2),
    "stats-case-type-unknown": (["stats", "--log", "{log}", "--case-type", "toddler"], 2),
    "generate-devices-text": (["generate", "--devices", "many", "--store", "{tmp}/g"], 1),
    "ingest-missing-file": (["ingest", "{tmp}/nope.csv", "--store", "{tmp}/g2"], 2),
}


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory, world):
    d = tmp_path_factory.mktemp("badcli")
    world.index.save(d / "st")
    (d / "officers.json").write_text(json.dumps([o.to_dict() for o in OFFICERS]))
    from geotarget.cli import main
    assert main(["alert", "report", "--log", str(d / "log.sqlite"), "--index", str(d / "st"), "--officers",
                 str(d / "officers.json"), "--officer", "city-1", "--lat", "30.27", "--lon", "120.15",
                 "--missing-since", "2026-11-23T08:00:00Z", "--now", "2026-11-23T08:00:00Z"]) == 0
    return d


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_bad_arguments_without_a_traceback(cli_world, case, capsys):
    from geotarget.cli import main
    from geotarget.log import RecipientLog

    argv, code = CLI_CASES[case]
    d = cli_world
    argv = [a.format(st=d / "st", log=d / "log.sqlite", off=d / "officers.json", tmp=d) for a in argv]
    with RecipientLog(d / "log.sqlite") as log:
        before = (log.stats(), [e["hash"] for e in log.audit_entries()])
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    with RecipientLog(d / "log.sqlite") as log:
        assert (log.stats(), [e["hash"] for e in log.audit_entries()]) == before


def test_every_public_name_is_walked():
    """A new public engine method or constructor parameter must get a row above."""
    import inspect

    walked = {label for label, *_ in CASES}
    engine_methods = {n for n, _ in inspect.getmembers(gt.AlertEngine, inspect.isfunction)
                      if not n.startswith("_")}
    takes_input = engine_methods - {"alerts", "verify", "shutdown", "alert", "step_down"}
    assert takes_input <= walked, takes_input - walked
    params = set(inspect.signature(gt.AlertEngine).parameters)
    assert params <= {name for label, name, *_ in CASES if label == "AlertEngine"}, params
    assert sys.modules["geotarget"] is gt


def test_last_seen_in_2100_is_refused():
    in_2100 = int(dt.datetime(2100, 1, 1, tzinfo=UTC).timestamp())
    with pytest.raises(gt.InvalidInputError, match=r"last_seen\[1\] = .* \(2100-01-01\) is more than a day"):
        gt.DeviceStore.from_arrays(np.arange(3, dtype=np.uint64), np.zeros(3), np.zeros(3),
                                   last_seen=np.array([1_700_000_000, in_2100, 1_700_000_000]))


@pytest.mark.parametrize("stamp, ok", [("2026-11-23 08:00:00", False), ("2026-11-23T08:00:00", False),
                                       ("2026-11-23T08:00:00+08:00", True), ("2026-11-23T00:00:00Z", True)])
def test_ingest_refuses_csv_times_without_an_offset(tmp_path, capsys, stamp, ok):
    from geotarget.cli import main

    rows = "\n".join(f"{i + 1},30.{i},120.{i},amap,{stamp}" for i in range(5))
    (tmp_path / "d.csv").write_text("device_id,lat,lon,app,last_seen\n" + rows + "\n")
    code = main(["ingest", str(tmp_path / "d.csv"), "--store", str(tmp_path / "st")])
    err = capsys.readouterr().err
    if ok:
        assert code == 0, err
        assert gt.DeviceStore.open(tmp_path / "st").last_seen_s[0] == int(
            dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    else:
        assert code == 2 and "without a UTC offset" in err and not (tmp_path / "st").exists()
