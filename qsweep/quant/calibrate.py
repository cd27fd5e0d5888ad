"""Prepare (fold BN, rewrites, plan, swap in quantized modules) and calibrate (observe, freeze) a model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qsweep.quant.fold import fold_batchnorm, fold_weight_standardization
from qsweep.quant.intops import apply_intops
from qsweep.config import quant_recipe
from qsweep.quant.batches import call_model, device_of, to_device
from qsweep.quant.embedding import quantize_embeddings
from qsweep.quant.modules import QuantLinear, quant_module_for
from qsweep.quant.plan import resolve_plan
from qsweep.quant.quantizer import ActQuantizer, CalibrationError, warn_clipping
from qsweep.quant.rotate import rotate_linears
from qsweep.quant.rotate_residual import rotate_residual
from qsweep.quant.smooth import smooth_linears
from qsweep.quant.vit import quantize_attentions, rewrite_post_ln


@dataclass
class QuantizeTimings:
    quantize_s: float = 0.0  # BN folding, planning, weight quantization
    calibrate_s: float = 0.0  # activation observation over the calibration batches
    reconstruct_s: float = 0.0  # GPTQ, AdaRound and LSQ
    reconstruct: dict[str, Any] = field(default_factory=dict)  # their statistics: {"gptq": ..., "lsq": ...}
    folded_bn: list[str] = field(default_factory=list)
    post_ln_skipped: dict[str, str] = field(default_factory=dict)  # quant.vit.post_ln: LayerNorm -> why not folded
    # quant.vit.attn_matmul / quant.intops: attention layer -> why its matmuls or softmax were left alone
    attn_skipped: dict[str, str] = field(default_factory=dict)
    smooth: dict[str, Any] = field(default_factory=dict)  # quant.smooth: the alpha chosen per layer
    # quant.rotate: {"offline": {Linear: block}, "online": {Linear: block}, "residual": why not offline or None}
    rotation: dict[str, Any] = field(default_factory=dict)
    mixed: dict[str, Any] = field(default_factory=dict)  # quant.mixed: the widths chosen (qsweep.quant.mixed)
    embeddings: dict[str, int] = field(default_factory=dict)  # quant.embeddings: the tables quantized, their bits


def prepare(model: nn.Module, recipe: Any, batches: Sequence[Any],
            smoothing: Mapping[str, torch.Tensor | None] | None = None,
            report: QuantizeTimings | None = None, float_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Fold BN, apply ``quant.vit`` / ``quant.intops`` / ``quant.smooth`` / ``quant.rotate`` and swap in the
    quantized modules (and, with ``quant.embeddings``, the quantized embedding tables).

    ``batches`` (the calibration batches) drive BN folding (the first one), the ``quant.vit.post_ln``
    statistics and the ``quant.smooth`` search (all), float rewrites done before the weights are
    quantized here, once. The ViT and integer-op modules are installed before the swap and keep every
    module name the plan uses. ``smoothing``: per-layer scales chosen before (see
    :func:`qsweep.quant.smooth.input_divisors`) instead of searching them. ``report`` receives the
    folded BatchNorm names, the LayerNorms ``post_ln`` left alone, the attention layers ``vit.attn_matmul`` /
    ``intops`` cannot reach and the ``alpha`` chosen per smoothed layer. ``float_weights``, if given,
    receives each swapped layer's (and quantized table's) float weight after the rewrites: what its codes were
    rounded from.
    """
    report = report if report is not None else QuantizeTimings()
    recipe = quant_recipe(recipe)
    batches = list(batches)
    if not batches:
        raise CalibrationError("prepare got no batches: give at least one calibration batch")
    device = device_of(model)

    def run(limit: int | None = None) -> None:
        for batch in batches[:limit]:
            call_model(model, to_device(batch, device))

    fold_weight_standardization(model)  # first: BN folded into a standardized weight would be re-standardized
    folded = fold_batchnorm(model, lambda: run(1)) if recipe.fold_bn else []
    offline, why_online = {}, "quant.rotate.residual is false"
    if recipe.rotate.enabled and recipe.rotate.residual:  # before the rewrites that wrap its Linears
        offline, why_online = rotate_residual(model, recipe, int(recipe.rotate.block_size))
    report.post_ln_skipped = rewrite_post_ln(model, recipe, run)
    report.attn_skipped = {**quantize_attentions(model, recipe, run), **apply_intops(model, recipe, run)}
    plans = resolve_plan(model, recipe)
    alphas = smooth_linears(model, plans, recipe, run, smoothing) if recipe.smooth.enabled else {}
    if recipe.rotate.enabled:
        rest = {n: p for n, p in plans.items() if n not in offline} if recipe.rotate.online or not offline else {}
        online = rotate_linears(model, rest, int(recipe.rotate.block_size))
        report.rotation = {"offline": offline, "online": online, "residual": why_online}
    float_tables = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, layer_plan in plans.items():
        layer = model.get_submodule(name)
        if float_weights is not None:
            float_weights[name] = layer.weight
        model.set_submodule(name, quant_module_for(layer, layer_plan))
    report.embeddings = quantize_embeddings(model, recipe.embeddings, recipe.layers)
    if float_weights is not None:
        float_weights.update({n: t.weight for n, t in float_tables.items() if n in report.embeddings})
    report.folded_bn, report.smooth = folded, alphas


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], progress: bool = False, seed: int = 0) -> int:
    """Observe activations over ``batches`` and freeze the qparams of every ActQuantizer; returns batches seen."""
    layers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for i, act in enumerate(layers):
        act.start_observing(seed=seed + i)
    device = device_of(model)
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
    warn_clipping(layers)  # one warning for the run's layers, not one each
    return seen
