"""The lab's search on a Hugging Face DeiT: trials over its layers, the best layout's run and the lab grader."""

import csv
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir

from qsweep.config import ConfigError
from qsweep.lab_eval import lab_eval
from qsweep.modes import execute

from fake_cifar import write_fake_cifar

transformers = pytest.importorskip("transformers")
from hf_tiny import tiny_vit  # noqa: E402  (needs transformers)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# CIFAR-sized: 3 channels, 32 px, 100 classes.
CIFAR_KW = dict(image_size=32, patch_size=8, num_channels=3, num_labels=100)


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_hf_deit_lab_search_grades_the_best_layout(tmp_path, one_thread):
    data = tmp_path / "data"
    write_fake_cifar(data)
    path = tmp_path / "tiny_deit"
    tiny_vit("deit", **CIFAR_KW).save_pretrained(path)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=deit_mixed_search", "model.source=hf", f"model.path={path}", f"data.root={data}",
            "data.image_size=32", "quant.calib.num_images=64", "quant.calib.batch_size=32",
            "search.n_trials=4", "search.w_bits=[4,8]", "search.trial_images=100", "search.prune_steps=2",
            "search.top_k=1", f"search.storage=sqlite:///{tmp_path}/optuna.db", f"search.best_dir={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false"])
    result = execute(cfg, tmp_path / "out")

    study = optuna.load_study(study_name="deit_mixed_search", storage=f"sqlite:///{tmp_path}/optuna.db")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4
    # The layout is chosen over the HF model's own module names (2 blocks x 6 Linears, patch conv, classifier).
    params = set(study.trials[0].params)
    assert {"w:model.deit.layers.1.mlp.fc1", "w:model.classifier"} <= params

    best = result["best_run"]
    assert best["weights"] == "hf:tiny_deit" and Path(best["artifact"]).name == "deits_quantized.pth"
    assert best["size_mb"] == pytest.approx(result["best_size_mb"], abs=1e-6)
    # The grader's procedure on the exported file reproduces what the run reported, and so does a
    # second, independent grading of the same file.
    assert best["lab_top1"] == pytest.approx(best["top1"]) and best["lab_size_mb"] == pytest.approx(best["size_mb"])
    graded = lab_eval(best["artifact"], data, image_size=32, progress=False)
    assert graded["acc"] == pytest.approx(best["top1"]) and graded["score"] == best["lab_score"]


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_hf_deit_runs_the_lab_recipe_once_its_timm_rule_is_renamed(tmp_path, one_thread):
    """deit_w4a8 keeps timm's `head` at 8 bits; on a Hugging Face DeiT the error says how to move the rule."""
    data = tmp_path / "data"
    write_fake_cifar(data)
    path = tmp_path / "tiny_deit"
    tiny_vit("deit", **CIFAR_KW).save_pretrained(path)
    common = ["+experiment=deit_w4a8", "model.source=hf", f"model.path={path}", f"data.root={data}",
              "data.image_size=32", "quant.calib.num_images=32", "quant.calib.batch_size=32",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        wrong = compose("config", overrides=common)
        renamed = compose("config", overrides=common + ["~quant.layers.head",
                                                        "+quant.layers={model.classifier: {w_bits: 8}}"])
    with pytest.raises(ConfigError, match=r"'head' matches no .*'model\.classifier'.*'~quant\.layers\.head'"):
        execute(wrong, tmp_path / "wrong")
    result = execute(renamed, tmp_path / "out")
    assert Path(result["artifact"]).name == "deits_quantized.pth"
    assert result["lab_top1"] == pytest.approx(result["top1"])
    with open(Path(result["output_dir"]) / "layers.csv") as f:
        bits = {row["name"]: int(row["w_bits"]) for row in csv.DictReader(f)}
    assert bits["model.classifier"] == 8 and bits["model.deit.layers.0.mlp.fc1"] == 4
