"""The scale benchmark end to end at 200 k devices: its report must be complete and add up.

``benchmarks/scale.py`` is what the 400 M-device run uses; this runs it small,
in a subprocess exactly as a user would, and checks the JSON report for
internal consistency (no timing asserts: the machine's load decides those).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "scale.py"
N = 200_000
PHASES = ("generate", "build", "serve", "log", "dispatch", "refresh", "build2", "retarget")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    wd = tmp_path_factory.mktemp("scale")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--devices", "200k", "--workdir", str(wd),
                           "--baseline-seconds", "0.3", "--dispatch-interval", "0.01"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = wd / "scale.json"
    assert path.exists()
    assert (wd / "scale.md").read_text() in proc.stdout  # the Markdown is printed too
    return json.loads(path.read_text()), wd


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.mark.scale
def test_every_phase_ran_and_reported(report):
    rep, _ = report
    assert rep["devices"] == N
    assert list(rep["phases"]) == list(PHASES)
    for name, ph in rep["phases"].items():
        assert "error" not in ph, (name, ph.get("error"))
        assert ph["phase"] == name
        assert _positive(ph["peak_rss"]) and _positive(ph["wall_seconds"])
        assert ph["process_seconds"] >= ph["wall_seconds"]
    assert _positive(rep["machine"]["nproc"]) and _positive(rep["machine"]["mem_total"])
    measured = {(m["phase"], m["measure"]) for m in rep["measures"]}
    assert {p for p, _ in measured} == set(PHASES)
    for m in rep["measures"]:
        assert m["value"] is not None, m
        assert m["met"] == (None if m["target"] is None else m["value"] <= m["target"])
        assert bool(m["shortfall"]) == (m["met"] is False)


@pytest.mark.scale
def test_generation_and_index_sizes(report):
    rep, wd = report
    gen, build, build2 = (rep["phases"][p] for p in ("generate", "build", "build2"))
    assert gen["n"] == build["n"] == N and gen["generation"] == build["generation"] == 1
    assert build["nbytes"] / N == pytest.approx(build["bytes_per_device"])
    # points (16 B) + keys (4 B) at least; the filters add seen (4 B) + app (1 B) per device, and
    # whatever per-node filter data the index keeps
    assert 20 <= build["bytes_per_device"] < build["bytes_per_device_with_filters"]
    assert build["nbytes_with_filters"] - build["nbytes"] >= 5 * N
    ref = rep["phases"]["refresh"]
    assert build2["n"] == ref["checks"]["n_g2"] == N + ref["new"] and build2["generation"] == 2
    for name in ("g1", "g2"):
        assert (wd / name / "index.json").exists()
    assert rep["sizes_on_disk"]["g1"] > 0 and rep["workdir_bytes"] >= rep["sizes_on_disk"]["g2"]


@pytest.mark.scale
def test_serve_counts_agree_with_fill_and_reference(report):
    rep, _ = report
    serve = rep["phases"]["serve"]
    assert set(serve["queries"]) == {f"{c}_{r}km" for c in ("dense", "medium", "rural") for r in (100, 500)}
    for name, q in serve["queries"].items():
        assert q["count"] == q["recipients"] == q["len"] <= N
        assert q["within_fill_best_s"] <= q["within_fill_median_s"]
        v = serve["verify"][name]
        assert v["mismatches"] == 0 and v["reference"] - v["ties"] <= q["count"] <= v["reference"] + v["ties"]
    qs = serve["queries"]
    for c in ("dense", "medium", "rural"):
        assert qs[f"{c}_100km"]["count"] <= qs[f"{c}_500km"]["count"]
    assert qs["dense_500km"]["count"] > qs["rural_500km"]["count"]  # Shanghai outnumbers the Chang Tang


@pytest.mark.scale
def test_log_holds_the_dense_push(report):
    rep, _ = report
    log, serve = rep["phases"]["log"], rep["phases"]["serve"]
    assert log["recipients"] == serve["queries"]["dense_500km"]["count"]
    stats = log["log_stats"]
    assert stats["pushes"] == len(log["append_seconds"]) == stats["alerts"]
    assert stats["recipients_logged"] == log["recipients"] * stats["pushes"]
    assert log["bytes_per_recipient"] == pytest.approx(stats["bytes_on_disk"] / stats["recipients_logged"])


@pytest.mark.scale
def test_refresh_generation_two(report):
    rep, _ = report
    ref = rep["phases"]["refresh"]
    assert ref["updates"] == ref["moved"] + ref["new"]
    assert ref["moved"] == N // 10 - N // 100 and 0 < ref["new"] <= N // 100
    c = ref["checks"]
    assert c["n_g2"] == c["n_expected"] == N + ref["new"] and c["generation"] == 2
    assert c["sample_missing"] == c["sample_keys_changed"] == 0
    assert c["sample_location_wrong"] == c["sample_app_wrong"] == 0
    during = ref["queries_during"]
    assert during["queries"] >= 1
    # the old generation kept answering, and with the same audience
    assert during["distinct_counts"] == ref["baseline_queries"]["distinct_counts"] \
        == [rep["phases"]["serve"]["queries"]["dense_100km"]["count"]]
    # so did the dispatch path (every app's batch of the 24 h-fresh 500 km audience), timed before
    base, disp = ref["baseline_dispatch"], ref["dispatch_during"]
    assert base["queries"] >= 20 and _positive(base["p50_s"]) and base["p99_s"] >= base["p50_s"]
    assert set(disp["distinct_counts"]) <= set(base["distinct_counts"]) \
        == {rep["phases"]["dispatch"]["recipients"]}


@pytest.mark.scale
def test_retarget_tops_up_every_alert(report):
    rep, _ = report
    rt = rep["phases"]["retarget"]
    assert rt["alerts"] == 50 and len({c["adcode"] for c in rt["cities"]}) == 50
    assert set(rt["radii_km"]) <= {100.0, 200.0, 300.0, 500.0} and min(rt["radii_km"]) == 100.0
    assert max(rt["radii_km"]) == 500.0
    assert rt["kinds"] == {"topup": rt["pushes"]} and rt["pushes"] <= rt["alerts"]
    assert rt["devices"] == rt["log_stats"]["recipients_logged"] - rt["devices_notified_before"]
    assert rt["n_g2"] == rep["phases"]["refresh"]["checks"]["n_g2"]
    # every device reached is inside some circle, at one alert at most once
    assert rt["devices"] <= rt["recipients_at_refresh"]


@pytest.mark.scale
def test_dispatch_phase_times_more_rings(report):
    rep, _ = report
    d = rep["phases"]["dispatch"]
    assert d["ring"]["recipients"] > 0 and d["ring"]["tick_to_batches_s"] > 0
    assert len(d["ring_ticks_s"]) == 10 and all(_positive(t) for t in d["ring_ticks_s"])
    row = next(m for m in rep["measures"] if m["measure"].startswith("  the same over 10 more new rings"))
    assert row["value"] == pytest.approx(float(np.percentile(d["ring_ticks_s"], 99)))
