"""Shared fixtures. Add yours below; keep the session cache fixtures.

``make test`` runs the suite on pytest-xdist workers, one per core (``-n auto``, ``--dist loadgroup``
from pyproject.toml). All workers of a run share one throwaway qsweep cache, so the digits ViT is
trained, and each FP32 reference measured, once per run rather than once per worker. Tests that
must not overlap one another carry ``@pytest.mark.xdist_group("serial")``: one worker runs them all,
one after another.

Most tests that record runs do so into a throwaway SQLite store, ``tmp_path/mlflow.db``. MLflow creates and
migrates a new store's schema on first use, seconds of CPU each time: the ``mlflow_store`` fixture starts a
test's store as a copy of one migrated once per run instead. Tests of a new store's first use (several
processes creating it at once) do not use it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qsweep.locks import file_lock


def _worker(config) -> str | None:
    """This process's xdist worker id ("gw0", ...), or None when not running under xdist."""
    return getattr(config, "workerinput", {}).get("workerid")


def pytest_configure(config):
    # No MLflow telemetry thread (mlflow decides when imported, at collection, before pytest marks a test
    # as running): no network from the tests, and no thread to hold a lock when a test forks.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if _worker(config):
        # One worker per core: one torch thread each, in the CLI processes they start too; more threads
        # only spin-wait on cores the other workers are using (the digits ViT's ops are tiny anyway).
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def _uses_digits_vit(item) -> bool:
    return "digits_vit" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Under xdist, an order that keeps both cores busy (a plain ``pytest`` keeps the file order).

    The serial group first (the first worker takes it as one unit while it trains the digits ViT, see
    ``_digits_vit_early``), then the tests that do not need the ViT (the other worker runs them
    meanwhile, instead of waiting for the training), each part with its CLI runs (``slow``) first,
    so that no long test is left alone at the end. Stable: a module's tests keep their order.
    """
    if not _worker(config):
        return

    def rank(item):
        group = item.get_closest_marker("xdist_group")
        serial = group is not None and "serial" in (*group.args, group.kwargs.get("name"))
        return not serial, _uses_digits_vit(item), item.get_closest_marker("slow") is None

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def qsweep_cache(tmp_path_factory, request):
    """A throwaway qsweep cache for the whole run (``$QSWEEP_CACHE``, inherited by subprocesses).

    Under xdist each worker's base temp folder lies in the run's, and the cache is made beside them,
    one for all workers: every qsweep cache writer is atomic (temp file + rename), so they can share it.
    """
    if _worker(request.config):
        path = tmp_path_factory.getbasetemp().parent / "qsweep_cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("qsweep_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSWEEP_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def _migrated_mlflow_store(qsweep_cache) -> Path:
    """An empty MLflow SQLite store with its schema created, made once per run for all workers."""
    path = qsweep_cache.parent / "mlflow_migrated.db"
    with file_lock(qsweep_cache.parent / "mlflow_migrated.lock"):
        if not path.exists():
            from mlflow.tracking import MlflowClient

            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            MlflowClient(f"sqlite:///{tmp}").search_experiments()  # creates and migrates the schema
            os.replace(tmp, path)
    return path


@pytest.fixture
def mlflow_store(tmp_path, _migrated_mlflow_store) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``, an empty store as MLflow creates it, copied rather than migrated anew."""
    shutil.copyfile(_migrated_mlflow_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def digits_bundle():
    """The digits data with the default split."""
    from qsweep.config import DigitsDataConfig
    from qsweep.data import build_data

    return build_data(DigitsDataConfig())


@pytest.fixture(scope="session")
def digits_vit(digits_bundle, qsweep_cache):
    """The embedded digits ViT, trained once per run into the throwaway cache.

    Under the lock the first worker to need it trains it, and the others, once it is written, load
    the same weights from the cache instead of each training its own.
    """
    from qsweep.models import load_digits_vit

    with file_lock(qsweep_cache.parent / "qsweep_cache.lock"):
        return load_digits_vit(digits_bundle, qsweep_cache, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _digits_vit_early(request, qsweep_cache):
    """Worker gw0 trains the digits ViT before its first test, while the others start on the tests that
    do not need it (see ``pytest_collection_modifyitems``); without xdist it is trained when first needed."""
    if _worker(request.config) == "gw0" and any(map(_uses_digits_vit, request.session.items)):
        request.getfixturevalue("digits_vit")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the digits ViT's ops are tiny, and one thread is faster
    (much faster when other processes share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib(digits_bundle):
    """64 class-balanced calibration images of the digits train split, in batches of 32."""
    from qsweep.config import CalibConfig
    from qsweep.data import calibration_batches

    return calibration_batches(digits_bundle, CalibConfig(num_images=64, batch_size=32))
