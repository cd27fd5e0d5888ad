"""Bias correction: each quantized layer's bias absorbs the mean shift quantization puts on its outputs.

Rounding a layer's weights moves the mean of every output channel by ``E[op(x, W_q - W)]``; with few
weights per output (a 3x3 depthwise conv has 9) that shift does not average out, and a network that
normalizes nothing after folding BN carries it to the logits. Two estimates of the shift on the
calibration samples (Nagel et al. 2019, "Data-Free Quantization", section 4.2, empirical form):

- a layer's own rounding, ``E[op(x, W_q - W)]`` over the inputs ``x`` it gets in the quantized model;
- for the layers ``quant.bias_correction.match_float`` selects: the difference between its output
  means in the float model and in the quantized one, so the correction also absorbs what activation
  rounding and earlier layers shifted. Where a layer has few weights per output the shift is
  systematic and this is better; on wide layers the estimate is noisier than the shift it removes.

A matched layer must see its inputs with every earlier correction made, or it would absorb shifts
that are removed upstream as well: layers are corrected in execution order, one segment starting at
each matched layer per pass over the samples (a pass stops after its segment's last layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qsweep.quant.batches import call_model, device_of, to_device
from qsweep.quant.modules import QuantLayer, quant_layers
from qsweep.quant.plan import selects
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.reconstruct import take_samples


@contextmanager
def _float_mode(model: nn.Module, float_weights: Mapping[str, torch.Tensor]):
    """The quantized model computing in float: float weights, every activation quantizer passed through
    (a quantized layer is its float layer plus grids, so this is the float model after the rewrites)."""
    layers = quant_layers(model)
    saved = {name: layer.weight for name, layer in layers.items()}
    hooks = [m.register_forward_hook(lambda m, args, out: args[0]) for m in model.modules()
             if isinstance(m, ActQuantizer)]
    try:
        for name, layer in layers.items():
            layer.weight = float_weights[name].detach().to(layer.weight)
        yield
    finally:
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            layer.weight = saved[name]


class _Means:
    """Per-channel means of the tensors ``add`` sees, over every dimension but ``feature_dim``."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, y: torch.Tensor, feature_dim: int) -> None:
        dim = feature_dim % y.dim()
        total = y.float().sum([d for d in range(y.dim()) if d != dim])
        self.sums[name] = self.sums.get(name, 0) + total
        self.counts[name] = self.counts.get(name, 0) + y.numel() // y.shape[dim]

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]


class _Stop(Exception):
    """Raised after a pass's last layer: nothing downstream is needed."""


def _run(model: nn.Module, batches: Sequence[Any], hooks: list) -> None:
    device = device_of(model)
    try:
        for batch in batches:
            try:
                call_model(model, to_device(batch, device))
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()


def _float_pass(model: nn.Module, batches: Sequence[Any], layers: Mapping[str, QuantLayer], matched: set[str],
                float_weights: Mapping[str, torch.Tensor]) -> tuple[list[str], _Means]:
    """The layers in execution order and the matched layers' float output means."""
    order: list[str] = []
    means = _Means()

    def seen(name: str, layer: QuantLayer, out: torch.Tensor) -> None:
        if name not in order:
            order.append(name)
        if name in matched:
            means.add(name, out, layer.feature_dim)

    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen(n, m, out)) for n, m in layers.items()]
    with _float_mode(model, float_weights):
        _run(model, batches, hooks)
    return order, means


def _own_shift(layer: QuantLayer, x: torch.Tensor, float_weight: torch.Tensor) -> torch.Tensor:
    """``op(x, W_q - W) + b`` for the layer's input ``x``: its mean over the samples, less the bias, is the
    output shift of the layer's weight rounding."""
    x = layer.scale_input(x)
    if layer.act is not None:
        x = layer.act(x)
    return layer.op(x, layer.weight - float_weight.to(layer.weight))


def _segments(order: list[str], matched: set[str]) -> list[list[str]]:
    """``order`` cut before each matched layer, each segment corrected in one pass: a matched layer is
    measured with every layer before it corrected; the layers after it in its segment are measured
    before its correction, which moves their own shift only by its product with their rounding."""
    segments: list[list[str]] = [[]]
    for name in order:
        if name in matched and segments[-1]:
            segments.append([])
        segments[-1].append(name)
    return [s for s in segments if s]


def _correct_segment(model: nn.Module, batches: Sequence[Any], layers: Mapping[str, QuantLayer],
                     segment: list[str], matched: set[str], target: _Means,
                     float_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One pass over the samples measuring ``segment``'s shifts; returns the correction per layer."""
    means = _Means()
    last = segment[-1]

    def measure(name: str, layer: QuantLayer, args: tuple, out: torch.Tensor) -> None:
        y = out if name in matched else _own_shift(layer, args[0], float_weights[name])
        means.add(name, y, layer.feature_dim)
        if name == last:
            raise _Stop

    hooks = [layers[n].register_forward_hook(lambda m, args, out, n=n: measure(n, m, args, out)) for n in segment]
    _run(model, batches, hooks)
    deltas = {}
    for name in segment:
        bias = layers[name].bias
        got = means.mean(name) - (0 if bias is None or name in matched else bias.float())
        deltas[name] = target.mean(name) - got if name in matched else -got
    return deltas


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Sequence[Any], cfg: Any,
                   float_weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Correct the bias of each weight-quantized layer ``cfg.layers`` selects, in place (see the module
    docstring); returns
    ``{"layers": n, "matched_float": [...], "passes": p, "max_shift": {layer: largest |correction|}}``."""
    samples = take_samples(batches, cfg.num_samples, cfg.num_samples, "quant.bias_correction")
    quantized = {n: m for n, m in quant_layers(model).items() if m.qweight is not None}
    names = list(quantized)

    def chosen(patterns) -> set[str]:
        return {n for n in names if any(selects(p, n, quantized[n], names) for p in patterns or ())}

    corrected = chosen(cfg.layers)
    layers = {n: m for n, m in quantized.items() if n in corrected}
    matched = chosen(cfg.match_float) & corrected
    order, target = _float_pass(model, samples, layers, matched, float_weights)
    segments = _segments(order, matched)
    shifts: dict[str, float] = {}
    for segment in segments:
        deltas = _correct_segment(model, samples, layers, segment, matched, target, float_weights)
        for name, delta in deltas.items():
            layer = layers[name]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
            layer.bias += delta.to(layer.bias)
            shifts[name] = float(delta.abs().max())
    return {"layers": len(shifts), "matched_float": [n for n in order if n in matched],
            "passes": len(segments) + 1, "max_shift": shifts}
