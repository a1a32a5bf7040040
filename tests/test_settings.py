"""Settings (one TOML file over documented defaults), case types and alert expiry."""
import datetime as dt

import numpy as np
import pytest

import geotarget as gt
from geotarget.alerts.cap import parse_identifiers
from geotarget.alerts.settings import DEFAULTS, Settings

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
H = dt.timedelta(hours=1)


# -- the file ------------------------------------------------------------------

def test_defaults_are_the_documented_text():
    s = Settings.default()
    assert s.sender == "tuanyuan@mps.gov.cn"
    assert s.max_location_age == 24 * H
    assert s.case("child").event == "Child Abduction Emergency" and s.case("child").event_code == "CAE"
    assert s.case("child").schedule.radii == (100.0, 200.0, 300.0, 500.0)
    assert s.case("elderly").event_code == "MEP"
    assert s.case("child").expiry == 72 * H
    assert s.approval == gt.ApprovalPolicy()
    # every key the defaults document can be set, and `show` reproduces the settings
    again = Settings._from_doc(__import__("tomllib").loads(s.to_toml()), "shown", None)
    assert again.to_dict() == s.to_dict()


def test_a_file_changes_only_what_it_names(tmp_path, settings_file):
    p = settings_file("""
[sender]
id = "alerts@gongan.zj.gov.cn"
signing_key = "keys/k.pem"
signing_cert = "keys/c.pem"
[dispatch]
max_location_age_hours = 6
[case.elderly]
expiry_hours = 240
schedule = [[4, 30], [12, 80]]
final_km = 150
[case.dementia]
event = "Missing and Endangered Person"
event_code = "MEP"
schedule = [[2, 20]]
final_km = 60
expiry_hours = 48
""")
    s = Settings.load(p)
    assert s.sender == "alerts@gongan.zj.gov.cn"
    assert s.signing_key == tmp_path / "keys" / "k.pem"     # relative to the file
    assert s.max_location_age == 6 * H
    assert s.case("elderly").expiry == 240 * H and s.case("elderly").schedule.radii == (30.0, 80.0, 150.0)
    assert s.case("elderly").event_code == "MEP"                 # kept from the defaults
    assert s.case("dementia").schedule.final_km == 60.0
    assert s.case("child") == Settings.default().case("child")


@pytest.mark.parametrize("text,match", [
    ("[sender]\nidd = 'x'\n", "unknown setting 'sender.idd'"),
    ("[senders]\nid = 'x'\n", "unknown setting 'senders'"),
    ("[sender]\nid = 'a b'\n", "CAP forbids"),
    ("[sender]\nid = 5\n", "sender.id must be"),
    ("[sender]\nsigning_key = 'k.pem'\n", "go together"),
    ("[dispatch]\nmax_location_age_hours = -1\n", "max_location_age_hours"),
    ("[dispatch]\nmax_location_age_hours = true\n", "max_location_age_hours"),
    ("[dispatch]\nmax_location_age_hours = nan\n", "max_location_age_hours"),
    ("[dispatch]\nlanguages = []\n", "languages"),
    ("[dispatch]\nlanguages = ['zh CN']\n", "language tag"),
    ("[retention]\ndays_after_closure = 1.5\n", "whole number"),
    ("[approval]\nneeds_approval = ['county']\napprover_levels = ['county']\n", "approval"),
    ("[approval]\nneeds_approval = ['sheriff']\n", "approval"),
    ("[limits]\nreports_per_officer_per_hour = -2\n", "reports_per_officer_per_hour"),
    ("[case.child]\nschedule = [[1, 300], [2, 100]]\n", "must not decrease"),
    ("[case.child]\nschedule = [[1]]\n", r"case.child.schedule\[0\]"),
    ("[case.child]\nevent_code = 'cae'\n", "SAME code"),
    ("[case.child]\nevent = ''\n", "case.child.event"),
    ("[case.child]\nexpiry_hours = 0\n", "expiry_hours must be > 0"),
    ("[case.new]\nevent = 'X'\n", "needs exactly the keys"),
    ("[case.Bad]\nevent='X'\nevent_code='MEP'\nschedule=[]\nfinal_km=10\nexpiry_hours=1\n", "lower-case"),
    ("case = 3\n", "must be a table"),
    ("not toml [", "not valid TOML"),
])
def test_bad_settings_are_refused_naming_the_key(settings_file, text, match):
    with pytest.raises(gt.InvalidInputError, match=match):
        Settings.load(settings_file(text))


def test_unreadable_settings_file(tmp_path, settings_file):
    with pytest.raises(gt.InvalidInputError, match="cannot read"):
        Settings.load(tmp_path / "missing.toml")
    with pytest.raises(gt.InvalidInputError, match="cannot read"):
        Settings.load(settings_file("").parent)   # a directory
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(gt.InvalidInputError, match="cannot read"):
        Settings.load(tmp_path / "bin.toml")


