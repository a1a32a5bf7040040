"""Prometheus metrics (geotarget.alerts.metrics): values read back from each engine's own registry."""
import datetime as dt
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import geotarget as gt
from geotarget.errors import CorruptFileError, InvalidInputError, LineageError

prometheus_client = pytest.importorskip("prometheus_client")
from geotarget.alerts.metrics import EngineMetrics  # noqa: E402

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HZ = (30.27, 120.15)
OFFICERS = [gt.Officer("city-1", level="city", division="330100"),
            gt.Officer("mps", level="ministry", division="000000")]

# The package under test, wherever it is installed (a source checkout may be unbuilt in CI).
PKG_PARENT = str(Path(gt.__file__).resolve().parent.parent)


def make_index(n=20_000, seed=0, lineage=None):
    rng = np.random.default_rng(seed)
    d_km = rng.uniform(0, 400, n)
    bearing = rng.uniform(0, 2 * np.pi, n)
    lat = HZ[0] + (d_km / 111.2) * np.cos(bearing)
    lon = HZ[1] + (d_km / (111.2 * np.cos(np.radians(HZ[0])))) * np.sin(bearing)
    store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) + 1, lat, lon,
                                       app=rng.choice(["amap", "weibo"], n),
                                       last_seen=T0 - dt.timedelta(hours=1))
    return gt.SpatialIndex.build(store)


@pytest.fixture(scope="module")
def index():
    return make_index()


def engine(index, path, metrics=None, **kw):
    return gt.AlertEngine(index, log=gt.RecipientLog(path), authority=gt.Authority(OFFICERS),
                          metrics=metrics, **kw)


def report(eng, minutes=0, **kw):
    return eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0,
                      now=T0 + dt.timedelta(minutes=minutes), **kw).id


def all_pushes(eng):
    return [p for a in eng.alerts() for p in eng.pushes(a.alert_id)]


def test_counters_and_histograms_match_the_logged_pushes(index, tmp_path):
    m = EngineMetrics()
    eng = engine(index, tmp_path / "log", m)
    child = report(eng)
    elderly = report(eng, case_type="elderly")
    drill = report(eng, drill=True)
    first = eng.tick(T0 + dt.timedelta(minutes=1))
    later = eng.tick(T0 + dt.timedelta(hours=2, minutes=30))
    assert {p.kind for p in later} == {"expand"}
    eng.update(elderly, "city-1", {"description": "grey coat"}, now=T0 + dt.timedelta(hours=3))
    eng.close(child, "city-1", "lost", now=T0 + dt.timedelta(hours=4))
    eng.close(drill, "city-1", "lost", now=T0 + dt.timedelta(hours=4))

    pushes = all_pushes(eng)
    assert len(pushes) == len(first) + len(later) + 3
    expected: dict = {}
    for p in pushes:
        key = (p.kind, "Exercise" if p.drill else "Actual")
        n, r = expected.get(key, (0, 0))
        expected[key] = (n + 1, r + len(p))
    assert ("alert", "Exercise") in expected and ("closure", "Actual") in expected
    for (kind, status), (n, r) in expected.items():
        assert m.value("geotarget_pushes_total", kind=kind, status=status) == n
        assert m.value("geotarget_recipients_total", kind=kind, status=status) == r
    # the drill went to nobody (no test devices are set), though its ring was counted as if real
    assert m.value("geotarget_recipients_total", kind="alert", status="Exercise") == 0
    assert m.value("geotarget_recipients_total", kind="alert", status="Actual") == sum(
        len(p) for p in first if not p.drill) > 0

    # stage latencies: every push has a log time, every ring a query time, as Push.timings says
    live = first + later
    rings = [p for p in live if "query_ms" in p.timings]
    assert len(rings) == len(live)
    assert m.value("geotarget_stage_seconds_count", stage="query") == len(rings)
    assert m.value("geotarget_stage_seconds_sum", stage="query") == pytest.approx(
        sum(p.timings["query_ms"] for p in rings) / 1e3)
    assert m.value("geotarget_stage_seconds_count", stage="log") == len(pushes)
    assert m.value("geotarget_stage_seconds_count", stage="batches") == 0
    batches = m.batches(first[0])
    assert {k: v.num_rows for k, v in batches.items()} == {k: v.num_rows for k, v in first[0].batches.items()}
    assert m.value("geotarget_stage_seconds_count", stage="batches") == 1
    assert m.value("geotarget_verification_failures_total", check="log") == 0
    eng.shutdown()


