"""AdaRound: learn whether each weight rounds up or down (Nagel et al. 2020, "Up or Down?").

Each weight's code is ``floor(w / s) + h(V)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, V initialised so that ``h`` equals
the fractional part of ``w / s`` (the soft weight starts at the float weight). Adam fits V to
reconstruct the FP output of a layer (``mode=layer``) or of a residual / transformer block
(``mode=block``) on calibration data, plus ``reg_weight * sum(1 - |2h - 1|^beta)`` which pushes
``h`` to 0 or 1 as beta is annealed. The result is hard-rounded (``h >= 0.5``: up) and written
back with the same scales and zero points, so codes move at most one step from nearest rounding.

Reconstruction is sequential as in BRECQ / AIMET: a layer's (block's) inputs come from the
quantized model with every earlier layer already rounded, its target is the FP model's output
of that layer (block) on the same images.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from qsweep.config import AdaRoundConfig, validate_adaround
from qsweep.quant.modules import QuantConv2d, QuantLayer
from qsweep.quant.quantizer import QuantizedWeight
from qsweep.quant.reconstruct import (
    ReconstructionError,
    capture,
    execution_order,
    find_blocks,
    float_weight,
    frozen,
    merge_config,
    recon_loss,
    reference_model,
    take_samples,
    weighted_layers,
)

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch, from the paper
# Stop once the rounding regularizer is this small: every h(V) is then at 0 or 1.
REG_STOP = 1e-5


class Rounding:
    """Learnable up/down rounding of one layer's weight (``[rows, groups, len]`` view)."""

    def __init__(self, layer: QuantLayer, w_view: torch.Tensor):
        q = layer.qweight
        self.layer, self.q = layer, q
        scaled = w_view * (1.0 / q.scale)  # the same reciprocal as the grid's nearest rounding
        self.base = torch.floor(scaled)
        frac = scaled - self.base
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def soft_weight(self, h: torch.Tensor) -> torch.Tensor:
        q = self.q
        codes = torch.clamp(self.base + h + q.zero_point, q.grid.qmin, q.grid.qmax)
        return ((codes - q.zero_point) * q.scale).reshape(q.shape)

    @staticmethod
    def regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard(self) -> QuantizedWeight:
        q = self.q
        codes = torch.clamp(self.base + (self.h() >= 0.5).float() + q.zero_point, q.grid.qmin, q.grid.qmax)
        return dataclasses.replace(q, codes=codes.to(torch.int16))


@contextmanager
def _inputs_float(layers: list[QuantLayer], off: bool):
    """Bypass the layers' input quantizers while reconstructing with float activations."""
    saved = [(layer, layer.act) for layer in layers]
    if off:
        for layer in layers:
            layer.act = None
    try:
        yield
    finally:
        for layer, act in saved:
            layer.act = act


@dataclasses.dataclass
class _Unit:
    """A layer or block reconstructed as one: ``module`` maps the cached inputs to the target."""

    name: str
    module: nn.Module
    layers: dict[str, QuantLayer]  # relative name inside ``module`` -> layer ('' for a layer unit)
    x: torch.Tensor  # cached inputs, dim 0 indexes samples (tokens / rows for a Linear)
    y: torch.Tensor  # FP targets, aligned with x
    per_iter: int  # samples drawn per iteration
    chunk: int  # samples per forward when measuring the loss over all of them
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if isinstance(self.module, QuantLayer):
            return self.module.op(x, self.module.weight if weights is None else weights[""])
        if weights is None:
            return self.module(x, *self.args, **self.kwargs)
        params = {f"{rel}.weight": w for rel, w in weights.items()}
        return functional_call(self.module, params, (x, *self.args), self.kwargs)

    @torch.no_grad()
    def loss(self) -> float:
        """Reconstruction loss of the current (hard) weights over all cached samples."""
        total = 0.0
        for lo in range(0, self.x.shape[0], self.chunk):
            x, y = self.x[lo:lo + self.chunk], self.y[lo:lo + self.chunk]
            total += recon_loss(self.forward(x), y).item() * x.shape[0]
        return total / self.x.shape[0]