def test_defaults_text_parses_and_documents_every_key():
    import tomllib
    doc = tomllib.loads(DEFAULTS)
    assert set(doc) == {"sender", "dispatch", "retention", "approval", "limits", "duplicates", "drill",
                        "photos", "case"}
    for table in doc.values():
        for key in table:
            assert key in DEFAULTS


def test_signer_from_settings(tmp_path, settings_file):
    gt.signing.self_signed("s", tmp_path / "keys")
    s = Settings.load(settings_file("[sender]\nsigning_key='keys/signing-key.pem'\n"
                                       "signing_cert='keys/signing-cert.pem'\n"))
    signer = s.signer()
    assert isinstance(signer, gt.CapSigner)
    assert Settings.default().signer() is None


# -- case types and expiry in the engine -------------------------------------------

@pytest.fixture
def make_engine(make_store, make_engine_on, officers):
    index = gt.SpatialIndex.build(make_store(3000, seed=5, spread=2.0))
    officers = officers + [gt.Officer("C-9", level="county", division="110101")]
    return lambda settings=None, name="log.sqlite": make_engine_on(index, officers, name, settings=settings)


def _publish(eng, case_type="child", at=T0):
    a = eng.report("C-1", lat=30.27, lon=120.15, missing_since=at, division="330102",
                   details={"headline": "missing"}, now=at + dt.timedelta(minutes=5), case_type=case_type)
    return eng.approve(a.id, "S-1", now=at + dt.timedelta(minutes=6))


def _event(xml):
    from lxml import etree
    ns = {"c": "urn:oasis:names:tc:emergency:cap:1.2"}
    info = etree.fromstring(xml.encode()).find("c:info", ns)
    return (info.findtext("c:event", None, ns), info.findtext("c:eventCode/c:value", None, ns),
            info.findtext("c:expires", None, ns))


def test_elderly_case_has_its_own_event_schedule_and_expiry(make_engine):
    eng = make_engine()
    a = _publish(eng, "elderly")
    assert a.case_type == "elderly" and a.expires_at == a.published_at + 72 * H
    (p,) = eng.tick(T0 + dt.timedelta(minutes=10))
    event, code, expires = _event(p.cap_xml)
    assert (event, code) == ("Missing and Endangered Person", "MEP")
    assert p.radius_km == 50.0                                   # the elderly schedule, not 100 km
    assert dt.datetime.fromisoformat(expires) == a.expires_at
    child = _publish(eng, "child", at=T0 + dt.timedelta(minutes=6))
    (q,) = eng.tick(T0 + dt.timedelta(minutes=13))
    assert q.alert_id == child.id and _event(q.cap_xml)[:2] == ("Child Abduction Emergency", "CAE")
    assert q.radius_km == 100.0
    with pytest.raises(gt.InvalidInputError, match="case_type"):
        eng.report("C-1", lat=30.27, lon=120.15, missing_since=T0, division="330102",
                   now=T0 + H, case_type="cat")


def test_every_push_carries_expires_after_sent(make_engine):
    eng = make_engine()
    a = _publish(eng)
    pushes = list(eng.tick(T0 + dt.timedelta(minutes=10))) + list(eng.tick(T0 + 2 * H))
    pushes.append(eng.update(a.id, "C-1", {"description": "seen at the station"}, now=T0 + 3 * H))
    pushes.append(eng.close(a.id, "C-1", outcome="lost", now=T0 + 4 * H))
    for p in pushes:
        sent = dt.datetime.fromisoformat(parse_identifiers(p.cap_xml)["sent"])
        expires = dt.datetime.fromisoformat(_event(p.cap_xml)[2])
        assert expires > sent, p.kind
    # the closure stays up a day; the rings end with the alert
    assert dt.datetime.fromisoformat(_event(pushes[-1].cap_xml)[2]) == T0 + 4 * H + 24 * H
    assert dt.datetime.fromisoformat(_event(pushes[0].cap_xml)[2]) == a.expires_at


