"""Statistics: the seeds' own figures, period and division filters, invariants."""
import datetime as dt

import pytest
from hypothesis import given, settings, strategies as st

from geotarget.errors import InvalidInputError
from geotarget.alerts.stats import (FOUND_OUTCOMES, OUTCOMES, SEED_FIGURES, STATUSES, AlertRecord,
                             check_outcome, compute, recovery_rate, seed_records)

UTC = dt.timezone.utc
CST = dt.timezone(dt.timedelta(hours=8))
T = dt.datetime(2026, 11, 23, 10, 0, tzinfo=CST)
DAY = dt.timedelta(days=1)


def rec(i, status="closed", outcome="runaway", division="330106", at=T, **kw):
    if status != "closed":
        outcome = None
    return AlertRecord(f"a{i}", division, at, status, outcome, **kw)


def test_outcome_lists():
    assert OUTCOMES == ("rescued_trafficking", "runaway", "lost", "drowned", "killed",
                        "accident", "visiting_friends", "other", "not_found")
    assert FOUND_OUTCOMES == OUTCOMES[:-1]
    for o in OUTCOMES:
        assert check_outcome(o) == o


@pytest.mark.parametrize("bad", ["found", "Runaway", "", None, 3, "retracted"])
def test_bad_outcome(bad):
    with pytest.raises(InvalidInputError, match="outcome=.*must be one of rescued_trafficking, "
                                                "runaway, .*, not_found"):
        check_outcome(bad)


# -- the seeds' figures ------------------------------------------------------------------------

def _fig(year):
    return next(f for f in SEED_FIGURES if f.as_of.year == year)


@pytest.mark.parametrize("year, published, found, pct", [
    (2016, 286, 260, 90.91), (2017, 1317, 1274, 96.74)])
def test_seed_figures_reproduced(year, published, found, pct):
    fig = _fig(year)
    assert (fig.published, fig.found, fig.recovery_rate_pct) == (published, found, pct)
    assert sum(fig.by_outcome.values()) == published
    assert sum(fig.by_outcome[o] for o in FOUND_OUTCOMES) == found
    out = compute(seed_records(fig))
    assert out["published"] == published and out["found"] == found
    assert out["not_found"] == published - found and out["open"] == 0
    assert out["recovery_rate_pct"] == pct
    assert out["recovery_rate"] == pytest.approx(found / published)
    assert out["by_outcome"] == dict(fig.by_outcome)


def test_seed_2017_breakdown_as_published():
    b = _fig(2017).by_outcome
    assert (b["drowned"], b["killed"], b["runaway"], b["rescued_trafficking"], b["lost"],
            b["visiting_friends"], b["accident"], b["other"], b["not_found"]) == \
        (75, 29, 750, 40, 192, 67, 7, 114, 43)
    assert "004_72cf8098543868e9.txt" in _fig(2017).sources


def test_seed_2016_breakdown_as_published():
    b = _fig(2016).by_outcome
    assert (b["rescued_trafficking"], b["runaway"], b["lost"], b["drowned"], b["killed"],
            b["other"], b["not_found"], b["accident"], b["visiting_friends"]) == \
        (18, 152, 27, 32, 20, 11, 26, 0, 0)
    assert _fig(2016).sources == ("001_bd5ba050eb83841b.txt",)


def test_seed_2018_totals_only():
    fig = _fig(2018)
    assert fig.by_outcome is None
    assert round(100 * recovery_rate(fig.found, fig.published), 2) == fig.recovery_rate_pct == 97.36
    with pytest.raises(InvalidInputError, match="no outcome breakdown"):
        seed_records(fig)


def test_seed_figures_are_read_only():
    with pytest.raises(TypeError):
        _fig(2017).by_outcome["runaway"] = 0


def test_both_seed_periods_together_and_apart():
    a = seed_records(_fig(2016), division="330106",
                     published_at=dt.datetime(2016, 11, 1, tzinfo=CST))
    b = seed_records(_fig(2017), division="420102",
                     published_at=dt.datetime(2017, 5, 1, tzinfo=CST))
    both = a + b
    first = compute(both, until=dt.datetime(2017, 1, 1, tzinfo=CST))
    assert (first["published"], first["recovery_rate_pct"]) == (286, 90.91)
    second = compute(both, since=dt.datetime(2017, 1, 1, tzinfo=CST))
    assert (second["published"], second["recovery_rate_pct"]) == (1317, 96.74)
    assert compute(both, division="420000")["recovery_rate_pct"] == 96.74
    assert compute(both, division="330100")["recovery_rate_pct"] == 90.91
    total = compute(both)
    assert total["published"] == 286 + 1317
    assert total["by_division"] == {
        "330000": {"published": 286, "found": 260, "not_found": 26, "open": 0, "retracted": 0},
        "420000": {"published": 1317, "found": 1274, "not_found": 43, "open": 0, "retracted": 0}}


