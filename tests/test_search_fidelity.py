"""Searching without labels: fidelity to the FP32 model's outputs (agreement, KL, cosine), and the role grouping."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import TensorDataset

import qsweep
from qsweep.config import ConfigError, validate
from qsweep.modes import execute
from qsweep.search.fidelity import QUALITIES, mean_quality, quality_of, reference_outputs
from qsweep.search.space import SearchSpace
from qsweep.search.study import PRUNERS, ScoreBoundPruner, directions
from qsweep.search.trials import TrialImages, evaluate_in_steps
from test_search import CONF, compose_search, space_cfg, study_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fidelity_qualities_compare_outputs_and_need_no_labels():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    same = {name: float(QUALITIES[name].per_input(ref.clone(), ref, None).mean()) for name in ("agreement", "kl", "cosine")}
    assert same == pytest.approx({"agreement": 1.0, "kl": 0.0, "cosine": 1.0}, abs=1e-12)
    flipped = ref[:, [1, 0, 2]]  # the first input's top class moves; the second's too
    assert QUALITIES["agreement"].per_input(flipped, ref, None).tolist() == [0.0, 0.0]
    assert (QUALITIES["kl"].per_input(flipped, ref, None) > 0).all()
    # per-token outputs (batch, tokens, classes): agreement and KL average over an input's positions
    tokens = torch.randn(2, 4, 3)
    other = tokens.clone()
    other[0, 0] = -other[0, 0]
    assert QUALITIES["agreement"].per_input(other, tokens, None)[1] == 1.0
    assert QUALITIES["cosine"].per_input(other, tokens, None).shape == (2,)
    # bounds a pruner can use: the rest of the inputs at the best value each
    assert QUALITIES["agreement"].optimistic(total=3, seen=4, n=10) == pytest.approx(90.0)
    assert QUALITIES["kl"].optimistic(total=0.4, seen=4, n=10) == pytest.approx(0.04)
    assert not QUALITIES["kl"].maximize and QUALITIES["kl"].better(0.01, 0.02)


def test_a_fidelity_evaluation_runs_on_inputs_alone(digits_vit, digits_bundle):
    inputs = torch.stack([digits_bundle.test[i][0] for i in range(64)])
    images = TrialImages.from_dataset(TensorDataset(inputs), None, batch_size=16, seed=0, steps=2)
    assert not images.labelled and images.images == 64
    reference = reference_outputs(digits_vit, images.batches)
    w2 = qsweep.quantize(digits_vit, {"weight": {"bits": 2}}, [inputs[:32]])
    for name, perfect in (("agreement", 100.0), ("kl", 0.0), ("cosine", 1.0)):
        quality = QUALITIES[name]
        tally = evaluate_in_steps(digits_vit, images, 2, torch.device("cpu"), lambda step, t: None, quality, reference)
        assert tally.correct is None and tally.top1() is None
        assert quality.mean(tally.total, tally.seen) == pytest.approx(perfect, abs=1e-9)
        quantized = mean_quality(w2, images.batches, quality, reference)
        assert quality.better(perfect, quantized), (name, quantized)  # 2-bit weights move the outputs


def test_the_bound_pruner_follows_a_minimized_quality():
    kl = QUALITIES["kl"]
    study = optuna.create_study(direction="minimize", pruner=ScoreBoundPruner(lambda size_mb, q: q, kl))
    study.add_trial(optuna.create_trial(value=0.05))
    verdicts = []
    for partial in (0.8, 0.2):  # KL summed over the first 10 of 100 inputs: at best 0.008 or 0.002 overall
        trial = study.ask()
        for key, value in {"size_mb": 1.0, "partial": partial * 10, "seen": 10, "total": 100}.items():
            trial.set_user_attr(key, value)
        verdicts.append(trial.should_prune())
    assert verdicts == [True, False]
    assert set(PRUNERS) == {"bound", "median", "none"}


def test_objectives_set_the_study_directions():
    assert directions(space_cfg(objective="kl")) == ["minimize"]
    assert directions(space_cfg(objective="pareto", quality="cosine")) == ["maximize", "minimize"]
    assert directions(space_cfg(objective="pareto", quality="kl")) == ["minimize", "minimize"]
    assert quality_of(space_cfg(objective="score")).name == "top1"


@pytest.mark.parametrize("override, match", [
    ("search.objective=accuracy", r"search.objective='accuracy' is not allowed; choose one of \['score', 'pareto', "
                                  r"'agreement', 'kl', 'cosine'\]"),
    ("search.quality=kl", r"search.quality='kl' is not allowed with search.objective='score'"),
    ("search.quality=top5", r"search.quality='top5' is not allowed; choose one of \['top1', 'agreement'"),
    ("search.max_size_mb=0", r"search.max_size_mb=0.0 is not allowed; must be > 0 MB"),
    ("search.max_size_fraction=1.5", r"search.max_size_fraction=1.5 is not allowed; a fraction of the FP32"),
    ("search.group_by=roles", r"search.group_by='roles' is not allowed; choose one of \[.*'role'\] \(did you mean"),
])
def test_bad_search_choices_are_refused_with_key_value_and_choices(override, match):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=digits_mixed_search", override])
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_study_maximizes_agreement_with_fp32(tmp_path, digits_vit):
    result = execute(compose_search(tmp_path, "search.objective=agreement", "search.n_trials=4", "search.w_bits=[2,8]",
                                    "search.greedy=false", "search.top_k=1"), tmp_path / "out")
    study = study_of(tmp_path)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    by_width = {next(iter(set(t.params.values()))): t for t in study.trials[:2]}
    assert by_width[8].state == TrialState.COMPLETE and by_width[8].value == by_width[8].user_attrs["agreement"]
    assert 90.0 < by_width[8].value <= 100.0
    assert result["best_agreement"] > 90.0 and result["best_top1"] > 90.0
    assert (tmp_path / "out" / "pareto.json").exists()


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_pareto_study_on_kl_keeps_a_minimizing_front(tmp_path, digits_vit):
    result = execute(compose_search(tmp_path, "search.objective=pareto", "search.quality=kl", "search.sampler=nsga2",
                                    "search.n_trials=4", "search.w_bits=[2,4,8]", "search.greedy=false",
                                    "search.top_k=0"), tmp_path / "out")
    study = study_of(tmp_path)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    front = result["pareto"]
    assert {(p["kl"], p["size_mb"]) for p in front} == {tuple(t.values) for t in study.best_trials}
    sizes = [p["size_mb"] for p in front]
    assert sizes == sorted(sizes) and all(a["kl"] > b["kl"] for a, b in zip(front, front[1:]))


def small_cnn() -> nn.Module:
    def block() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))

    model = nn.Module()
    model.conv_stem = nn.Conv2d(3, 8, 3)
    model.blocks = nn.Sequential(block(), block())
    model.classifier = nn.Linear(8, 10)
    return model


def test_role_groups_keep_depthwise_first_and_last_layers_alone():
    model = small_cnn()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    space = SearchSpace.build(names, space_cfg(group_by="role"), model=model)
    assert space.groups == {"conv_stem": ("conv_stem",), "blocks.0.0": ("blocks.0.0",), "blocks.0": ("blocks.0.1",),
                            "blocks.1.0": ("blocks.1.0",), "blocks.1": ("blocks.1.1",), "classifier": ("classifier",)}
    # by block, a depthwise conv shares its block's choice
    assert SearchSpace.build(names, space_cfg(group_by="block")).groups["blocks.0"] == ("blocks.0.0", "blocks.0.1")
    with pytest.raises(ValueError, match="needs the model"):
        SearchSpace.build(names, space_cfg(group_by="role"))


def test_role_groups_on_a_vit_put_the_stem_and_the_head_alone(digits_vit):
    names = [n for n, m in digits_vit.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    space = SearchSpace.build(names, space_cfg(group_by="role"), model=digits_vit)
    assert list(space.groups)[0] == "patch_embed.proj" and list(space.groups)[-1] == "head"
    assert space.groups["blocks.0"] == tuple(n for n in names if n.startswith("blocks.0."))


def test_conf_search_files_compose(tmp_path):
    for experiment in sorted(Path(CONF, "experiment").glob("*search*.yaml")):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            validate(compose("config", overrides=[f"+experiment={experiment.stem}", "model.checkpoint=/x.pth",
                                                  "data.root=/data"] if "deit" in experiment.stem else
                             [f"+experiment={experiment.stem}"]))
