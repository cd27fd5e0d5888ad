"""The naive reference: round-to-nearest with abs-max ranges, as a first attempt would write it.

Weights: per-output-channel symmetric, scale = max |w| / qmax. Inputs of every Linear: one
symmetric per-tensor scale, max |x| over the calibration set, fixed afterwards (static).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def fake_quant(x: torch.Tensor, amax: torch.Tensor | float, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = torch.as_tensor(amax).clamp(min=1e-12) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


@torch.no_grad()
def quantize(model: nn.Module, calib: list[dict[str, torch.Tensor]], w_bits: int, a_bits: int) -> nn.Module:
    """A copy of ``model`` whose Linears round their weights and inputs to the naive grids."""
    model = copy.deepcopy(model).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    amax = dict.fromkeys(linears, 0.0)

    def observe(name):
        return lambda mod, args: amax.__setitem__(name, max(amax[name], args[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in linears.items()]
    for batch in calib:
        model(**batch)
    for h in hooks:
        h.remove()
    for name, m in linears.items():
        m.weight.copy_(fake_quant(m.weight, m.weight.abs().amax(1, keepdim=True), w_bits))
        m.register_forward_pre_hook(lambda mod, args, a=amax[name]: (fake_quant(args[0], a, a_bits),))
    return model