def test_expired_alert_stops_expanding_and_topping_up_but_can_close(make_engine):
    """An alert reported 30 days ago is not still expanding (regression: it used to be)."""
    short = Settings._from_doc(__import__("tomllib").loads(
        DEFAULTS.replace("expiry_hours = 72", "expiry_hours = 2", 1)), "test", None)
    eng = make_engine(short)
    a = _publish(eng)
    assert a.expires_at == T0 + dt.timedelta(minutes=6) + 2 * H
    assert [p.radius_km for p in eng.tick(T0 + dt.timedelta(minutes=10))] == [100.0]
    assert [p.radius_km for p in eng.tick(T0 + dt.timedelta(minutes=70))] == [200.0]
    assert list(eng.tick(T0 + 3 * H)) == []                      # 300 km would be due: expired
    assert list(eng.tick(T0 + 30 * 24 * H)) == []
    assert list(eng.refresh(eng.index, T0 + 30 * 24 * H)) == []   # no top-ups either
    expiries = [e for e in eng.log.audit_entries(a.id) if e["action"] == "expire"]
    assert len(expiries) == 1                                     # audited once
    # still closable, and the closure reaches exactly everyone notified
    closure = eng.close(a.id, "C-1", outcome="runaway", now=T0 + 30 * 24 * H)
    assert set(closure.audience.keys()) == set(eng.log.notified(a.id))


def test_renewal_resumes_rings_and_is_audited(make_engine):
    short = Settings._from_doc(__import__("tomllib").loads(
        DEFAULTS.replace("expiry_hours = 72", "expiry_hours = 2", 1)), "test", None)
    eng = make_engine(short)
    a = _publish(eng)
    eng.tick(T0 + dt.timedelta(minutes=10))
    assert list(eng.tick(T0 + 3 * H)) == []
    with pytest.raises(gt.UnauthorizedError):
        eng.renew(a.id, "C-9", now=T0 + 3 * H)                    # a Beijing officer
    with pytest.raises(gt.InvalidInputError, match="hours"):
        eng.renew(a.id, "C-1", now=T0 + 3 * H, hours=-1)
    renewed = eng.renew(a.id, "C-1", now=T0 + 3 * H, hours=12)
    assert renewed.expires_at == T0 + 15 * H
    (p,) = eng.tick(T0 + 3 * H + dt.timedelta(minutes=1))
    assert p.kind == "expand" and p.radius_km == 500.0
    assert dt.datetime.fromisoformat(_event(p.cap_xml)[2]) == T0 + 15 * H
    actions = [e["action"] for e in eng.log.audit_entries(a.id)]
    assert "renew" in actions and actions.index("expire") < actions.index("renew")


def test_expiry_survives_a_restart(make_engine, tmp_path):
    short = Settings._from_doc(__import__("tomllib").loads(
        DEFAULTS.replace("expiry_hours = 72", "expiry_hours = 2", 1)), "test", None)
    eng = make_engine(short, name="r.sqlite")
    a = _publish(eng)
    (first,) = eng.tick(T0 + dt.timedelta(minutes=10))
    eng.log.close()
    again = make_engine(short, name="r.sqlite")
    assert again.alert(a.id).expires_at == a.expires_at
    # the unacknowledged first ring is offered again (a logged push is always offered),
    # but the expired alert does not expand
    assert [p.push_id for p in again.tick(T0 + 3 * H)] == [first.push_id]
    assert list(again.tick(T0 + 3 * H)) == []


# -- rate limits, duplicates, drills ----------------------------------------------

def _with(**tables):
    """Default settings with some tables' keys replaced (TOML text edited, then parsed)."""
    import tomllib
    doc = tomllib.loads(DEFAULTS)
    for table, values in tables.items():
        doc[table].update(values)
    return Settings._from_doc(doc, "test", None)


def _report(eng, minute, *, officer="C-1", division="330102", lat=30.27, lon=120.15, **kw):
    return eng.report(officer, lat=lat, lon=lon, missing_since=T0, division=division,
                      now=T0 + dt.timedelta(minutes=minute), **kw)


def test_officer_rate_limit_refuses_and_logs_nothing(make_engine):
    eng = make_engine(_with(limits={"reports_per_officer_per_hour": 3,
                                    "reports_per_division_per_hour": 0}))
    for m in range(3):
        _report(eng, m)
    audit_before = len(eng.log.audit_entries())
    with pytest.raises(gt.RateLimitError, match="officer C-1 has reported 3"):
        _report(eng, 10)
    assert len(eng.alerts()) == 3 and len(eng.log.audit_entries()) == audit_before
    _report(eng, 61)                                  # the sliding hour has moved on
    assert len(eng.alerts()) == 4


def test_division_rate_limit_counts_every_officer(make_engine):
    eng = make_engine(_with(limits={"reports_per_officer_per_hour": 0,
                                    "reports_per_division_per_hour": 2}))
    _report(eng, 0)
    _report(eng, 1, officer="S-1")
    with pytest.raises(gt.RateLimitError, match="division 330102"):
        _report(eng, 2, officer="S-1")
    _report(eng, 3, officer="S-1", division="330100")  # another division code


def test_default_limit_stops_a_flood(make_engine):
    """One officer opening 200 alerts at one spot in a moment is refused past the default."""
    eng = make_engine()
    with pytest.raises(gt.RateLimitError):
        for i in range(200):
            _report(eng, 0)
    assert len(eng.alerts()) == Settings.default().limits.per_officer_per_hour


