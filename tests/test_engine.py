"""AlertEngine: lifecycle, exactly-once rings, precise closure, outbox, authority, bad input."""
import datetime as dt

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import geotarget as gt
from geotarget.errors import (AlertStateError, InvalidInputError, UnauthorizedError, UnknownAlertError,
                              UnknownOfficerError, UnknownPushError)
from geotarget.geo import haversine_km

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
HZ = (30.27, 120.15)  # Hangzhou

OFFICERS = [
    gt.Officer("county-1", level="county", division="330102"),
    gt.Officer("county-2", level="county", division="330105"),
    gt.Officer("city-1", level="city", division="330100"),
    gt.Officer("prov-1", level="province", division="330000"),
    gt.Officer("prov-sh", level="province", division="310000"),
    gt.Officer("mps", level="ministry", division="000000"),
]


def make_world(n=30_000, seed=0):
    """Devices around Hangzhou, spread so every ring of the default schedule is non-empty."""
    rng = np.random.default_rng(seed)
    d_km = rng.uniform(0, 700, n)
    bearing = rng.uniform(0, 2 * np.pi, n)
    lat = HZ[0] + (d_km / 111.2) * np.cos(bearing)
    lon = HZ[1] + (d_km / (111.2 * np.cos(np.radians(HZ[0])))) * np.sin(bearing)
    ids = np.arange(n, dtype=np.uint64) * 13 + 5
    app = rng.choice(["amap", "alipay", "weibo"], n)
    store = gt.DeviceStore.from_arrays(ids, lat, lon, app=app, last_seen=T0 - dt.timedelta(hours=1))
    return gt.SpatialIndex.build(store)


def moved(index, frac=0.1, seed=1, new=500):
    """A new generation: some devices move near the centre, some new devices appear."""
    rng = np.random.default_rng(seed)
    s = index.store
    k = rng.choice(len(s), int(len(s) * frac), replace=False)
    ids = np.concatenate([s.device_id[k], np.arange(new, dtype=np.uint64) + 10**12 + seed * 10**6])
    m = len(ids)
    lat = HZ[0] + rng.uniform(-2, 2, m)
    lon = HZ[1] + rng.uniform(-2, 2, m)
    return gt.SpatialIndex.build(s.with_updates(ids, lat, lon, app=rng.choice(["amap", "qq"], m)))


def oracle(index, lat, lon, r):
    return set(np.flatnonzero(haversine_km(lat, lon, index.store.lat, index.store.lon) <= r).tolist())


@pytest.fixture(scope="module")
def world():
    return make_world()


