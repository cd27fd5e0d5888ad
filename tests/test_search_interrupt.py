"""A search that is interrupted, or started twice at once on a new storage, or whose worker died, loses nothing
and leaves no run RUNNING."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

import qsweep.search.study
from qsweep.modes import execute
from qsweep.config import RootConfig
from qsweep.search.retries import OWNER, claim, claim_retry, fail_dead_trials
from qsweep.search.storage import open_storage
from qsweep.search.study import open_study, work
from qsweep.tracking import HOST, NullRecorder, process_gone, process_token
from test_search import compose_search, study_of


def open_together(url: str, barrier, results) -> None:
    barrier.wait()  # all processes open the new storage at the same moment
    try:
        storage = open_storage(url, Path.cwd(), heartbeat_s=10, retries=2)
        _, created = open_study("s", storage, OmegaConf.structured(RootConfig).search, "space", lambda mb, top1: top1)
        results.put("created" if created else "joined")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_workers_started_at_once_on_a_new_sqlite_storage_all_open_it(tmp_path):
    n = 4
    ctx = multiprocessing.get_context("fork")  # the child needs nothing but optuna: no re-import of torch
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=open_together, args=(f"sqlite:///{tmp_path}/optuna.db", barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    assert outcomes == ["created"] + ["joined"] * (n - 1)


class Stopped(BaseException):
    """Not an ``Exception``, like the interrupt a SIGTERM handler raises."""


def test_an_interrupted_trial_is_retried_first_however_often_and_whatever_stopped_it(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", tmp_path, heartbeat_s=10, retries=0)
    study = optuna.create_study(storage=storage, direction="maximize")
    for x in (1, 2, 3):
        study.enqueue_trial({"x": x})
    ran = []

    def objective(trial):
        ran.append(trial.suggest_int("x", 0, 9))
        if len(ran) <= 2:
            raise (KeyboardInterrupt if len(ran) == 1 else Stopped)()
        return ran[-1]

    search = {"n_trials": 2, "timeout_s": None, "heartbeat_s": 10, "sampler": "tpe"}
    worker = SimpleNamespace(cfg=OmegaConf.create({"search": search}),
                             objective=objective, parent=NullRecorder(), after_trial=lambda study: None)
    for stop in (KeyboardInterrupt, Stopped):
        with pytest.raises(stop):
            work(study, worker, heartbeat=True)
    work(study, worker, heartbeat=True)
    # x=1 twice interrupted (search.retries=0 limits dead workers' retries, not these), then the oldest seed
    assert ran == [1, 1, 1, 2]
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING,
                                         TrialState.FAIL, TrialState.COMPLETE]
    assert trials[4].system_attrs["failed_trial"] == 0 and trials[4].system_attrs["retry_history"] == [0, 3]
    assert "interrupted (Stopped); retried as trial 4" == trials[3].user_attrs["error"]


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_an_interrupted_search_retries_its_layout_and_its_runs_say_so(tmp_path, digits_vit, one_thread, monkeypatch):
    real = qsweep.search.study.evaluate_in_steps

    def interrupted_once(*args, **kwargs):
        monkeypatch.setattr(qsweep.search.study, "evaluate_in_steps", real)
        raise KeyboardInterrupt  # Ctrl-C inside the first trial's evaluation

    monkeypatch.setattr(qsweep.search.study, "evaluate_in_steps", interrupted_once)
    # Two seeds, one trial: the interrupted seed runs on resume only if its retry goes ahead of the other.
    cfg = compose_search(tmp_path, "search.n_trials=1", "search.warm_start=[8,4]", "search.greedy=false",
                         "search.top_k=0")
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, tmp_path / "a")
    study = study_of(tmp_path)
    first = study.trials[0]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING and retry.params == first.params
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["error"] == \
        f"interrupted (KeyboardInterrupt); retried as trial {retry.number}"
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"

    execute(cfg, tmp_path / "b")
    study = study_of(tmp_path)
    (done,) = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done.number == retry.number and set(done.params.values()) == {8}
    assert done.user_attrs["seed"] == "warm start" and study.trials[1].state == TrialState.WAITING
    assert client.get_run(parent_id).info.status == "FINISHED"


def ended_process() -> str:
    """The :func:`process_token` of a process that has ended."""
    proc = subprocess.Popen(["sleep", "600"])
    token = process_token(proc.pid)
    proc.kill()
    proc.wait()
    return token


def test_a_killed_process_not_yet_waited_for_is_gone():
    proc = subprocess.Popen(["sleep", "600"])
    token = process_token(proc.pid)
    assert not process_gone(token)
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie: its parent has not waited
    assert process_gone(token)
    proc.wait()


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_dead_workers_trial_is_failed_and_retried_once_however_many_workers_sweep(tmp_path, kind, monkeypatch):
    spec = f"journal:{tmp_path}/study.log" if kind == "journal" else f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=open_storage(spec, tmp_path, heartbeat_s=10, retries=1),
                                direction="maximize")
    # another worker's view of the study, taken before this one swept it: it sees the dead trial RUNNING too
    other = optuna.load_study(study_name="s", storage=open_storage(spec, tmp_path, heartbeat_s=10, retries=1))
    dead, live = study.ask(), study.ask()
    dead.suggest_int("x", 0, 9)
    study._storage.set_trial_system_attr(dead._trial_id, OWNER, f"{HOST}/{ended_process()}")
    claim(study, live._trial_id)  # this process: alive
    stale_view = other.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    monkeypatch.setattr(other, "get_trials", lambda **kwargs: stale_view)

    assert fail_dead_trials(study, retries=1) == [dead.number]
    assert fail_dead_trials(other, retries=1) == []  # the storage refuses to fail it twice: no second retry
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[0].user_attrs["error"].startswith("its worker (") and "is gone" in trials[0].user_attrs["error"]
    retry = trials[2]
    assert retry.params == trials[0].params and retry.system_attrs["retry_history"] == [0]
    assert OWNER not in retry.system_attrs and "error" not in retry.user_attrs

    # the retry's worker dies too: search.retries=1 is used up, so it is failed and not queued again
    taken = claim_retry(study)
    study._storage.set_trial_system_attr(taken._trial_id, OWNER, f"{HOST}/{ended_process()}")
    assert fail_dead_trials(study, retries=1) == [retry.number]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]
