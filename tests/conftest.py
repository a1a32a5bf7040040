"""Fixtures several test modules share: officers, small stores and engines around Hangzhou,
settings files, a command-line working directory, and a real PostgreSQL (tests/_pg.py) for
the log tests.

Each fixture builds fresh objects (nothing mutable is shared between tests), so a test
that changes what it was given cannot affect another.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import geotarget as gt

#: Hangzhou (West Lake), the centre of the small stores.
HANGZHOU = (30.27, 120.15)


@pytest.fixture
def officers() -> list:
    """A county officer of Shangcheng (330102) and a city officer of Hangzhou (330100)."""
    return [gt.Officer("C-1", level="county", division="330102"),
            gt.Officer("S-1", level="city", division="330100")]


@pytest.fixture(scope="session")
def make_store():
    """``make_store(n, seed, spread)``: ``n`` devices (ids 1..n), normal around Hangzhou, ``spread`` degrees."""
    def make(n: int = 3000, seed: int = 3, spread: float = 1.0) -> gt.DeviceStore:
        rng = np.random.default_rng(seed)
        return gt.DeviceStore.from_arrays(np.arange(1, n + 1, dtype=np.uint64),
                                          HANGZHOU[0] + rng.normal(0, spread, n),
                                          HANGZHOU[1] + rng.normal(0, spread, n))
    return make


@pytest.fixture
def make_engine_on(tmp_path):
    """``make_engine_on(index, officers, name="log.sqlite", **engine_kwargs)``: an engine on a new log
    in ``tmp_path``; every log it opened is closed after the test."""
    logs = []

    def make(index, officers, name: str = "log.sqlite", **kw) -> gt.AlertEngine:
        log = gt.RecipientLog(tmp_path / name)
        logs.append(log)
        return gt.AlertEngine(index, log=log, authority=gt.Authority(officers), **kw)

    yield make
    for log in logs:
        log.close()


@pytest.fixture
def settings_file(tmp_path):
    """``settings_file(text, name="geotarget.toml")``: the text written (UTF-8) into ``tmp_path``; its path."""
    def write(text: str, name: str = "geotarget.toml"):
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p
    return write


@pytest.fixture(scope="session")
def cli_work(tmp_path_factory):
    """``cli_work(name, devices)``: a new directory holding ``officers.json`` (test_cli's officers)
    and a store ``st`` of ``devices`` generated and indexed by the command line."""
    from test_cli import OFFICERS, ok

    def make(name: str, devices: str):
        d = tmp_path_factory.mktemp(name)
        (d / "officers.json").write_text(json.dumps(OFFICERS))
        ok("generate", "--devices", devices, "--store", "st", "--build", cwd=d)
        return d
    return make


# --- a real PostgreSQL for the log tests (tests/_pg.py) ---

_CLUSTER = []
_FAILED = []


@pytest.fixture(scope="session")
def pg_cluster():
    from _pg import Cluster, _unavailable

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'geotarget[postgres]')")
    if _FAILED:  # one attempt per run: the reason, again
        _unavailable(_FAILED[0])
    if not _CLUSTER:
        try:
            _CLUSTER.append(Cluster())
        except BaseException as exc:
            _FAILED.append(str(exc))
            raise
    yield _CLUSTER[0]


def pytest_sessionfinish(session, exitstatus):
    while _CLUSTER:
        _CLUSTER.pop().stop()


@pytest.fixture
def pg_url(pg_cluster):
    """A postgresql:// URL to a fresh, empty database."""
    return pg_cluster.new_database()
