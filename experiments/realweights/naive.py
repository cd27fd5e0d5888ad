"""The naive reference: round-to-nearest with abs-max ranges, as a first attempt would write it.

Weights: per-output-channel symmetric, scale = max |w| / qmax. Inputs of every Linear (or every
layer of ``types``): one symmetric per-tensor scale, max |x| over the calibration set, fixed
afterwards (static). Shared with experiments/realvision (Conv2d and Linear, BatchNorm folded).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def fake_quant(x: torch.Tensor, amax: torch.Tensor | float, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = torch.as_tensor(amax).clamp(min=1e-12) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


@torch.no_grad()
def quantize(model: nn.Module, calib: list, w_bits: int, a_bits: int, types: tuple[type, ...] = (nn.Linear,),
             prepare: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """A copy of ``model`` whose layers of ``types`` round their weights and inputs to the naive grids.

    ``calib``: batches, dicts of keyword arguments or tensors; ``prepare``: a float rewrite of the
    copy (e.g. BatchNorm folding) before anything is observed.
    """
    model = copy.deepcopy(model).eval()
    if prepare is not None:
        prepare(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, types)}
    amax = dict.fromkeys(layers, 0.0)

    def observe(name):
        return lambda mod, args: amax.__setitem__(name, max(amax[name], args[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in layers.items()]
    for batch in calib:
        model(**batch) if isinstance(batch, dict) else model(batch)
    for h in hooks:
        h.remove()
    for name, m in layers.items():
        w = m.weight
        m.weight.copy_(fake_quant(w, w.abs().flatten(1).amax(1).reshape(-1, *[1] * (w.dim() - 1)), w_bits))
        m.register_forward_pre_hook(lambda mod, args, a=amax[name]: (fake_quant(args[0], a, a_bits),))
    return model
