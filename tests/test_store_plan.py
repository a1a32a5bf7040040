"""plan_generation: the key rules of a new store generation, on their own."""
import numpy as np
import pytest

from geotarget._store_checks import MAX_DEVICES
from geotarget._store_plan import plan_generation, spatial_order
from geotarget.errors import InvalidInputError


def _batch(seed=0, m=500, n_old=1000, share_new=0.3):
    rng = np.random.default_rng(seed)
    keys = rng.choice(n_old, size=m, replace=False).astype(np.int64)
    keys[rng.random(m) < share_new] = -1
    lat = rng.uniform(-80, 80, m)
    lon = rng.uniform(-179, 179, m)
    return keys, lat, lon


def test_moved_devices_keep_their_keys_and_new_ones_follow_in_spatial_order():
    keys, lat, lon = _batch()
    before = (keys.copy(), lat.copy(), lon.copy())
    plan = plan_generation(keys, lat, lon, n_old=1000, generation=4, uid="u4", ancestry=("u1", "u2", "u3"))
    # pure: the inputs are untouched
    for a, b in zip(before, (keys, lat, lon)):
        np.testing.assert_array_equal(a, b)
    assert (plan.generation, plan.parent, plan.ancestry) == (5, 4, ("u1", "u2", "u3", "u4"))
    old = np.flatnonzero(keys >= 0)
    new = np.flatnonzero(keys < 0)
    assert plan.n_old == 1000 and plan.n_new == new.size and plan.n_total == 1000 + new.size
    # movers: ascending keys, each with the batch row that holds it
    np.testing.assert_array_equal(plan.moved_keys, np.sort(keys[old]))
    np.testing.assert_array_equal(keys[plan.moved_rows], plan.moved_keys)
    # new devices: batch order, then KD leaf order among themselves
    np.testing.assert_array_equal(plan.new_rows, new[spatial_order(lat[new], lon[new])])
    assert sorted(plan.new_rows.tolist()) == new.tolist()
    changed = plan.changed_keys()
    assert changed.dtype == np.uint32
    np.testing.assert_array_equal(changed, np.union1d(keys[old], np.arange(1000, plan.n_total)))


def test_rows_name_the_batch_rows_of_keys_given_in_another_order():
    """The on-disk path passes keys in id order with their rows; the plan must not depend on that order."""
    keys, lat, lon = _batch(seed=1)
    perm = np.random.default_rng(7).permutation(keys.size).astype(np.uint32)
    a = plan_generation(keys, lat, lon, n_old=1000, generation=1, uid="u")
    b = plan_generation(keys[perm], lat, lon, rows=perm, n_old=1000, generation=1, uid="u")
    for field in ("moved_keys", "moved_rows", "new_rows"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_array_equal(a.changed_keys(), b.changed_keys())


def test_only_moves_and_only_new_devices():
    lat, lon = np.zeros(3), np.zeros(3)
    moves = plan_generation(np.array([2, 0, 1]), lat, lon, n_old=3, generation=1, uid="u")
    assert moves.n_new == 0 and moves.n_total == 3
    np.testing.assert_array_equal(moves.moved_rows, [1, 2, 0])
    fresh = plan_generation(np.array([-1, -1, -1]), lat, lon, n_old=0, generation=1, uid="u")
    assert fresh.moved_keys.size == 0 and sorted(fresh.new_rows.tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(fresh.changed_keys(), [0, 1, 2])
    empty = plan_generation(np.empty(0, np.int64), np.empty(0), np.empty(0), n_old=5, generation=2, uid="u")
    assert empty.n_total == 5 and empty.changed_keys().size == 0


def test_new_devices_beyond_the_key_space_are_refused():
    with pytest.raises(InvalidInputError, match="exceed the key space"):
        plan_generation(np.array([-1, -1, 0]), np.zeros(3), np.zeros(3), n_old=MAX_DEVICES - 1,
                        generation=1, uid="u")
    ok = plan_generation(np.array([-1, 0]), np.zeros(2), np.zeros(2), n_old=MAX_DEVICES - 1, generation=1, uid="u")
    assert ok.n_total == MAX_DEVICES


def test_both_with_updates_paths_follow_the_plan(tmp_path):
    """The in-memory and the on-disk generation agree row for row (both are built from the plan)."""
    import geotarget as gt
    rng = np.random.default_rng(3)
    ids = rng.choice(10**12, size=2000, replace=False).astype(np.uint64)
    base = gt.DeviceStore.from_arrays(ids, rng.uniform(-60, 60, 2000), rng.uniform(-170, 170, 2000))
    base.save(tmp_path / "g1")
    disk_base = gt.DeviceStore.open(tmp_path / "g1")
    up = np.concatenate([ids[rng.choice(2000, 300, replace=False)], np.arange(200, dtype=np.uint64) + 10**13])
    rng.shuffle(up)
    lat, lon = rng.uniform(-60, 60, up.size), rng.uniform(-170, 170, up.size)
    seen = rng.integers(1_600_000_000, 1_700_000_000, up.size)
    mem = base.with_updates(up, lat, lon, last_seen=seen, app="qq")
    disk = disk_base.with_updates(up, lat, lon, last_seen=seen, app="qq", directory=tmp_path / "g2")
    plan = plan_generation(base.lookup(up), lat, lon, n_old=len(base), generation=1, uid=base.uid)
    for s in (mem, disk):
        np.testing.assert_array_equal(s.device_id[len(base):], up[plan.new_rows])
        np.testing.assert_array_equal(s.lat[plan.moved_keys], lat[plan.moved_rows])
        np.testing.assert_array_equal(s.changed_keys, plan.changed_keys())
        assert (s.generation, s.parent, s.ancestry) == (plan.generation, plan.parent, plan.ancestry)
    for col in ("device_id", "lat", "lon", "app_codes", "last_seen_s"):
        np.testing.assert_array_equal(getattr(mem, col), getattr(disk, col), err_msg=col)