def engine_for(index, path, **kw):
    return gt.AlertEngine(index, log=gt.RecipientLog(path), authority=gt.Authority(OFFICERS), **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def log_at(request, tmp_path):
    """Where the engine's log lives: a SQLite file, or a fresh PostgreSQL database."""
    return tmp_path / "log" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def keyset(push):
    return set(push.audience.keys().tolist())


def test_full_lifecycle(world, log_at):
    eng = engine_for(world, log_at)
    alert = eng.report("county-1", lat=HZ[0], lon=HZ[1], division="330102",
                       missing_since=T0, now=T0 + dt.timedelta(minutes=20), details={"headline": "Missing girl, 6"})
    assert alert.status == "pending"
    assert eng.tick(T0 + dt.timedelta(minutes=25)) == []          # not approved: nothing goes out
    eng.approve(alert.id, "city-1", now=T0 + dt.timedelta(minutes=30))
    p1 = eng.tick(T0 + dt.timedelta(minutes=30))
    assert [p.kind for p in p1] == ["alert"] and p1[0].radius_km == 100
    assert set(p1[0].timings) == {"query_ms", "log_ms"} and p1[0].timings["log_ms"] > 0
    assert keyset(p1[0]) == oracle(world, *HZ, 100)
    assert eng.tick(T0 + dt.timedelta(minutes=30)) == []          # idempotent
    assert eng.tick(T0 + dt.timedelta(minutes=59)) == []          # still 100 km
    seen = keyset(p1[0])
    for minutes, r in ((61, 200), (150, 300), (181, 500)):
        ps = eng.tick(T0 + dt.timedelta(minutes=minutes))
        assert [(p.kind, p.radius_km) for p in ps] == [("expand", r)]
        ring = keyset(ps[0])
        assert ring == oracle(world, *HZ, r) - seen and not (ring & seen)
        seen |= ring
    # a location refresh: devices that moved inside get a top-up, nobody gets it twice
    new_index = moved(world)
    tops = eng.refresh(new_index, T0 + dt.timedelta(minutes=200))
    assert [p.kind for p in tops] == ["topup"]
    assert keyset(tops[0]) == oracle(new_index, *HZ, 500) - seen
    seen |= keyset(tops[0])
    upd = eng.update(alert.id, "county-1", {"description": "last seen near West Lake"},
                     now=T0 + dt.timedelta(minutes=210))
    assert upd.kind == "update" and keyset(upd) == seen
    closure = eng.close(alert.id, "county-1", outcome="lost", now=T0 + dt.timedelta(minutes=240))
    assert closure.kind == "closure" and keyset(closure) == seen      # exactly everyone, incl. movers
    assert closure.push_id == eng.close(alert.id, "county-1", outcome="lost").push_id
    with pytest.raises(AlertStateError):
        eng.close(alert.id, "county-1", outcome="runaway")
    assert eng.tick(T0 + dt.timedelta(hours=9)) == []                # closed: nothing more
    # batches per app and CAP
    assert sum(t.num_rows for t in closure.batches.values()) == len(seen)
    assert "<msgType>Update</msgType>" in closure.cap_xml and "AllClear" in closure.cap_xml
    assert "<msgType>Alert</msgType>" in p1[0].cap_xml
    st_ = eng.stats()
    assert st_["published"] == 1 and st_["found"] == 1 and st_["recovery_rate"] == 1.0
    assert st_["by_outcome"]["lost"] == 1
    eng.verify()


def test_late_report_starts_at_radius_due(world, tmp_path):
    eng = engine_for(world, tmp_path / "log")
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0,
                   now=T0 + dt.timedelta(hours=2, minutes=30))
    assert a.status == "open"                                        # city reports need no approval
    ps = eng.tick(T0 + dt.timedelta(hours=2, minutes=30))
    assert [(p.kind, p.radius_km) for p in ps] == [("alert", 300)]
    assert keyset(ps[0]) == oracle(world, *HZ, 300)


def test_outbox_replays_unacked_after_reopen(world, log_at):
    eng = engine_for(world, log_at)
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
    p1 = eng.tick(T0)[0]
    eng.ack(p1.push_id)
    p2 = eng.tick(T0 + dt.timedelta(minutes=90))[0]                  # not acknowledged
    eng.log.close()
    eng2 = engine_for(world, log_at)
    replay = eng2.tick(T0 + dt.timedelta(minutes=90))
    assert [p.push_id for p in replay] == [p2.push_id]
    assert replay[0].timings == {}                                   # a replay did no new work
    assert keyset(replay[0]) == keyset(p2)
    assert eng2.tick(T0 + dt.timedelta(minutes=90)) == []            # offered once per engine
    closure = eng2.close(a.id, "city-1", outcome="runaway", now=T0 + dt.timedelta(hours=2))
    assert keyset(closure) == keyset(p1) | keyset(p2)
    with pytest.raises(UnknownPushError):
        eng2.ack("nope.0")


def test_retraction_goes_to_everyone_and_is_not_an_outcome(world, tmp_path):
    eng = engine_for(world, tmp_path / "log")
    a = eng.report("prov-1", lat=HZ[0], lon=HZ[1], division="330102", missing_since=T0, now=T0)
    p = eng.tick(T0)[0]
    r = eng.retract(a.id, "city-1", reason="false report", now=T0 + dt.timedelta(minutes=5))
    assert r.kind == "retraction" and keyset(r) == keyset(p) and "<msgType>Cancel</msgType>" in r.cap_xml
    s = eng.stats()
    assert s["published"] == 0 and s["retracted"] == 1
    with pytest.raises(AlertStateError):
        eng.close(a.id, "city-1", outcome="lost")


