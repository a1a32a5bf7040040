"""RadiusSchedule: the default table, boundaries, validation, round-trips, next_change."""
import datetime as dt
import json
import math
import zoneinfo

import pytest
from hypothesis import given, settings, strategies as st

from geotarget.errors import InvalidInputError
from geotarget.geo import HALF_CIRCUMFERENCE_KM
from geotarget.alerts.schedule import RadiusSchedule

UTC = dt.timezone.utc
CST = dt.timezone(dt.timedelta(hours=8))
T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=CST)
H = dt.timedelta(hours=1)
US = dt.timedelta(microseconds=1)


@pytest.mark.parametrize("elapsed, km", [
    (dt.timedelta(0), 100.0),
    (dt.timedelta(minutes=59), 100.0),
    (H, 100.0),                       # inclusive bound: exactly 1 h is still 100 km
    (H + US, 200.0),
    (2 * H, 200.0),
    (2 * H + US, 300.0),
    (3 * H, 300.0),
    (3 * H + US, 500.0),
    (dt.timedelta(days=400), 500.0),
])
def test_default_table(elapsed, km):
    assert RadiusSchedule.default().radius_at(T0, T0 + elapsed) == km


def test_default_shape():
    s = RadiusSchedule.default()
    assert s.name == "default"
    assert s.radii == (100.0, 200.0, 300.0, 500.0)
    assert s.final_km == s.max_km == 500.0
    assert s.steps == ((H, 100.0), (2 * H, 200.0), (3 * H, 300.0))


def test_elderly_preset():
    s = RadiusSchedule.elderly()
    assert s.name == "elderly"
    assert s.radii == (50.0, 100.0, 200.0, 300.0)
    assert s.radius_at(T0, T0 + 2 * H) == 50.0
    assert s.radius_at(T0, T0 + 2 * H + US) == 100.0
    assert s.radius_at(T0, T0 + 25 * H) == 300.0


def test_anchor_is_missing_since_in_any_timezone():
    # same instants written in two offsets give the same answer
    missing_utc = T0.astimezone(UTC)
    now = (T0 + 90 * dt.timedelta(minutes=1)).astimezone(dt.timezone(dt.timedelta(hours=-5)))
    assert RadiusSchedule.default().radius_at(missing_utc, now) == 200.0


def test_dst_change_uses_elapsed_not_wall_clock():
    # 2026-03-08 02:00 America/New_York jumps to 03:00: 01:30 -> 03:15 wall is 45 min elapsed.
    # Same-tzinfo subtraction in Python would say 1 h 45 min (wall clock) and give 200 km.
    ny = zoneinfo.ZoneInfo("America/New_York")
    missing = dt.datetime(2026, 3, 8, 1, 30, tzinfo=ny)
    now = dt.datetime(2026, 3, 8, 3, 15, tzinfo=ny)
    assert now - missing == dt.timedelta(hours=1, minutes=45)   # the trap
    assert RadiusSchedule.default().radius_at(missing, now) == 100.0
    nxt = RadiusSchedule.default().next_change(missing, now)
    assert nxt == missing.astimezone(UTC) + H + US


def test_no_steps_is_a_constant_radius():
    s = RadiusSchedule([], 42.0)
    assert s.radius_at(T0, T0) == 42.0
    assert s.radius_at(T0, T0 + dt.timedelta(days=9)) == 42.0
    assert s.next_change(T0, T0) is None
    assert s.radii == (42.0,)


def test_half_circumference_is_allowed():
    s = RadiusSchedule([(H, 10.0)], HALF_CIRCUMFERENCE_KM)
    assert s.radius_at(T0, T0 + 2 * H) == HALF_CIRCUMFERENCE_KM


def test_int_radii_become_float():
    s = RadiusSchedule([(H, 100)], 500)
    assert isinstance(s.radius_at(T0, T0), float)


# -- next_change ---------------------------------------------------------------

@pytest.mark.parametrize("elapsed, expected", [
    (dt.timedelta(0), H + US),
    (H, H + US),                      # at the bound the radius has not grown yet
    (H + US, 2 * H + US),
    (2 * H + dt.timedelta(minutes=30), 3 * H + US),
    (3 * H, 3 * H + US),
])
def test_next_change_default(elapsed, expected):
    s = RadiusSchedule.default()
    nxt = s.next_change(T0, T0 + elapsed)
    assert nxt == T0 + expected
    assert nxt.tzinfo is not None
    assert s.radius_at(T0, nxt) > s.radius_at(T0, T0 + elapsed)
    assert s.radius_at(T0, nxt - US) == s.radius_at(T0, T0 + elapsed)


