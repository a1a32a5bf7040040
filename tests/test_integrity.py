"""The integrity chain store -> index -> recipient log (issue 11).

Each test named after a row of the issue's table rebuilds that situation on
small data and pins that it now ends in a typed error, with nothing logged,
or in the exact answer.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import geotarget as gt
from geotarget import cli
from geotarget.errors import CorruptFileError, GeotargetError, LineageError

from _integrity_world import (HZ, OFFICERS, T0, close_ids, copy_dir, engine, moved, population, query_ids,
                              reference_ids, run_alert, save_generations)

TESTS = Path(__file__).resolve().parent
PKG_PARENT = str(Path(gt.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """g1..g3 of lineage A, h1..h2 of lineage B (same sizes), and a log of one alert over g1 -> g2."""
    root = tmp_path_factory.mktemp("world")
    g = save_generations(root, seed=1)
    h = save_generations(root / "other", seed=2, count=2)
    log = root / "log.sqlite"
    alert_id = run_alert(g[0], g[1], log)
    expected = close_ids(g[1], copy_dir(root, root.parent / "expected") / "log.sqlite", alert_id)
    return {"root": root, "g": g, "h": h, "log": log, "alert": alert_id, "closure": expected}


def _log_copy(world, tmp_path) -> Path:
    p = tmp_path / "log.sqlite"
    p.write_bytes(world["log"].read_bytes())
    return p


def _pushes(log_path) -> list[str]:
    with gt.RecipientLog(log_path) as log:
        return [r.push_id for r in log.pushes(audiences=False)]


def test_the_exact_closure_is_every_device_the_rings_reached(world, tmp_path):
    log = _log_copy(world, tmp_path)
    with gt.RecipientLog(log) as lg:
        rings = [r for r in lg.pushes(world["alert"]) if r.kind != "closure"]
        keys = np.array(sorted(set().union(*(set(r.audience) for r in rings))), dtype=np.int64)
    store = gt.DeviceStore.open(world["g"][1])
    np.testing.assert_array_equal(world["closure"], np.sort(store.device_id[keys]))
    assert len(world["closure"]) > 100


def test_log_records_its_lineage_at_the_first_push_and_the_generation_of_every_push(world, tmp_path):
    with gt.RecipientLog(_log_copy(world, tmp_path)) as log:
        assert log.lineage() == gt.DeviceStore.open(world["g"][0]).lineage
        assert [r.generation for r in log.pushes(world["alert"], audiences=False)] == [1, 1, 2, 2]
        assert log.max_generation() == 2


def test_every_generation_records_lineage_parent_and_a_content_digest(world):
    stores = [gt.DeviceStore.open(d) for d in world["g"]]
    assert len({s.lineage for s in stores}) == 1 and len({s.uid for s in stores}) == 3
    assert [(s.generation, s.parent) for s in stores] == [(1, None), (2, 1), (3, 2)]
    assert len({s.digest for s in stores}) == 3 and all(isinstance(s.digest, str) for s in stores)
    assert gt.DeviceStore.open(world["h"][0]).lineage != stores[0].lineage


# -- the table, row by row ---------------------------------------------------------------

def test_close_with_an_index_of_another_population_of_the_same_size_is_refused(world, tmp_path, capsys):
    log = _log_copy(world, tmp_path)
    before = _pushes(log)
    assert len(gt.SpatialIndex.open(world["h"][1])) == len(gt.SpatialIndex.open(world["g"][1]))
    with pytest.raises(LineageError, match="lineage"):
        close_ids(world["h"][1], log, world["alert"])
    officers = tmp_path / "officers.json"
    officers.write_text(json.dumps([{"officer_id": o.officer_id, "level": o.level, "division": o.division}
                                    for o in OFFICERS]))
    rc = cli.main(["alert", "close", "--log", str(log), "--index", str(world["h"][1]), "--officers",
                   str(officers), world["alert"], "--officer", "mps", "--outcome", "lost",
                   "--now", (T0 + dt.timedelta(hours=5)).isoformat()])
    assert rc != 0 and "lineage" in capsys.readouterr().err
    assert _pushes(log) == before


def test_log_of_a_larger_store_closed_with_a_smaller_index_reads_no_key_beyond_the_store(world, tmp_path):
    log = _log_copy(world, tmp_path)
    before = _pushes(log)
    small = tmp_path / "small"
    gt.SpatialIndex.build(population(5, n=200)).save(small)
    with pytest.raises(LineageError):
        close_ids(small, log, world["alert"])
    # Even a store that claims the log's lineage and generation cannot make a kernel read past it.
    lineage = gt.DeviceStore.open(world["g"][0]).lineage
    forged = population(5, n=200, lineage=lineage)
    forged.generation = 2
    eng = engine(gt.SpatialIndex.build(forged), log)
    try:
        with pytest.raises(CorruptFileError, match="store has 200 devices"):
            eng.notified(world["alert"])
        with pytest.raises(CorruptFileError, match="store has 200 devices"):
            eng.close(world["alert"], "mps", outcome="lost", now=T0 + dt.timedelta(hours=5))
    finally:
        eng.log.close()
    assert _pushes(log) == before


def test_generate_into_a_directory_holding_a_store_and_its_index_refuses_without_force(tmp_path, capsys):
    d = tmp_path / "st"
    assert cli.main(["generate", "--devices", "3000", "--seed", "0", "--store", str(d), "--build"]) == 0
    old = gt.DeviceStore.open(d).uid
    assert cli.main(["generate", "--devices", "3000", "--seed", "1", "--store", str(d)]) != 0
    assert "--force" in capsys.readouterr().err
    assert gt.DeviceStore.open(d).uid == old                    # refused: nothing changed
    assert cli.main(["build", "--store", str(d)]) != 0          # an index is there too
    assert cli.main(["generate", "--devices", "3000", "--seed", "1", "--store", str(d), "--force"]) == 0
    assert gt.DeviceStore.open(d).uid != old
    with pytest.raises(CorruptFileError, match="index.json"):
        gt.SpatialIndex.open(d)                                 # the old index went with the old store
    assert cli.main(["build", "--store", str(d)]) == 0
    store = gt.DeviceStore.open(d)
    for got, want in zip(query_ids(d), reference_ids(store)):
        np.testing.assert_array_equal(got, want)


def test_a_store_saved_over_an_indexed_directory_makes_the_old_index_refuse_to_open(world, tmp_path):
    d = copy_dir(world["g"][1], tmp_path / "d")
    population(9).save(d)      # the library path, without the CLI's removal of the index
    with pytest.raises(CorruptFileError, match="built from store"):
        gt.SpatialIndex.open(d)


def _reseal(path: Path, **changes):
    from geotarget._fs import seal
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(seal(doc)))


def test_index_json_keys_are_rows_flipped_is_refused(world, tmp_path):
    d = copy_dir(world["g"][1], tmp_path / "d")
    meta = json.loads((d / "index.json").read_text())
    assert meta["keys_are_rows"] is False
    (d / "index.json").write_text(json.dumps({**meta, "keys_are_rows": True}))
    with pytest.raises(CorruptFileError, match="checksum"):
        gt.SpatialIndex.open(d)
    _reseal(d / "index.json", keys_are_rows=True)   # resealed by hand: the arrays still tell the truth
    idx = gt.SpatialIndex.open(d)
    with pytest.raises(CorruptFileError, match="keys_are_rows"):
        idx.within(HZ[0], HZ[1], 300.0)


def test_bounds_npy_swapped_with_another_generations_is_refused(world, tmp_path):
    d = copy_dir(world["g"][1], tmp_path / "d")
    other = world["g"][2] / "bounds.npy"
    assert other.stat().st_size == (d / "bounds.npy").stat().st_size
    assert other.read_bytes() != (d / "bounds.npy").read_bytes()
    (d / "bounds.npy").write_bytes(other.read_bytes())
    idx = gt.SpatialIndex.open(d)                    # same size and shape: only the content differs
    with pytest.raises(CorruptFileError, match="bounds.npy: content digest mismatch"):
        idx.within(HZ[0], HZ[1], 300.0)
    with pytest.raises(CorruptFileError, match="bounds.npy"):
        engine(gt.SpatialIndex.open(d), _log_copy(world, tmp_path))


def test_ten_bytes_flipped_in_keys_npy_are_refused(world, tmp_path):
    d = copy_dir(world["g"][1], tmp_path / "d")
    raw = bytearray((d / "keys.npy").read_bytes())
    for i in range(10):
        raw[len(raw) // 2 + 37 * i] ^= 0xFF
    (d / "keys.npy").write_bytes(bytes(raw))
    idx = gt.SpatialIndex.open(d)
    with pytest.raises(CorruptFileError, match="keys.npy"):
        idx.count(HZ[0], HZ[1], 300.0)


def test_one_bit_flipped_in_the_device_id_column_is_refused(world, tmp_path):
    d = copy_dir(world["g"][1], tmp_path / "d")
    log = _log_copy(world, tmp_path)
    with gt.RecipientLog(log) as lg:
        key = min(lg.notified(world["alert"]))
    store = gt.DeviceStore.open(d)
    at = gt._fs.offset_in(store._mmap, store.device_id) + 8 * key
    del store
    with open(d / "store.arrow", "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 1]))
    before = _pushes(log)
    with pytest.raises(CorruptFileError, match="store.arrow: content digest mismatch"):
        close_ids(d, log, world["alert"])
    assert _pushes(log) == before


def test_a_middle_push_row_deleted_from_the_log_stops_the_closure(world, tmp_path):
    log = _log_copy(world, tmp_path)
    conn = sqlite3.connect(log)
    (log_seq,) = conn.execute("SELECT log_seq FROM pushes WHERE alert_id=? AND seq=1",
                              (world["alert"],)).fetchone()
    conn.execute("DELETE FROM pushes WHERE log_seq=?", (log_seq,))
    conn.execute("DELETE FROM audiences WHERE log_seq=?", (log_seq,))
    conn.commit()
    conn.close()
    before = _pushes(log)
    assert len(before) == 3
    with pytest.raises(CorruptFileError, match=r"seq \[0, 2, 3\].*nothing was sent"):
        close_ids(world["g"][1], log, world["alert"])
    assert _pushes(log) == before


def test_a_reached_count_that_disagrees_with_the_logged_rings_stops_the_closure(world, tmp_path):
    log = _log_copy(world, tmp_path)
    with gt.RecipientLog(log) as lg:
        rec = lg.alert(world["alert"])
        lg.save_alert(world["alert"], {**rec, "reached": rec["reached"] + 1})
    with pytest.raises(CorruptFileError, match="alert record says"):
        close_ids(world["g"][1], log, world["alert"])
    assert len(_pushes(log)) == 4


def test_refresh_with_a_fresh_reingest_instead_of_a_descendant_is_refused(world, tmp_path):
    log = _log_copy(world, tmp_path)
    eng = engine(gt.SpatialIndex.open(world["g"][1]), log)
    now = T0 + dt.timedelta(hours=3)
    try:
        fresh = gt.SpatialIndex.build(population(1))             # the same devices, ingested anew
        with pytest.raises(LineageError, match="lineage"):
            eng.refresh(fresh, now)
        with pytest.raises(LineageError, match="descendant"):
            eng.refresh(gt.SpatialIndex.open(world["g"][0]), now)   # older
        sibling = moved(gt.DeviceStore.open(world["g"][0]), seed=77)  # another generation 2
        with pytest.raises(LineageError, match="descendant"):
            eng.refresh(gt.SpatialIndex.build(sibling), now)
        # a generation 3 grown on that other branch: same lineage, a later number, not a descendant
        with pytest.raises(LineageError, match="does not descend"):
            eng.refresh(gt.SpatialIndex.build(moved(sibling, seed=78)), now)
        assert eng.index.path == world["g"][1]
        assert len(eng.log.pushes(audiences=False)) == 4
        pushes = eng.refresh(gt.SpatialIndex.open(world["g"][2]), now)   # a real descendant
        assert {p.kind for p in pushes} <= {"topup", "expand"}
    finally:
        eng.log.close()


def test_an_altered_lineage_row_in_the_log_is_refused(world, tmp_path):
    log = _log_copy(world, tmp_path)
    other = gt.DeviceStore.open(world["h"][1]).lineage
    conn = sqlite3.connect(log)
    conn.execute("UPDATE lineage SET lineage=? WHERE id=1", (other,))   # as if the log were the other's
    conn.commit()
    conn.close()
    with gt.RecipientLog(log) as lg:
        with pytest.raises(CorruptFileError, match="lineage fails its checksum"):
            lg.verify()
    with pytest.raises(CorruptFileError, match="lineage fails its checksum"):
        close_ids(world["h"][1], log, world["alert"])


def test_engine_refuses_an_index_older_than_the_newest_generation_its_log_used(world, tmp_path):
    with pytest.raises(LineageError, match="older than generation 2"):
        engine(gt.SpatialIndex.open(world["g"][0]), _log_copy(world, tmp_path))


def test_log_of_schema_version_1_is_refused_with_a_clear_error(tmp_path):
    p = tmp_path / "old.sqlite"
    gt.RecipientLog(p).close()
    conn = sqlite3.connect(p)
    conn.execute("PRAGMA user_version=1")
    conn.close()
    with pytest.raises(CorruptFileError, match="version 1 predates lineage"):
        gt.RecipientLog(p)


def test_engine_verifies_a_generation_once_before_its_first_push(world, tmp_path, monkeypatch):
    idx = gt.SpatialIndex.open(world["g"][1])
    assert not idx._verified
    engine(idx, _log_copy(world, tmp_path)).log.close()
    assert idx._verified and idx.store._verified
    calls = []
    monkeypatch.setattr(gt._fs, "file_digest", lambda p: calls.append(p))
    idx.within(HZ[0], HZ[1], 100.0)
    assert calls == []                                        # remembered in-process


@pytest.mark.crash
def test_crash_between_saving_a_store_and_its_index_never_opens_a_stale_index(tmp_path):
    """kill -9 a process that keeps replacing a directory's store and then its index."""
    d = tmp_path / "d"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PKG_PARENT, str(TESTS)) if p))
    rng = np.random.default_rng(11)
    outcomes = {"refused": 0, "exact": 0}
    for trial in range(12):
        child = subprocess.Popen([sys.executable, str(TESTS / "_integrity_crash_child.py"), str(d)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.6)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        try:
            got = query_ids(d)
        except GeotargetError:
            outcomes["refused"] += 1
            continue
        for g, w in zip(got, reference_ids(gt.DeviceStore.open(d))):
            np.testing.assert_array_equal(g, w)
        outcomes["exact"] += 1
    assert sum(outcomes.values()) == 12


def test_a_generation_records_every_ancestor_and_reopens_with_them(world, tmp_path):
    """A refresh may skip generations (1 -> 3) only along the chain the files record."""
    stores = [gt.DeviceStore.open(d) for d in world["g"]]
    assert stores[0].ancestry == ()
    assert stores[1].ancestry == (stores[0].uid,)
    assert stores[2].ancestry == (stores[0].uid, stores[1].uid)
    eng = engine(gt.SpatialIndex.open(world["g"][0]), tmp_path / "fresh.sqlite")
    try:
        eng.refresh(gt.SpatialIndex.open(world["g"][2]), T0 + dt.timedelta(hours=3))   # skips g2
        assert eng.index.store.generation == 3
    finally:
        eng.log.close()
