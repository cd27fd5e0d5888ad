"""The run pipeline and CLI end to end on the embedded digits ViT, with a throwaway MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

import qsweep
from qsweep import app, job
from qsweep.config import ConfigError
from qsweep.data import calibration_batches, eval_loader
from qsweep.evaluate import evaluate
from qsweep.export import load_program

CONF = str(Path(__file__).resolve().parents[1] / "conf")
ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false",
                                             *overrides])


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("qsweep")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_default_run_end_to_end(tmp_path, digits_vit):
    result = app.run(compose_cfg(tmp_path), tmp_path / "out")
    assert result["fp_top1"] >= 95.0
    assert result["top1"] >= result["fp_top1"] - 3.0  # W4A8 within 3 points
    assert result["artifact_top1"] == result["top1"]
    # the tiny model carries float embeddings, norms and per-channel scales: ~4.5x, not 8x
    assert result["compression"] > 4.0 and 3.9 < result["avg_weight_bits"] < 4.1
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["mlflow_run_id"] == result["mlflow_run_id"] and Path(saved["artifact"]).exists()

    client, found = runs(tmp_path)
    (run,) = found
    assert run.info.status == "FINISHED"
    assert run.data.params["quant.weight.bits"] == "4" and run.data.params["model.name"] == "digits_vit"
    for key in ("top1", "top5", "fp_top1", "delta_top1", "size_mb", "fp32_size_mb", "compression",
                "avg_weight_bits", "score", "calibration_s", "quantization_s", "eval_s", "peak_rss_mb"):
        assert key in run.data.metrics, key
    assert run.data.metrics["size_mb"] == pytest.approx(result["size_mb"])
    assert {"model", "data", "experiment", "git_commit", "weights", "qsweep_version"} <= set(run.data.tags)
    assert run.data.tags["weights"] == "embedded"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "layers.csv", "result.json", "model"} <= artifacts


def test_accuracy_is_monotone_in_bits(digits_bundle, digits_vit):
    from qsweep.config import DataConfig, QuantConfig

    loader = eval_loader(digits_bundle, DataConfig())
    calib = calibration_batches(digits_bundle, QuantConfig().calib)
    images = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        ref = digits_vit(images)
    fp = evaluate(digits_vit, loader, 10).top1
    acc, err = {}, {}
    for bits in (8, 4, 3, 2):
        q = qsweep.quantize(digits_vit, {"weight": {"bits": bits}, "act": {"bits": 8}}, calib)
        acc[bits] = evaluate(q, loader, 10).top1
        with torch.no_grad():
            err[bits] = (q(images) - ref).pow(2).mean().item()
    assert acc[8] >= fp - 1.0
    assert acc[4] >= fp - 3.0
    assert acc[2] < min(acc[8], acc[4])
    # Near the FP ceiling accuracy on 450 images is not monotone: W3 beats W4 by 4 images on some trained
    # models. The logits' error is: each bit less multiplies the weight rounding noise by ~4.
    assert err[8] < err[4] < err[3] < err[2], err


def test_experiment_overlay(tmp_path):
    cfg = compose_cfg(tmp_path, "+experiment=digits_w8a8")
    assert cfg.name == "digits_w8a8" and cfg.quant.weight.bits == 8 and cfg.quant.act.bits == 8


def test_bad_config_fails_before_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "build_model", lambda *a, **k: pytest.fail("model built before validation"))
    with pytest.raises(ConfigError, match=r"quant.weight.bits=9"):
        app.run(compose_cfg(tmp_path, "quant.weight.bits=9"), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"quant.act.bits=2"):
        app.run(compose_cfg(tmp_path, "quant.act.bits=2"), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"score.name='lab5'"):
        app.run(compose_cfg(tmp_path, "score.name=lab5"), tmp_path / "out")


def test_unknown_key_is_rejected_by_composition(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="colour"):
        compose_cfg(tmp_path, "quant.colour=red")


def test_failed_run_is_recorded_with_reason(tmp_path, digits_vit):
    with pytest.raises(ConfigError, match=r"'haed' matches no Linear/Conv2d.*head"):
        app.run(compose_cfg(tmp_path, "quant.skip=[haed]"), tmp_path / "out")
    _, found = runs(tmp_path)
    (run,) = found
    assert run.info.status == "FAILED"
    assert "haed" in run.data.tags["error"]


def test_quantize_exported_artifact_matches_in_process(tmp_path, digits_vit):
    result = app.run(compose_cfg(tmp_path, "quant=w2a8", "tracking.enabled=false"), tmp_path / "out")
    loaded = load_program(result["artifact"])
    x = torch.randn(3, 1, 16, 16)
    assert loaded(x).shape == (3, 10)
    assert result["mlflow_run_id"] is None and result["artifact_top1"] == result["top1"]


def _cli(tmp_path, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    return subprocess.run([sys.executable, "-m", "qsweep", *args, "progress=false",
                           f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multi"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_single_run_prints_table(tmp_path, digits_vit):
    proc = _cli(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qsweep result" in proc.stdout and "top-1" in proc.stdout and "result.json" in proc.stdout
    assert (tmp_path / "run" / "result.json").exists()


@pytest.mark.slow
def test_cli_multirun_gives_one_mlflow_run_per_job_under_one_parent(tmp_path, digits_vit):
    proc = _cli(tmp_path, "-m", "quant.act.observer=minmax,percentile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, found = runs(tmp_path)
    (parent,) = [r for r in found if r.data.tags.get("qsweep.kind") == "sweep"]
    jobs = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["quant.act.observer"] for r in jobs) == ["minmax", "percentile"]
    assert all(r.info.status == "FINISHED" for r in found) and len(found) == 3
    assert parent.data.tags["qsweep.sweep"] == str((tmp_path / "multi").resolve())


@pytest.mark.slow
def test_cli_bad_input_is_one_clear_line(tmp_path):
    proc = _cli(tmp_path, "quant.weight.bits=1")
    assert proc.returncode != 0
    assert "quant.weight.bits=1 is not allowed" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_checkpoint_fails_the_recorded_run(tmp_path):
    from qsweep.models.checkpoint import CheckpointError

    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth"):
        app.run(compose_cfg(tmp_path, f"model.checkpoint={missing}"), tmp_path / "out")
    _, found = runs(tmp_path)
    (run,) = found
    assert run.info.status == "FAILED" and "nope.pth" in run.data.tags["error"]


def test_analyze_mode_writes_and_logs_plots(tmp_path, digits_vit):
    result = app.run(compose_cfg(tmp_path, "mode=analyze", "analysis.w_bits=2"), tmp_path / "out")
    assert {"weight_box", "input_box_fliers", "histograms", "sensitivity_plot", "sensitivity_csv"} <= set(result["analysis"])
    assert all(Path(p).stat().st_size > 1000 for p in result["analysis"].values())
    assert not (tmp_path / "out" / "quantized.pt2").exists()  # analysis only: nothing quantized or exported
    client, found = runs(tmp_path)
    (run,) = found
    names = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert "analysis/sensitivity.png" in names or any(n.endswith(".png") for n in names)


def test_int_backend_run_matches_fake(tmp_path, digits_vit):
    fake = app.run(compose_cfg(tmp_path, "tracking.enabled=false", "export.enabled=false", "eval.backend=fake"),
                   tmp_path / "fake")
    # auto picks the integer kernels when no artifact has to be matched bit for bit
    real = app.run(compose_cfg(tmp_path, "tracking.enabled=false", "export.enabled=false"), tmp_path / "int")
    # The same codes up to rare one-step flips at rounding ties (tests/test_intkernel.py): top-1 moves at most
    # by the share of images whose predictions differ, which test_intkernel bounds at 1 %.
    assert abs(real["top1"] - fake["top1"]) <= 1.0 and real["int_fallback_layers"] == 0
    assert "int_fallback_layers" not in fake
    with pytest.raises(ConfigError, match=r"eval.backend='float'"):
        app.run(compose_cfg(tmp_path, "eval.backend=float"), tmp_path / "bad")
