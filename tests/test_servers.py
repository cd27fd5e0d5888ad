"""A study storage or tracking server that accepts connections and never answers is a clear error within
a stated timeout, not a hang.

The PostgreSQL cases need its driver, psycopg (``pip install -e '.[distributed]'``, not in the test
extras): they are skipped without it. The HTTP tracking case needs nothing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qsweep.rdb import CONNECT_TIMEOUT_S, connect_args, is_server_url

ROOT = Path(__file__).resolve().parents[1]
# The CLI runs here wait SHORT_WAIT_S for a silent server, not the product's 10 s (a database) and 5 s (HTTP):
# ``python -m qsweep`` with qsweep.rdb.CONNECT_TIMEOUT_S and qsweep.tracking.PROBE_TIMEOUT_S set first. The
# code reads both at each use, so the run applies, and states, the shorter wait; the defaults themselves
# are checked by test_every_server_wait_is_bounded_unless_the_url_sets_its_own. libpq waits 2 s at least.
SHORT_WAIT_S = 2
SHORT_WAITS = f"""
import runpy, sys
import qsweep.rdb, qsweep.tracking
qsweep.rdb.CONNECT_TIMEOUT_S = {SHORT_WAIT_S}
qsweep.tracking.PROBE_TIMEOUT_S = {SHORT_WAIT_S}.0
sys.argv[0] = "qsweep"
runpy.run_module("qsweep", run_name="__main__", alter_sys=True)
"""
# A port bound and released here could be taken by another test that binds one meanwhile: one
# worker runs every test that binds a port on 127.0.0.1, one after another (see conftest.py).
pytestmark = pytest.mark.xdist_group("serial")


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 whose connections the kernel accepts (the listen backlog) and nobody answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m qsweep`` waiting SHORT_WAIT_S for a server; its own timeouts end it long before this
    one (a hang fails the test)."""
    return subprocess.run([sys.executable, "-c", SHORT_WAITS, f"hydra.run.dir={tmp_path}/run", "progress=false",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("qsweep: error:")]
    assert all(part in line for part in parts), line
    assert "Traceback" not in proc.stderr
    return line


def test_every_server_wait_is_bounded_unless_the_url_sets_its_own():
    assert connect_args("postgresql://u:p@db.example/optuna") == {"connect_timeout": CONNECT_TIMEOUT_S}
    assert connect_args("postgresql+psycopg2://u:p@db.example/optuna") == {"connect_timeout": CONNECT_TIMEOUT_S}
    assert connect_args("postgresql+pg8000://u:p@db.example/optuna") == {"timeout": CONNECT_TIMEOUT_S}
    assert connect_args("postgresql://u:p@db.example/optuna?connect_timeout=60") == {}  # the driver reads the URL's
    assert connect_args("sqlite:////tmp/optuna.db") == {"timeout": 30}  # a local file: the wait for its write lock
    assert is_server_url("postgresql://u:p@db.example/optuna") and is_server_url("mysql+pymysql://h/db")
    assert not any(map(is_server_url, ("sqlite:///x.db", "http://127.0.0.1:5000", "file:///tmp/mlruns", "x.db")))


def test_a_silent_http_tracking_server_is_an_error_within_seconds(tmp_path, silent_port):
    proc = run_cli(tmp_path, f"tracking.uri=http://127.0.0.1:{silent_port}")
    assert_one_error_line(proc, f"tracking.uri='http://127.0.0.1:{silent_port}' cannot be reached",
                          f"waited {SHORT_WAIT_S:g} s")


def test_a_silent_postgresql_study_storage_is_an_error_within_seconds(tmp_path, silent_port):
    pytest.importorskip("psycopg", reason="psycopg, the postgresql:// driver, is not installed (.[distributed])")
    url = f"postgresql://qsweep:secret@127.0.0.1:{silent_port}/optuna"
    proc = run_cli(tmp_path, "+experiment=digits_mixed_search", f"search.storage={url}", "tracking.enabled=false")
    line = assert_one_error_line(proc, f"search.storage='postgresql://qsweep:***@127.0.0.1:{silent_port}/optuna' "
                                       "cannot be reached", f"a server gets {SHORT_WAIT_S} s to answer")
    assert "secret" not in proc.stderr + proc.stdout and "secret" not in line


def test_a_silent_postgresql_tracking_store_is_an_error_within_seconds(tmp_path, silent_port):
    pytest.importorskip("psycopg", reason="psycopg, the postgresql:// driver, is not installed (.[distributed])")
    proc = run_cli(tmp_path, f"tracking.uri=postgresql://qsweep:secret@127.0.0.1:{silent_port}/mlflow")
    assert_one_error_line(proc, f"tracking.uri='postgresql://qsweep:***@127.0.0.1:{silent_port}/mlflow' "
                                "cannot be reached", f"a server gets {SHORT_WAIT_S} s to answer")
    assert "secret" not in proc.stderr + proc.stdout
