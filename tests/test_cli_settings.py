"""The settings file, case types, drills, expiry and freshness on the command line."""
import datetime as dt

import pytest

from geotarget.spatial.index import SpatialIndex
from geotarget.alerts.log import RecipientLog
from test_cli import HZ, T, ok, ok_json, run


@pytest.fixture(scope="module")
def work(cli_work):
    return cli_work("cli_settings", "20k")


COMMON = ("--index", "st", "--officers", "officers.json")


def test_config_show_prints_the_settings_in_force(work):
    import tomllib
    default = tomllib.loads(ok("config", "show", cwd=work).stdout)
    assert default["sender"]["id"] == "tuanyuan@mps.gov.cn"
    assert default["case"]["child"]["event_code"] == "CAE"
    (work / "mine.toml").write_text('[dispatch]\nmax_location_age_hours = 6\n[case.child]\nexpiry_hours = 12\n')
    mine = ok_json("config", "show", "--config", "mine.toml", cwd=work)
    assert mine["dispatch"]["max_location_age_hours"] == 6
    assert mine["case"]["child"]["expiry_hours"] == 12 and mine["case"]["elderly"] == default["case"]["elderly"]
    (work / "bad.toml").write_text("[case.child]\nschedule = [[1, 300], [2, 100]]\n")
    p = run("config", "show", "--config", "bad.toml", cwd=work)
    assert p.returncode == 2 and "must not decrease" in p.stderr and "Traceback" not in p.stderr


def _ring_keys(work, log, extra=()):
    rep = ok_json("alert", "report", "--log", log, *COMMON, "--officer", "S-330100", "--lat", HZ["lat"],
                  "--lon", HZ["lon"], "--missing-since", T.format("08:10"), "--now", T.format("08:25"),
                  *extra, cwd=work)
    tick = ok_json("alert", "tick", "--log", log, *COMMON, "--now", T.format("08:32"), "--ack", *extra,
                   cwd=work)
    return rep, tick["pushes"][0]


def test_alert_verbs_use_the_freshness_window(work):
    """Default 24 h from the settings; --max-location-age 0 reaches every device, stale ones too."""
    _, fresh = _ring_keys(work, "fresh.sqlite")
    _, every = _ring_keys(work, "all.sqlite", ("--max-location-age", "0"))
    idx = SpatialIndex.open(work / "st")
    now = dt.datetime.fromisoformat(T.format("08:32"))
    assert fresh["recipients"] == len(idx.within(HZ["lat"], HZ["lon"], 100,
                                                 seen_since=now - dt.timedelta(hours=24)))
    assert every["recipients"] == len(idx.within(HZ["lat"], HZ["lon"], 100))
    assert every["recipients"] > fresh["recipients"]


def test_elderly_drill_renew_and_confirm(work):
    base = ("--log", "cases.sqlite", *COMMON)
    rep = ok_json("alert", "report", *base, "--officer", "S-330100", "--lat", HZ["lat"], "--lon", HZ["lon"],
                  "--missing-since", T.format("08:10"), "--now", T.format("08:25"), "--case-type", "elderly",
                  "--details", '{"name": "Zhang San"}', cwd=work)
    assert rep["case_type"] == "elderly" and rep["status"] == "open" and not rep["drill"]
    twin = ok_json("alert", "report", *base, "--officer", "S-330100", "--lat", HZ["lat"], "--lon", HZ["lon"],
                   "--missing-since", T.format("08:20"), "--now", T.format("08:26"), "--case-type", "elderly",
                   "--details", '{"name": "zhang  san"}', cwd=work)
    assert twin["status"] == "held" and twin["duplicate_of"] == rep["alert_id"]
    text = ok("alert", "confirm", twin["alert_id"], *base, "--officer", "S-330100", "--duplicate",
              "--now", T.format("08:27"), cwd=work).stdout
    assert "merged" in text
    drill = ok("alert", "report", *base, "--officer", "S-330100", "--lat", HZ["lat"], "--lon", HZ["lon"],
               "--missing-since", T.format("08:10"), "--now", T.format("08:28"), "--drill", cwd=work).stdout
    assert drill.startswith("DRILL (exercise, not a real alert)")
    ticked = ok_json("alert", "tick", *base, "--now", T.format("08:40"), "--out", "cases_out", "--ack",
                     cwd=work)["pushes"]
    kinds = {p["alert_id"][:5]: p for p in ticked}
    assert set(kinds) == {"GT-33", "DRILL"}
    assert kinds["DRILL"]["recipients"] == 0                  # no test devices registered
    assert b"<status>Exercise</status>" in (work / kinds["DRILL"]["cap_file"]).read_bytes()
    assert b"Missing and Endangered Person" in (work / kinds["GT-33"]["cap_file"]).read_bytes()
    renewed = ok_json("alert", "renew", rep["alert_id"], *base, "--officer", "S-330100", "--hours", "100",
                      "--now", T.format("09:00"), cwd=work)
    assert renewed["expires_at"].startswith("2026-11-27T")    # 09:00 +08:00 plus 100 h, in UTC
    with RecipientLog(work / "cases.sqlite") as log:
        actions = [e["action"] for e in log.audit_entries()]
    assert {"renew", "confirm-duplicate"} <= set(actions)
    stats = ok_json("stats", "--log", "cases.sqlite", cwd=work)
    assert stats["published"] == 1                            # neither the drill nor the duplicate
