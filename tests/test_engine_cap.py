"""What the engine writes into each push's CAP message, by push kind."""
import datetime as dt

import numpy as np
import pytest

import geotarget as gt
from geotarget.alerts.cap import parse_identifiers

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
DETAILS = {"headline": "Missing girl, 6", "description": "Last seen near West Lake. Call 110.",
           "instruction": "Look out for her and call 110.", "age": 6, "clothes": "red coat",
           "kind": "runaway?"}


def _minutes(m):
    return T0 + dt.timedelta(minutes=m)


@pytest.fixture
def engine(make_store, make_engine_on, officers):
    return make_engine_on(gt.SpatialIndex.build(make_store(3000, seed=3, spread=1.0)), officers)


def _info(xml):
    from lxml import etree
    ns = {"c": "urn:oasis:names:tc:emergency:cap:1.2"}
    info = etree.fromstring(xml.encode()).find("c:info", ns)
    return {f: info.findtext(f"c:{f}", None, ns) for f in ("headline", "description", "instruction")}


def _open(engine):
    a = engine.report("C-1", lat=30.27, lon=120.15, missing_since=T0, division="330102",
                      details=dict(DETAILS), now=_minutes(5))
    engine.approve(a.id, "S-1", now=_minutes(6))
    (first,) = engine.tick(_minutes(10))
    return a, first


def test_rings_carry_the_alert_text_and_every_detail(engine):
    _, first = _open(engine)
    info = _info(first.cap_xml)
    assert info["description"] == DETAILS["description"]
    assert info["instruction"] == DETAILS["instruction"]
    params = parse_identifiers(first.cap_xml)["parameters"]
    assert params["age"] == "6" and params["clothes"] == "red coat"
    assert params["detail_kind"] == "runaway?" and params["kind"] == "alert"


def test_found_closure_does_not_repeat_call_to_action(engine):
    a, _ = _open(engine)
    closure = engine.close(a.id, "C-1", outcome="lost", now=_minutes(30))
    info = _info(closure.cap_xml)
    assert "found" in info["headline"].lower() or "找到" in info["headline"]
    assert "110" not in info["description"] and "110" not in info["instruction"]
    assert "感谢" in info["description"]


def test_retraction_carries_its_reason(engine):
    a, _ = _open(engine)
    p = engine.retract(a.id, "C-1", reason="家属报案有误,孩子在亲戚家", now=_minutes(30))
    info = _info(p.cap_xml)
    assert "孩子在亲戚家" in info["description"]
    assert "110" not in info["instruction"]


def test_update_details_reach_the_cap(engine):
    a, _ = _open(engine)
    p = engine.update(a.id, "C-1", {"description": "Seen at Hangzhou East station, 09:40",
                                     "clothes": "blue jacket"}, now=_minutes(40))
    assert _info(p.cap_xml)["description"] == "Seen at Hangzhou East station, 09:40"
    assert parse_identifiers(p.cap_xml)["parameters"]["clothes"] == "blue jacket"


def test_each_language_is_its_own_info(tmp_path):
    import tomllib
    from geotarget.alerts.settings import DEFAULTS, Settings
    doc = tomllib.loads(DEFAULTS)
    doc["dispatch"]["languages"] = ["zh-CN", "en-US", "ug-CN"]
    settings = Settings._from_doc(doc, "test", None)
    rng = np.random.default_rng(3)
    store = gt.DeviceStore.from_arrays(np.arange(1, 501, dtype=np.uint64),
                                       30.27 + rng.normal(0, 0.5, 500), 120.15 + rng.normal(0, 0.5, 500))
    officers = [gt.Officer("S-1", level="city", division="330100")]
    with gt.RecipientLog(tmp_path / "l.sqlite") as log:
        eng = gt.AlertEngine(gt.SpatialIndex.build(store), log=log, authority=gt.Authority(officers),
                             settings=settings)
        details = {"headline": "女童走失", "description": "身穿红色外套",
                   "translations": {"en-US": {"headline": "Girl missing", "description": "Red coat"}}}
        a = eng.report("S-1", lat=30.27, lon=120.15, missing_since=T0, division="330100",
                       details=details, now=_minutes(5))
        (p,) = eng.tick(_minutes(10))
        closure = eng.close(a.id, "S-1", outcome="lost", now=_minutes(20))
    from lxml import etree
    ns = {"c": "urn:oasis:names:tc:emergency:cap:1.2"}
    infos = etree.fromstring(p.cap_xml.encode()).findall("c:info", ns)
    assert [i.findtext("c:language", None, ns) for i in infos] == ["zh-CN", "en-US", "ug-CN"]
    assert [i.findtext("c:headline", None, ns) for i in infos] == ["女童走失", "Girl missing",
                                                                    "Missing child emergency"]
    assert infos[1].findtext("c:description", None, ns) == "Red coat"
    assert "translations" not in parse_identifiers(p.cap_xml)["parameters"]
    closing = etree.fromstring(closure.cap_xml.encode()).findall("c:info", ns)
    assert closing[1].findtext("c:headline", None, ns) == "Child found: Girl missing"
    assert "Red coat" not in closing[1].findtext("c:description", None, ns)


@pytest.mark.parametrize("details,match", [
    ({"headline": "bad\x0bline"}, "headline'\\] has a non-printable character U\\+000B"),
    ({"description": "x\x00"}, "description"),
    ({"translations": "en"}, "translations"),
    ({"translations": {"en": {"headline": 5}}}, "translations"),
    ({"translations": {"en": {"title": "x"}}}, "unknown field"),
    ({"translations": {"en US": {"headline": "x"}}}, "not a language tag"),
    ({"translations": {"en": {"headline": "x"}, "EN": {"headline": "y"}}}, "appears twice"),
    ({"age": object()}, "details\\['age'\\] must be a string"),
])
def test_text_cap_cannot_carry_is_refused_at_report_and_update(engine, details, match):
    """A poison detail is refused at the door; it would otherwise fail every later tick."""
    from geotarget.alerts.settings import DEFAULTS, Settings
    import tomllib
    doc = tomllib.loads(DEFAULTS)
    doc["dispatch"]["languages"] = ["zh-CN", "en"]
    engine.settings = Settings._from_doc(doc, "test", None)
    with pytest.raises(gt.InvalidInputError, match=match):
        engine.report("C-1", lat=30.27, lon=120.15, missing_since=T0, division="330102",
                      details=details, now=_minutes(5))
    assert engine.alerts() == []
    a, _ = _open(engine)
    with pytest.raises(gt.InvalidInputError, match=match):
        engine.update(a.id, "C-1", details, now=_minutes(20))
    assert len(engine.log.pushes(a.id)) == 1
    assert len(engine.tick(_minutes(70))) == 1          # the alert goes on