class _Sources:
    """Where a layer's inputs and FP targets are captured: from the whole models, or for a layer inside
    a block, from that block run on its inputs, captured once per block (one model pass per block
    instead of one per layer)."""

    def __init__(self, qmodel: nn.Module, ref: nn.Module, samples: list[Any], blocks: dict[str, nn.Module]):
        self.qmodel, self.ref, self.samples, self.blocks = qmodel, ref, samples, blocks
        self.block: str | None = None
        self.inputs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def capture(self, name: str, layer: QuantLayer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``layer``'s inputs in the quantized model and its outputs in the FP one, per sample piece."""
        block = next((b for b in self.blocks if name.startswith(b + ".")), None)
        if block is not None and block != self.block:
            self.block = block
            xq, args, kwargs = capture(self.qmodel, self.blocks[block], self.samples, "input", block)
            xf = capture(self.ref, self.ref.get_submodule(block), self.samples, "input", block)[0]
            self.inputs = None if args or kwargs else (xq, xf)  # extra arguments: run the whole models
        q_root, ref_root, q_samples, ref_samples = self.qmodel, self.ref, self.samples, self.samples
        if block is not None and self.inputs is not None:
            q_root, ref_root = self.blocks[block], self.ref.get_submodule(block)
            q_samples, ref_samples = self.inputs
        xs = capture(q_root, layer, q_samples, "input", name)[0]
        ys = capture(ref_root, self.ref.get_submodule(name), ref_samples, "output", name)[0]
        return xs, ys


def _layer_unit(sources: _Sources, name: str, layer: QuantLayer, cfg: Any) -> _Unit:
    xs, ys = sources.capture(name, layer)
    with torch.no_grad():
        xs = [layer.scale_input(x) for x in xs]
        if cfg.act_quant and layer.act is not None:
            xs = [layer.act(x) for x in xs]
    images = sum(y.shape[0] for y in ys)
    if isinstance(layer, QuantConv2d):
        x, y = torch.cat(xs), torch.cat(ys)
        pixels = y[0, 0].numel()
        per_iter = math.ceil(cfg.rows_per_iter / pixels) if cfg.rows_per_iter else cfg.batch_size
        chunk = cfg.batch_size
    else:  # tokens are independent through a Linear: flatten them into rows and sample rows
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        y = torch.cat([t.reshape(-1, t.shape[-1]) for t in ys])
        chunk = cfg.batch_size * (y.shape[0] // images)
        per_iter = cfg.rows_per_iter or chunk
    return _Unit(name, layer, {"": layer}, x, y, per_iter, chunk)


def _block_unit(qmodel: nn.Module, ref: nn.Module, name: str, block: nn.Module, layers: dict[str, QuantLayer],
                samples: list[Any], cfg: Any) -> _Unit:
    xs, args, kwargs = capture(qmodel, block, samples, "input", name)
    ys = capture(ref, ref.get_submodule(name), samples, "output", name)[0]
    x, y = torch.cat(xs), torch.cat(ys)
    rows = recon_rows(y)
    per_iter = math.ceil(cfg.rows_per_iter / rows) if cfg.rows_per_iter else cfg.batch_size
    return _Unit(name, block, {n[len(name) + 1:]: m for n, m in layers.items()}, x, y, per_iter, cfg.batch_size,
                 args, kwargs)


def recon_rows(y: torch.Tensor) -> int:
    """Rows (tokens / pixels) per sample of a block output, as :func:`recon_loss` counts them."""
    features = y.shape[1] if y.dim() == 4 else y.shape[-1]
    return max(1, y[0].numel() // features)


def _beta(cfg: Any, it: int, warm: int) -> float:
    """Linear anneal from beta_start to beta_end over the iterations after warm-up."""
    frac = (it - warm) / max(1, cfg.iters - warm)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1.0 - frac)


def _optimize(unit: _Unit, roundings: dict[str, Rounding], cfg: Any, gen: torch.Generator,
              bar: tqdm) -> int:
    """Fit the roundings' V; returns the iterations run (fewer when the regularizer converged)."""
    opt = torch.optim.Adam([r.v for r in roundings.values()], lr=cfg.lr)
    warm = int(cfg.warmup * cfg.iters)
    n = unit.x.shape[0]
    for it in range(cfg.iters):
        if unit.per_iter < n:
            idx = torch.randint(n, (unit.per_iter,), generator=gen).to(unit.x.device)
            x, y = unit.x[idx], unit.y[idx]
        else:
            x, y = unit.x, unit.y
        hs = {rel: r.h() for rel, r in roundings.items()}
        rec = recon_loss(unit.forward(x, {rel: r.soft_weight(hs[rel]) for rel, r in roundings.items()}), y)
        loss = rec
        reg = None
        if it >= warm and cfg.reg_weight > 0:
            beta = _beta(cfg, it, warm)
            reg = cfg.reg_weight * sum(Rounding.regularizer(h, beta) for h in hs.values())
            loss = rec + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
        if it % 25 == 0:
            bar.set_postfix(rec=f"{rec.item():.4g}", reg=f"{0.0 if reg is None else reg.item():.3g}")
        if reg is not None and reg.item() < REG_STOP:
            return it + 1
    return cfg.iters


def _reconstruct(unit: _Unit, ref: nn.Module, cfg: Any, gen: torch.Generator, progress: bool,
                 float_weights: Mapping[str, torch.Tensor] | None) -> dict:
    start = time.perf_counter()
    layers = list(unit.layers.values())
    inside = [m for m in unit.module.modules() if isinstance(m, QuantLayer)]  # float-weight ones too
    with _inputs_float(inside, off=not cfg.act_quant):
        before = unit.loss()
        roundings = {rel: Rounding(layer, float_weight(ref, layer.layer_name, layer, float_weights))
                     for rel, layer in unit.layers.items()}
        with tqdm(total=cfg.iters, desc=f"adaround {unit.name}", disable=not progress, leave=False) as bar:
            with torch.enable_grad():
                iters = _optimize(unit, roundings, cfg, gen, bar)
        old = {rel: layer.qweight for rel, layer in unit.layers.items()}
        for rel, r in roundings.items():
            unit.layers[rel].set_qweight(r.hard())
        after = unit.loss()
        kept = "adaround"
        if after > before:  # a worse rounding than nearest on the calibration samples: keep nearest
            for rel, q in old.items():
                unit.layers[rel].set_qweight(q)
            kept = "nearest"
    return {"layers": [layer.layer_name for layer in layers], "loss_before": before, "loss_after": after,
            "kept": kept, "iters": iters, "samples": unit.x.shape[0], "seconds": time.perf_counter() - start}


def _plan_units(qmodel: nn.Module, order: list[str], mode: str) -> list[tuple[str, nn.Module, dict[str, QuantLayer]]]:
    """(name, module, layers) per reconstruction unit in execution order; layers outside blocks alone."""
    weighted = weighted_layers(qmodel)
    blocks = find_blocks(qmodel) if mode == "block" else {}
    units: dict[str, tuple[str, nn.Module, dict[str, QuantLayer]]] = {}
    for name in order:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            units[name] = (name, weighted[name], {name: weighted[name]})
        else:
            units.setdefault(block, (block, blocks[block], {}))[2][name] = weighted[name]
    return list(units.values())


def apply_adaround(qmodel: nn.Module, fp_model: nn.Module, batches: list[Any], cfg: Any, progress: bool = False,
                   float_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Learn the rounding of every integer weight of ``qmodel`` against ``fp_model``; in place.

    Args:
        qmodel: a calibrated model from :func:`qsweep.quantize`.
        fp_model: the float model it was quantized from (not modified; BN is folded in a copy
            when ``qmodel`` was folded).
        batches: calibration batches; the first ``cfg.num_samples`` samples are used.
        cfg: :class:`qsweep.config.AdaRoundConfig`, dict or DictConfig. ``rows_per_iter`` draws
            that many rows per iteration: tokens for a Linear, and for convs and blocks (which need
            whole images) ``ceil(rows_per_iter / rows per image)`` images.
        progress: a progress bar per layer / block showing the losses.
        float_weights: the float weights the quantized layers were made from, by layer name, when
            they differ from ``fp_model``'s (``quant.vit.post_ln`` rewrites them; quantize() passes them).

    Returns:
        Per unit (layer or block name): its layers, ``loss_before`` (nearest rounding) and
        ``loss_after`` on the calibration samples, ``kept`` ("adaround", or "nearest" when the
        learned rounding was no better), iterations, samples (token rows for a Linear) and seconds.
    """
    cfg = merge_config(AdaRoundConfig, cfg, "adaround", validate_adaround)
    if cfg.mode == "off":
        return {}
    weighted = weighted_layers(qmodel)
    if not weighted:
        raise ReconstructionError(
            f"adaround.mode={cfg.mode!r}: every quantized layer keeps float weights, so there is nothing to "
            "round; quantize weights (quant.weight.bits / quant.layers.*.w_bits) or set adaround.mode=off"
        )
    samples = take_samples(batches, cfg.num_samples, cfg.batch_size, "adaround")
    training = qmodel.training
    qmodel.eval()
    ref = reference_model(qmodel, fp_model, samples[0])
    order = execution_order(qmodel, weighted, samples[0])
    gen = torch.Generator().manual_seed(int(cfg.seed))
    sources = _Sources(qmodel, ref, samples, find_blocks(qmodel))
    stats: dict[str, dict] = {}
    try:
        with frozen(qmodel):
            for name, module, layers in _plan_units(qmodel, order, cfg.mode):
                if isinstance(module, QuantLayer):
                    unit = _layer_unit(sources, name, module, cfg)
                else:
                    unit = _block_unit(qmodel, ref, name, module, layers, samples, cfg)
                stats[name] = _reconstruct(unit, ref, cfg, gen, progress, float_weights)
                del unit
    finally:
        qmodel.train(training)
    return stats