def test_outbox_depth_follows_acks_and_survives_a_restart(index, tmp_path):
    m = EngineMetrics()
    eng = engine(index, tmp_path / "log", m)
    report(eng)
    report(eng, case_type="elderly")
    out = eng.tick(T0 + dt.timedelta(minutes=1)) + eng.tick(T0 + dt.timedelta(hours=2, minutes=30))
    assert m.value("geotarget_outbox_depth") == len(out) == len(eng.log.unacked()) == 4
    assert eng.ack(out[0].push_id) and not eng.ack(out[0].push_id)
    assert m.value("geotarget_outbox_depth") == 3 == len(eng.log.unacked())
    eng.shutdown()
    # a reopened engine offers the unacknowledged pushes again: its outbox starts there
    m2 = EngineMetrics()
    eng = engine(index, tmp_path / "log", m2)
    assert m2.value("geotarget_outbox_depth") == 3
    replay = eng.tick(T0 + dt.timedelta(hours=2, minutes=31))
    assert len(replay) == 3 and m2.value("geotarget_pushes_total", kind="alert", status="Actual") == 0
    for p in replay:
        eng.ack(p.push_id)
    assert m2.value("geotarget_outbox_depth") == 0 == len(eng.log.unacked())
    eng.shutdown()


def test_quarantined_alerts_gauge(index, tmp_path):
    path = tmp_path / "log"
    eng = engine(index, path)
    ids = [report(eng), report(eng, case_type="elderly"), report(eng, case_type="other")]
    # records written before texts were checked (the log API takes any JSON)
    for a in ids[1:]:
        rec = eng.log.alert(a)
        rec["details"] = {"headline": "bad\x0bline"}
        eng.log.save_alert(a, rec)
    eng.shutdown()
    m = EngineMetrics()
    eng = engine(index, path, m)
    assert m.value("geotarget_quarantined_alerts") == 0
    out = eng.tick(T0 + dt.timedelta(minutes=1))
    assert sorted(f.alert_id for f in out.errors) == sorted(ids[1:]) and all(f.quarantined for f in out.errors)
    assert m.value("geotarget_quarantined_alerts") == 2
    eng.shutdown()
    m = EngineMetrics()                       # the quarantine is persisted: a new process sees it
    eng = engine(index, path, m)
    assert m.value("geotarget_quarantined_alerts") == 2
    eng.update(ids[1], "city-1", {"headline": "Missing man, 81"}, now=T0 + dt.timedelta(minutes=2))
    assert m.value("geotarget_quarantined_alerts") == 1
    assert eng.retract(ids[2], "city-1", reason="false report", now=T0 + dt.timedelta(minutes=3)) is None
    assert m.value("geotarget_quarantined_alerts") == 0
    eng.shutdown()


