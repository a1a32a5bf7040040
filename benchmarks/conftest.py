"""Shared, session-scoped data for the pytest-benchmark suite.

Run with ``pytest benchmarks/ --benchmark-only`` (the default ``pytest`` run
collects ``tests/`` only).  The device count comes from the environment
variable ``GEOTARGET_BENCH_DEVICES`` (default ``2M``; ``20M`` reproduces
the 20 M targets of docs/design.md, slowly: the BallTree build alone takes most of a minute).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _paths  # noqa: E402,F401  (finds geotarget: in-place build or installed)

from compare import parse_count, unit_xyz  # noqa: E402


def bench_devices() -> int:
    return parse_count(os.environ.get("GEOTARGET_BENCH_DEVICES", "2M"))


@pytest.fixture(scope="session")
def cols():
    from geotarget.spatial.population import generate_arrays
    return generate_arrays(bench_devices(), seed=0)


@pytest.fixture(scope="session")
def store(cols):
    from geotarget.spatial.store import DeviceStore
    return DeviceStore.from_arrays(cols["device_id"], cols["lat"], cols["lon"], last_seen=cols["last_seen"])


@pytest.fixture(scope="session")
def index(store):
    from geotarget.spatial.index import SpatialIndex
    return SpatialIndex.build(store)


@pytest.fixture(scope="session")
def balltree(cols):
    neighbors = pytest.importorskip("sklearn.neighbors", reason="scikit-learn is not installed")
    import numpy as np
    return neighbors.BallTree(np.radians(np.column_stack([cols["lat"], cols["lon"]])), metric="haversine")


@pytest.fixture(scope="session")
def ckdtree(cols):
    spatial = pytest.importorskip("scipy.spatial", reason="scipy is not installed")
    return spatial.cKDTree(unit_xyz(cols["lat"], cols["lon"]))


@pytest.fixture(scope="session")
def numba_peer(cols):
    pytest.importorskip("numba", reason="numba is not installed")
    from compare import NumbaPeer
    return NumbaPeer(cols)