# -- counting rules -------------------------------------------------------------------------------

def test_empty_gives_zero_rate():
    out = compute([])
    assert out["published"] == 0 and out["recovery_rate"] == 0.0 and out["recovery_rate_pct"] == 0.0
    assert out["by_outcome"] == dict.fromkeys(OUTCOMES, 0)
    assert out["by_division"] == {}


def test_open_counts_against_the_rate():
    out = compute([rec(1), rec(2, "open")])
    assert (out["published"], out["found"], out["open"], out["recovery_rate"]) == (2, 1, 1, 0.5)


def test_retracted_not_counted():
    base = [rec(1), rec(2, outcome="not_found")]
    out = compute(base + [rec(3, "retracted", pushes=2, devices_reached=50),
                          rec(4, "retracted", at=None)])
    assert out["published"] == 2 and out["found"] == 1 and out["not_found"] == 1
    assert out["retracted"] == 2
    assert out["recovery_rate"] == compute(base)["recovery_rate"] == 0.5
    assert sum(out["by_outcome"].values()) == 2
    # the retracted alert's pushes did go out
    assert out["pushes"] == 2 and out["devices_reached"] == 50


def test_pending_not_published():
    out = compute([rec(1), rec(2, "pending", at=None)])
    assert out["published"] == 1 and out["pending"] == 1
    assert compute([rec(2, "pending", at=None)], since=T - DAY)["pending"] == 0


def test_pushes_and_devices_summed():
    out = compute([rec(1, pushes=3, devices_reached=1000), rec(2, "open", pushes=1,
                                                                devices_reached=7)])
    assert out["pushes"] == 4 and out["devices_reached"] == 1007


def test_period_is_half_open():
    records = [rec(1, at=T - DAY), rec(2, at=T), rec(3, at=T + DAY)]
    assert compute(records, since=T)["published"] == 2
    assert compute(records, until=T)["published"] == 1
    assert compute(records, since=T, until=T + DAY)["published"] == 1
    assert compute(records, since=T, until=T)["published"] == 0
    # the same instant in another offset
    assert compute(records, since=T.astimezone(UTC), until=(T + DAY).astimezone(UTC))["published"] == 1


def test_unpublished_records_outside_any_bounded_period():
    records = [rec(1, "retracted", at=None)]
    assert compute(records)["retracted"] == 1
    assert compute(records, since=T - DAY * 10000)["retracted"] == 0


@pytest.mark.parametrize("division, n", [
    ("000000", 4), ("330000", 3), ("330100", 2), ("330106", 1), ("330102", 1), ("320000", 1),
    ("110000", 0)])
def test_division_filter(division, n):
    records = [rec(1, division="330106"), rec(2, division="330102"), rec(3, division="330201"),
               rec(4, division="320102")]
    assert compute(records, division=division)["published"] == n


def test_by_division_rows():
    out = compute([rec(1, division="330106"), rec(2, "open", division="330201"),
                   rec(3, "retracted", division="320102"), rec(4, division="320102",
                                                               outcome="not_found")])
    assert out["by_division"] == {
        "320000": {"published": 1, "found": 0, "not_found": 1, "open": 0, "retracted": 1},
        "330000": {"published": 2, "found": 1, "not_found": 0, "open": 1, "retracted": 0}}


STATUS_OUTCOME = st.one_of(
    st.tuples(st.just("closed"), st.sampled_from(OUTCOMES)),
    st.tuples(st.sampled_from(("open", "pending", "retracted")), st.none()))
DIVS = st.sampled_from(["330106", "330102", "330201", "320102", "310101", "330100"])


