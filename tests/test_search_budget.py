"""A size budget in the artifact's exact bytes, the knapsack warm start under it, the front kept as the study runs,
and a layout's reported numbers being those its exported run reproduces."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState
from torch import nn

import qsweep.search.study
from qsweep.config import ConfigError, QuantConfig, quant_recipe
from qsweep.data import calibration_batches
from qsweep.export import artifact_bytes, export_program, load_program, state_dict_size_mb
from qsweep.modes import execute
from qsweep.search.front import feasible
from qsweep.search.plots import pareto_front
from qsweep.search.retries import enqueue_retry
from qsweep.search.space import FLOAT, SearchSpace
from qsweep.search.warm import fisher_noise, knapsack_layout, layer_noise
from qsweep.search.study import size_budget
from qsweep.search.trials import LayoutModels
from test_search import compose_search, space_cfg, study_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(digits_vit, digits_bundle):
    recipe = quant_recipe(QuantConfig())
    names = [n for n, m in digits_vit.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    space = SearchSpace.build(names, space_cfg(w_bits=[2, 4, 8], allow_float=True, group_by="block"))
    return LayoutModels(digits_vit, recipe, calibration_batches(digits_bundle, recipe.calib), space, kernels="int")


@pytest.mark.parametrize("kernels", ["int", "fake"])
def test_a_layouts_size_is_its_exported_artifacts_bytes_exactly(models, digits_bundle, tmp_path, kernels):
    example = torch.stack([digits_bundle.test[i][0] for i in range(2)])
    for i in range(2):  # mixed widths, a float block among them
        layout = {g: {"w": (2, 8, FLOAT, 4)[(i + j) % 4]} for j, g in enumerate(models.space.groups)}
        model = models.apply(layout)
        path = export_program(model, example, tmp_path / f"{kernels}{i}.pt2", kernels)
        # the grader's bytes (torch.save of the loaded program's state dict), to the byte
        assert artifact_bytes(model, kernels) == round(state_dict_size_mb(load_program(path)) * 1e6)
    if kernels == "int":
        assert models.size_bytes() == artifact_bytes(model, "int")  # what a trial records


def test_the_knapsack_warm_start_fits_the_budget_with_least_sensitivity(models):
    space = models.space
    rng = random.Random(0)
    noise = layer_noise([{"name": n, "output_sqnr_db": rng.uniform(5, 40)} for n in space.layers], ref_bits=4)
    widest, narrowest = models.layout_bytes(space.uniform(8)), models.layout_bytes(space.uniform(2))

    def cost(layout):
        return sum(noise(n, c["w"]) for n, c in space.per_layer(layout).items())

    for budget in (narrowest + (widest - narrowest) // 3, (narrowest + widest) // 2):
        layout = knapsack_layout(space, models, noise, budget)
        assert models.layout_bytes(layout) <= budget
        fitting = [space.uniform(w) for w in (2, 4, 8) if models.layout_bytes(space.uniform(w)) <= budget]
        assert fitting and all(cost(layout) <= cost(u) + 1e-12 for u in fitting)
    assert knapsack_layout(space, models, noise, narrowest - 1000) is None  # nothing fits
    assert knapsack_layout(space, models, noise, narrowest) == space.uniform(2)


def test_the_fisher_warm_start_costs_fall_with_bits_and_pick_a_layout_under_the_budget(models, digits_vit,
                                                                                       digits_bundle):
    space = models.space
    cfg = OmegaConf.create({"quant": quant_recipe(QuantConfig())})
    job = SimpleNamespace(model=digits_vit, calib=calibration_batches(digits_bundle, cfg.quant.calib))
    noise = fisher_noise(cfg, space, job)
    for name in space.layers:  # the Fisher-weighted rounding error: less with every extra bit, none in float
        assert noise(name, 2) > noise(name, 4) > noise(name, 8) > 0.0 == noise(name, FLOAT)
    budget = (models.layout_bytes(space.uniform(4)) + models.layout_bytes(space.uniform(8))) // 2
    layout = knapsack_layout(space, models, noise, budget)
    assert models.layout_bytes(layout) <= budget and layout != space.uniform(4)


def test_a_bad_warm_cost_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"search.warm_cost='hessian' is not allowed; choose one of \['fisher', 'sqnr'\]"):
        execute(compose_search(tmp_path, "search.warm_cost=hessian"), tmp_path / "run")


def test_a_retried_trial_measures_its_constraint_again():
    study = optuna.create_study()
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    trial.set_constraint("max_size_mb", 0.5)
    trial.set_user_attr("over_budget", "...")
    study.tell(trial, state=TrialState.FAIL)
    number = enqueue_retry(study, study.trials[0])
    retry = study.trials[number]
    assert study.trials[0].constraints == {"max_size_mb": 0.5} and retry.constraints == {}
    assert retry.params == study.trials[0].params


def test_the_budget_is_the_smaller_of_megabytes_and_fraction():
    assert size_budget(space_cfg(max_size_mb=0.1), 0.5) == 100_000
    assert size_budget(space_cfg(max_size_mb=0.1, max_size_fraction=0.1), 0.5) == 50_000
    assert size_budget(space_cfg(), 0.5) is None


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_budgeted_pareto_study_evaluates_only_layouts_that_fit_and_its_best_run_reproduces_it(
        tmp_path, digits_vit, capsys):
    # W8 (0.176 MB) and W4 (0.110 MB) are over 0.1 MB, W2 (0.077 MB) fits
    result = execute(compose_search(tmp_path, "search.objective=pareto", "search.quality=agreement",
                                    "search.max_size_mb=0.1", "search.n_trials=6", "search.w_bits=[2,4,8]",
                                    "search.top_k=2", "export.enabled=true"), tmp_path / "out")
    out = capsys.readouterr().out
    budget = 100_000
    study = study_of(tmp_path)
    warm = [t for t in study.trials if t.user_attrs.get("seed") == "warm start"]
    assert {frozenset(t.params.values()) for t in warm if len(set(t.params.values())) == 1} == {frozenset({2})}
    assert "W8, W4 over the size budget: not enqueued" in out
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["size_bytes"] <= budget and feasible(t) and "agreement" in t.user_attrs
        elif "over_budget" in t.user_attrs:  # the sampler proposed it; it was not evaluated, and the sampler knows
            assert t.state == TrialState.PRUNED and t.user_attrs["size_bytes"] > budget and not feasible(t)
            assert "agreement" not in t.user_attrs and "seen" not in t.user_attrs
    # the front: every trial no other beats on agreement and size, in the run folder and the study's MLflow run
    doc = json.loads((tmp_path / "out" / "pareto.json").read_text())
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    expected = [complete[i].number for i in pareto_front([(t.user_attrs["agreement"], t.user_attrs["size_mb"])
                                                          for t in complete])]
    assert [e["trial"] for e in doc["front"]] == expected and doc["budget_bytes"] == budget
    assert all(e["size_bytes"] <= budget and set(e["w_bits"].values()) <= {2, 4, 8} for e in doc["front"])
    assert (tmp_path / "out" / "pareto.csv").read_text().startswith("trial,agreement,size_mb,size_bytes,top1,")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    assert {"pareto.json", "pareto.csv"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert f"mlflow: study run {parent_id} at sqlite:///" in out.rsplit("best layout under the size budget", 1)[1]
    for e in doc["front"]:  # each member has its overlay and command
        assert f"+experiment=best/s_trial{e['trial']}" in out and (tmp_path / f"experiment/best/s_trial{e['trial']}.yaml").exists()
    # the numbers reported for the best layout are those its exported run reproduces
    best = result["best_run"]
    assert best["top1"] == result["best_top1"] and best["size_mb"] == result["best_size_mb"]
    assert best["artifact_top1"] == best["top1"] and round(best["size_mb"] * 1e6) <= budget


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_killed_study_keeps_the_front_of_its_finished_trials(tmp_path, digits_vit, monkeypatch):
    real, calls = qsweep.search.study.evaluate_in_steps, []

    def killed_in_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as SIGTERM or Ctrl-C mid-trial
        return real(*args, **kwargs)

    monkeypatch.setattr(qsweep.search.study, "evaluate_in_steps", killed_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        execute(compose_search(tmp_path, "search.n_trials=5", "search.w_bits=[2,4,8]", "search.greedy=false",
                               "search.objective=pareto", "search.top_k=0"), tmp_path / "out")
    study = study_of(tmp_path)
    done = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    doc = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert doc["trials_finished"] == 2 and {e["trial"] for e in doc["front"]} <= set(done) and doc["front"]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(study.user_attrs["mlflow_parent_run_id"])
    stored = Path(run.info.artifact_uri.removeprefix("file://"))
    assert json.loads((stored / "pareto.json").read_text()) == doc
    assert sorted(p.name for p in stored.iterdir()) == ["pareto.csv", "pareto.json"]  # no temp file left
