"""Several worker processes on one study (a journal file), and a worker that dies on a journal, SQLite or
PostgreSQL storage.

``make test`` runs the shared journal study and the kill test on a journal and SQLite; ``make
test-distributed`` runs the kill test on a PostgreSQL server it starts on 127.0.0.1 (``QSWEEP_TEST_PG_URL``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# ``python -m qsweep`` with a hook run first: what a test needs to happen inside a worker, at a known point.
HOOKED = """
import runpy, sys
{hook}
sys.argv[0] = "qsweep"
runpy.run_module("qsweep", run_name="__main__", alter_sys=True)
"""
# Dies the way SIGKILL or a power cut kills a worker, at a known point: inside its first trial's evaluation.
DIES_MID_TRIAL = """
import os, signal
import qsweep.search.study
qsweep.search.study.evaluate_in_steps = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
"""
# Each worker's first trial waits until a trial other than its own has started: both workers run trials,
# however late the second one starts.
MEET_FIRST = """
import time
from optuna.trial import TrialState
from qsweep.search.study import Worker
objective, met = Worker.objective, []

def meet_first(self, trial):
    while not met and not any(t.number != trial.number and t.state != TrialState.WAITING
                              for t in trial.study.get_trials(deepcopy=False)):
        time.sleep(0.05)
    met.append(True)
    return objective(self, trial)

Worker.objective = meet_first
"""


def worker(tmp_path: Path, storage: str, n_trials: int, *extra: str, hook: str | None = None) -> subprocess.Popen:
    python = [sys.executable, "-c", HOOKED.format(hook=hook)] if hook else [sys.executable, "-m", "qsweep"]
    cmd = [*python, "+experiment=digits_mixed_search", "progress=false",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"search.storage={storage}", f"search.study_name={study_name(tmp_path)}",
           f"search.n_trials={n_trials}", "search.seed=null", "search.top_k=0", "export.enabled=false",
           "search.w_bits=[2,4,8]",  # what a worker does, not what it finds: 3 widths to quantize, not 6
           f"search.best_dir={tmp_path}/best", f"hydra.run.dir={tmp_path}/run-{time.monotonic_ns()}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the digits ViT's ops are tiny: threads only contend for the cores
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study_name(tmp_path: Path) -> str:
    return f"w-{tmp_path.name}"  # unique per test: a PostgreSQL database outlives the test


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def load(storage: str, name: str) -> optuna.Study:
    if storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(storage[len("journal:"):]))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_two_processes_share_one_journal_study(tmp_path, digits_vit):
    storage = f"journal:{tmp_path}/study.log"
    # the same command twice, at once, on a new MLflow store: one creates and seeds the study, the other joins it
    # MEET_FIRST, not slow trials, makes both run trials: evaluation runs at its usual batch size
    first, second = (worker(tmp_path, storage, 6, "search.pruner=none", "search.greedy=false", hook=MEET_FIRST)
                     for _ in "12")
    outs = wait_all([first, second])
    study = load(storage, study_name(tmp_path))
    finished = [t for t in study.trials if t.state in FINISHED]
    # each worker checks the count before asking for a trial: two may pass the check at once
    assert 6 <= len(finished) <= 7 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2, "both processes ran trials"
    assert all(f"study '{study_name(tmp_path)}'" in out for out in outs)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("qsweep.kind") == "study"]
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == len(finished)


def kill_mid_trial(tmp_path: Path, storage: str) -> None:
    # Three waiting seeds and two trials: the killed trial's retry runs only if it goes ahead of them.
    opts = ("search.heartbeat_s=1", "search.pruner=none", "search.warm_start=[8,4,2]", "search.greedy=false")
    doomed = worker(tmp_path, storage, 2, *opts, hook=DIES_MID_TRIAL)
    out, _ = doomed.communicate(timeout=600)
    assert doomed.returncode == -signal.SIGKILL, out[-3000:]
    (killed,) = [t for t in load(storage, study_name(tmp_path)).trials if t.state == TrialState.RUNNING]
    survivor = worker(tmp_path, storage, 2, *opts)
    wait_all([survivor])

    study = load(storage, study_name(tmp_path))
    killed = study.trials[killed.number]
    assert killed.state == TrialState.FAIL
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == 2 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    # the killed trial's layout ran again (retried, not lost) and no layout finished twice
    (retry,) = [t for t in finished if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and f"retried as trial {retry.number}" in run.data.tags["error"]
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
@pytest.mark.slow
def test_a_killed_worker_trial_is_retried_journal(tmp_path, digits_vit):
    # no heartbeat on a journal: the trial's owner process being gone is what fails it
    storage = f"journal:{tmp_path}/study.log"
    kill_mid_trial(tmp_path, storage)
    (killed,) = [t for t in load(storage, study_name(tmp_path)).trials if t.state == TrialState.FAIL]
    assert "is gone: it was killed" in killed.user_attrs["error"]


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
@pytest.mark.slow
def test_a_killed_worker_trial_is_retried_sqlite(tmp_path, digits_vit):
    kill_mid_trial(tmp_path, f"sqlite:///{tmp_path}/optuna.db")


@pytest.mark.distributed
def test_a_killed_worker_trial_is_retried_postgresql(tmp_path, digits_vit):
    url = os.environ.get("QSWEEP_TEST_PG_URL")
    if not url:  # `make test-distributed` always sets it
        pytest.skip("set QSWEEP_TEST_PG_URL (make test-distributed starts a server and sets it)")
    kill_mid_trial(tmp_path, url)
