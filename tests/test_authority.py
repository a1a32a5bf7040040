"""Authority: division codes, officers, approval policy, jurisdiction checks."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from geotarget.alerts.authority import (ACTIONS, LEVELS, ApprovalPolicy, Authority, Officer,
                                 division_covers, division_level, province_of, validate_division)
from geotarget.spatial.divisions import Divisions
from geotarget.errors import InvalidInputError, UnauthorizedError, UnknownOfficerError

MINISTRY = Officer("M-1", "ministry", "000000", "部打拐办")
ZJ = Officer("P-33", "province", "330000", "浙江省厅")
JS = Officer("P-32", "province", "320000")
HZ = Officer("C-3301", "city", "330100", "杭州市局")
NB = Officer("C-3302", "city", "330200")
SHANG = Officer("C-3101", "city", "310100")
XIHU = Officer("X-330106", "county", "330106", "西湖区")
SHANGCHENG = Officer("X-330102", "county", "330102")
HUANGPU = Officer("X-310101", "county", "310101", "黄浦区")
ALL = [MINISTRY, ZJ, JS, HZ, NB, SHANG, XIHU, SHANGCHENG, HUANGPU]


@pytest.fixture
def auth():
    return Authority(ALL)


# -- division codes -------------------------------------------------------------------

@pytest.mark.parametrize("code, level", [
    ("000000", "ministry"), ("330000", "province"), ("330100", "city"), ("330102", "county"),
    ("310101", "county"),      # Shanghai Huangpu: a municipality's district is a county
    ("429004", "county"),      # Xiantao: a county directly under a province uses YY = 90
    ("110000", "province"), ("659001", "county"),
])
def test_division_level(code, level):
    assert validate_division(code) == code
    assert division_level(code) == level


@pytest.mark.parametrize("outer, inner, covers", [
    ("000000", "330102", True), ("000000", "000000", True), ("000000", "110000", True),
    ("330000", "330102", True), ("330000", "330100", True), ("330000", "330000", True),
    ("330000", "320102", False), ("330000", "000000", False),
    ("330100", "330102", True), ("330100", "330100", True), ("330100", "330202", False),
    ("330100", "330000", False),
    ("330102", "330102", True), ("330102", "330106", False), ("330102", "330100", False),
    ("310100", "310101", True), ("310000", "310101", True), ("320000", "310101", False),
])
def test_division_covers_table(outer, inner, covers):
    assert division_covers(outer, inner) is covers


def test_province_of():
    assert province_of("330102") == "330000"
    assert province_of("330000") == "330000"
    assert province_of("000000") == "000000"


CODES = st.one_of(
    st.just("000000"),
    st.integers(1, 99).map(lambda p: f"{p:02d}0000"),
    st.tuples(st.integers(1, 99), st.integers(1, 99)).map(lambda t: f"{t[0]:02d}{t[1]:02d}00"),
    st.tuples(st.integers(1, 99), st.integers(1, 99), st.integers(1, 99)).map(
        lambda t: f"{t[0]:02d}{t[1]:02d}{t[2]:02d}"),
)


def _ancestors(code):
    """Plain model: the chain of codes from the ministry down to ``code``."""
    chain = ["000000"]
    if code != "000000":
        chain.append(code[:2] + "0000")
        if code[2:4] != "00":
            chain.append(code[:4] + "00")
            if code[4:] != "00":
                chain.append(code)
    return chain


@settings(max_examples=300, deadline=None)
@given(a=CODES, b=CODES, c=CODES)
def test_covers_is_the_tree_order(a, b, c):
    assert division_covers(a, b) == (a in _ancestors(b))
    assert division_covers(a, a)
    if division_covers(a, b) and division_covers(b, a):
        assert a == b
    if division_covers(a, b) and division_covers(b, c):
        assert division_covers(a, c)
    assert LEVELS.index(division_level(a)) == len(_ancestors(a)) - 1


def test_district_directly_under_a_region_is_well_formed():
    # Hong Kong's and Macau's districts (810001, 820001) have no city digits
    assert division_level("810001") == "county"
    assert division_covers("810000", "810001")
    a = Authority([Officer("HK-1", "county", "810001")])
    assert a.place("810001").startswith("香港特别行政区")


@pytest.mark.parametrize("code, match", [
    ("33010", "6 ASCII digits"), ("3301020", "6 ASCII digits"), ("", "6 ASCII digits"),
    ("33o102", "6 ASCII digits"), ("３３０１０２", "6 ASCII digits"), ("٣٣٠١٠٢", "6 ASCII digits"),
    (" 330102", "6 ASCII digits"), ("330102\n", "6 ASCII digits"),
    ("000100", "province digits '00'"), ("001234", "province digits '00'"),
    (330102, "division=330102 must be a 6-digit string, not int"), (None, "6-digit string"),
    (b"330102", "6-digit string"),
])
def test_bad_division(code, match):
    with pytest.raises(InvalidInputError, match=match):
        validate_division(code)
    with pytest.raises(InvalidInputError):
        division_covers("000000", code)
    with pytest.raises(InvalidInputError):
        division_covers(code, "330102")


# -- officers ---------------------------------------------------------------------------------

def test_officer_fields_and_rank():
    assert XIHU.level == "county" and XIHU.division == "330106" and XIHU.name == "西湖区"
    assert [o.rank for o in (MINISTRY, ZJ, HZ, XIHU)] == [0, 1, 2, 3]
    with pytest.raises(AttributeError):
        XIHU.level = "city"


def test_officer_round_trip():
    for off in ALL:
        assert Officer.from_dict(json.loads(json.dumps(off.to_dict()))) == off
    assert Officer.from_dict({"officer_id": "a", "level": "city", "division": "330100"}).name == ""


@pytest.mark.parametrize("level, division", [
    ("county", "330100"), ("county", "330000"), ("county", "000000"),
    ("city", "330102"), ("city", "330000"), ("province", "330100"), ("province", "000000"),
    ("ministry", "330000"), ("ministry", "330102"),
])
def test_officer_level_division_mismatch(level, division):
    with pytest.raises(InvalidInputError, match=f"division='{division}' is a .* but level='{level}'"):
        Officer("x", level, division)


@pytest.mark.parametrize("level", ["County", "village", "", None, "prefecture"])
def test_officer_bad_level(level):
    with pytest.raises(InvalidInputError, match="level=.*must be one of ministry, province, city, county"):
        Officer("x", level, "330102")


def test_officer_bad_division():
    with pytest.raises(InvalidInputError, match="6 ASCII digits"):
        Officer("x", "county", "33012")


@pytest.mark.parametrize("oid", ["", " x", "x ", None, 7])
def test_officer_bad_id(oid):
    with pytest.raises(InvalidInputError, match="officer_id"):
        Officer(oid, "county", "330102")


def test_officer_bad_name():
    with pytest.raises(InvalidInputError, match="name=3"):
        Officer("x", "county", "330102", 3)


@pytest.mark.parametrize("d, match", [
    ("x", "must be a dict"), ({"officer_id": "a", "level": "city"}, "lacks key 'division'"),
    ({"officer_id": "a", "level": "city", "division": "330100", "rank": 1}, "unknown key"),
])
def test_officer_bad_dict(d, match):
    with pytest.raises(InvalidInputError, match=match):
        Officer.from_dict(d)


# -- policy -------------------------------------------------------------------------------------

def test_default_policy():
    p = ApprovalPolicy()
    assert p.needs_approval == frozenset({"county"})
    assert p.approver_levels == frozenset({"city", "province", "ministry"})
    assert p.to_dict() == {"needs_approval": ["county"],
                           "approver_levels": ["ministry", "province", "city"]}


def test_policy_round_trip_and_lists_accepted():
    p = ApprovalPolicy(needs_approval=["county", "city"], approver_levels=("province",))
    assert isinstance(p.needs_approval, frozenset)
    assert ApprovalPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert ApprovalPolicy.from_dict({}) == ApprovalPolicy()
    assert ApprovalPolicy(needs_approval=frozenset()).needs_approval == frozenset()


@pytest.mark.parametrize("kwargs, match", [
    ({"needs_approval": "county"}, "got the string"),
    ({"approver_levels": "city"}, "got the string"),
    ({"needs_approval": {"borough"}}, "needs_approval level='borough'"),
    ({"approver_levels": {"sheriff"}}, "approver_levels level='sheriff'"),
    ({"needs_approval": 5}, "collection of levels"),
    ({"needs_approval": {"ministry"}}, "no approver level"),
    ({"needs_approval": {"city"}, "approver_levels": {"city", "county"}}, "no approver level"),
    ({"approver_levels": frozenset()}, "no approver level"),
])
def test_bad_policy(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ApprovalPolicy(**kwargs)


@pytest.mark.parametrize("d, match", [
    ([], "must be a dict"), ({"needs_approval": [], "extra": 1}, "unknown key"),
])
def test_bad_policy_dict(d, match):
    with pytest.raises(InvalidInputError, match=match):
        ApprovalPolicy.from_dict(d)


# -- registry ------------------------------------------------------------------------------------

def test_collection_protocol(auth):
    assert len(auth) == len(ALL)
    assert "X-330106" in auth and "nobody" not in auth and ["unhashable"] not in auth
    assert list(auth) == ALL
    assert auth.officer("C-3301") is HZ


def test_duplicate_ids_refused():
    with pytest.raises(InvalidInputError, match="officers\\[1\\]: duplicate officer_id 'M-1'"):
        Authority([MINISTRY, Officer("M-1", "province", "330000")])


def test_non_officer_refused():
    with pytest.raises(InvalidInputError, match="officers\\[1\\].*is not an Officer"):
        Authority([MINISTRY, {"officer_id": "a"}])


def test_officers_not_iterable_refused():
    with pytest.raises(InvalidInputError, match="iterable of Officer"):
        Authority(3)


def test_bad_policy_type_refused():
    with pytest.raises(InvalidInputError, match="policy must be an ApprovalPolicy"):
        Authority(ALL, policy={"needs_approval": []})


@pytest.mark.parametrize("oid", ["nobody", "", None, ["x"]])
def test_unknown_officer(auth, oid):
    with pytest.raises(UnknownOfficerError, match="unknown officer_id"):
        auth.officer(oid)
    with pytest.raises(UnknownOfficerError):
        auth.check_report(oid, "330106")
    with pytest.raises(UnknownOfficerError):
        auth.check_act(oid, "330106", "close")
    with pytest.raises(UnknownOfficerError):
        auth.check_approve(oid, "X-330106", "330106")
    with pytest.raises(UnknownOfficerError):
        auth.check_approve("C-3301", oid, "330106")
    with pytest.raises(UnknownOfficerError):
        auth.needs_approval(oid)


def test_unknown_officer_is_a_key_error_too(auth):
    with pytest.raises(KeyError):
        auth.officer("nobody")


def test_authority_round_trip(auth):
    back = Authority.from_dict(json.loads(json.dumps(auth.to_dict())))
    assert list(back) == list(auth) and back.policy == auth.policy
    assert Authority.from_dict({"officers": []}).policy == ApprovalPolicy()


@pytest.mark.parametrize("d, match", [
    ([], "'officers' list"), ({}, "'officers' list"), ({"officers": {}}, "must be a list"),
    ({"officers": [{"officer_id": "a", "level": "city", "division": "330102"}]}, "county code"),
])
def test_bad_authority_dict(d, match):
    with pytest.raises(InvalidInputError, match=match):
        Authority.from_dict(d)


def test_six_thousand_officers():
    # about the real system's size ("6000余名打拐民警", seed 001): two officers in every real division
    codes = list(Divisions.china())
    officers = [MINISTRY] + [Officer(f"{k}{c}", division_level(c), c) for c in codes for k in "AB"]
    a = Authority(officers)
    assert len(a) == 1 + 2 * len(codes) > 6000
    assert a.check_report("A650102", "650102").level == "county"
    assert a.check_approve("A650100", "B650102", "650102").officer_id == "A650100"
    with pytest.raises(UnauthorizedError):
        a.check_report("A650102", "650103")


# -- jurisdiction checks -------------------------------------------------------------------------

@pytest.mark.parametrize("oid, division", [
    ("M-1", "330106"), ("M-1", "000000"), ("M-1", "110000"),
    ("P-33", "330106"), ("P-33", "330000"), ("C-3301", "330106"), ("C-3301", "330100"),
    ("X-330106", "330106"), ("X-310101", "310101"), ("C-3101", "310101"),
])
def test_report_inside_jurisdiction(auth, oid, division):
    assert auth.check_report(oid, division) is auth.officer(oid)
    for action in ACTIONS:
        assert auth.check_act(oid, division, action) is auth.officer(oid)


@pytest.mark.parametrize("oid, division", [
    ("P-33", "320102"), ("P-32", "330106"), ("C-3301", "330203"), ("C-3301", "330000"),
    ("X-330106", "330102"), ("X-330106", "330100"), ("X-330106", "000000"),
    ("C-3101", "320102"), ("P-33", "000000"),
])
def test_report_outside_jurisdiction(auth, oid, division):
    with pytest.raises(UnauthorizedError, match=f"may not report an alert in division {division}"):
        auth.check_report(oid, division)
    for action in ACTIONS:
        with pytest.raises(UnauthorizedError, match=f"may not {action}"):
            auth.check_act(oid, division, action)


def test_report_bad_division(auth):
    with pytest.raises(InvalidInputError, match="division="):
        auth.check_report("M-1", "33")


def test_act_bad_division(auth):
    with pytest.raises(InvalidInputError, match="division="):
        auth.check_act("M-1", "0000001", "close")


@pytest.mark.parametrize("action", ["delete", "approve", "report", "", None, "Close"])
def test_act_bad_action(auth, action):
    with pytest.raises(InvalidInputError, match="action=.*update, close, retract"):
        auth.check_act("M-1", "330106", action)


def test_needs_approval_default(auth):
    assert [auth.needs_approval(o) for o in (MINISTRY, ZJ, HZ, XIHU)] == [False, False, False, True]
    assert auth.needs_approval("X-330106") is True


def test_needs_approval_custom_policy():
    a = Authority(ALL, ApprovalPolicy(needs_approval={"city", "county"},
                                      approver_levels={"province"}))
    assert a.needs_approval(HZ) and a.needs_approval(XIHU) and not a.needs_approval(ZJ)
    assert a.check_approve("P-33", "C-3301", "330106") is ZJ
    with pytest.raises(UnauthorizedError, match="may not approve \\(approver levels: province\\)"):
        a.check_approve("C-3301", "X-330106", "330106")
    with pytest.raises(UnauthorizedError, match="may not approve"):
        a.check_approve("M-1", "X-330106", "330106")


@pytest.mark.parametrize("approver, reporter, division", [
    ("C-3301", "X-330106", "330106"), ("P-33", "X-330106", "330106"),
    ("M-1", "X-330106", "330106"), ("C-3101", "X-310101", "310101"),
    ("P-33", "C-3301", "330106"), ("M-1", "P-33", "330106"),
])
def test_approve_allowed(auth, approver, reporter, division):
    assert auth.check_approve(approver, reporter, division) is auth.officer(approver)


def test_nobody_approves_their_own_report(auth):
    with pytest.raises(UnauthorizedError, match="may not approve their own report"):
        auth.check_approve("C-3301", "C-3301", "330106")


def test_approver_not_superior(auth):
    with pytest.raises(UnauthorizedError, match="not superior"):
        auth.check_approve("C-3302", "C-3301", "330106")


def test_approver_junior_to_reporter(auth):
    # a county cannot approve at all under the default policy (level checked first)
    with pytest.raises(UnauthorizedError, match="level 'county', which may not approve"):
        auth.check_approve("X-330102", "C-3301", "330106")


def test_approver_level_not_in_policy_even_if_superior():
    a = Authority(ALL, ApprovalPolicy(approver_levels={"province", "ministry"}))
    with pytest.raises(UnauthorizedError, match="level 'city', which may not approve"):
        a.check_approve("C-3301", "X-330106", "330106")


def test_approver_outside_jurisdiction(auth):
    with pytest.raises(UnauthorizedError, match="may not approve an alert in division 330106"):
        auth.check_approve("C-3302", "X-330106", "330106")
    with pytest.raises(UnauthorizedError, match="outside their jurisdiction"):
        auth.check_approve("P-32", "X-330106", "330106")


def test_approve_bad_division(auth):
    with pytest.raises(InvalidInputError, match="division="):
        auth.check_approve("C-3301", "X-330106", 330106)


def test_refusals_change_nothing(auth):
    before = auth.to_dict()
    for call in (lambda: auth.check_report("X-330106", "330102"),
                 lambda: auth.check_approve("X-330106", "X-330106", "330106"),
                 lambda: auth.check_act("P-32", "330106", "close"),
                 lambda: auth.officer("ghost")):
        with pytest.raises((UnauthorizedError, UnknownOfficerError)):
            call()
    assert auth.to_dict() == before