@st.composite
def records(draw):
    out = []
    for i in range(draw(st.integers(0, 40))):
        status, outcome = draw(STATUS_OUTCOME)
        at = None if status in ("pending", "retracted") and draw(st.booleans()) else \
            T + dt.timedelta(hours=draw(st.integers(-500, 500)))
        out.append(AlertRecord(f"a{i}", draw(DIVS), at, status, outcome,
                               pushes=draw(st.integers(0, 5)),
                               devices_reached=draw(st.integers(0, 10**6))))
    return out


@settings(max_examples=200, deadline=None)
@given(rs=records(),
       since=st.none() | st.integers(-600, 600).map(lambda h: T + dt.timedelta(hours=h)),
       span=st.none() | st.integers(0, 600),
       division=st.none() | st.sampled_from(["000000", "330000", "330100", "320102"]))
def test_invariants(rs, since, span, division):
    until = None if span is None else (since or T) + dt.timedelta(hours=span)
    out = compute(rs, since=since, until=until, division=division)
    assert out["found"] + out["not_found"] + out["open"] == out["published"]
    assert sum(out["by_outcome"].values()) == out["found"] + out["not_found"]
    assert out["by_outcome"]["not_found"] == out["not_found"]
    assert sum(row["published"] for row in out["by_division"].values()) == out["published"]
    assert 0.0 <= out["recovery_rate"] <= 1.0
    # plain-Python model of the period and division filters
    def kept(r):
        if division is not None and not r.division.startswith(division.rstrip("0")):
            return False
        if since is None and until is None:
            return True
        return r.published_at is not None and (since is None or r.published_at >= since) \
            and (until is None or r.published_at < until)
    sel = [r for r in rs if kept(r)]
    pub = [r for r in sel if r.status in ("open", "closed")]
    found = [r for r in pub if r.found]
    assert out["published"] == len(pub) and out["found"] == len(found)
    assert out["retracted"] == sum(r.status == "retracted" for r in sel)
    assert out["pushes"] == sum(r.pushes for r in sel)
    assert out["recovery_rate"] == (len(found) / len(pub) if pub else 0.0)


# -- bad input: one test per case --------------------------------------------------------------

def test_naive_since():
    with pytest.raises(InvalidInputError, match="since=.*naive"):
        compute([], since=dt.datetime(2026, 1, 1))


def test_naive_until():
    with pytest.raises(InvalidInputError, match="until=.*naive"):
        compute([], until=dt.datetime(2026, 1, 1))


def test_until_before_since():
    with pytest.raises(InvalidInputError, match="until=.*before since"):
        compute([], since=T, until=T - DAY)


def test_bad_division_filter():
    with pytest.raises(InvalidInputError, match="division="):
        compute([], division="33")


def test_non_record_refused():
    with pytest.raises(InvalidInputError, match=r"records\[1\].*not an AlertRecord"):
        compute([rec(1), {"alert_id": "x"}])


@pytest.mark.parametrize("kwargs, match", [
    ({"alert_id": ""}, "alert_id"),
    ({"alert_id": 5}, "alert_id"),
    ({"division": "33"}, "division="),
    ({"status": "found"}, "status='found' must be one of " + ", ".join(STATUSES)),
    ({"status": "open", "published_at": None, "outcome": None}, "needs published_at"),
    ({"status": "closed", "published_at": None}, "needs published_at"),
    ({"published_at": dt.datetime(2026, 1, 1)}, "published_at=.*naive"),
    ({"published_at": "2026-01-01"}, "published_at must be a datetime"),
    ({"outcome": None}, "outcome=None must be one of"),
    ({"outcome": "home"}, "outcome='home' must be one of"),
    ({"status": "open", "outcome": "runaway"}, "only closed alerts have an outcome"),
    ({"status": "retracted", "outcome": "other"}, "only closed alerts have an outcome"),
    ({"closed_at": dt.datetime(2026, 1, 1)}, "closed_at=.*naive"),
    ({"pushes": -1}, "pushes=-1"),
    ({"pushes": 1.5}, "pushes=1.5"),
    ({"devices_reached": True}, "devices_reached=True"),
])
def test_bad_record(kwargs, match):
    fields = {"alert_id": "a1", "division": "330106", "published_at": T, "status": "closed",
              "outcome": "runaway"}
    fields.update(kwargs)
    with pytest.raises(InvalidInputError, match=match):
        AlertRecord(**fields)


# -- by case type, from a real engine ---------------------------------------------------------------

