"""``quantize``, the public verb: prepare and calibrate a copy of the model, then GPTQ / AdaRound / LSQ."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from qsweep.config import AdaRoundConfig, LSQConfig, gptq_replaced_by, quant_recipe, validate_adaround, validate_lsq
from qsweep.quant.adaround import apply_adaround
from qsweep.quant.bias_correct import correct_biases
from qsweep.quant.calibrate import QuantizeTimings, calibrate, prepare
from qsweep.quant.gptq import apply_gptq
from qsweep.quant.lsq import apply_lsq
from qsweep.quant.mixed import choose_widths, with_widths
from qsweep.quant.quantizer import CalibrationError
from qsweep.quant.reconstruct import merge_config
from qsweep.quant.rotate_residual import rotate_residual


def quantize(model: nn.Module, recipe: Any, calib_batches: Iterable[Any], *, inplace: bool = False,
             progress: bool = False, timings: QuantizeTimings | None = None, adaround: Any = None,
             lsq: Any = None, smoothing: Mapping[str, torch.Tensor | None] | None = None) -> nn.Module:
    """Quantize ``model`` with a ``conf/quant``-shaped ``recipe`` calibrated on ``calib_batches``.

    ``recipe``: dict, DictConfig or :class:`qsweep.config.QuantConfig` (missing keys take defaults).
    ``calib_batches``: tensors, tuples (positional args) or dicts (keyword args). ``inplace`` modifies
    ``model`` instead of a deep copy; ``timings`` receives the seconds of each step and their statistics.
    ``adaround`` / ``lsq``: :class:`qsweep.config.AdaRoundConfig` / ``LSQConfig`` (or dicts); they learn
    against ``model`` (the FP reference) after calibration and take precedence over the recipe's GPTQ.
    ``recipe.mixed.enabled``: the widths are chosen first (:mod:`qsweep.quant.mixed`). ``smoothing``: with
    ``recipe.smooth.enabled``, per-layer input scales to reuse instead of searching them (``input_divisors`` of
    an earlier result). Returns the model in eval mode with quantized modules (``QuantLayer``, ``QuantEmbedding``).
    """
    recipe = quant_recipe(recipe)
    ada_cfg = merge_config(AdaRoundConfig, adaround or {}, "adaround", validate_adaround)
    lsq_cfg = merge_config(LSQConfig, lsq or {}, "lsq", validate_lsq)
    reconstruct = ada_cfg.mode != "off" or lsq_cfg.mode != "off"
    replaced = gptq_replaced_by(recipe.gptq, ada_cfg, lsq_cfg)
    gptq = bool(recipe.gptq.enabled) and replaced is None
    batches = list(calib_batches)
    if not batches:
        raise CalibrationError("calibration got no batches: give at least one calibration batch")
    timings = timings if timings is not None else QuantizeTimings()
    recipe = _with_mixed_widths(model, recipe, batches, timings)
    fp_model = copy.deepcopy(model) if inplace and reconstruct else model
    model = (model if inplace else copy.deepcopy(model)).eval()
    # The float weights after prepare()'s rewrites (BN folding, quant.vit.post_ln, ...): what the codes were rounded from.
    correct = bool(recipe.bias_correction.enabled)
    weights: dict[str, torch.Tensor] | None = {} if reconstruct or gptq or correct else None
    if replaced is not None:
        timings.reconstruct["gptq"] = {"skipped": replaced}
    start = time.perf_counter()
    prepare(model, recipe, batches, smoothing, timings, weights)
    timings.quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(model, batches, progress=progress, seed=int(recipe.calib.seed))
    timings.calibrate_s = time.perf_counter() - start
    fp_model = _rotated_like_layers(fp_model, recipe, timings) if reconstruct else fp_model
    if reconstruct or gptq:
        start = time.perf_counter()
        if gptq:
            timings.reconstruct["gptq"] = apply_gptq(model, batches, recipe.gptq, weights, progress)
        _learn(model, fp_model, batches, ada_cfg, lsq_cfg, weights, progress, timings)
        timings.reconstruct_s = time.perf_counter() - start
    if correct:  # last: the shift it removes is that of the final weights
        start = time.perf_counter()
        timings.reconstruct["bias_correction"] = correct_biases(model, batches, recipe.bias_correction, weights)
        timings.reconstruct_s += time.perf_counter() - start
    return model


def _rotated_like_layers(fp_model: nn.Module, recipe, timings: QuantizeTimings) -> nn.Module:
    """``fp_model``, or a copy with its residual stream rotated as ``quant.rotate.residual`` rotated the quantized
    model's: the reference the layers learn against (their inputs and outputs are rotated)."""
    if not timings.rotation.get("offline"):
        return fp_model
    fp_model = copy.deepcopy(fp_model)
    rotate_residual(fp_model, recipe, int(recipe.rotate.block_size))
    return fp_model


def _with_mixed_widths(model: nn.Module, recipe, batches: list, timings: QuantizeTimings):
    """``recipe`` with ``quant.mixed``'s chosen widths written out (unchanged when it is off)."""
    if not recipe.mixed.enabled:
        return recipe
    timings.mixed = choose_widths(model, recipe, batches)
    return with_widths(recipe, timings.mixed["widths"])


def _learn(model: nn.Module, fp_model: nn.Module, batches: list, ada_cfg, lsq_cfg, weights: dict,
           progress: bool, timings: QuantizeTimings) -> None:
    """AdaRound and LSQ against the float model. With AdaRound on, weight step sizes are learned before it:
    LSQ re-rounds weights to nearest, which would undo the learned rounding."""
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
