"""The public verb: fold BN, plan, swap in quantized modules, calibrate, freeze."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from qsweep.config import AdaRoundConfig, LSQConfig, gptq_replaced_by, quant_recipe, validate_adaround, validate_lsq
from qsweep.quant.fold import fold_batchnorm
from qsweep.quant.intops import apply_intops
from qsweep.quant.modules import QuantLayer, QuantLinear, quant_module_for
from qsweep.quant.plan import resolve_plan
from qsweep.quant.quantizer import ActQuantizer, CalibrationError
from qsweep.quant.smooth import smooth_linears
from qsweep.quant.vit import apply_vit


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
    reconstruct_s: float = 0.0  # GPTQ, AdaRound and LSQ
    reconstruct: dict[str, Any] = field(default_factory=dict)  # their statistics: {"gptq": ..., "lsq": ...}
    folded_bn: list[str] = field(default_factory=list)
    post_ln_skipped: dict[str, str] = field(default_factory=dict)  # quant.vit.post_ln: LayerNorm -> why not folded
    smooth: dict[str, Any] = field(default_factory=dict)  # quant.smooth: the alpha chosen per layer


def prepare(model: nn.Module, recipe: Any, batches: Sequence[Any],
            smoothing: Mapping[str, torch.Tensor | None] | None = None,
            report: QuantizeTimings | None = None) -> None:
    """Fold BN, apply ``quant.vit`` / ``quant.intops`` / ``quant.smooth`` and swap in the quantized modules.

    ``batches`` (the calibration batches) drive BN folding (the first one), the ``quant.vit.post_ln``
    statistics and the ``quant.smooth`` search (all), float rewrites done before the weights are
    quantized here, once. The ViT and integer-op modules are installed before the swap and keep every
    module name the plan uses. ``smoothing``: per-layer scales chosen before (see
    :func:`qsweep.quant.smooth.input_divisors`) instead of searching them. ``report`` receives the
    folded BatchNorm names, the LayerNorms ``post_ln`` left alone and the ``alpha`` chosen per smoothed layer.
    """
    report = report if report is not None else QuantizeTimings()
    recipe = quant_recipe(recipe)
    batches = list(batches)
    if not batches:
        raise CalibrationError("prepare got no batches: give at least one calibration batch")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(limit: int | None = None) -> None:
        for batch in batches[:limit]:
            call_model(model, to_device(batch, device))

    folded = fold_batchnorm(model, lambda: run(1)) if recipe.fold_bn else []
    report.post_ln_skipped = apply_vit(model, recipe, run)
    apply_intops(model, recipe)
    plans = resolve_plan(model, recipe)
    alphas = smooth_linears(model, plans, recipe, run, smoothing) if recipe.smooth.enabled else {}
    for name, layer_plan in plans.items():
        model.set_submodule(name, quant_module_for(model.get_submodule(name), layer_plan))
    report.folded_bn, report.smooth = folded, alphas


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], progress: bool = False, seed: int = 0) -> int:
    """Observe activations over ``batches`` and freeze the qparams of every ActQuantizer; returns batches seen."""
    layers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
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
    # A Linear's input is scored through its weight (observer=auto and the clipping check).
    consumers = {id(m.act): m.weight for m in model.modules() if isinstance(m, QuantLinear) and m.act is not None}
    for act in layers:
        act.freeze(consumers.get(id(act)))
    return seen


def quantize(model: nn.Module, recipe: Any, calib_batches: Iterable[Any], *, inplace: bool = False,
             progress: bool = False, timings: QuantizeTimings | None = None, adaround: Any = None,
             lsq: Any = None, smoothing: Mapping[str, torch.Tensor | None] | None = None) -> nn.Module:
    """Quantize ``model`` with a ``conf/quant``-shaped ``recipe`` calibrated on ``calib_batches``.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` and ``nn.Conv2d`` layers are quantized.
        recipe: dict, DictConfig or :class:`qsweep.config.QuantConfig`; missing keys take defaults.
        calib_batches: tensors, tuples (positional args) or dicts (keyword args).
        inplace: modify ``model`` instead of a deep copy.
        progress: show a progress bar over calibration.
        timings: filled with the seconds spent quantizing, calibrating and reconstructing.
        adaround: :class:`qsweep.config.AdaRoundConfig`, dict or DictConfig; None or mode ``off``: nearest
            rounding, or GPTQ's with ``recipe.gptq.enabled``. AdaRound (and LSQ on weights) take precedence
            over the recipe's GPTQ. Runs after calibration against ``model`` (the FP reference).
        lsq: :class:`qsweep.config.LSQConfig` likewise; runs after AdaRound, except that with AdaRound on,
            weight step sizes are learned before it (LSQ re-rounds weights to nearest, which would undo it).
        smoothing: with ``recipe.smooth.enabled``, per-layer input scales to reuse instead of searching
            them (:func:`qsweep.quant.smooth.input_divisors` of an earlier result, e.g. another bit width).

    Returns:
        The model in eval mode with quantized modules (:class:`qsweep.quant.modules.QuantLayer`).
    """
    # Imported here: they build on this module's helpers.
    from qsweep.quant.adaround import apply_adaround
    from qsweep.quant.gptq import apply_gptq
    from qsweep.quant.lsq import apply_lsq
    from qsweep.quant.reconstruct import merge_config

    recipe = quant_recipe(recipe)
    ada_cfg = merge_config(AdaRoundConfig, adaround or {}, "adaround", validate_adaround)
    lsq_cfg = merge_config(LSQConfig, lsq or {}, "lsq", validate_lsq)
    reconstruct = ada_cfg.mode != "off" or lsq_cfg.mode != "off"
    replaced = gptq_replaced_by(recipe.gptq, ada_cfg, lsq_cfg)
    gptq = bool(recipe.gptq.enabled) and replaced is None
    batches = list(calib_batches)
    if not batches:
        raise CalibrationError("calibration got no batches: give at least one calibration batch")
    fp_model = copy.deepcopy(model) if inplace and reconstruct else model
    model = model if inplace else copy.deepcopy(model)
    # The float modules prepare() rewrites in place (BN folding, quant.vit.post_ln) and then replaces:
    # their weights are what the quantized codes were rounded from.
    float_modules = ({n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
                     if reconstruct or gptq else {})
    model.eval()
    timings = timings if timings is not None else QuantizeTimings()
    if replaced is not None:
        timings.reconstruct["gptq"] = {"skipped": replaced}
    start = time.perf_counter()
    prepare(model, recipe, batches, smoothing, timings)
    timings.quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(model, batches, progress=progress, seed=int(recipe.calib.seed))
    timings.calibrate_s = time.perf_counter() - start
    if reconstruct or gptq:
        start = time.perf_counter()
        weights = {n: m.weight for n, m in float_modules.items()}
        if gptq:
            timings.reconstruct["gptq"] = apply_gptq(model, batches, recipe.gptq, weights, progress)
        lsq_mode = lsq_cfg.mode
        if ada_cfg.mode != "off":
            if lsq_mode in ("weight", "both"):
                weight_cfg = OmegaConf.merge(lsq_cfg, {"mode": "weight"})
                timings.reconstruct["lsq_weight"] = apply_lsq(model, fp_model, batches, weight_cfg, progress, weights)
                lsq_mode = "act" if lsq_mode == "both" else "off"
            timings.reconstruct["adaround"] = apply_adaround(model, fp_model, batches, ada_cfg, progress, weights)
        if lsq_mode != "off":
            rest_cfg = OmegaConf.merge(lsq_cfg, {"mode": lsq_mode})
            timings.reconstruct["lsq"] = apply_lsq(model, fp_model, batches, rest_cfg, progress, weights)
        timings.reconstruct_s = time.perf_counter() - start
    return model
