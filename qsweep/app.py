"""The single-run pipeline: build -> quantize -> evaluate -> export -> score -> record."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import qsweep
from qsweep.analysis import analyze
from qsweep.config import validate
from qsweep.data import DataBundle, build_data, calibration_batches, eval_loader
from qsweep.evaluate import EvalResult, cached_fp_eval, evaluate, model_fingerprint
from qsweep.export import artifact_size_mb, export_program, export_pte, load_program, state_dict_size_mb
from qsweep.lab_eval import lab_eval
from qsweep.models import build_model
from qsweep.models.cache import cache_dir as resolve_cache_dir
from qsweep.quant.calibrate import QuantizeTimings, quantize
from qsweep.quant.intkernel import to_int_backend
from qsweep.report import average_weight_bits, format_table, layer_table, write_csv
from qsweep.score import compute_score
from qsweep.tracking import Recorder, flatten, git_commit

PROJECT_DIR = Path.cwd()


class ArtifactMismatch(RuntimeError):
    """The exported artifact does not reproduce the in-process accuracy."""


@dataclass
class RunContext:
    cfg: DictConfig
    output_dir: Path
    recorder: Recorder | None


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: DictConfig, output_dir: str | Path, parent_run_id: str | None = None,
        sweep: str | None = None) -> dict[str, Any]:
    """Run one quantization job (or, with ``mode=search``, a study); returns the result dict.

    The config is validated before anything is built. A failure after the MLflow run started
    marks that run FAILED with the reason, then re-raises. ``parent_run_id`` nests the run under
    another (a study's); ``sweep`` (a Hydra multirun's directory) nests it under that sweep's run.
    """
    cfg = validate(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "search":
        from qsweep.search import run_search

        return run_search(cfg, output_dir, PROJECT_DIR, sweep=sweep)
    recorder, sweep_run = None, None
    if cfg.tracking.enabled:
        recorder = Recorder.for_project(cfg.tracking.uri, cfg.tracking.experiment, PROJECT_DIR)
        if sweep is not None and parent_run_id is None:
            parent_run_id = sweep_run = recorder.sweep_parent(sweep, cfg.experiment)
        recorder.start(cfg.tracking.run_name or f"{cfg.experiment}:{cfg.model.name}:{cfg.quant.name}",
                       run_tags(cfg), parent_run_id=parent_run_id)
        recorder.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    try:
        result = _pipeline(RunContext(cfg, output_dir, recorder))
    except BaseException as exc:
        if recorder is not None:
            recorder.finish(error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if sweep_run is not None:
            recorder.close_parent(sweep_run)
    if recorder is not None:
        recorder.finish()
    return result


def run_tags(cfg: DictConfig) -> dict[str, str]:
    return {"model": cfg.model.name, "data": cfg.data.name, "experiment": cfg.experiment, "recipe": cfg.quant.name,
            "git_commit": git_commit(PROJECT_DIR), "qsweep_version": qsweep.__version__}


@dataclass
class Prepared:
    """What every job builds before quantizing: data, the float model and its accuracy, calibration."""

    bundle: DataBundle
    model: torch.nn.Module
    weights: str
    loader: DataLoader
    fp: EvalResult
    fp_size_mb: float
    fp_key: str
    calib: list
    device: torch.device


def prepare_job(cfg: DictConfig, rec: Recorder | None) -> Prepared:
    """Build data and model, measure the float model (cached), draw the calibration batches."""
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    cache = resolve_cache_dir(cfg.cache_dir)
    bundle = build_data(cfg.data)
    model, weights = build_model(cfg.model, bundle, cache, progress=cfg.progress)
    if rec is not None:
        rec.set_tags({"weights": weights})
    model = model.to(device).eval()
    loader = eval_loader(bundle, cfg.data)
    fp_key = f"{model_fingerprint(model)}-{bundle.fingerprint}-{cfg.data.max_eval_images}"
    fp, _ = cached_fp_eval(model, loader, bundle.num_classes, cache, fp_key, device, cfg.progress)
    return Prepared(bundle, model, weights, loader, fp, state_dict_size_mb(model), fp_key,
                    calibration_batches(bundle, cfg.quant.calib), device)


def _pipeline(ctx: RunContext) -> dict[str, Any]:
    cfg, out, rec = ctx.cfg, ctx.output_dir, ctx.recorder
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    job = prepare_job(cfg, rec)
    bundle, model, weights, loader, fp, device = job.bundle, job.model, job.weights, job.loader, job.fp, job.device
    fp_size_mb, fp_key, calib = job.fp_size_mb, job.fp_key, job.calib
    if cfg.mode == "analyze":
        return {"analysis": _analysis(ctx, model, bundle, loader, calib, fp_key), "output_dir": str(out),
                "weights": weights, "fp_top1": fp.top1, "mlflow_run_id": rec.run_id if rec else None}

    timings = QuantizeTimings()
    qmodel = quantize(model, cfg.quant, calib, progress=cfg.progress, timings=timings, adaround=cfg.adaround,
                      lsq=cfg.lsq)
    backend = cfg.eval.backend
    if backend == "auto":
        backend = "fake" if cfg.export.enabled else "int"
    if rec is not None:
        rec.set_tags({"eval_backend": backend})
        if timings.post_ln_skipped:
            rec.set_tags({"post_ln_skipped": "; ".join(f"{k}: {v}" for k, v in timings.post_ln_skipped.items())})
    fallbacks: dict[str, str] = {}
    runner = qmodel
    if backend == "int":
        runner, fallbacks = to_int_backend(qmodel)
        if rec is not None and fallbacks:
            rec.set_tags({"int_fallbacks": "; ".join(f"{k}: {v}" for k, v in fallbacks.items())})
    q = evaluate(runner, loader, bundle.num_classes, device, cfg.progress, desc=f"evaluate quantized ({backend})")
    del runner

    rows = layer_table(qmodel)
    artifact = None
    if cfg.export.enabled:
        example = next(iter(loader))[0]
        artifact = export_program(qmodel, example, out / cfg.export.filename)
        loaded = load_program(artifact)
        size_mb = state_dict_size_mb(loaded)
        check = evaluate(loaded, loader, bundle.num_classes, "cpu", cfg.progress, desc="evaluate artifact")
        if cfg.export.pte:
            pte = export_pte(qmodel, example, artifact.with_suffix(".pte"), cfg.export.pte_max_batch)
            if rec is not None and cfg.tracking.log_model:
                rec.log_artifact(pte, "model")
    else:
        size_mb, check = artifact_size_mb(qmodel), None

    score = compute_score(cfg.score.name, size_mb, q.top1, fp_size_mb, fp.top1,
                          cfg.score.ref_size_mb, cfg.score.ref_acc)
    metrics = {
        "top1": q.top1, "top5": q.top5, "fp_top1": fp.top1, "fp_top5": fp.top5, "delta_top1": q.top1 - fp.top1,
        "size_mb": size_mb, "fp32_size_mb": fp_size_mb, "compression": fp_size_mb / size_mb,
        "avg_weight_bits": average_weight_bits(rows), "score": score,
        "calibration_s": timings.calibrate_s, "quantization_s": timings.quantize_s,
        "reconstruction_s": timings.reconstruct_s, "eval_s": q.seconds,
        "eval_images": q.images, "peak_rss_mb": peak_rss_mb(),
    }
    if backend == "int":
        metrics["int_fallback_layers"] = len(fallbacks)
    if check is not None:
        metrics["artifact_top1"] = check.top1
    if artifact is not None and cfg.score.name == "lab4" and cfg.data.name == "cifar100":
        # The grader's own procedure on the artifact: batch 1, mini test set, its size measure.
        graded = lab_eval(artifact, cfg.data.root, per_class=cfg.data.per_class, image_size=cfg.data.image_size,
                          progress=cfg.progress)
        metrics.update(lab_score=graded["score"], lab_top1=graded["acc"], lab_size_mb=graded["size_mb"],
                       lab_eval_s=graded["seconds"])
    if device.type == "cuda":
        metrics["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    table_path = write_csv(rows, out / "layers.csv")
    result = {**metrics, "artifact": str(artifact) if artifact else None, "weights": weights,
              "mlflow_run_id": rec.run_id if rec else None, "mlflow_uri": rec.uri if rec else None,
              "output_dir": str(out)}
    if cfg.analysis.enabled:
        result["analysis"] = _analysis(ctx, model, bundle, loader, calib, fp_key)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if rec is not None:
        rec.log_metrics(metrics)
        for path in (out / "config.yaml", table_path, out / "result.json"):
            rec.log_artifact(path)
        if artifact is not None and cfg.tracking.log_model:
            rec.log_artifact(artifact, "model")
    _print_summary(cfg, result, weights)
    # The artifact computes the fake-quant grid: it must reproduce a fake-backend evaluation
    # exactly. The int backend may differ on an input whose activation code sits on a rounding tie.
    if check is not None and check.top1 != q.top1 and backend == "fake":
        raise ArtifactMismatch(f"exported artifact {artifact} scores top-1 {check.top1:.4f} % but the "
                               f"in-process model scored {q.top1:.4f} %")
    return result


def _analysis(ctx: RunContext, model, bundle, loader, calib, fp_key: str) -> dict[str, str]:
    """Box plots, histograms and per-layer sensitivity into ``<run dir>/analysis`` and MLflow."""
    cfg, a = ctx.cfg, ctx.cfg.analysis
    # The sensitivity cache key must change with everything that changes the table.
    data_key = f"{fp_key}-calib{cfg.quant.calib.num_images}x{cfg.quant.calib.batch_size}-seed{cfg.quant.calib.seed}"
    paths = analyze(model, calib, loader, bundle.num_classes, ctx.output_dir / "analysis", cfg.quant,
                    resolve_cache_dir(cfg.cache_dir), data_key, a.histogram_layers, cfg.progress,
                    w_bits=a.w_bits, a_bits=a.a_bits, max_samples=a.max_samples)
    if ctx.recorder is not None:
        for path in paths.values():
            ctx.recorder.log_artifact(path, "analysis")
    print(f"analysis written to {ctx.output_dir / 'analysis'} ({len(paths)} files)", flush=True)
    return {name: str(path) for name, path in paths.items()}


def _print_summary(cfg: DictConfig, r: dict[str, Any], weights: str) -> None:
    rows = [
        ("model", f"{cfg.model.name} ({weights})"), ("data", cfg.data.name), ("recipe", cfg.quant.name),
        ("top-1", f"{r['top1']:.2f} %  (FP32 {r['fp_top1']:.2f} %, delta {r['delta_top1']:+.2f})"),
        ("top-5", f"{r['top5']:.2f} %"),
        ("size", f"{r['size_mb']:.4f} MB  (FP32 {r['fp32_size_mb']:.4f} MB, {r['compression']:.2f}x)"),
        ("avg weight bits", f"{r['avg_weight_bits']:.2f}"),
        (f"score ({cfg.score.name})", f"{r['score']:g}"),
        *([("lab grader", f"score {r['lab_score']:g}, top-1 {r['lab_top1']:.2f} %, {r['lab_size_mb']:.4f} MB, "
                          f"{r['lab_eval_s']:.1f} s")] if "lab_score" in r else []),
        ("artifact", str(r["artifact"])), ("result", str(Path(r["output_dir"]) / "result.json")),
    ]
    if r["mlflow_run_id"]:
        rows.append(("mlflow", f"run {r['mlflow_run_id']} at {r['mlflow_uri']}"))
    print("\nqsweep result\n" + format_table(rows), flush=True)