def test_next_change_none_when_final():
    s = RadiusSchedule.default()
    assert s.next_change(T0, T0 + 3 * H + US) is None
    assert s.next_change(T0, T0 + dt.timedelta(days=3)) is None


def test_next_change_skips_equal_radii():
    s = RadiusSchedule([(H, 100.0), (2 * H, 100.0), (3 * H, 150.0)], 150.0)
    assert s.next_change(T0, T0) == T0 + 2 * H + US
    assert s.next_change(T0, T0 + 2 * H + US) is None


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 10_000), min_size=0, max_size=6),
    growth=st.lists(st.floats(0.0, 500.0), min_size=7, max_size=7),
    first=st.floats(0.001, 1000.0),
    elapsed=st.integers(0, 80_000),
)
def test_step_function_properties(gaps, growth, first, elapsed):
    bounds, r, radii = [], first, []
    acc = 0
    for i, g in enumerate(gaps):
        acc += g
        bounds.append(dt.timedelta(seconds=acc))
        radii.append(r)
        r += growth[i]
    s = RadiusSchedule(list(zip(bounds, radii)), r + growth[-1])
    now = T0 + dt.timedelta(seconds=elapsed)
    here = s.radius_at(T0, now)
    # plain-Python model: the first step whose bound is >= t, else final
    t = now - T0
    model = next((rad for b, rad in zip(bounds, radii) if t <= b), s.final_km)
    assert here == model
    # non-decreasing in time
    assert s.radius_at(T0, now + dt.timedelta(seconds=1)) >= here
    nxt = s.next_change(T0, now)
    if nxt is None:
        assert s.radius_at(T0, now + dt.timedelta(days=3650)) == here
    else:
        assert nxt > now
        assert s.radius_at(T0, nxt) > here
        assert s.radius_at(T0, nxt - US) == here
    # round-trips through JSON
    assert RadiusSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# -- serialisation ----------------------------------------------------------------

@pytest.mark.parametrize("make", [RadiusSchedule.default, RadiusSchedule.elderly,
                                  lambda: RadiusSchedule([(dt.timedelta(seconds=1.5), 1.25)], 2.5,
                                                         name="odd")])
def test_round_trip(make):
    s = make()
    d = s.to_dict()
    back = RadiusSchedule.from_dict(json.loads(json.dumps(d)))
    assert back == s and hash(back) == hash(s)
    assert back.to_dict() == d


def test_to_dict_shape():
    assert RadiusSchedule.default().to_dict() == {
        "name": "default", "steps": [[3600.0, 100.0], [7200.0, 200.0], [10800.0, 300.0]],
        "final_km": 500.0}


def test_from_dict_name_defaults_to_custom():
    s = RadiusSchedule.from_dict({"steps": [[60, 5]], "final_km": 6})
    assert s.name == "custom" and s.radii == (5.0, 6.0)


def test_equality_and_repr():
    assert RadiusSchedule.default() == RadiusSchedule.default()
    assert RadiusSchedule.default() != RadiusSchedule.elderly()
    assert RadiusSchedule.default() != "default"
    assert "500 km" in repr(RadiusSchedule.default())


# -- bad input: one test per case ---------------------------------------------------

NAIVE = dt.datetime(2026, 11, 23, 10, 0)


def test_naive_missing_since_refused():
    with pytest.raises(InvalidInputError, match="missing_since.*naive"):
        RadiusSchedule.default().radius_at(NAIVE, T0)


def test_naive_now_refused():
    with pytest.raises(InvalidInputError, match="now.*naive"):
        RadiusSchedule.default().radius_at(T0, NAIVE)


def test_naive_refused_by_next_change():
    with pytest.raises(InvalidInputError, match="naive"):
        RadiusSchedule.default().next_change(NAIVE, T0)


def test_non_datetime_refused():
    with pytest.raises(InvalidInputError, match="missing_since must be a datetime"):
        RadiusSchedule.default().radius_at("2026-11-23T10:00:00+08:00", T0)


