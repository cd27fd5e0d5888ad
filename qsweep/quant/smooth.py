"""Per-channel input scaling of quantized Linears (``quant.smooth``): SmoothQuant and AWQ as one search.

For a Linear ``y = W x`` any positive per-channel ``s`` gives ``y = (W diag(s)) (x / s)``. Dividing the
input by ``s`` flattens activation outlier channels, so one per-tensor grid fits them (SmoothQuant,
``alpha`` near 1), or, with ``s > 1`` on channels where inputs are large, spends weight precision where
it matters most (AWQ, ``alpha`` near 0). With ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)``, each
layer's ``alpha`` is chosen on calibration tokens to minimize the layer's output error with both its
weight and its input on their grids; "no scaling" is a candidate too, so on those tokens no layer gets
worse than without it.

The float Linear's weight is multiplied by ``s`` in place and ``s`` is registered on it as the
buffer ``input_divisor``: :class:`~qsweep.quant.modules.QuantLayer` takes it over and divides its input
by it before quantizing (one elementwise division, the same in the exported program and on integer kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from qsweep.quant.grid import Grid, fake_quantize, qparams
from qsweep.quant.modules import QuantLayer
from qsweep.quant.observers import TokenSample
from qsweep.quant.plan import LayerPlan
from qsweep.quant.quantizer import quantize_weight
from qsweep.quant.rotate import hadamard, rotation_block

# Floor of max|x_j| and max|W_:j| in the ratio: a dead channel would give 0 or inf.
_FLOOR = 1e-5
NO_SCALING = "off"


class _Inputs:
    """Per-channel min/max of one Linear's input over every batch, and a uniform sample of its tokens."""

    def __init__(self, max_tokens: int, generator: torch.Generator):
        self.tokens = TokenSample(max_tokens, generator)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = torch.aminmax(rows, dim=0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.tokens.update(rows)

    @property
    def rows(self) -> torch.Tensor:
        return self.tokens.rows


def _scales(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = weight.abs().amax(dim=0).float().clamp_min(_FLOOR)
    s = absmax.clamp_min(_FLOOR).pow(alpha) / w_max.pow(1.0 - alpha)
    return s / s.log().mean().exp()  # geometric mean 1: only the ratios between channels matter


def _quantized_input(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """``x`` on the layer's input grid: static min-max over ``[lo, hi]``, or per token."""
    if plan.act is None:
        return x
    grid = Grid(plan.act.bits, plan.act.symmetric)
    if plan.act.granularity == "per_token":
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    scale, zero_point = qparams(lo, hi, grid)
    return fake_quantize(x.clone(), scale, zero_point, grid)


@torch.no_grad()
def _output_error(linear: nn.Linear, plan: LayerPlan, stats: _Inputs, s: torch.Tensor | None,
                  target: torch.Tensor, block: int | None) -> float:
    x, weight, lo, hi = stats.rows, linear.weight.detach().float().cpu(), stats.lo.cpu(), stats.hi.cpu()
    if s is not None:
        x, weight, lo, hi = x / s, weight * s, lo / s, hi / s
    if block is not None:  # quant.rotate follows: per-channel ranges do not rotate, the sample's do
        x, weight = hadamard(x, block), hadamard(weight, block)
        lo, hi = x.amin(0), x.amax(0)
    if plan.weight is not None:
        weight = quantize_weight(weight, plan.weight, plan.name).dequantize()
    x_hat = _quantized_input(x, lo.min(), hi.max(), plan)
    return float((x_hat @ weight.t() - target).square().sum())


def choose_scales(linear: nn.Linear, plan: LayerPlan, stats: _Inputs, alpha: float | None,
                  grid: int, block: int | None = None) -> tuple[torch.Tensor | None, float | str]:
    """The ``s`` (or None) and ``alpha`` (or ``"off"``) with the lowest output error on the sampled tokens,
    the input rotated by ``block``-sized Hadamard blocks after scaling (``quant.rotate``) if given."""
    absmax = torch.maximum(-stats.lo, stats.hi).cpu()
    weight = linear.weight.detach().float().cpu()
    if alpha is not None:
        return _scales(absmax, weight, alpha), alpha
    target = stats.rows @ weight.t()
    best: tuple[float, torch.Tensor | None, float | str] = (_output_error(linear, plan, stats, None, target, block),
                                                           None, NO_SCALING)
    for i in range(grid + 1):
        a = i / grid
        s = _scales(absmax, weight, a)
        err = _output_error(linear, plan, stats, s, target, block)
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2]


@torch.no_grad()
def smooth_linears(model: nn.Module, plans: Mapping[str, LayerPlan], recipe: Any, run: Callable[[], Any],
                   given: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, float | str]:
    """Scale the inputs of the planned float Linears of ``model`` (before their weights are quantized).

    Candidates are scored at the recipe's own bit widths (``quant.weight.bits`` / ``quant.act.bits``),
    not at per-layer width overrides (a layer's granularity and group size are its own): the choice then
    depends only on the float model and the recipe, so a mixed-precision search and a fresh run of the
    layout it found scale every layer alike.

    Args:
        model: the float model; its planned ``nn.Linear`` s get ``weight * s`` and a buffer ``input_divisor``.
        plans: the quantization plan: which Linears are quantized.
        recipe: the ``conf/quant`` recipe; ``recipe.smooth`` holds ``alpha``, ``grid``, ``max_tokens``.
        run: feeds the calibration batches through ``model``.
        given: per-layer ``s`` chosen before (e.g. by another width of the same search): no search then.

    Returns:
        ``{layer name: chosen alpha or "off"}`` (``"given"`` for layers whose ``s`` came from ``given``).
    """
    linears = {n: model.get_submodule(n) for n, p in plans.items()
               if isinstance(model.get_submodule(n), nn.Linear) and (p.weight is not None or p.act is not None)}
    chosen: dict[str, float | str] = {}
    if given is not None:
        for name, linear in linears.items():
            _install(linear, given.get(name))
            chosen[name] = "given"
        return chosen
    cfg = recipe.smooth
    w_bits, a_bits = recipe.weight.bits, recipe.act.bits
    gen = torch.Generator().manual_seed(0)
    stats = {n: _Inputs(int(cfg.max_tokens), gen) for n in linears}
    handles = [m.register_forward_pre_hook(lambda _m, args, st=stats[n]: st.update(args[0]))
               for n, m in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for name, linear in linears.items():
        if stats[name].lo is None:
            continue  # never reached by calibration: leave it alone
        plan = plans[name]
        at_recipe_widths = LayerPlan(name, plan.weight and replace(plan.weight, bits=w_bits),
                                     plan.act and (replace(plan.act, bits=a_bits) if a_bits is not None else None))
        block = rotation_block(linear.in_features, int(recipe.rotate.block_size)) if recipe.rotate.enabled else None
        s, alpha = choose_scales(linear, at_recipe_widths, stats[name], cfg.alpha, int(cfg.grid), block)
        _install(linear, s)
        chosen[name] = alpha
    return chosen


def _install(linear: nn.Linear, s: torch.Tensor | None) -> None:
    if s is None:
        return
    s = s.to(linear.weight.device, torch.float32)
    linear.weight.mul_(s.to(linear.weight.dtype))
    linear.register_buffer("input_divisor", s)


def input_divisors(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The ``s`` of every quantized layer of ``model`` (None where its input is not scaled), for ``given``."""
    return {name: m.input_divisor for name, m in model.named_modules() if isinstance(m, QuantLayer)}
