"""The single-run pipeline: build -> quantize -> evaluate -> export -> score -> record."""

from __future__ import annotations

import json
import resource
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qsweep.analysis import analyze
from qsweep.analysis.tables import write_csv
from qsweep.config import validate
from qsweep.evaluate import EvalResult, evaluate
from qsweep.export import artifact_size_mb, export_program, export_pte, load_program, state_dict_size_mb
from qsweep.files import write_text
from qsweep.job import PROJECT_DIR, Prepared, check_environment, prepare_job, record_failure, run_tags
from qsweep.lab_eval import lab_eval
from qsweep.lineage import MODEL_METRICS, MODEL_TYPES, EvalData, eval_data, model_name
from qsweep.models.cache import cache_dir as resolve_cache_dir
from qsweep.onnx_export import export_onnx, onnx_filename
from qsweep.onnx_runtime import OnnxEval, evaluate_onnx
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.pipeline import quantize
from qsweep.quant.intkernel import to_int_backend
from qsweep.report import average_weight_bits, format_table, layer_table
from qsweep.run_params import run_params
from qsweep.score import compute_score
from qsweep.tracking import OUTPUT_DIR_TAG, NullRecorder, Recorder


class ArtifactMismatch(RuntimeError):
    """The exported artifact does not reproduce the in-process accuracy."""


class OnnxMismatch(RuntimeError):
    """ONNX Runtime's predictions on the exported ONNX file differ from the int backend's beyond the tolerance."""


@dataclass
class RunContext:
    cfg: DictConfig
    output_dir: Path
    recorder: Recorder | NullRecorder
    data: EvalData | None = None  # the evaluated images, once the data is built
    onnx: OnnxEval | None = None  # eval.backend=onnxruntime: ORT on the written ONNX file, against int
    onnx_path: Path | None = None


