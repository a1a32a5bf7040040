"""Fixtures shared by the log tests: a real PostgreSQL (tests/_pg.py)."""
import pytest

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
