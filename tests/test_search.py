"""The mixed-precision search: space, cached layouts, greedy seed, and whole studies on the digits ViT."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState
from torch.utils.data import TensorDataset

import qsweep
from qsweep import app
from qsweep.config import ConfigError, QuantConfig, RootConfig, quant_recipe, validate
from qsweep.data import calibration_batches
from qsweep.export import export_artifact, state_dict_size_mb
from qsweep.files import write_text
from qsweep.modes import execute
from qsweep.quant.smooth import input_divisors
from qsweep.search.local_sampler import PARENT
from qsweep.search.warm import COST_ATTR, layer_noise
from qsweep.search.plots import pareto_front
from qsweep.search.space import FLOAT, SearchSpace, block_of, type_of
from qsweep.search.storage import StorageError
from qsweep.search.study import BEST_RUN_KEYS, ScoreBoundPruner, best_experiment_yaml
from qsweep.search.trials import LayoutModels, TrialImages, evaluate_in_steps

CONF = str(Path(__file__).resolve().parents[1] / "conf")
LAYERS = ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1",
          "head"]
# Each test's tmp_path/mlflow.db starts as an empty store already migrated (see conftest.py).
pytestmark = pytest.mark.usefixtures("mlflow_store")


def space_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(RootConfig).search, kw)


def compose_search(tmp_path, *overrides, study="s"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[
            "+experiment=digits_mixed_search", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false",
            f"search.storage=sqlite:///{tmp_path}/optuna.db", f"search.best_dir={tmp_path}",
            f"search.study_name={study}", "export.enabled=false", *overrides])


def test_groups_by_layer_block_and_type():
    assert block_of("blocks.3.attn.qkv") == "blocks.3" and block_of("layer2.1.conv1") == "layer2.1"
    assert block_of("head") == "head" and type_of("blocks.3.mlp.fc2") == "mlp.fc2" and type_of("head") == "head"
    by_block = SearchSpace.build(LAYERS, space_cfg(group_by="block"))
    assert list(by_block.groups) == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    by_type = SearchSpace.build(LAYERS, space_cfg(group_by="type"))
    assert by_type.groups["attn.qkv"] == ("blocks.0.attn.qkv", "blocks.1.attn.qkv")
    some = SearchSpace.build(LAYERS, space_cfg(layers=["blocks.*"]))
    assert some.layers == LAYERS[1:5]
    with pytest.raises(ConfigError, match="search.layers"):
        SearchSpace.build(LAYERS, space_cfg(layers=["decoder.*"]))


def test_layout_round_trips_through_params_and_becomes_overrides():
    space = SearchSpace.build(LAYERS, space_cfg(group_by="block", a_bits=[4, 8], allow_float=True))
    assert space.w_choices == (2, 3, 4, 5, 6, 8, FLOAT) and space.a_choices == (4, 8)
    study = optuna.create_study(direction="maximize")
    layout = {"patch_embed.proj": {"w": 8, "a": 8}, "blocks.0": {"w": 3, "a": 4}, "blocks.1": {"w": FLOAT},
              "head": {"w": 5, "a": 8}}
    study.enqueue_trial(space.params(layout))
    trial = study.ask()
    assert space.suggest(trial) == layout
    assert space.layout_of(trial.params) == layout
    overrides = space.overrides(layout)
    assert overrides["blocks.0.mlp.fc1"] == {"w_bits": 3, "a_bits": 4}
    assert overrides["blocks.1.attn.qkv"] == {"w_bits": None, "a_bits": None}
    assert space.fingerprint({"x": 1}) != space.fingerprint({"x": 2})


def test_layer_noise_scales_the_measured_noise_by_four_per_bit():
    noise = layer_noise([{"name": "a", "output_sqnr_db": 10.0}, {"name": "b", "output_sqnr_db": 40.0}], ref_bits=4)
    assert noise("a", 4) == pytest.approx(0.1) and noise("a", 3) == pytest.approx(0.4)
    assert noise("b", 8) == pytest.approx(1e-4 / 256) and noise("b", FLOAT) == 0.0


def test_pareto_front():
    points = [(90.0, 1.0), (95.0, 2.0), (94.0, 3.0), (80.0, 0.5), (95.0, 1.5)]
    assert pareto_front(points) == [3, 0, 4]


@pytest.fixture(scope="module")
def layout_models(digits_vit, digits_bundle):
    recipe = quant_recipe(QuantConfig())
    calib = calibration_batches(digits_bundle, recipe.calib)
    space = SearchSpace.build([n for n, m in digits_vit.named_modules() if isinstance(m, torch.nn.Linear)
                               or isinstance(m, torch.nn.Conv2d)], space_cfg(w_bits=[2, 4, 8], allow_float=True))
    models = LayoutModels(digits_vit, recipe, calib, space)
    images = TrialImages.from_dataset(digits_bundle.test, 96, 32, seed=0)
    return models, space, recipe, calib, images


def test_a_cached_layout_has_the_codes_and_size_of_a_fresh_quantization(layout_models, digits_vit):
    models, space, recipe, calib, images = layout_models
    layout = {g: {"w": (2, 4, 8)[i % 3]} for i, g in enumerate(space.groups)}
    layout["head"] = {"w": FLOAT}
    model = models.apply(layout)
    overrides = space.overrides(layout)
    fresh = qsweep.quantize(digits_vit, {**OmegaConf.to_container(recipe), "layers": overrides}, calib)
    for name, choice in space.per_layer(layout).items():
        ours, theirs = model.get_submodule(name), fresh.get_submodule(name)
        if choice["w"] == FLOAT:
            assert getattr(ours, "qweight", None) is None and torch.equal(ours.weight, theirs.weight)
        else:
            assert ours.w_bits == choice["w"] and torch.equal(ours.qweight.codes, theirs.qweight.codes)
    # the size the trial reports is what the grader measures on the exported program
    exported = state_dict_size_mb(export_artifact(model, images.batches[0][0]).module())
    assert models.size_mb() == pytest.approx(exported, abs=1e-4)  # within 100 bytes
    assert models.estimate_mb(layout) == pytest.approx(exported, rel=0.02)
    # at the widest layout activations were calibrated exactly as a fresh run does: same logits
    top = models.apply(space.uniform(8))
    fresh8 = qsweep.quantize(digits_vit, {**OmegaConf.to_container(recipe), "layers": space.overrides(
        space.uniform(8))}, calib)
    x = images.batches[0][0]
    assert torch.equal(top(x), fresh8(x))


def test_accuracy_falls_with_width_and_steps_report_partial_accuracy(layout_models):
    models, space, _, _, images = layout_models
    accs = {}
    for bits in (8, 4, 2):
        models.apply(space.uniform(bits))
        runner, fallbacks = models.runner("int")
        assert not fallbacks
        seen_steps = []
        tally = evaluate_in_steps(runner, images, 3, torch.device("cpu"), lambda step, t: seen_steps.append(t.seen))
        assert tally.seen == images.images == 96 and seen_steps == sorted(seen_steps) and len(seen_steps) == 3
        assert tally.total == tally.correct  # top-1 is the quality by default
        accs[bits] = tally.correct / tally.seen
    # W2 loses 7-13 of the 96 images; W8 and W4 trade single images near the FP ceiling (which one wins
    # depends on the trained weights), so only W2 is ordered.
    assert accs[2] < min(accs[8], accs[4]), accs


def study_of(tmp_path, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def test_study_end_to_end_records_parent_and_trials_and_resumes(tmp_path, digits_vit):
    result = execute(compose_search(tmp_path, "search.n_trials=5", "search.top_k=2", "search.w_bits=[2,4,8]"),
                     tmp_path / "out")
    study = study_of(tmp_path)
    states = [t.state for t in study.trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 5
    # warm start: the uniform layouts, widest first, then the greedy layout at all-4's size
    assert [set(t.params.values()) for t in study.trials[:3]] == [{8}, {4}, {2}]
    greedy = [t for t in study.trials[3:] if t.user_attrs.get("seed") == "warm start"]
    assert all(t.user_attrs["size_mb"] <= study.trials[1].user_attrs["size_mb"] + 1e-4 for t in greedy)
    assert result["best_score"] >= max(t.user_attrs["score"] for t in study.trials[:2] if "score" in t.user_attrs) - 2
    yaml_path = Path(result["best_yaml"])
    assert yaml_path.exists() and yaml_path.read_text().startswith("# @package _global_")
    # a defaults line, the name and quant.layers, plus what the command line changed: not the whole config
    overlay = OmegaConf.load(yaml_path)
    assert set(overlay) == {"defaults", "name", "quant", "export"} and set(overlay.quant) == {"name", "layers"}
    assert overlay.defaults == [{"override /data": "digits"}, "_self_"] and overlay.export == {"enabled": False}
    assert (tmp_path / "out" / "pareto.png").exists() and (tmp_path / "out" / "layout_heatmap.png").exists()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("qsweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("qsweep.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5 and all(r.info.status == "FINISHED" for r in children)
    assert all("size_mb" in r.data.metrics and "pruned" in r.data.metrics for r in children)
    assert parent.data.metrics["best_score"] == result["best_score"]
    assert {"pareto.png", "layout_heatmap.png", "history.png", "trials.csv", "s_best.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}

    # the same study name resumes: 2 more trials, under the same parent run
    result = execute(compose_search(tmp_path, "search.n_trials=7", "search.top_k=1", "search.w_bits=[2,4,8]"),
                     tmp_path / "out2")
    study = study_of(tmp_path)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 7
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("qsweep.kind") == "study"]) == 1

    # the best layout is a ready experiment: an ordinary run reproduces it
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "+experiment=best/s_best",
                                           "tracking.enabled=false", "progress=false"])
    best = app.run(cfg, tmp_path / "best")
    # the study reports the layout as its run quantizes it (trials calibrate once, at the widest widths)
    assert best["top1"] == result["best_top1"]
    # without export a run sizes the artifact form without exporting it, to the byte (export.artifact_bytes)
    assert best["size_mb"] == result["best_size_mb"]


def test_a_local_study_proposes_fresh_neighbours_of_its_best_layouts(tmp_path, digits_vit):
    execute(compose_search(tmp_path, "search.sampler=local", "search.n_trials=7", "search.top_k=0",
                           "search.w_bits=[2,4,8]", "search.max_size_mb=0.12", "tracking.enabled=false"),
            tmp_path / "out")
    study = study_of(tmp_path)
    assert set(study.user_attrs[COST_ATTR]["w:head"]) == {"2", "4", "8"}  # the warm start's cost, for the sampler
    proposed = [t for t in study.trials if PARENT in t.system_attrs]
    assert proposed and all(t.user_attrs.get("seed") != "warm start" for t in proposed)
    for t in proposed:
        parent = study.trials[t.system_attrs[PARENT]]
        assert parent.state == TrialState.COMPLETE and t.user_attrs["size_bytes"] <= 120_000
        moved = sorted(([2, 4, 8].index(t.params[p]) - [2, 4, 8].index(w)) for p, w in parent.params.items()
                       if t.params[p] != w)
        assert moved in ([-1, 1], [-1], [1])
    keys = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(keys)) == len(keys)


def test_the_best_overlay_states_what_differs_and_reproduces_the_run(tmp_path):
    overrides = ["+experiment=deit_mixed_search", "data.root=/data", "model.checkpoint=/deit.pth", "quant=w8a8",
                 "data.test_set=full", "search.n_trials=3", "tracking.enabled=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = validate(compose("config", overrides=overrides))
    layers = {"head": {"w_bits": 8}, "blocks.0.attn.qkv": {"w_bits": 3, "a_bits": None}}
    text = best_experiment_yaml(cfg, layers, "s_best", ["a header"])
    write_text(tmp_path / "experiment" / "best" / "s_best.yaml", text)
    overlay = OmegaConf.load(tmp_path / "experiment" / "best" / "s_best.yaml")
    assert overlay.defaults == [{"override /data": "cifar100"}, "_self_"] and overlay.quant.layers == layers
    assert overlay.data == {"root": "/data", "test_set": "full"} and "search" not in overlay and "mode" not in overlay
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        best = validate(compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "+experiment=best/s_best",
                                                     "tracking.enabled=false"]))
    expected = OmegaConf.merge(cfg, {"quant": {"name": "s_best", "layers": layers}})
    assert {k: best[k] for k in BEST_RUN_KEYS} == {k: expected[k] for k in BEST_RUN_KEYS}
    assert best.mode == "run" and best.name == "s_best"


def test_a_study_of_the_same_name_with_another_space_is_refused(tmp_path, digits_vit):
    execute(compose_search(tmp_path, "search.n_trials=1", "search.warm_start=[8]", "search.top_k=0"), tmp_path / "a")
    with pytest.raises(StorageError, match="different search space"):
        execute(compose_search(tmp_path, "search.n_trials=2", "search.w_bits=[4,8]", "search.warm_start=[8]"),
                tmp_path / "b")


def test_a_crashed_trial_is_recorded_and_the_study_goes_on(tmp_path, digits_vit, monkeypatch):
    real = LayoutModels.size_bytes
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full while measuring")
        return real(self)

    monkeypatch.setattr(LayoutModels, "size_bytes", flaky)
    # without a budget or sensitivity layouts the warm start measures nothing: the 2nd measurement is trial 1's
    execute(compose_search(tmp_path, "search.n_trials=3", "search.top_k=0", "search.greedy=false"), tmp_path / "out")
    study = study_of(tmp_path)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "disk full" in failed[0].user_attrs["error"]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "disk full" in run.data.tags["error"]


@pytest.mark.parametrize("override, match", [
    ("search.w_bits=[]", "search.w_bits"),
    ("search.n_trials=0", "search.n_trials"),
    ("search.warm_start=[3]", "search.warm_start"),
    ("search.sampler=cmaes", "search.sampler"),
])
def test_bad_search_config_is_refused_before_work(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        execute(compose_search(tmp_path, override, "search.w_bits=[2,4,8]" if "w_bits" not in override else
                               "search.n_trials=1"), tmp_path / "out")


def test_an_unreachable_storage_is_refused_before_work(tmp_path):
    with pytest.raises(StorageError, match="cannot be reached") as err:
        execute(compose_search(tmp_path, "search.storage=postgresql://qsweep:secret@127.0.0.1:9/none"), tmp_path / "o")
    assert "secret" not in str(err.value)


def test_pareto_objective_reports_the_front(tmp_path, digits_vit):
    result = execute(compose_search(tmp_path, "search.objective=pareto", "search.sampler=nsga2", "search.n_trials=4",
                                    "search.w_bits=[2,8]", "search.greedy=false", "search.top_k=1"), tmp_path / "o")
    study = study_of(tmp_path)
    assert len(study.directions) == 2 and len(study.best_trials) >= 1
    front = {(p["top1"], p["size_mb"]) for p in result["pareto"]}
    assert {(t.values[0], t.values[1]) for t in study.best_trials} == front


def test_a_search_composes_with_adaround_lsq_and_vit_options(tmp_path, digits_vit):
    result = execute(compose_search(tmp_path, "search.n_trials=3", "search.w_bits=[2,8]", "search.greedy=false",
                                    "search.top_k=1", "adaround=layer", "adaround.iters=20",
                                    "adaround.num_samples=32", "lsq=act", "lsq.iters=5", "lsq.num_samples=32",
                                    "quant.vit.post_ln=reparam", "quant.intops=ivit",
                                    # quant.smooth with this whole combination at 2 bits scores ~45 % here, though
                                    # a plain W2A8 AdaRound run gains from it (97.1 vs 96.2 %): open, see issue 10
                                    "quant.smooth.enabled=false"), tmp_path / "o")
    study = study_of(tmp_path)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 3
    uniform2 = next(t for t in study.trials if set(t.params.values()) == {2})
    assert uniform2.state == TrialState.COMPLETE
    assert uniform2.user_attrs["top1"] > 90.0  # learned rounding at 2 bits (nearest min-max: ~85 %)
    assert result["best_score"] > 0


def test_the_bound_pruner_stops_only_trials_that_cannot_beat_the_best():
    from qsweep.score import lab4
    from qsweep.search.study import ScoreBoundPruner

    study = optuna.create_study(direction="maximize", pruner=ScoreBoundPruner(lab4))
    study.add_trial(optuna.create_trial(value=40.0))  # e.g. 20 MB at 90 %: 10 + 12 + 10 + 8

    def running(size_mb, correct, seen, total=500):
        trial = study.ask()
        for key, value in dict(size_mb=size_mb, partial=correct, seen=seen, total=total).items():
            trial.set_user_attr(key, value)
        trial.report(0.0, 0)
        return trial.should_prune()

    # 26 MB: size part 12; 100 right of 125 seen, the other 375 right would be 95 %: 12 + 28 = 40, a tie
    assert not running(26.0, correct=100, seen=125)
    # 29 MB: 10 for size; 40 still needs >= 96 %, and 100 of 250 seen leaves at most 70 %
    assert running(29.0, correct=100, seen=250)
    assert not running(29.0, correct=245, seen=250)  # 99 % so far, can reach 40+


def test_with_smoothing_every_width_shares_the_widest_ones_input_divisors(digits_vit, digits_bundle):
    recipe = quant_recipe({"smooth": {"enabled": True, "max_tokens": 256, "grid": 4}})
    calib = calibration_batches(digits_bundle, recipe.calib)[:1]
    names = [n for n, m in digits_vit.named_modules() if isinstance(m, torch.nn.Linear)]
    space = SearchSpace.build(names, space_cfg(w_bits=[4, 8]))
    models = LayoutModels(digits_vit, recipe, calib, space)
    layout = {g: {"w": (4, 8)[i % 2]} for i, g in enumerate(space.groups)}
    model = models.apply(layout)
    fresh = qsweep.quantize(digits_vit, {**OmegaConf.to_container(recipe), "layers": space.overrides(layout)},
                            calib, smoothing=input_divisors(models.model))
    scaled = 0
    for name in space.per_layer(layout):
        ours, theirs = model.get_submodule(name), fresh.get_submodule(name)
        assert torch.equal(ours.qweight.codes, theirs.qweight.codes)
        if ours.input_divisor is not None:
            scaled += 1
            torch.testing.assert_close(ours.input_divisor, theirs.input_divisor)
    assert scaled > 0


def test_the_bound_pruner_settles_a_trial_by_its_size_before_any_image():
    def score_of(size_mb, top1):
        return top1 - 10.0 * size_mb

    study = optuna.create_study(direction="maximize", pruner=ScoreBoundPruner(score_of))
    study.add_trial(optuna.trial.create_trial(value=80.0))  # the best so far
    verdicts = []
    for size in (3.0, 1.0):  # 100 % top-1 would score 70 (cannot win), 90 (might)
        trial = study.ask()
        for key, value in {"size_mb": size, "total": 100, "seen": 0, "partial": 0}.items():
            trial.set_user_attr(key, value)
        verdicts.append(trial.should_prune())
    assert verdicts == [True, False]


def test_trial_images_are_batched_so_every_prune_step_has_images():
    data = TensorDataset(torch.zeros(300, 1), torch.zeros(300, dtype=torch.long))
    images = TrialImages.from_dataset(data, 225, batch_size=256, seed=0, steps=3)
    assert [len(y) for _, y in images.batches] == [75, 75, 75]
    assert [len(part) for part in images.steps(3)] == [1, 1, 1]
    assert len(TrialImages.from_dataset(data, None, batch_size=64, seed=0, steps=2).batches) == 5