@dataclass
class Exported:
    """The artifact as the grader sees it: its path, size and accuracy (None when export is off)."""

    path: Path | None
    size_mb: float
    check: EvalResult | None


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run(cfg: DictConfig, output_dir: str | Path, parent_run_id: str | None = None,
        sweep: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run one quantization job (``mode=run`` or ``analyze``); returns the result dict.

    The config is validated and the machine checked before anything is built. Any failure marks
    the run FAILED (KILLED if interrupted) in MLflow with the reason, writes it to ``error.txt`` in
    the run's folder, then re-raises; a refused config is recorded too, unless tracking itself is
    what cannot be used. ``parent_run_id`` nests the run under another (a study's); ``sweep`` (a
    Hydra multirun's directory) nests it under that sweep's run. ``overrides`` (the command line's) are
    recorded as params beside the recipe's.
    """
    output_dir = Path(output_dir)
    rec: Recorder | NullRecorder = NullRecorder()
    try:
        try:
            checked = validate(cfg)
            check_environment(checked, output_dir)
        except Exception:
            rec = record_refused(cfg, output_dir, parent_run_id, sweep, overrides)
            raise
        rec = _open_recorder(checked)
        _start_run(rec, checked, output_dir, parent_run_id, sweep, overrides)
        result = _pipeline(RunContext(checked, output_dir, rec))
        rec.finish()
    except BaseException as exc:
        record_failure(output_dir, rec, exc)
        raise
    return result


def _open_recorder(cfg: DictConfig) -> Recorder | NullRecorder:
    if not cfg.tracking.enabled:
        return NullRecorder()
    return Recorder.for_project(cfg.tracking.uri, cfg.tracking.experiment, PROJECT_DIR)


def _start_run(rec: Recorder | NullRecorder, cfg: DictConfig, output_dir: Path, parent_run_id: str | None,
               sweep: str | None, overrides: Sequence[str]) -> None:
    """Start ``rec``'s run tagged, with the recipe and the overridden keys as params (``rec`` knows its run once
    created); the whole config is the run's ``config.yaml`` artifact."""
    if sweep is not None and parent_run_id is None:
        parent_run_id = rec.sweep_parent(sweep, cfg.name)
    rec.start(cfg.tracking.run_name or f"{cfg.name}:{cfg.model.name}:{cfg.quant.name}",
              {**run_tags(cfg), OUTPUT_DIR_TAG: str(output_dir.resolve())}, parent_run_id=parent_run_id)
    rec.log_params(run_params(cfg, overrides))


def record_refused(cfg: DictConfig, output_dir: Path, parent_run_id: str | None,
                    sweep: str | None, overrides: Sequence[str]) -> Recorder | NullRecorder:
    """A run for a config that was refused before recording began, with the params that can be read.

    Best effort: when the tracking config itself cannot be used, or a value cannot be read, the
    refusal being raised is what the user must see, so a failure here is dropped.
    """
    rec: Recorder | NullRecorder = NullRecorder()
    with suppress(Exception):
        rec = _open_recorder(cfg)
        _start_run(rec, cfg, output_dir, parent_run_id, sweep, overrides)
    return rec


def _pipeline(ctx: RunContext) -> dict[str, Any]:
    cfg, out = ctx.cfg, ctx.output_dir
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    job = prepare_job(cfg, ctx.recorder)
    ctx.data = eval_data(job.bundle, cfg.data, len(job.loader.dataset))
    ctx.recorder.log_input(ctx.data)
    if cfg.mode == "analyze":
        return {"analysis": _analysis(ctx, job), "output_dir": str(out), "weights": job.weights,
                "fp_top1": job.fp.top1, "mlflow_run_id": ctx.recorder.run_id}
    timings = QuantizeTimings()
    qmodel = quantize(job.model, cfg.quant, job.calib, progress=cfg.progress, timings=timings,
                      adaround=cfg.adaround, lsq=cfg.lsq)
    if timings.mixed:
        _record_mixed(ctx, timings.mixed)
    backend, q, fallbacks = _evaluate_quantized(ctx, job, qmodel, timings)
    exported = _export(ctx, job, qmodel)
    rows = layer_table(qmodel)
    metrics = _metrics(cfg, job, q, exported, rows, timings)
    if backend in ("int", "onnxruntime"):
        metrics["int_fallback_layers"] = len(fallbacks)
    if ctx.onnx is not None:
        metrics.update(int_top1=ctx.onnx.int_result.top1, onnx_agreement=ctx.onnx.agreement,
                       onnx_size_mb=ctx.onnx_path.stat().st_size / 1e6)
    metrics.update(_lab_grade(cfg, exported))
    result = _record(ctx, job, metrics, rows, exported)
    _print_summary(cfg, result, job.weights)
    # Validation makes the evaluated backend the artifact's own kernels: it must score the same.
    if exported.check is not None and exported.check.top1 != q.top1:
        raise ArtifactMismatch(f"exported artifact {exported.path} scores top-1 {exported.check.top1:.4f} % but "
                               f"the in-process model scored {q.top1:.4f} %")
    if ctx.onnx is not None and ctx.onnx.disagreements > ctx.onnx.allowed:
        raise OnnxMismatch(f"ONNX Runtime on {ctx.onnx_path} predicts another top-1 class than the int backend on "
                           f"{ctx.onnx.disagreements} of {ctx.onnx.images} images (allowed: {ctx.onnx.allowed}); "
                           f"top-1 {q.top1:.2f} % against {ctx.onnx.int_result.top1:.2f} %")
    return result


def _record_mixed(ctx: RunContext, mixed: dict[str, Any]) -> None:
    """quant.mixed's chosen widths: ``mixed.json`` in the run folder and as an artifact, a tag counting the widths."""
    path = write_text(ctx.output_dir / "mixed.json", json.dumps(mixed, indent=1))
    ctx.recorder.log_artifact(path)
    counts = Counter("float" if b is None else f"W{b}" for b in mixed["widths"].values())
    ctx.recorder.set_tags({"mixed_widths": ", ".join(f"{w}: {counts[w]}" for w in sorted(counts, key=len))})
    ctx.recorder.log_metrics({"mixed_budget_mb": mixed["budget_bytes"] / 1e6, "mixed_s": mixed["seconds"]})


def _evaluate_quantized(ctx: RunContext, job: Prepared, qmodel: torch.nn.Module,
                        timings: QuantizeTimings) -> tuple[str, EvalResult, dict[str, str]]:
    """Top-1 of the quantized model on the configured backend: ``(backend, result, int fallbacks)``.

    ``onnxruntime`` writes the ONNX file first (the export step of ``export.format=onnx``) and evaluates it,
    and the int backend beside it (``ctx.onnx``: the agreement the run is checked by)."""
    cfg, rec = ctx.cfg, ctx.recorder
    backend = cfg.eval.backend
    if backend == "auto":
        artifact = "onnxruntime" if cfg.export.format == "onnx" else cfg.export.kernels
        backend = artifact if cfg.export.enabled else "int"
    rec.set_tags({"eval_backend": backend, "export_kernels": cfg.export.kernels})
    for tag, skipped in (("post_ln_skipped", timings.post_ln_skipped), ("attn_skipped", timings.attn_skipped)):
        if skipped:
            rec.set_tags({tag: "; ".join(f"{k}: {v}" for k, v in skipped.items())})
    fallbacks: dict[str, str] = {}
    runner = qmodel
    if backend in ("int", "onnxruntime"):  # onnxruntime: the reference ORT's predictions are checked against
        runner, fallbacks = to_int_backend(qmodel)
        if fallbacks:
            rec.set_tags({"int_fallbacks": "; ".join(f"{k}: {v}" for k, v in fallbacks.items())})
    if backend == "onnxruntime":
        example = next(iter(job.loader))[0]
        ctx.onnx_path = export_onnx(qmodel, example, ctx.output_dir / onnx_filename(cfg.export.filename))
        ctx.onnx = evaluate_onnx(ctx.onnx_path, runner, job.loader, job.bundle.num_classes, job.device, cfg.progress)
        return backend, ctx.onnx.result, fallbacks
    q = evaluate(runner, job.loader, job.bundle.num_classes, job.device, cfg.progress,
                 desc=f"evaluate quantized ({backend})")
    return backend, q, fallbacks


def _export(ctx: RunContext, job: Prepared, qmodel: torch.nn.Module) -> Exported:
    """Write the artifact, load it back as the grader does, and measure its size and accuracy."""
    cfg = ctx.cfg
    if not cfg.export.enabled:
        return Exported(None, artifact_size_mb(qmodel, cfg.export.kernels), None)
    if cfg.export.format == "onnx":  # written and evaluated already; the size is the packed artifact's
        return Exported(ctx.onnx_path, artifact_size_mb(qmodel, cfg.export.kernels), ctx.onnx.result)
    example = next(iter(job.loader))[0]
    path = export_program(qmodel, example, ctx.output_dir / cfg.export.filename, cfg.export.kernels)
    loaded = load_program(path)
    check = evaluate(loaded, job.loader, job.bundle.num_classes, "cpu", cfg.progress, desc="evaluate artifact")
    if cfg.export.pte:
        pte = export_pte(qmodel, example, path.with_suffix(".pte"), cfg.export.pte_max_batch)
        if cfg.tracking.log_model:
            ctx.recorder.log_artifact(pte, "model")
    return Exported(path, state_dict_size_mb(loaded), check)


def _metrics(cfg: DictConfig, job: Prepared, q: EvalResult, exported: Exported, rows: list[dict],
             timings: QuantizeTimings) -> dict[str, float]:
    fp, size_mb = job.fp, exported.size_mb
    metrics = {
        "top1": q.top1, "top5": q.top5, "fp_top1": fp.top1, "fp_top5": fp.top5, "delta_top1": q.top1 - fp.top1,
        "size_mb": size_mb, "fp32_size_mb": job.fp_size_mb, "compression": job.fp_size_mb / size_mb,
        "avg_weight_bits": average_weight_bits(rows),
        "score": compute_score(cfg.score.name, size_mb, q.top1, job.fp_size_mb, fp.top1, cfg.score.ref_size_mb,
                               cfg.score.ref_acc),
        "calibration_s": timings.calibrate_s, "quantization_s": timings.quantize_s,
        "reconstruction_s": timings.reconstruct_s, "eval_s": q.seconds, "eval_images": q.images,
        "peak_rss_mb": peak_rss_mb(),
    }
    if exported.check is not None:
        metrics["artifact_top1"] = exported.check.top1
    if job.device.type == "cuda":
        metrics["peak_cuda_mb"] = torch.cuda.max_memory_allocated(job.device) / 2**20
    return metrics


def _lab_grade(cfg: DictConfig, exported: Exported) -> dict[str, float]:
    """The grader's own procedure on the artifact (batch 1, mini test set, its size), for the lab's setting."""
    lab = cfg.score.name == "lab4" and cfg.data.name == "cifar100"
    if exported.path is None or cfg.export.format != "torch" or not lab:
        return {}
    graded = lab_eval(exported.path, cfg.data.root, per_class=cfg.data.per_class, image_size=cfg.data.image_size,
                      progress=cfg.progress)
    return {"lab_score": graded["score"], "lab_top1": graded["acc"], "lab_size_mb": graded["size_mb"],
            "lab_eval_s": graded["seconds"]}


def _record(ctx: RunContext, job: Prepared, metrics: dict[str, float], rows: list[dict],
            exported: Exported) -> dict[str, Any]:
    """``layers.csv``, ``result.json`` (and the analysis if asked) in the run's folder and in MLflow."""
    cfg, out, rec = ctx.cfg, ctx.output_dir, ctx.recorder
    table_path = write_csv(rows, out / "layers.csv")
    result = {**metrics, "artifact": str(exported.path) if exported.path else None, "weights": job.weights,
              "mlflow_run_id": rec.run_id, "mlflow_uri": rec.uri, "mlflow_runs_url": rec.runs_url(),
              "output_dir": str(out)}
    if cfg.analysis.enabled:
        result["analysis"] = _analysis(ctx, job)
    model_id = _log_model(ctx, exported)
    result["mlflow_model_id"] = model_id
    write_text(out / "result.json", json.dumps(result, indent=2))
    of_model = {k: v for k, v in metrics.items() if k in MODEL_METRICS}
    rec.log_metrics(of_model, model_id=model_id, data=ctx.data)
    rec.log_metrics({k: v for k, v in metrics.items() if k not in of_model})
    for path in (out / "config.yaml", table_path, out / "result.json"):
        rec.log_artifact(path)
    return result


def _log_model(ctx: RunContext, exported: Exported) -> str | None:
    """The artifact (and its ``.pte``) as the run's logged model, with the recipe's params; its metrics follow."""
    cfg = ctx.cfg
    if exported.path is None or not cfg.tracking.log_model:
        return None
    files = [exported.path, *([exported.path.with_suffix(".pte")] if cfg.export.pte else [])]
    ctx.recorder.log_artifact(exported.path, "model")
    return ctx.recorder.log_model(model_name(cfg.model.name, cfg.quant.name), files, run_params(cfg),
                                  MODEL_TYPES[cfg.export.format])


def _analysis(ctx: RunContext, job: Prepared) -> dict[str, str]:
    """Box plots, histograms and per-layer sensitivity into ``<run dir>/analysis`` and MLflow."""
    cfg, a = ctx.cfg, ctx.cfg.analysis
    # The sensitivity cache key must change with everything that changes the table.
    data_key = f"{job.fp_key}-calib{cfg.quant.calib.num_images}x{cfg.quant.calib.batch_size}-seed{cfg.quant.calib.seed}"
    paths = analyze(job.model, job.calib, job.loader, job.bundle.num_classes, ctx.output_dir / "analysis", cfg.quant,
                    resolve_cache_dir(cfg.cache_dir), data_key, a.histogram_layers, cfg.progress,
                    w_bits=a.w_bits, a_bits=a.a_bits, max_samples=a.max_samples)
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
        *([("onnxruntime", f"same top-1 as int on {r['onnx_agreement']:.2f} % of images (int top-1 "
                            f"{r['int_top1']:.2f} %); file {r['onnx_size_mb']:.4f} MB")]
          if "onnx_agreement" in r else []),
        ("artifact", str(r["artifact"])), ("result", str(Path(r["output_dir"]) / "result.json")),
    ]
    if r["mlflow_run_id"]:
        rows.append(("mlflow", f"run {r['mlflow_run_id']} at {r['mlflow_uri']}"))
        if r.get("mlflow_model_id"):
            rows.append(("mlflow model", f"models:/{r['mlflow_model_id']}"))
        rows.append(("runs table", r["mlflow_runs_url"]))
    print("\nqsweep result\n" + format_table(rows), flush=True)