def test_verification_failures_are_counted_once_by_check(index, tmp_path):
    path = tmp_path / "log"
    m = EngineMetrics()
    eng = engine(index, path, m)
    report(eng)
    eng.tick(T0 + dt.timedelta(minutes=1))
    # refresh with an index of another lineage (a fresh ingest, not a new generation)
    other = make_index(seed=1)
    with pytest.raises(LineageError):
        eng.refresh(other, T0 + dt.timedelta(minutes=2))
    assert m.value("geotarget_verification_failures_total", check="index") == 1
    eng.shutdown()
    # an engine on another lineage's index is refused at construction
    m2 = EngineMetrics()
    with pytest.raises(LineageError):
        engine(other, path, m2)
    assert m2.value("geotarget_verification_failures_total", check="index") == 1

    # an audit entry changed on disk: a full verify refuses
    conn = sqlite3.connect(path)
    conn.execute("UPDATE audit SET actor = 'someone' WHERE seq = 1")
    conn.commit()
    conn.close()
    m3 = EngineMetrics()
    eng = engine(index, path, m3)
    with pytest.raises(CorruptFileError):
        eng.verify()
    assert m3.value("geotarget_verification_failures_total", check="verify") == 1
    assert m3.value("geotarget_verification_failures_total", check="index") == 0
    eng.shutdown()
    # a push row's count changed on disk: the engine refuses to open the log, counted once
    conn = sqlite3.connect(path)
    conn.execute("UPDATE pushes SET count = count + 1 WHERE seq = 0")
    conn.commit()
    conn.close()
    m4 = EngineMetrics()
    with pytest.raises(CorruptFileError, match="checksum"):
        engine(index, path, m4)
    assert m4.value("geotarget_verification_failures_total", check="log") == 1
    assert m4.value("geotarget_verification_failures_total", check="index") == 0


def test_two_engines_in_one_process_keep_their_own_series(index, tmp_path):
    ma, mb = EngineMetrics(), EngineMetrics()
    a, b = engine(index, tmp_path / "a", ma), engine(index, tmp_path / "b", mb)
    report(a)
    a.tick(T0 + dt.timedelta(minutes=1))
    assert ma.value("geotarget_pushes_total", kind="alert", status="Actual") == 1
    assert mb.value("geotarget_pushes_total", kind="alert", status="Actual") == 0
    # nothing went to the process-wide default registry
    assert prometheus_client.REGISTRY.get_sample_value("geotarget_outbox_depth") is None
    text = prometheus_client.generate_latest(ma.registry).decode()
    assert 'geotarget_pushes_total{kind="alert",status="Actual"} 1.0' in text
    a.shutdown()
    b.shutdown()


def test_bad_registry_is_refused():
    with pytest.raises(InvalidInputError, match="registry"):
        EngineMetrics(registry="default")


def test_the_engine_needs_no_prometheus_client_without_metrics(tmp_path):
    """With prometheus_client made unimportable, an engine without metrics runs a whole alert."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["prometheus_client"] = None      # import prometheus_client now raises
        import datetime as dt
        import numpy as np
        import geotarget as gt
        T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone.utc)
        n = 2000
        rng = np.random.default_rng(0)
        store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) + 1, 30.27 + rng.uniform(-1, 1, n),
                                           120.15 + rng.uniform(-1, 1, n), last_seen=T0)
        eng = gt.AlertEngine(gt.SpatialIndex.build(store), log=gt.RecipientLog({str(tmp_path / 'log')!r}),
                             authority=gt.Authority([gt.Officer("c", level="city", division="330100")]))
        assert eng.metrics is None
        a = eng.report("c", lat=30.27, lon=120.15, division="330100", missing_since=T0, now=T0).id
        [p] = eng.tick(T0 + dt.timedelta(minutes=1))
        eng.ack(p.push_id)
        c = eng.close(a, "c", "lost", now=T0 + dt.timedelta(hours=1))
        assert len(c) == len(p) > 0
        assert "prometheus_client" not in [m for m in sys.modules if sys.modules[m] is not None]
        try:
            import geotarget.alerts.metrics
        except ImportError:
            print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": PKG_PARENT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_serving_example_serves_the_engines_series(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "examples" / "serve_metrics.py"), "--port", "0",
                          "--devices", "20000"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": PKG_PARENT})
    assert out.returncode == 0, out.stderr
    lines = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
    assert float(lines['geotarget_pushes_total{kind="closure",status="Actual"}']) == 1
    assert float(lines['geotarget_recipients_total{kind="closure",status="Actual"}']) == (
        float(lines['geotarget_recipients_total{kind="alert",status="Actual"}'])
        + float(lines['geotarget_recipients_total{kind="expand",status="Actual"}'])) > 0
    assert float(lines["geotarget_outbox_depth"]) == 0
    assert float(lines['geotarget_stage_seconds_count{stage="batches"}']) >= 1
