"""The MLflow runs table compares runs: a few recipe params (any config key recordable), the evaluated images
as the run's dataset input, the artifact as a registrable logged model, and a link that opens the table
sorted by score with the compared columns (``qsweep.runs_view``)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from qsweep import runs_view
from qsweep.run_params import MAX_OVERRIDES, TRUNCATED, VALUE_MAX, layout_hash, rounding, run_params
from qsweep.tracking import Recorder, unparam_key
from test_hostile_inputs import cli

CONF = str(Path(__file__).resolve().parents[1] / "conf")
README_GLOB = ("quant.skip=[head]", "++quant.layers={blocks.0.*: {w_bits: 8}}")  # README's per-layer example


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_the_readme_glob_example_is_a_finished_run_that_compares(tmp_path, monkeypatch, capsys, digits_vit):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = cli(tmp_path, monkeypatch, capsys, *README_GLOB, common=("progress=false", f"tracking.uri={store}"))
    assert outcome.code == 0, outcome.err[-3000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("qsweep")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert len(params) < 40, sorted(params)
    assert {unparam_key(k): v for k, v in params.items()}["quant.layers.blocks.0.*.w_bits"] == "8"
    assert params["quant.skip"] == '["head"]' and params["layout"] != "uniform"
    assert params["quant.name"] == "w4a8" and params["rounding"] == "gptq" and params["model.name"] == "digits_vit"
    assert (outcome.run_dir / "config.yaml").exists()  # the whole config, also the run's artifact
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    for key in ("top1", "fp_top1", "delta_top1", "size_mb", "compression", "avg_weight_bits", "score"):
        assert key in run.data.metrics, key

    (data,) = run.inputs.dataset_inputs  # the Dataset column
    assert data.dataset.name == "digits-test" and json.loads(data.dataset.profile)["images"] == 450
    assert {t.key: t.value for t in data.tags}["mlflow.data.context"] == "eval"

    (output,) = run.outputs.model_outputs  # the Models column
    model = client.get_logged_model(output.model_id)
    assert model.status == "READY" and model.source_run_id == run.info.run_id and model.name == "digits_vit-w4a8"
    metrics = {m.key: m for m in model.metrics}
    assert metrics["top1"].value == pytest.approx(run.data.metrics["top1"])
    assert metrics["size_mb"].dataset_digest == data.dataset.digest
    assert model.params["quant.name"] == "w4a8"
    assert [a.path for a in client.list_logged_model_artifacts(model.model_id)] == ["quantized.pt2"]
    result = json.loads((outcome.run_dir / "result.json").read_text())
    assert result["mlflow_model_id"] == model.model_id

    # The best logged model by score, registered as MLflow users do.
    (best,) = client.search_logged_models([experiment.experiment_id], max_results=1,
                                          order_by=[{"field_name": "metrics.score", "ascending": False}])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    version = mlflow.register_model(f"models:/{best.model_id}", "digits-best")
    assert int(version.version) == 1 and version.source == f"models:/{model.model_id}"


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_the_printed_link_opens_the_runs_table_by_score_with_the_compared_columns(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    rec = Recorder(store, "qsweep")
    url = rec.runs_url("http://127.0.0.1:5000")
    assert url == (f"http://127.0.0.1:5000/#/experiments/{rec.experiment_id}/runs"
                   "?workflowType=machine_learning&viewStateShareKey=qsweep")
    tags = rec.client.get_experiment(rec.experiment_id).tags
    envelope = json.loads(tags[runs_view.VIEW_TAG])  # what MLflow's UI reads for viewStateShareKey=qsweep
    assert envelope["name"] == runs_view.VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`score`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == ["metrics.`score`", "metrics.`top1`", "metrics.`size_mb`"]
    assert {"params.`quant.name`", "attributes.`Models`", "attributes.`Dataset`"} <= set(state["selectedColumns"])
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    # An existing experiment gets the view once; a changed view is rewritten.
    Recorder(store, "qsweep")
    assert rec.client.get_experiment(rec.experiment_id).tags[runs_view.VIEW_TAG] == tags[runs_view.VIEW_TAG]
    rec.client.set_experiment_tag(rec.experiment_id, runs_view.VIEW_TAG, "{}")
    Recorder(store, "qsweep")
    assert runs_view.is_current(rec.client.get_experiment(rec.experiment_id).tags[runs_view.VIEW_TAG])


def params_of(*overrides: str) -> dict[str, str]:
    """The params of a run started as ``python -m qsweep OVERRIDES``."""
    return run_params(compose_cfg(*overrides), overrides)


def test_the_recipe_params_name_rounding_layout_and_overrides():
    params = params_of("quant.act.observer=percentile", "progress=false", "tracking.uri=sqlite:///x.db")
    assert params["quant.act.observer"] == "percentile" and "progress" not in params and "tracking.uri" not in params
    assert params["layout"] == "uniform" and params["rounding"] == "gptq" and len(params) == 14
    assert rounding(compose_cfg("quant=w8a8")) == "nearest"
    assert rounding(compose_cfg("adaround=block", "lsq=act")) == "adaround:block+lsq:act"
    assert rounding(compose_cfg("lsq=both")) == "lsq:both"
    assert layout_hash([], {"blocks.0.*": {"w_bits": 8}}) != layout_hash([], {"blocks.1.*": {"w_bits": 8}})
    # A group option is the recipe params' business; an experiment overlay is named.
    assert "quant" not in params_of("quant=w2a8") and params_of("quant=w2a8")["quant.name"] == "w2a8"
    assert params_of("+experiment=digits_w8a8")["experiment"] == "digits_w8a8"


def test_long_values_are_cut_and_many_overrides_capped():
    skip = ",".join(f"blocks.{i}.mlp.fc1" for i in range(40))
    params = params_of(f"quant.skip=[{skip}]")
    assert len(params["quant.skip"]) == VALUE_MAX and params["quant.skip"].endswith(TRUNCATED)
    layers = ",".join(f"blocks.{i}.*: {{w_bits: 8}}" for i in range(30))
    many = params_of(f"++quant.layers={{{layers}}}")
    assert len(many) < 40 and many["more_overrides"] == f"{30 - MAX_OVERRIDES + 1} more in config.yaml"


def test_a_refused_config_records_the_params_it_can_read():
    params = params_of("quant.weight.bits=9", "adaround.mode=sideways")
    assert params["quant.weight.bits"] == "9" and params["rounding"] == "adaround:sideways"