T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def _case_engine(path, index=None):
    import numpy as np
    import geotarget as gt
    if index is None:
        rng = np.random.default_rng(5)
        n = 2000
        index = gt.SpatialIndex.build(gt.DeviceStore.from_arrays(
            np.arange(1, n + 1, dtype=np.uint64), 30.27 + rng.normal(0, 0.5, n), 120.15 + rng.normal(0, 0.5, n)))
    officers = [gt.Officer("C-1", level="county", division="330102"),
                gt.Officer("S-1", level="city", division="330100")]
    log = gt.RecipientLog(path)
    return gt.AlertEngine(index, log=log, authority=gt.Authority(officers)), log


def _open_case(eng, case_type, minute, drill=False):
    at = T0 + dt.timedelta(minutes=minute)
    a = eng.report("C-1", lat=30.27, lon=120.15, missing_since=at, division="330102", now=at,
                   case_type=case_type, drill=drill, details={"headline": f"{case_type} {minute}"})
    eng.approve(a.id, "S-1", now=at + dt.timedelta(minutes=1))
    return a


def test_engine_stats_by_case_type_and_filter(tmp_path):
    eng, log = _case_engine(tmp_path / "log.sqlite")
    # no person's name in the details, so no report is held as a duplicate of another
    c1 = _open_case(eng, "child", 0)
    c2 = _open_case(eng, "child", 1)
    _open_case(eng, "child", 2)
    e1 = _open_case(eng, "elderly", 3)
    e2 = _open_case(eng, "elderly", 4)
    _open_case(eng, "elderly", 5, drill=True)          # never counted
    eng.tick(T0 + dt.timedelta(minutes=10))
    later = T0 + dt.timedelta(hours=2)
    eng.close(c1.id, "S-1", outcome="runaway", now=later)
    eng.close(c2.id, "S-1", outcome="not_found", now=later)
    eng.close(e1.id, "S-1", outcome="lost", now=later)
    s = eng.stats()
    assert s["published"] == 5 and s["found"] == 2
    child, elderly = s["by_case_type"]["child"], s["by_case_type"]["elderly"]
    assert (child["published"], child["found"], child["not_found"], child["open"]) == (3, 1, 1, 1)
    assert (elderly["published"], elderly["found"], elderly["not_found"], elderly["open"]) == (2, 1, 0, 1)
    assert child["recovery_rate"] == pytest.approx(1 / 3) and child["recovery_rate_pct"] == 33.33
    assert elderly["recovery_rate"] == pytest.approx(0.5)
    assert s["by_case_type"]["other"]["published"] == 0       # every configured type has a row
    # the rows add up to the totals
    for k in ("published", "found", "not_found", "open", "retracted", "pending"):
        assert sum(r[k] for r in s["by_case_type"].values()) == s[k]
    only = eng.stats(case_type="elderly")
    assert (only["published"], only["found"], only["open"]) == (2, 1, 1)
    assert set(only["by_case_type"]) == {"elderly"}
    assert only["by_outcome"]["lost"] == 1 and only["by_outcome"]["runaway"] == 0
    with pytest.raises(InvalidInputError, match="case_type"):
        eng.stats(case_type="toddler")
    # the case type survives a restart: the engine reloads it from the log
    eng.shutdown()
    log.close()
    eng2, log2 = _case_engine(tmp_path / "log.sqlite", eng.index)
    try:
        assert eng2.stats()["by_case_type"] == s["by_case_type"]
        assert {a.id for a in eng2.alerts() if a.case_type == "elderly" and not a.drill} == {e1.id, e2.id}
    finally:
        eng2.shutdown()
        log2.close()


def test_compute_case_type_rows_and_validation():
    recs = [AlertRecord("a1", "330102", T0, "closed", "lost", case_type="child"),
            AlertRecord("a2", "330102", T0, "open", case_type="elderly"),
            AlertRecord("a3", "330102", None, "pending", case_type="elderly")]
    s = compute(recs)
    assert set(s["by_case_type"]) == {"child", "elderly"}
    assert s["by_case_type"]["elderly"]["pending"] == 1 and s["by_case_type"]["elderly"]["open"] == 1
    assert compute(recs, case_type="child")["published"] == 1
    with pytest.raises(InvalidInputError, match="case_type"):
        compute(recs, case_type="x", case_types=("child", "elderly"))
    with pytest.raises(InvalidInputError, match="case_type"):
        AlertRecord("a4", "330102", T0, "open", case_type="")
