"""model.source=hf: a local Hugging Face image classifier through the whole pipeline, and its errors."""

import copy
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from qsweep import app
from qsweep.config import ConfigError, DataConfig, QuantConfig, quant_recipe, validate
from qsweep.data import calibration_batches, eval_loader
from qsweep.evaluate import evaluate
from qsweep.export import load_program
from qsweep.locks import file_lock
from qsweep.models import build_model
from qsweep.models.checkpoint import CheckpointError
from qsweep.quant.vit import apply_vit, model_output, pre_norm_pairs, relative_error

transformers = pytest.importorskip("transformers")
from hf_tiny import tiny_vit, train  # noqa: E402  (needs transformers)
from test_vit import runner  # noqa: E402
from qsweep.models.hf import HFImageClassifier  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false",
                                             *overrides])


def hf_cfg(tmp_path, path, *overrides):
    return compose_cfg(tmp_path, "model.source=hf", f"model.path={path}", *overrides)


@pytest.fixture(scope="module")
def vit_dir(qsweep_cache, digits_bundle, one_thread):
    """A tiny HF ViT trained ~10 s on digits (83-91 % top-1, depending on the seed or CPU), saved as save_pretrained
    does: trained once per test run, by the first xdist worker to need it, beside the run's shared qsweep cache."""
    path = qsweep_cache.parent / "hf_trained" / "tiny_vit"
    with file_lock(qsweep_cache.parent / "hf_trained.lock"):
        if not path.exists():
            model = tiny_vit()
            train(model, digits_bundle)
            tmp = path.with_name(f"tiny_vit.{os.getpid()}.tmp")
            model.save_pretrained(tmp)
            os.replace(tmp, path)
    return path


@pytest.fixture(scope="module")
def trained_vit(vit_dir):
    return transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()


def save(model, tmp_path, name):
    path = tmp_path / name
    model.save_pretrained(path)
    return path


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_hf_vit_run_end_to_end_with_post_ln(tmp_path, vit_dir, digits_bundle, one_thread):
    cfg = hf_cfg(tmp_path, vit_dir, "quant=w8a8", "quant.vit.post_ln=reparam")
    result = app.run(cfg, tmp_path / "out")
    assert result["fp_top1"] >= 50.0  # the trained weights are used: far above chance (10 %), whatever the CPU
    assert result["top1"] >= result["fp_top1"] - 3.0  # W8A8
    assert result["artifact_top1"] == result["top1"] and result["weights"] == "hf:tiny_vit"
    # The artifact alone, as the grader loads it: batch 1 works, same accuracy on the test set.
    loaded = load_program(result["artifact"])
    loader = eval_loader(digits_bundle, DataConfig())
    assert evaluate(loaded, loader, 10).top1 == pytest.approx(result["top1"])
    assert loaded(next(iter(loader))[0][:1]).shape == (1, 10)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "hf:tiny_vit"
    assert run.data.params["model.source"] == "hf" and run.data.metrics["top1"] == pytest.approx(result["top1"])


def test_hf_deit_random_weights_end_to_end(tmp_path, one_thread):
    path = save(tiny_vit("deit"), tmp_path, "tiny_deit")
    result = app.run(hf_cfg(tmp_path, path, "quant=w8a8", "tracking.enabled=false"), tmp_path / "out")
    assert result["weights"] == "hf:tiny_deit" and result["artifact_top1"] == result["top1"]
    assert Path(result["artifact"]).exists()


def test_wrapper_keeps_hf_names_and_returns_logits(trained_vit):
    wrapped = HFImageClassifier(trained_vit)
    assert "model.vit.layers.0.attention.q_proj" in dict(wrapped.named_modules())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(wrapped(x), trained_vit(pixel_values=x).logits)


@pytest.mark.parametrize("overrides, match", [
    (["model.source=hf"], r"model.path=None .*config.json"),
    (["model.source=onnx"], r"model.source='onnx'.*'timm', 'hf'"),
])
def test_bad_source_or_path_fails_validation(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(tmp_path, *overrides))


def test_directory_without_config_json_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path=.*empty.*config.json"):
        validate(hf_cfg(tmp_path, tmp_path / "empty"))


def _build(tmp_path, path, bundle, *overrides):
    return build_model(validate(hf_cfg(tmp_path, path, *overrides)).model, bundle, tmp_path)


def test_pickled_weights_need_trust(tmp_path, digits_bundle):
    model = tiny_vit()
    path = tmp_path / "bin_only"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*model.trust_checkpoint=true"):
        _build(tmp_path, path, digits_bundle)
    loaded, weights = _build(tmp_path, path, digits_bundle, "model.trust_checkpoint=true")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(pixel_values=x).logits)
    assert weights == "hf:bin_only"


def test_no_weights_and_random_weights(tmp_path, digits_bundle):
    path = tmp_path / "config_only"
    tiny_vit().config.save_pretrained(path)
    with pytest.raises(CheckpointError, match=r"has no weights.*model.safetensors"):
        _build(tmp_path, path, digits_bundle)
    model, weights = _build(tmp_path, path, digits_bundle, "model.weights=random")
    assert weights == "random" and isinstance(model, HFImageClassifier)


@pytest.mark.parametrize("overrides, error, match", [
    ({"num_labels": 5}, CheckpointError, r"5 classes but the data has 10"),
    ({"num_channels": 3}, ConfigError, r"num_channels=3 but the data has 1"),
    ({"image_size": 32}, ConfigError, r"image_size=32 but the data gives 16x16"),
])
def test_model_must_fit_the_data(tmp_path, digits_bundle, overrides, error, match):
    path = save(tiny_vit(**overrides), tmp_path, "misfit")
    with pytest.raises(error, match=match):
        _build(tmp_path, path, digits_bundle)


# --- quant.vit.post_ln found by structure on HF ViT (pre-norm) --------------------------------------

@pytest.mark.parametrize("mode", ["reparam", "smooth"])
def test_post_ln_pairs_and_exact_rewrite_on_hf_vit(trained_vit, digits_bundle, mode, one_thread):
    calib = calibration_batches(digits_bundle, QuantConfig().calib)
    model = copy.deepcopy(HFImageClassifier(trained_vit)).eval()
    names = dict(model.named_modules())
    pairs = pre_norm_pairs(model, runner(model, calib))
    prefix = "model.vit.layers"
    assert [n for n, _, _ in pairs] == [f"{prefix}.{i}.layernorm_{w}" for i in range(2) for w in ("before", "after")]
    for name, _, readers in pairs:
        want = ["q_proj", "k_proj", "v_proj"] if name.endswith("before") else ["fc1"]
        block = name.rsplit(".", 1)[0]
        sub = "attention" if name.endswith("before") else "mlp"
        assert readers == [names[f"{block}.{sub}.{w}"] for w in want]
    ref = model_output(model, runner(model, calib))
    skipped = apply_vit(model, quant_recipe({"vit": {"post_ln": mode}}), runner(model, calib))
    assert skipped == {}
    assert relative_error(model_output(model, runner(model, calib)), ref) < 1e-5
    assert not torch.equal(pairs[0][1].weight, trained_vit.vit.layers[0].layernorm_before.weight)  # it did fold