def test_future_missing_since_refused():
    with pytest.raises(InvalidInputError, match="before missing_since"):
        RadiusSchedule.default().radius_at(T0 + US, T0)


def test_future_missing_since_refused_by_next_change():
    with pytest.raises(InvalidInputError, match="before missing_since"):
        RadiusSchedule.default().next_change(T0 + H, T0)


@pytest.mark.parametrize("radius, match", [
    (0.0, "must be > 0"),
    (-5.0, "must be > 0"),
    (math.nan, "finite"),
    (math.inf, "finite"),
    (HALF_CIRCUMFERENCE_KM + 0.001, "circumference"),
    (1e9, "circumference"),
    ("100", "number"),
    (None, "number"),
    (True, "number"),
])
def test_bad_step_radius(radius, match):
    with pytest.raises(InvalidInputError, match=r"steps\[1\] radius") as ei:
        RadiusSchedule([(H, 1.0), (2 * H, radius)], 600.0)
    assert ei.match(match)


@pytest.mark.parametrize("final, match", [
    (0.0, "> 0"), (-1.0, "> 0"), (math.nan, "finite"), (math.inf, "finite"),
    (30_000.0, "circumference"), ("x", "number"),
])
def test_bad_final_km(final, match):
    with pytest.raises(InvalidInputError, match="final_km") as ei:
        RadiusSchedule([(H, 1.0)], final)
    assert ei.match(match)


def test_decreasing_radius_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[1\] radius = 50.0.*must not decrease"):
        RadiusSchedule([(H, 100.0), (2 * H, 50.0)], 500.0)


def test_final_below_last_step_refused():
    with pytest.raises(InvalidInputError, match="final_km = 200.0.*must not decrease"):
        RadiusSchedule([(H, 300.0)], 200.0)


def test_zero_bound_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[0\] bound = 0:00:00 must be positive"):
        RadiusSchedule([(dt.timedelta(0), 100.0)], 500.0)


def test_negative_bound_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[0\] bound.*positive"):
        RadiusSchedule([(-H, 100.0)], 500.0)


def test_equal_bounds_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[1\] bound = 1:00:00.*strictly increase"):
        RadiusSchedule([(H, 100.0), (H, 200.0)], 500.0)


def test_decreasing_bounds_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[1\] bound.*strictly increase"):
        RadiusSchedule([(2 * H, 100.0), (H, 200.0)], 500.0)


def test_bound_not_timedelta_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[0\] bound = 3600 must be a datetime.timedelta"):
        RadiusSchedule([(3600, 100.0)], 500.0)


def test_step_not_a_pair_refused():
    with pytest.raises(InvalidInputError, match=r"steps\[0\].*pair"):
        RadiusSchedule([(H, 100.0, 1)], 500.0)


def test_steps_not_iterable_refused():
    with pytest.raises(InvalidInputError, match="steps must be a sequence"):
        RadiusSchedule(5, 500.0)


@pytest.mark.parametrize("name", ["", "  ", None, 3])
def test_bad_name_refused(name):
    with pytest.raises(InvalidInputError, match="name"):
        RadiusSchedule([], 5.0, name=name)


@pytest.mark.parametrize("d, match", [
    ([], "must be a dict"),
    ({"final_km": 5}, "lacks key"),
    ({"steps": []}, "lacks key"),
    ({"steps": [], "final_km": 5, "colour": "red"}, "unknown key"),
    ({"steps": "x", "final_km": 5}, "steps must be a list"),
    ({"steps": [[60]], "final_km": 5}, r"steps\[0\]"),
    ({"steps": [[None, 5]], "final_km": 5}, r"steps\[0\] seconds"),
    ({"steps": [[float("nan"), 5]], "final_km": 5}, r"steps\[0\] seconds"),
    ({"steps": [[1e20, 5]], "final_km": 5}, "out of range"),
    ({"steps": [[-60, 5]], "final_km": 5}, "positive"),
    ({"steps": [[60, -5]], "final_km": 5}, "> 0"),
    ({"steps": [], "final_km": "far"}, "final_km"),
    ({"steps": [], "final_km": 5, "name": ""}, "name"),
])
def test_bad_dict_refused(d, match):
    with pytest.raises(InvalidInputError, match=match):
        RadiusSchedule.from_dict(d)
