"""The public verb: fold BN, plan, swap in quantized modules, calibrate, freeze."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qsweep.config import quant_recipe
from qsweep.quant.fold import fold_batchnorm
from qsweep.quant.modules import QuantLayer, quant_module_for
from qsweep.quant.plan import resolve_plan
from qsweep.quant.quantizer import CalibrationError


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch given as a tensor, a tuple/list (positional) or a dict (keywords)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"calibration batch of type {type(batch).__name__}: give tensors, tuples or dicts")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


@dataclass
class QuantizeTimings:
    quantize_s: float = 0.0  # BN folding, planning, weight quantization
    calibrate_s: float = 0.0  # activation observation over the calibration batches
    folded_bn: list[str] = field(default_factory=list)


def prepare(model: nn.Module, recipe: Any, first_batch: Any) -> list[str]:
    """Fold BN and swap every planned module for its quantized form (weights quantized here, once)."""
    recipe = quant_recipe(recipe)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    folded = fold_batchnorm(model, lambda: call_model(model, to_device(first_batch, device))) if recipe.fold_bn else []
    for name, layer_plan in resolve_plan(model, recipe).items():
        model.set_submodule(name, quant_module_for(model.get_submodule(name), layer_plan))
    return folded


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], progress: bool = False, seed: int = 0) -> int:
    """Observe input activations over ``batches`` and freeze their qparams; returns batches seen."""
    layers = [m.act for m in quant_layers(model).values() if m.act is not None]
    for i, act in enumerate(layers):
        act.start_observing(seed=seed + i)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            call_model(model, to_device(batch, device))
            seen += 1
    except CalibrationError as exc:
        raise CalibrationError(f"batch {seen}: {exc}") from None
    if seen == 0 and layers:
        raise CalibrationError("calibration got no batches: give at least one calibration batch")
    for act in layers:
        act.freeze()
    return seen


def quantize(model: nn.Module, recipe: Any, calib_batches: Iterable[Any], *, inplace: bool = False,
             progress: bool = False, timings: QuantizeTimings | None = None) -> nn.Module:
    """Quantize ``model`` with a ``conf/quant``-shaped ``recipe`` calibrated on ``calib_batches``.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` and ``nn.Conv2d`` layers are quantized.
        recipe: dict, DictConfig or :class:`qsweep.config.QuantConfig`; missing keys take defaults.
        calib_batches: tensors, tuples (positional args) or dicts (keyword args).
        inplace: modify ``model`` instead of a deep copy.
        progress: show a progress bar over calibration.
        timings: filled with the seconds spent quantizing and calibrating.

    Returns:
        The model in eval mode with quantized modules (:class:`qsweep.quant.modules.QuantLayer`).
    """
    recipe = quant_recipe(recipe)
    batches = list(calib_batches)
    if not batches:
        raise CalibrationError("calibration got no batches: give at least one calibration batch")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    timings = timings if timings is not None else QuantizeTimings()
    start = time.perf_counter()
    timings.folded_bn = prepare(model, recipe, batches[0])
    timings.quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(model, batches, progress=progress, seed=int(recipe.calib.seed))
    timings.calibrate_s = time.perf_counter() - start
    return model