def test_authority_refusals_change_nothing(world, tmp_path):
    eng = engine_for(world, tmp_path / "log")
    with pytest.raises(UnauthorizedError):      # outside jurisdiction
        eng.report("county-1", lat=HZ[0], lon=HZ[1], division="330105", missing_since=T0, now=T0)
    with pytest.raises(UnknownOfficerError):
        eng.report("ghost", lat=HZ[0], lon=HZ[1], division="330102", missing_since=T0, now=T0)
    a = eng.report("county-1", lat=HZ[0], lon=HZ[1], division="330102", missing_since=T0, now=T0)
    with pytest.raises(UnauthorizedError):      # nobody approves their own report
        eng.approve(a.id, "county-1", now=T0)
    with pytest.raises(UnauthorizedError):      # a peer county is not a superior
        eng.approve(a.id, "county-2", now=T0)
    with pytest.raises(UnauthorizedError):      # Shanghai does not cover Hangzhou
        eng.approve(a.id, "prov-sh", now=T0)
    assert eng.alert(a.id).status == "pending"
    eng.approve(a.id, "mps", now=T0)
    eng.tick(T0)
    with pytest.raises(UnauthorizedError):
        eng.close(a.id, "county-2", outcome="lost", now=T0)
    assert eng.alert(a.id).status == "open"
    entries = eng.log.audit_entries(a.id)
    assert [e["action"] for e in entries][:3] == ["report", "approve", "alert"]
    assert all("device" not in str(e.get("detail", "")) for e in entries)


BAD = [
    ("naive missing_since", dict(missing_since=dt.datetime(2026, 11, 23, 8)), InvalidInputError),
    ("future missing_since", dict(missing_since=T0 + dt.timedelta(hours=1)), InvalidInputError),
    ("nan centre", dict(lat=float("nan")), InvalidInputError),
    ("lat out of range", dict(lat=91.0), InvalidInputError),
    ("bad division", dict(division="33A102"), InvalidInputError),
    ("unknown officer", dict(officer_id="nobody"), UnknownOfficerError),
]


@pytest.mark.parametrize("name,override,exc", BAD, ids=[b[0] for b in BAD])
def test_bad_reports_raise_and_change_nothing(world, tmp_path, name, override, exc):
    eng = engine_for(world, tmp_path / "log")
    kw = dict(officer_id="city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
    kw.update(override)
    officer = kw.pop("officer_id")
    with pytest.raises(exc):
        eng.report(officer, **kw)
    assert eng.alerts() == [] and eng.log.alerts() == {}


def test_other_bad_inputs(world, tmp_path):
    eng = engine_for(world, tmp_path / "log")
    with pytest.raises(UnknownAlertError):
        eng.close("GT-nope", "mps", outcome="lost", now=T0)
    with pytest.raises(InvalidInputError):
        eng.tick(dt.datetime(2026, 11, 23))
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
    eng.tick(T0)
    with pytest.raises(InvalidInputError):
        eng.close(a.id, "city-1", outcome="abducted-by-aliens", now=T0)
    with pytest.raises(InvalidInputError):
        gt.RadiusSchedule([(dt.timedelta(hours=1), -5.0)], final_km=100)
    with pytest.raises(InvalidInputError):
        gt.RadiusSchedule([(dt.timedelta(hours=1), 100.0)], final_km=1e9)
    assert eng.alert(a.id).status == "open"


def test_custom_schedule_per_alert(world, tmp_path):
    eng = engine_for(world, tmp_path / "log")
    a = eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0,
                   schedule=gt.RadiusSchedule.elderly())
    r0 = gt.RadiusSchedule.elderly().radius_at(T0, T0)
    assert eng.tick(T0)[0].radius_km == r0
    assert eng.alert(a.id).schedule == gt.RadiusSchedule.elderly().to_dict()