def test_same_child_reported_twice_is_held_not_pushed(make_engine):
    eng = make_engine(_with(limits={"reports_per_officer_per_hour": 0, "reports_per_division_per_hour": 0}))
    first = _report(eng, 0, officer="S-1", details={"name": "Wang  Xiaoming", "age": 6})
    assert first.status == "open"
    eng.tick(T0 + dt.timedelta(minutes=5))
    twin = _report(eng, 6, officer="S-1", lat=30.28, lon=120.16, details={"name": "wang xiaoming"})
    assert twin.status == "held" and twin.duplicate_of == first.id
    assert [p.alert_id for p in eng.tick(T0 + dt.timedelta(minutes=70))] == [first.id]   # only the expand
    # far away, another name or another case type: not held
    assert _report(eng, 71, officer="S-1", division="330100", lat=30.05, lon=119.95,   # ~30 km away
                   details={"name": "Wang Xiaoming"}).status == "open"
    assert _report(eng, 72, officer="S-1", details={"name": "Li Hua"}).status == "open"
    assert _report(eng, 73, officer="S-1", details={"name": "Wang Xiaoming"},
                   case_type="elderly").status == "open"
    assert _report(eng, 74, officer="S-1").status == "open"              # no name: nothing to match
    # an officer confirms: the same child (merged, never pushed) ...
    with pytest.raises(gt.AlertStateError, match="not held"):
        eng.confirm_duplicate(first.id, "S-1", now=T0 + dt.timedelta(minutes=75))
    merged = eng.confirm_duplicate(twin.id, "S-1", now=T0 + dt.timedelta(minutes=75))
    assert merged.status == "merged"
    assert not eng.log.pushes(twin.id)
    # ... or another child after all, which then goes on like any report
    other = _report(eng, 76, officer="C-1", details={"name": "Li Hua"})
    assert other.status == "held"
    distinct = eng.confirm_distinct(other.id, "S-1", now=T0 + dt.timedelta(minutes=77))
    assert distinct.status == "pending"                        # a county report still needs approval
    eng.approve(other.id, "S-1", now=T0 + dt.timedelta(minutes=78))
    assert other.id in {p.alert_id for p in eng.tick(T0 + dt.timedelta(minutes=79))}
    assert {e["action"] for e in eng.log.audit_entries()} >= {"confirm-duplicate", "confirm-distinct"}
    st = eng.stats()
    assert st["published"] == len([a for a in eng.alerts() if a.published_at is not None])


def test_drill_reaches_only_test_devices_and_never_counts(make_engine):
    store_ids = [1, 2, 3, 2999]
    eng = make_engine(_with(drill={"test_devices": store_ids + [10**12]}))   # one id unknown
    real = _report(eng, 0, officer="S-1")
    drill = _report(eng, 1, officer="S-1", drill=True)
    assert drill.id.startswith("DRILL-") and drill.drill
    pushes = {p.alert_id: p for p in eng.tick(T0 + dt.timedelta(minutes=5))}
    d = pushes[drill.id]
    assert d.drill and not pushes[real.id].drill
    keys = set(eng.index.store.lookup(np.array(store_ids, dtype=np.uint64)).tolist())
    assert set(d.audience.keys().tolist()) <= keys
    # counted as if real: the same ring as the real alert at the same place and time
    assert d.as_if_real == len(pushes[real.id])
    from lxml import etree
    doc = etree.fromstring(d.cap_xml.encode())
    ns = {"c": "urn:oasis:names:tc:emergency:cap:1.2"}
    assert doc.findtext("c:status", None, ns) == "Exercise"
    assert doc.findtext("c:info/c:headline", None, ns).startswith("【演练")
    assert "演练" in doc.findtext("c:note", None, ns)
    assert parse_identifiers(pushes[real.id].cap_xml)["status"] == "Actual"
    closure = eng.close(drill.id, "S-1", outcome="lost", now=T0 + dt.timedelta(minutes=30))
    assert set(closure.audience.keys()) == set(eng.log.notified(drill.id)) and closure.drill
    st = eng.stats()
    assert st["published"] == 1 and st["found"] == 0           # the drill is not a statistic
    with pytest.raises(gt.InvalidInputError, match="drill"):
        _report(eng, 2, officer="S-1", drill="yes")


def test_drill_without_test_devices_reaches_nobody(make_engine):
    eng = make_engine()
    drill = _report(eng, 1, officer="S-1", drill=True)
    (p,) = eng.tick(T0 + dt.timedelta(minutes=5))
    assert p.alert_id == drill.id and len(p) == 0 and p.as_if_real > 0
