"""The MLflow UI's server shows a study: its parent run, trial runs and their metrics, through the REST API."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qsweep.modes import execute
from qsweep.tracking import Recorder, unparam_key
from qsweep.ui import free_port, mlflow_server

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def call(base: str, endpoint: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # a hang guard: the server answers in ms
        return json.loads(response.read())


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
@pytest.mark.xdist_group("serial")  # binds a port on 127.0.0.1 (see conftest.py)
@pytest.mark.slow
def test_mlflow_server_on_loopback_serves_the_study(tmp_path, capsys, digits_vit):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=digits_mixed_search", f"tracking.uri={store}", "progress=false", "export.enabled=false",
            f"search.storage=sqlite:///{tmp_path}/optuna.db", f"search.best_dir={tmp_path}/best",
            "search.n_trials=3", "search.warm_start=[8]", "search.top_k=0", "search.study_name=ui"])
    execute(cfg, tmp_path / "out")

    with mlflow_server(store, "127.0.0.1", free_port()) as (base, _):
        experiment = call(base, "experiments/get-by-name?experiment_name=qsweep")["experiment"]
        runs = call(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        (parent,) = [r for r, t in zip(runs, tags) if t.get("qsweep.kind") == "study"]
        parent_id = parent["info"]["run_id"]
        assert len(parent["data"]["params"]) < 40  # the recipe, not every config key
        assert f"mlflow: study run {parent_id} at {store}; runs table http://127.0.0.1:5000/#/experiments/" \
            in capsys.readouterr().out
        trials = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id]
        assert len(trials) == 3
        for r in trials:
            metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
            assert {"size_mb", "pruned"} <= set(metrics)
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            assert set(params) == {"layout", "layout.w_bits"}  # not one per layer
            assert set(params["layout.w_bits"].split(",")) <= {"2", "3", "4", "5", "6", "8"}
        best = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert "best_score" in best and "best_size_mb" in best


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_the_runs_table_link_names_the_experiment(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run([sys.executable, "-m", "qsweep.tracking", store, "http://127.0.0.1:5000"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(store).get_experiment_by_name("qsweep")
    assert out.strip() == (f"runs of experiment 'qsweep': http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                           "?workflowType=machine_learning&viewStateShareKey=qsweep")


@pytest.mark.parametrize("key", ["quant.layers.blocks.0.*.w_bits", "quant.layers.@depthwise.w_bits",
                                 "quant.layers.features.[0-3]*.a_bits", "a-b c/d:e", "x-2D-y"])
@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_any_config_key_is_an_mlflow_param_key_reversibly(tmp_path, key):
    rec = Recorder(f"sqlite:///{tmp_path}/mlflow.db", "keys")
    run_id = rec.start("r", {})
    rec.log_params({key: 1})
    rec.finish()
    (logged,) = rec.get_run(run_id).data.params
    assert unparam_key(logged) == key