class EngineModel(RuleBasedStateMachine):
    """The engine beside a plain-Python model with a brute-force haversine oracle."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp()
        self.index = SMALL
        self.gen = 0
        self.eng = engine_for(self.index, f"{self.dir}/log")
        self.now = T0
        self.alerts = {}      # id -> dict(centre, notified:set, offered:set of push ids, closed)
        self.offered = {}     # push_id -> set(keys)
        self.acked = set()

    def _record(self, pushes):
        for p in pushes:
            ks = keyset(p)
            if p.push_id in self.offered:  # a replay: same id, same audience, nothing new
                assert self.offered[p.push_id] == ks, "a push id came back with another audience"
                continue
            self.offered[p.push_id] = ks
            a = self.alerts[p.alert_id]
            if p.kind in ("alert", "expand", "topup"):
                assert not (ks & a["notified"]), "a device got the alert twice"
                a["notified"] |= ks
                lat, lon = a["centre"]
                assert ks == oracle(self.eng.index, lat, lon, p.radius_km) - (a["notified"] - ks)
            else:
                assert ks == a["notified"]

    # points inside the reporter's division: Shangcheng for the county, Fuyang and Chun'an for the city
    @rule(city=st.sampled_from([(30.25, 120.17), (30.05, 119.95), (29.6, 119.0)]),
          ago=st.integers(0, 300), officer=st.sampled_from(["county-1", "city-1"]))
    def report(self, city, ago, officer):
        div = "330100"
        if officer == "county-1":
            city, div = (30.25, 120.17), "330102"
        a = self.eng.report(officer, lat=city[0], lon=city[1], division=div,
                            missing_since=self.now - dt.timedelta(minutes=ago), now=self.now)
        self.alerts[a.id] = {"centre": city, "notified": set(), "closed": False,
                             "pending": a.status == "pending"}

    @precondition(lambda self: any(a["pending"] for a in self.alerts.values()))
    @rule(data=st.data())
    def approve(self, data):
        aid = data.draw(st.sampled_from(sorted(k for k, a in self.alerts.items() if a["pending"])))
        self.eng.approve(aid, "prov-1", now=self.now)
        self.alerts[aid]["pending"] = False

    @rule(minutes=st.integers(0, 100))
    def tick(self, minutes):
        self.now += dt.timedelta(minutes=minutes)
        self._record(self.eng.tick(self.now))

    @rule(seed=st.integers(0, 3))
    def refresh(self, seed):
        self.gen += 1
        new = moved(self.eng.index, frac=0.05, seed=seed * 100 + self.gen, new=50)
        self._record(self.eng.refresh(new, self.now))

    @precondition(lambda self: bool(self.offered))
    @rule(data=st.data())
    def ack(self, data):
        pid = data.draw(st.sampled_from(sorted(self.offered)))
        self.eng.ack(pid)
        self.acked.add(pid)

    @precondition(lambda self: any(not a["closed"] and not a["pending"] for a in self.alerts.values()))
    @rule(data=st.data(), outcome=st.sampled_from(["lost", "runaway", "not_found"]))
    def close(self, data, outcome):
        aid = data.draw(st.sampled_from(sorted(k for k, a in self.alerts.items()
                                               if not a["closed"] and not a["pending"])))
        p = self.eng.close(aid, "prov-1", outcome=outcome, now=self.now)
        self._record([p])
        self.alerts[aid]["closed"] = True

    @rule()
    def reopen(self):
        index = self.eng.index
        self.eng.log.close()
        self.eng = engine_for(index, f"{self.dir}/log")
        replay = self.eng.tick(self.now)
        unacked = {pid for pid in self.offered if pid not in self.acked}
        got = {p.push_id for p in replay if p.push_id in self.offered}
        assert got == unacked, "reopen must offer exactly the unacknowledged pushes again"
        self._record(replay)

    @invariant()
    def closure_is_union(self):
        for aid, a in self.alerts.items():
            assert set(self.eng.notified(aid).keys().tolist()) == a["notified"]

    def teardown(self):
        self.eng.log.close()


SMALL = make_world(n=3000, seed=7)
TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)


@pytest.mark.parametrize("max_age_h", [None, 2])
def test_refresh_with_changed_keys_equals_full_retarget(world, tmp_path, max_age_h):
    """The delta path (only devices a generation changed) gives the full query's top-ups."""
    age = dt.timedelta(hours=max_age_h) if max_age_h else None
    results = []
    for mode in ("delta", "stale", "full"):
        eng = engine_for(world, tmp_path / f"log-{mode}", max_location_age=age)
        eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
        eng.tick(T0 + dt.timedelta(minutes=30))
        new_index = moved(world, frac=0.2, seed=5, new=2000)
        assert new_index.store.parent_generation == world.store.generation
        assert new_index.delta_points is not None      # kept by the build
        if mode == "stale":                             # points of other keys: recomputed, not trusted
            new_index.delta_points = new_index.delta_points[::-1].copy()
            new_index.delta_latlon = new_index.delta_latlon[:, ::-1].copy()
        if mode == "full":
            new_index.store.changed_keys = None          # forces a full query per alert
        tops = eng.refresh(new_index, T0 + dt.timedelta(minutes=40))
        results.append([(p.kind, p.radius_km, set(p.audience.keys().tolist())) for p in tops])
        eng.log.close()
    assert results[0] == results[1] == results[2] and results[0] and results[0][0][0] == "topup"


