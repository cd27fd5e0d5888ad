"""A run that fails is FAILED in MLflow with its reason, whatever fails: the config, the checkpoint,
quantization, or the recording itself.

``python -m qsweep`` runs in-process (``test_hostile_inputs.cli``) with a throwaway SQLite store in
``tmp_path``. Each failure must end with exit status 1 and one ``qsweep: error:`` line, the run FAILED
with ``Class: message`` as its ``error`` tag, and the same reason in ``error.txt`` in its folder.
"""

from __future__ import annotations

import os
import socket

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qsweep.files import failure_reason, write_failure
from qsweep.tracking import HOST, OUTPUT_DIR_TAG, Recorder
from test_hostile_inputs import Outcome, cli

# A process that cannot be alive: no pid is this large.
DEAD_PROCESS = "999999999:0"
# Each test's tmp_path/mlflow.db starts as an empty store already migrated (see conftest.py).
pytestmark = pytest.mark.usefixtures("mlflow_store")


def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def run_cli(tmp_path, monkeypatch, capsys, *overrides: str) -> Outcome:
    return cli(tmp_path, monkeypatch, capsys, *overrides,
               common=("progress=false", f"tracking.uri={store(tmp_path)}"))


def the_failed_run(tmp_path, outcome: Outcome, reason: str):
    """The one run of the store, after checking it, the exit, the error line and error.txt all give ``reason``."""
    errors = [line for line in outcome.err.splitlines() if line.startswith("qsweep: error:")]
    assert outcome.code == 1 and len(errors) == 1, outcome.err[-3000:]
    client = MlflowClient(store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(reason), run.data.tags["error"]
    assert failure_reason(outcome.run_dir).startswith(reason)
    assert not (outcome.run_dir / "result.json").exists()
    return run


def test_a_refused_config_value_is_a_failed_run_with_the_values_read(tmp_path, monkeypatch, capsys):
    outcome = run_cli(tmp_path, monkeypatch, capsys, "quant.weight.bits=9")
    run = the_failed_run(tmp_path, outcome, "ConfigError: quant.weight.bits=9 is not allowed")
    assert "quant.weight.bits=9 is not allowed" in outcome.err
    assert run.data.params["quant.weight.bits"] == "9" and run.data.tags["model"] == "digits_vit"


@pytest.mark.parametrize("name, content", [("nonexistent.safetensors", None), ("notes.pt", b"not a checkpoint\n")])
def test_an_unloadable_checkpoint_is_a_failed_run(tmp_path, monkeypatch, capsys, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    outcome = run_cli(tmp_path, monkeypatch, capsys, f"model.checkpoint={path}")
    run = the_failed_run(tmp_path, outcome, "CheckpointError: ")
    assert str(path) in run.data.tags["error"] and str(path) in outcome.err


def test_an_exception_mid_quantization_is_a_failed_run_with_its_traceback(tmp_path, monkeypatch, capsys,
                                                                           digits_vit):
    def broken(*args, **kwargs):
        raise RuntimeError("observer state lost")

    monkeypatch.setattr("qsweep.quant.pipeline.calibrate", broken)
    outcome = run_cli(tmp_path, monkeypatch, capsys)
    the_failed_run(tmp_path, outcome, "RuntimeError: observer state lost")
    assert f"traceback in {outcome.run_dir / 'error.txt'}" in outcome.err
    assert "in broken" in (outcome.run_dir / "error.txt").read_text()  # the traceback, for the bug report


def test_a_refused_search_config_is_a_failed_run_with_its_reason(tmp_path, monkeypatch, capsys):
    outcome = run_cli(tmp_path, monkeypatch, capsys, "+experiment=digits_mixed_search", "search.n_trials=0",
                      f"search.storage=sqlite:///{tmp_path}/optuna.db")
    assert failure_reason(outcome.run_dir).startswith("ConfigError: search.n_trials=0 is not allowed")
    the_failed_run(tmp_path, outcome, "ConfigError: search.n_trials=0 is not allowed")


def test_a_store_refusing_the_params_is_a_failed_run(tmp_path, monkeypatch, capsys):
    def refuse(self, params):
        raise MlflowException('Invalid value "quant.layers.blocks.0.*.w_bits" for parameter')

    monkeypatch.setattr(Recorder, "log_params", refuse)
    outcome = run_cli(tmp_path, monkeypatch, capsys)
    the_failed_run(tmp_path, outcome, 'MlflowException: Invalid value "quant.layers.blocks.0.*.w_bits"')


def test_a_store_lost_while_recording_the_failure_leaves_the_reason_for_the_next_run(tmp_path, monkeypatch,
                                                                                      capsys):
    def lost(*args, **kwargs):
        raise MlflowException("database is locked")

    with monkeypatch.context() as broken:
        broken.setattr(Recorder, "log_params", lost)
        broken.setattr(MlflowClient, "set_terminated", lost)
        outcome = run_cli(tmp_path, monkeypatch, capsys)
    assert outcome.code == 1 and "not recorded in MLflow: MlflowException: database is locked" in \
        (outcome.run_dir / "error.txt").read_text()
    client = MlflowClient(store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id])
    assert run.info.status == "RUNNING"
    client.set_tag(run.info.run_id, "qsweep.process", DEAD_PROCESS)  # as if it had exited since
    Recorder(store(tmp_path), "qsweep").reap_dead_runs()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("MlflowException: database is locked")


def test_a_dead_run_is_failed_with_the_reason_it_left_and_killed_without_one(tmp_path):
    rec = Recorder(store(tmp_path), "qsweep")
    failed, killed, reused = tmp_path / "failed", tmp_path / "killed", tmp_path / "reused"
    for folder in (failed, killed, reused):
        folder.mkdir()
    write_failure(reused, "an earlier run's reason")
    os.utime(reused / "error.txt", (0, 0))  # long before the run began
    ids = {folder: rec.client.create_run(rec.experiment_id, tags={
        "qsweep.host": HOST, "qsweep.process": DEAD_PROCESS, OUTPUT_DIR_TAG: str(folder)}).info.run_id
        for folder in (failed, killed, reused)}
    write_failure(failed, "CheckpointError: cannot read checkpoint 'x.pt'", "details")
    assert sorted(rec.reap_dead_runs()) == sorted(ids.values())
    run = rec.client.get_run(ids[failed])
    assert run.info.status == "FAILED" and run.data.tags["error"] == "CheckpointError: cannot read checkpoint 'x.pt'"
    for folder in (killed, reused):
        run = rec.client.get_run(ids[folder])
        assert run.info.status == "KILLED" and "is gone: it was killed" in run.data.tags["error"]


@pytest.mark.xdist_group("serial")  # binds a port on 127.0.0.1 (see conftest.py)
def test_a_refused_config_with_an_unusable_store_is_the_error_line_alone(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = cli(tmp_path, monkeypatch, capsys, "quant.weight.bits=9",
                  common=("progress=false", f"tracking.uri=http://127.0.0.1:{port}"))
    errors = [line for line in outcome.err.splitlines() if line.startswith("qsweep: error:")]
    assert outcome.code == 1 and len(errors) == 1 and "quant.weight.bits=9 is not allowed" in errors[0]
    assert failure_reason(outcome.run_dir).startswith("ConfigError: quant.weight.bits=9")
