"""Several worker processes on one study: a journal file, and a SQLite/PostgreSQL RDB where a worker dies.

``make test`` runs the journal case and the kill test on SQLite; ``make test-distributed`` runs
the kill test on a PostgreSQL server it starts on 127.0.0.1 (``QSWEEP_TEST_PG_URL``).
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
# Batch 1 over all 450 test images: a trial takes seconds, so workers overlap and a kill lands inside one.
SLOW = ("data.eval_batch_size=1", "search.trial_images=450", "search.pruner=none", "search.heartbeat_s=1")


def worker(tmp_path: Path, storage: str, n_trials: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qsweep", "+experiment=digits_mixed_search", "progress=false",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"search.storage={storage}", f"search.study_name={study_name(tmp_path)}",
           f"search.n_trials={n_trials}", "search.seed=null", "search.top_k=0", "export.enabled=false",
           f"search.best_dir={tmp_path}/best", f"hydra.run.dir={tmp_path}/run-{time.monotonic_ns()}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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


def trials_or_none(storage: str, name: str) -> list | None:
    try:
        return load(storage, name).trials
    except KeyError:  # the study is not created yet
        return None


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_processes_share_one_journal_study(tmp_path, digits_vit):
    storage = f"journal:{tmp_path}/study.log"
    # MLflow migrates a new SQLite store on first use and cannot do it from two processes at once
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()
    # the same command twice, at once: one creates and seeds the study, the other joins it
    first, second = (worker(tmp_path, storage, 6, "data.eval_batch_size=4", "search.pruner=none") for _ in "12")
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


def kill_mid_trial(tmp_path: Path, storage: str, n_trials: int) -> None:
    # One seed only: a retried trial queues behind waiting seeds, and with many of them a small
    # study would complete before reaching it.
    slow = (*SLOW, "search.warm_start=[8]", "search.greedy=false")
    doomed = worker(tmp_path, storage, n_trials, *slow)
    # Killed only once its trial has an MLflow run: the state checked below, however slow the machine.
    running = wait_for(lambda: [t for t in trials_or_none(storage, study_name(tmp_path)) or []
                                if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                                and t.user_attrs.get("worker", "").endswith(f":{doomed.pid}")], 300,
                       "a running trial of the first worker with its MLflow run")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    survivor = worker(tmp_path, storage, n_trials, *slow)
    wait_all([survivor])

    study = load(storage, study_name(tmp_path))
    killed = study.trials[running[0].number]
    assert killed.state == TrialState.FAIL
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == n_trials and not [t for t in study.trials if t.state == TrialState.RUNNING]
    # the killed trial's layout ran again (retried, not lost) and no layout finished twice
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert len({t.number for t in finished}) == len(finished)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "retried" in run.data.tags["error"]


@pytest.mark.slow
def test_a_killed_worker_trial_is_retried_sqlite(tmp_path, digits_vit):
    kill_mid_trial(tmp_path, f"sqlite:///{tmp_path}/optuna.db", 3)


@pytest.mark.distributed
def test_a_killed_worker_trial_is_retried_postgresql(tmp_path, digits_vit):
    url = os.environ.get("QSWEEP_TEST_PG_URL")
    if not url:  # `make test-distributed` always sets it
        pytest.skip("set QSWEEP_TEST_PG_URL (make test-distributed starts a server and sets it)")
    kill_mid_trial(tmp_path, url, 4)
