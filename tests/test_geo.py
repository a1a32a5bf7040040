"""The single helpers of geo.py: the time (now or the clock), integer checks, ISO text."""
import datetime as dt

import numpy as np
import pytest

import geotarget as gt
from geotarget.geo import check_int, iso_utc, now_or_clock

CST = dt.timezone(dt.timedelta(hours=8))


def test_now_or_clock_checks_a_given_time_and_reads_the_clock_otherwise():
    given = dt.datetime(2026, 11, 23, 16, 0, tzinfo=CST)
    got = now_or_clock(given)
    assert got == given and got.utcoffset() == dt.timedelta(0)
    before = dt.datetime.now(dt.timezone.utc)
    clock = now_or_clock(None)
    assert before <= clock <= dt.datetime.now(dt.timezone.utc) and clock.tzinfo is not None
    with pytest.raises(gt.InvalidInputError, match="at=.*naive"):
        now_or_clock(dt.datetime(2026, 11, 23), "at")
    with pytest.raises(gt.InvalidInputError, match="now must be a datetime"):
        now_or_clock("2026-11-23")


@pytest.mark.parametrize("value", [0, 7, np.int64(7), np.uint8(3), 4096])
def test_check_int_accepts_integers_in_range(value):
    got = check_int(value, "x", 0, 4096)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value, match", [
    (True, ", got True"), (np.bool_(False), ", got (np\\.)?False"), (1.0, ", got 1.0"),
    ("3", ", got '3'"), (None, ", got None"), (-1, r" >= 0, got -1"), (4097, r" in \[0, 4096\], got 4097"),
])
def test_check_int_refuses_the_rest(value, match):
    maximum = 4096 if value == 4097 else None
    with pytest.raises(gt.InvalidInputError, match="x must be a whole number" + match):
        check_int(value, "x", 0, maximum)


def test_iso_utc():
    t = dt.datetime(2026, 11, 23, 16, 0, 5, 120, tzinfo=CST)
    assert iso_utc(t) == "2026-11-23T08:00:05.000120+00:00"
    assert iso_utc(t, "seconds") == "2026-11-23T08:00:05+00:00"
    assert iso_utc(None) is None
