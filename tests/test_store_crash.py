"""Kill -9 a process writing a new store generation; the old one is intact and no half generation is visible."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import geotarget as gt

sys.path.insert(0, str(Path(__file__).parent))
from store_crash_child import batch  # noqa: E402

pytestmark = pytest.mark.crash
CHILD = Path(__file__).with_name("store_crash_child.py")


def _digests(d: Path):
    return {f.name: hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def g1(tmp_path_factory):
    wd = tmp_path_factory.mktemp("store-crash")
    rng = np.random.default_rng(4)
    n = 200_000
    ids = rng.permutation(np.arange(n, dtype=np.uint64) * 977 + 3)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)
    chunks = ({"device_id": ids[s:s + 50_000], "lat": lat[s:s + 50_000], "lon": lon[s:s + 50_000],
               "app": np.zeros(min(50_000, n - s), np.int8), "last_seen": np.full(min(50_000, n - s), 1_700_000_000)}
              for s in range(0, n, 50_000))
    gt.DeviceStore.write_chunks(wd / "g1", chunks, n, ["amap"])
    base = gt.DeviceStore.open(wd / "g1")
    up, ulat, ulon, useen = batch(base)
    expected = base.with_updates(up, ulat, ulon, last_seen=useen)
    return wd, _digests(wd / "g1"), expected


@pytest.mark.parametrize("seed", range(12))
def test_kill_while_writing_a_generation(tmp_path, g1, seed):
    wd, before, expected = g1
    (tmp_path / "g1").symlink_to(wd / "g1")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(gt.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "start", proc.stderr.read()
    tmp = tmp_path / "g2" / "store.arrow.tmp"
    deadline = time.monotonic() + 60
    while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    # writing takes ~0.1 s here: most kills land mid-write, a few after the renames
    time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.12)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _digests(wd / "g1") == before  # the old generation is untouched
    g2 = tmp_path / "g2"
    if not (g2 / "store.arrow").exists():
        # no generation here: only staged ".tmp" files, which open() never reads
        assert all(f.name.endswith(".tmp") for f in g2.iterdir()) if g2.exists() else True
        with pytest.raises(gt.errors.CorruptFileError):
            gt.DeviceStore.open(g2)
        return
    # store.arrow is only ever renamed into place complete and fsynced, with companions
    # of its own generation or none; whatever the kill left must be that generation
    got = gt.DeviceStore.open(g2)
    for col in ("device_id", "lat", "lon", "app_codes", "last_seen_s"):
        np.testing.assert_array_equal(getattr(got, col), getattr(expected, col))
    everyone = np.concatenate([expected.device_id, np.array([1, 2], np.uint64)])
    np.testing.assert_array_equal(got.lookup(everyone), expected.lookup(everyone))
    if got.changed_keys is not None:
        np.testing.assert_array_equal(got.changed_keys, expected.changed_keys)
