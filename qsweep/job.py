"""What a run and a study's worker share: checks before any work, the prepared float job, tags, failure records."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import qsweep
from qsweep.data import DataBundle, build_data, calibration_batches, eval_loader
from qsweep.errors import Interrupted, QsweepError, interruption_taken
from qsweep.evaluate import EvalResult, cached_fp_eval, model_fingerprint
from qsweep.export import state_dict_size_mb
from qsweep.files import ensure_writable, write_failure
from qsweep.hydra_callbacks import FAILED_FILE
from qsweep.models import build_model
from qsweep.models.cache import cache_dir as resolve_cache_dir
from qsweep.tracking import NullRecorder, Recorder, git_commit

PROJECT_DIR = Path.cwd()


class EnvironmentCheckError(QsweepError):
    """The config asks for something this machine does not have (checked before any work)."""


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_environment(cfg: DictConfig, output_dir: Path) -> None:
    """What the job will need from this machine, checked before anything is built or recorded."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EnvironmentCheckError("device='cuda' but this torch sees no CUDA GPU "
                                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                                    "use device=cpu or device=auto")
    if cfg.export.enabled and cfg.export.pte:
        try:
            import executorch.exir  # noqa: F401 - only whether it imports
        except ImportError:
            raise EnvironmentCheckError("export.pte=true needs ExecuTorch: pip install -e '.[executorch]' "
                                        "(or export.pte=false)") from None
    if cfg.export.enabled and cfg.export.format == "onnx":
        try:
            import onnx  # noqa: F401 - only whether they import
            import onnxruntime  # noqa: F401
        except ImportError:
            raise EnvironmentCheckError("export.format=onnx needs onnx and ONNX Runtime: pip install -e '.[onnx]' "
                                        "(or export.format=torch)") from None
    ensure_writable(output_dir, "hydra.run.dir (the run's output folder)")
    ensure_writable(resolve_cache_dir(cfg.cache_dir), "cache_dir")


def check_finite(model: torch.nn.Module, weights: str) -> None:
    """NaN or inf in the float weights would quantize to garbage: name the tensor and the file."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise QsweepError(f"{weights}: tensor {name!r} holds {bad} NaN or infinite values of {tensor.numel()}; "
                              "the checkpoint is damaged or was saved after a diverged training step")


def run_tags(cfg: DictConfig) -> dict[str, str]:
    return {"model": cfg.model.name, "data": cfg.data.name, "experiment": cfg.name, "recipe": cfg.quant.name,
            "git_commit": git_commit(PROJECT_DIR), "qsweep_version": qsweep.__version__}


def record_failure(output_dir: Path, rec: Recorder | NullRecorder, exc: BaseException) -> None:
    """The job's folder and MLflow run say it holds no result, and why (KILLED if interrupted).

    The folder is written first: if the store fails too, a later run's check for dead processes
    finds the reason there and marks the run FAILED with it.
    """
    if isinstance(exc, Interrupted):
        interruption_taken()
    reason = f"{type(exc).__name__}: {exc}"
    # Bad input needs no traceback; a bug or a library's failure does.
    details = "" if isinstance(exc, (QsweepError, KeyboardInterrupt)) else "".join(traceback.format_exception(exc))
    write_failure(output_dir, reason, details)
    if rec.run_id is None:
        return
    try:
        rec.finish(error=reason, killed=isinstance(exc, KeyboardInterrupt))
    except Exception as lost:  # noqa: BLE001 - the run's own error is the one to raise
        write_failure(output_dir, reason, f"not recorded in MLflow: {type(lost).__name__}: {lost}\n\n{details}")


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


def prepare_job(cfg: DictConfig, rec: Recorder | NullRecorder) -> Prepared:
    """Build data and model, measure the float model (cached), draw the calibration batches."""
    torch.manual_seed(cfg.seed)
    device = device_of(cfg.device)
    cache = resolve_cache_dir(cfg.cache_dir)
    bundle = build_data(cfg.data)
    model, weights = build_model(cfg.model, bundle, cache, progress=cfg.progress)
    check_finite(model, weights)
    rec.set_tags({"weights": weights})
    model = model.to(device).eval()
    loader = eval_loader(bundle, cfg.data)
    fp_key = f"{model_fingerprint(model)}-{bundle.fingerprint}-{cfg.data.max_eval_images}"
    fp, _ = cached_fp_eval(model, loader, bundle.num_classes, cache, fp_key, device, cfg.progress)
    return Prepared(bundle, model, weights, loader, fp, state_dict_size_mb(model), fp_key,
                    calibration_batches(bundle, cfg.quant.calib), device)
