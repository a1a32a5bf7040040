"""A real PostgreSQL for the log tests: ``$GEOTARGET_TEST_PG_URL``, or a throwaway cluster.

Without the URL, :func:`cluster` starts one with ``initdb``/``pg_ctl`` (from ``$PATH`` or
/usr/lib/postgresql/*/bin) in a temporary directory, listening on a unix socket only; as
root it runs them as the ``postgres`` user (initdb refuses root).  Each test gets a fresh
database (``CREATE DATABASE ... TEMPLATE template0``).  When no server can be found or
started the PostgreSQL cases skip, saying why, unless ``GEOTARGET_REQUIRE_PG=1`` (set by
.ci/run), where they fail.
"""
import glob
import os
import secrets
import shutil
import subprocess
import tempfile

import pytest

URL_ENV = "GEOTARGET_TEST_PG_URL"
REQUIRE_ENV = "GEOTARGET_REQUIRE_PG"


def _unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but unavailable: {reason}")
    pytest.skip(f"no PostgreSQL: {reason} (set {URL_ENV}, or install PostgreSQL's server binaries)")


def _bindir():
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return os.path.dirname(dirs[0]) if dirs else None


class Cluster:
    """A server reachable at ``url(dbname)``; ``admin`` is a connection to its maintenance database."""

    def __init__(self):
        self.proc_dir = None
        self.run_as = None
        url = os.environ.get(URL_ENV)
        if url:
            self.base = url
        else:
            self.base = self._start()
        import psycopg

        self.admin = psycopg.connect(self.base, autocommit=True)

    def _start(self) -> str:
        bindir = _bindir()
        if bindir is None:
            _unavailable("initdb not found")
        self.proc_dir = tempfile.mkdtemp(prefix="geotarget-pg-")
        os.chmod(self.proc_dir, 0o755)
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root and there is no 'postgres' user to run initdb as")
            os.chown(self.proc_dir, pw.pw_uid, pw.pw_gid)
            self.run_as = "postgres"
        data = os.path.join(self.proc_dir, "data")
        self.bindir = bindir
        self._run([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"])
        self._run([f"{bindir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(self.proc_dir, "log"),
                   "-o", f"-k {self.proc_dir} -c listen_addresses= -c fsync=on -c synchronous_commit=on",
                   "start"])
        self.data = data
        return f"postgresql://postgres@/postgres?host={self.proc_dir}"

    def _run(self, argv):
        if self.run_as:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if r.returncode:
            _unavailable(f"{' '.join(argv)} failed: {r.stderr.strip()[-300:]}")

    def url(self, dbname: str) -> str:
        import psycopg.conninfo as ci

        params = ci.conninfo_to_dict(self.base)
        params["dbname"] = dbname
        return "postgresql://?" + "&".join(f"{k}={v}" for k, v in params.items())

    def new_database(self) -> str:
        name = "gt_" + secrets.token_hex(6)
        self.admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def stop(self):
        self.admin.close()
        if self.proc_dir:
            subprocess.run((["runuser", "-u", self.run_as, "--"] if self.run_as else [])
                           + [f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
            shutil.rmtree(self.proc_dir, ignore_errors=True)
