"""pytest-benchmark versions of ``benchmarks/compare.py`` (default 2 M devices).

Each group holds geotarget and its peers on the same query, so the table that
pytest-benchmark prints shows the ratios directly.  Every benchmark also
checks its result against geotarget's ``device_ids()``: a fast wrong answer
fails.

    pytest benchmarks/ --benchmark-only
    GEOTARGET_BENCH_DEVICES=20M pytest benchmarks/ --benchmark-only -k "dense"
"""
from __future__ import annotations

import numpy as np
import pytest

from compare import CENTRES, EARTH_RADIUS_KM, RADII_KM, TIE_KM, chord, unit_xyz
from geotarget.geo import haversine_km

QUERIES = [(c, r) for c in CENTRES for r in RADII_KM]
QUERY_IDS = [f"{c}-{r:.0f}km" for c, r in QUERIES]


def _expected(index, centre, r):
    lat, lon = CENTRES[centre]
    return index.within(lat, lon, r).device_ids()


def _assert_same(rows, expected, cols, centre, r):
    """Peer rows (indices into ``cols``) name the same devices, up to 1e-6 km ties."""
    got = np.sort(cols["device_id"][np.asarray(rows, dtype=np.int64)])
    if np.array_equal(got, expected):
        return
    lat, lon = CENTRES[centre]
    diff = np.setxor1d(got, expected)
    order = np.argsort(cols["device_id"])
    rows_diff = order[np.searchsorted(cols["device_id"], diff, sorter=order)]
    d = haversine_km(lat, lon, cols["lat"][rows_diff], cols["lon"][rows_diff])
    assert (np.abs(d - r) <= TIE_KM).all(), f"{diff.size} devices differ, distances {d[:5]}"


# -- build -------------------------------------------------------------------

@pytest.mark.benchmark(group="build")
def test_build_geotarget(benchmark, store):
    from geotarget.spatial.index import SpatialIndex
    index = benchmark.pedantic(SpatialIndex.build, args=(store,), rounds=3, iterations=1)
    assert len(index) == len(store)


@pytest.mark.benchmark(group="build")
def test_build_balltree(benchmark, cols):
    neighbors = pytest.importorskip("sklearn.neighbors")
    rad = np.radians(np.column_stack([cols["lat"], cols["lon"]]))
    tree = benchmark.pedantic(neighbors.BallTree, args=(rad,), kwargs={"metric": "haversine"},
                              rounds=1, iterations=1)
    assert tree.data.shape[0] == rad.shape[0]


@pytest.mark.benchmark(group="build")
def test_build_ckdtree(benchmark, cols):
    spatial = pytest.importorskip("scipy.spatial")
    xyz = unit_xyz(cols["lat"], cols["lon"])
    tree = benchmark.pedantic(spatial.cKDTree, args=(xyz,), rounds=1, iterations=1)
    assert tree.n == xyz.shape[0]


# -- ids -----------------------------------------------------------------------

@pytest.mark.parametrize("centre, r", QUERIES, ids=QUERY_IDS)
@pytest.mark.parametrize("engine", ["geotarget-fill", "geotarget-device_ids", "balltree", "ckdtree", "brute", "numba"])
def test_ids(benchmark, engine, centre, r, cols, index, request):
    benchmark.group = f"ids {centre} {r:.0f} km"
    lat, lon = CENTRES[centre]
    expected = _expected(index, centre, r)
    if engine == "geotarget-fill":
        buf = np.empty(len(index), dtype=np.uint32)
        n = benchmark(lambda: index.within(lat, lon, r).fill(buf))
        assert n == expected.size
        np.testing.assert_array_equal(np.sort(index.store.device_id[buf[:n]]), expected)
        return
    if engine == "geotarget-device_ids":
        got = benchmark(lambda: index.within(lat, lon, r).device_ids())
        np.testing.assert_array_equal(got, expected)
        return
    if engine == "balltree":
        tree = request.getfixturevalue("balltree")
        q = np.radians([[lat, lon]])
        rows = benchmark(lambda: tree.query_radius(q, r / EARTH_RADIUS_KM)[0])
    elif engine == "ckdtree":
        tree = request.getfixturevalue("ckdtree")
        x = unit_xyz(np.array([lat]), np.array([lon]))[0]
        rows = benchmark(lambda: tree.query_ball_point(x, chord(r), return_sorted=False))
    elif engine == "numba":
        peer = request.getfixturevalue("numba_peer")
        rows = benchmark(peer.ids, lat, lon, r)
    else:
        rows = benchmark(lambda: np.flatnonzero(haversine_km(lat, lon, cols["lat"], cols["lon"]) <= r))
    _assert_same(rows, expected, cols, centre, r)


# -- counts --------------------------------------------------------------------

@pytest.mark.parametrize("centre, r", QUERIES, ids=QUERY_IDS)
@pytest.mark.parametrize("engine", ["geotarget", "balltree", "ckdtree", "brute", "numba"])
def test_count(benchmark, engine, centre, r, cols, index, request):
    benchmark.group = f"count {centre} {r:.0f} km"
    lat, lon = CENTRES[centre]
    expected = _expected(index, centre, r).size
    if engine == "geotarget":
        got = benchmark(index.count, lat, lon, r)
    elif engine == "balltree":
        tree = request.getfixturevalue("balltree")
        q = np.radians([[lat, lon]])
        got = int(benchmark(lambda: tree.query_radius(q, r / EARTH_RADIUS_KM, count_only=True))[0])
    elif engine == "ckdtree":
        tree = request.getfixturevalue("ckdtree")
        x = unit_xyz(np.array([lat]), np.array([lon]))[0]
        got = int(benchmark(lambda: tree.query_ball_point(x, chord(r), return_length=True)))
    elif engine == "numba":
        got = benchmark(request.getfixturevalue("numba_peer").count, lat, lon, r)
    else:
        got = int(benchmark(lambda: np.count_nonzero(haversine_km(lat, lon, cols["lat"], cols["lon"]) <= r)))
    # a tie within 1e-6 km may flip one device either way
    assert abs(got - expected) <= (0 if engine == "geotarget" else 2), (got, expected)