def test_refresh_across_a_skipped_generation_falls_back_to_full_query(world, tmp_path):
    eng = engine_for(world, tmp_path / "log")
    eng.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
    eng.tick(T0)
    g2 = moved(world, frac=0.1, seed=8, new=100)
    g3 = moved(g2, frac=0.1, seed=9, new=100)          # its changed_keys are relative to g2, not g1
    tops = eng.refresh(g3, T0 + dt.timedelta(minutes=10))
    seen = set(eng.pushes(eng.alerts()[0].alert_id)[0].audience.keys().tolist())
    assert set().union(*(set(p.audience.keys().tolist()) for p in tops)) == oracle(g3, *HZ, 100) - seen


def test_tick_and_ack_from_several_threads(world, tmp_path):
    """Dispatch threads tick and ack concurrently: every push is offered once, rings stay disjoint."""
    import threading
    eng = engine_for(world, tmp_path / "log")
    centres = [(30.27, 120.15), (29.6, 119.0), (30.05, 119.95), (30.3, 119.6)]  # inside Hangzhou
    ids = [eng.report("city-1", lat=la, lon=lo, division="330100", missing_since=T0, now=T0).id
           for la, lo in centres]
    offered, lock, errors = [], threading.Lock(), []
    times = [T0 + dt.timedelta(minutes=m) for m in range(0, 240, 7)]

    def dispatcher(offset):
        try:
            for now in times[offset::2] + times:
                for p in eng.tick(now):
                    with lock:
                        offered.append(p)
                    eng.ack(p.push_id)
        except Exception as exc:  # surfaced below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=dispatcher, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    push_ids = [p.push_id for p in offered]
    assert len(push_ids) == len(set(push_ids)), "a push was offered twice"
    assert not eng.log.unacked()
    for aid in ids:
        rings = [set(p.audience.keys().tolist()) for p in offered if p.alert_id == aid]
        assert sum(map(len, rings)) == len(set().union(*rings)), "a device got the alert twice"
        assert set().union(*rings) == oracle(world, *centres[ids.index(aid)], 500)
        closure = eng.close(aid, "city-1", outcome="lost", now=T0 + dt.timedelta(hours=5))
        assert set(closure.audience.keys().tolist()) == set().union(*rings)


def test_a_standby_engine_answers_reads_refuses_actions_and_takes_over(world, pg_url):
    from geotarget.errors import LeaseLostError

    leader = engine_for(world, pg_url)
    standby = gt.AlertEngine(world, log=gt.RecipientLog(pg_url, standby=True), authority=gt.Authority(OFFICERS))
    try:
        assert leader.leader and not standby.leader
        a = leader.report("city-1", lat=HZ[0], lon=HZ[1], division="330100", missing_since=T0, now=T0)
        [p1] = leader.tick(T0)
        leader.ack(p1.push_id)
        [p2] = leader.tick(T0 + dt.timedelta(minutes=90))          # handed over, never acknowledged
        # the standby reads what the leader committed
        assert [x.alert_id for x in standby.alerts()] == [a.alert_id]
        assert standby.alert(a.alert_id).radius_km == 200
        assert [x.push_id for x in standby.pushes(a.alert_id)] == [p1.push_id, p2.push_id]
        assert set(standby.notified(a.alert_id).keys().tolist()) == keyset(p1) | keyset(p2)
        assert standby.stats()["published"] == 1 and standby.verify()["anchored"] is False
        # ... and acts on nothing
        before = leader.log.anchor()
        for act in (lambda: standby.tick(T0 + dt.timedelta(minutes=150)),
                    lambda: standby.report("city-1", lat=HZ[0], lon=HZ[1], division="330100",
                                           missing_since=T0, now=T0),
                    lambda: standby.close(a.alert_id, "city-1", outcome="lost", now=T0 + dt.timedelta(hours=2)),
                    lambda: standby.ack(p2.push_id)):
            with pytest.raises(LeaseLostError, match="standby"):
                act()
        assert leader.log.anchor() == before and standby.take_over(timeout=0.2) is False
        # a planned hand-over: the new leader offers the unacknowledged push again, under its id
        leader.step_down()
        assert standby.take_over(timeout=5) and standby.leader and not leader.leader
        replay = standby.tick(T0 + dt.timedelta(minutes=95))
        assert [x.push_id for x in replay] == [p2.push_id] and keyset(replay[0]) == keyset(p2)
        closure = standby.close(a.alert_id, "city-1", outcome="lost", now=T0 + dt.timedelta(hours=2))
        assert keyset(closure) == keyset(p1) | keyset(p2)
        with pytest.raises(LeaseLostError):
            leader.tick(T0 + dt.timedelta(hours=3))
    finally:
        standby.log.close()
        leader.log.close()
