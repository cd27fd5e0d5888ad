"""LSQ: learned step sizes (Esser et al. 2020), and zero points on affine grids, fitted on calibration data.

The objective is the whole model's output error (MSE against the FP model's output), not a
per-layer or per-block one: step sizes trade error between layers (a wider activation range
here, a finer one there), which only the end-to-end loss sees, and it needs no block
discovery. The price is a full forward and backward pass per iteration.

Scales are learned in log space, so Adam's steps (about ``lr`` each) are relative changes, alike
for scales of 1e-4 and of 1. Rounding and zero points pass gradients straight through, and the
step-size gradient carries LSQ's scale ``1 / sqrt(numel * qmax)``. Each candidate state is
evaluated exactly as deployed (scales rounded to their storage dtype, integer zero points,
codes re-quantized) on the fixed calibration samples, starting with the untouched model; the
best state seen is restored at the end, so the calibration loss never increases.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qsweep.config import LSQConfig, validate_lsq
from qsweep.quant.batches import call_model, to_device
from qsweep.quant.grid import EPS, Grid, quantize
from qsweep.quant.modules import QuantLayer
from qsweep.quant.quantizer import SCALE_DTYPES, ActQuantizer, QuantizedWeight
from qsweep.quant.reconstruct import (
    ReconstructionError,
    device_of,
    float_weight,
    frozen,
    merge_config,
    reference_model,
    take_samples,
    weighted_layers,
)

# Candidate states evaluated on the calibration samples over a run (plus the initial one).
EVALS = 10


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient times ``g`` in the backward pass."""
    return x * g + (x - x * g).detach()


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: Grid,
                      g: float) -> torch.Tensor:
    """Differentiable fake-quant with the grid's conventions: ``(clamp(round(x / s) + zp) - zp) * s``."""
    scale = _grad_scale(scale, g)
    zp = 0.0 if zero_point is None else _round_ste(_grad_scale(zero_point, g).clamp(grid.qmin, grid.qmax))
    q = torch.clamp(_round_ste(x / scale) + zp, grid.qmin, grid.qmax)
    return (q - zp) * scale


def _storage_scale(log_scale: torch.Tensor, dtype: str) -> torch.Tensor:
    return log_scale.detach().exp().clamp_min(EPS).to(SCALE_DTYPES[dtype]).float().clamp_min(EPS)


def _storage_zp(zp: torch.Tensor | None, grid: Grid, like: torch.Tensor) -> torch.Tensor:
    if zp is None:
        return like
    return zp.detach().round().clamp(grid.qmin, grid.qmax).to(torch.int32).reshape(like.shape)


class _ActParams:
    """Learnable step size (and zero point) of one static activation quantizer."""

    def __init__(self, act: ActQuantizer):
        self.act = act
        self.log_scale = nn.Parameter(act.scale.detach().float().log())
        self.zp = None if act.grid.symmetric else nn.Parameter(act.zero_point.detach().float())

    def hook(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        g = 1.0 / math.sqrt(max(1, x[0].numel()) * self.act.grid.qmax)
        return lsq_fake_quantize(x, self.log_scale.exp(), self.zp, self.act.grid, g)

    @torch.no_grad()
    def commit(self) -> None:
        act = self.act
        act.scale.copy_(_storage_scale(self.log_scale, act.cfg.scale_dtype))
        act.zero_point.copy_(_storage_zp(self.zp, act.grid, act.zero_point))


class _WeightParams:
    """Learnable per-(row, group) step sizes (and zero points) of one layer's weight."""

    def __init__(self, layer: QuantLayer, w_view: torch.Tensor):
        q = layer.qweight
        self.layer, self.w = layer, w_view
        self.log_scale = nn.Parameter(q.scale.detach().log())
        self.zp = None if q.grid.symmetric else nn.Parameter(q.zero_point.detach().float())
        self.g = 1.0 / math.sqrt(w_view.shape[-1] * q.grid.qmax)

    def fake_weight(self) -> torch.Tensor:
        q = self.layer.qweight
        return lsq_fake_quantize(self.w, self.log_scale.exp(), self.zp, q.grid, self.g).reshape(q.shape)

    @torch.no_grad()
    def commit(self) -> None:
        q = self.layer.qweight
        scale = _storage_scale(self.log_scale, q.scale_dtype)
        zp = _storage_zp(self.zp, q.grid, q.zero_point)
        codes = quantize(self.w, scale, zp, q.grid).to(torch.int16)
        self.layer.set_qweight(QuantizedWeight(codes, scale, zp, q.grid, q.shape, q.scale_dtype))


def _output(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ReconstructionError(f"lsq: the model returns a {type(out).__name__}; it needs a tensor output")
    return out.float()


class _State:
    """The quantizers' committed state, to restore the best one seen."""

    def __init__(self, acts: list[_ActParams], weights: list[_WeightParams]):
        self.acts = [(p.act, p.act.scale.clone(), p.act.zero_point.clone()) for p in acts]
        self.weights = [(p.layer, p.layer.qweight) for p in weights]

    @torch.no_grad()
    def restore(self) -> None:
        for act, scale, zp in self.acts:
            act.scale.copy_(scale)
            act.zero_point.copy_(zp)
        for layer, q in self.weights:
            layer.set_qweight(q)


def _learnables(qmodel: nn.Module, ref: nn.Module, mode: str, float_weights: Mapping[str, torch.Tensor] | None
                ) -> tuple[list[_ActParams], list[_WeightParams]]:
    acts, weights = [], []
    if mode in ("act", "both"):
        # Exactly ActQuantizer: subclasses may quantize on other grids (e.g. log2 softmax).
        acts = [_ActParams(m) for m in qmodel.modules() if type(m) is ActQuantizer and not m.dynamic]
        if not acts and mode == "act":
            raise ReconstructionError(
                "lsq.mode='act': the model has no static activation quantizer to learn (activations are float "
                "or per_token); use lsq.mode=weight or quantize activations per_tensor"
            )
    if mode in ("weight", "both"):
        weights = [_WeightParams(layer, float_weight(ref, name, layer, float_weights))
                   for name, layer in weighted_layers(qmodel).items()]
        if not weights and not acts:
            raise ReconstructionError(
                f"lsq.mode={mode!r}: the model has no integer weight or static activation quantizer to learn"
            )
    return acts, weights


@torch.no_grad()
def _mean_loss(qmodel: nn.Module, samples: list, targets: list[torch.Tensor]) -> float:
    """Output MSE of ``qmodel`` over every calibration sample, weighted by rows."""
    losses = [F.mse_loss(_output(call_model(qmodel, s)), t).item() * t.shape[0] for s, t in zip(samples, targets)]
    return sum(losses) / sum(t.shape[0] for t in targets)


def _optimizer(acts: list, weights: list, lr: float) -> torch.optim.Optimizer:
    groups = [{"params": [p.log_scale for p in acts + weights], "lr": lr}]
    # Zero points move in codes: the same relative step as the log-scales, over the grid's span.
    groups += [{"params": [p.zp], "lr": lr * (p.layer.qweight.grid.qmax - p.layer.qweight.grid.qmin)}
               for p in weights if p.zp is not None]
    groups += [{"params": [p.zp], "lr": lr * (p.act.grid.qmax - p.act.grid.qmin)} for p in acts if p.zp is not None]
    return torch.optim.Adam(groups)


def _step(qmodel: nn.Module, acts: list, weights: list, opt: torch.optim.Optimizer, sample: Any,
          target: torch.Tensor) -> None:
    """One Adam step on the output MSE of ``sample``, through the quantizers' straight-through gradients."""
    handles = [p.act.register_forward_hook(p.hook) for p in acts]
    try:
        with torch.enable_grad():
            for p in weights:
                p.layer.weight = p.fake_weight()  # the buffer, for this forward only
            loss = F.mse_loss(_output(call_model(qmodel, sample)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()


def _fit(qmodel: nn.Module, acts: list, weights: list, samples: list, targets: list, cfg: Any,
         progress: bool) -> tuple[float, float, int]:
    """Adam over the samples in seeded random order; keeps the best state seen at each evaluation.

    Returns the loss before, the best loss and the iteration it was reached at (0: the initial state).
    """
    opt = _optimizer(acts, weights, cfg.lr)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    every = max(1, cfg.iters // EVALS)
    best, best_loss, best_iter = _State(acts, weights), _mean_loss(qmodel, samples, targets), 0
    before = best_loss
    order: list[int] = []
    try:
        with frozen(qmodel), tqdm(total=cfg.iters, desc="lsq", disable=not progress, leave=False) as bar:
            for it in range(1, cfg.iters + 1):
                if not order:
                    order = torch.randperm(len(samples), generator=gen).tolist()
                i = order.pop()
                _step(qmodel, acts, weights, opt, samples[i], targets[i])
                bar.update()
                if it % every == 0 or it == cfg.iters:
                    for p in acts + weights:
                        p.commit()
                    current = _mean_loss(qmodel, samples, targets)
                    bar.set_postfix(loss=f"{current:.4g}", best=f"{min(current, best_loss):.4g}")
                    if current < best_loss:
                        best, best_loss, best_iter = _State(acts, weights), current, it
    finally:
        best.restore()
    return before, best_loss, best_iter


def apply_lsq(qmodel: nn.Module, fp_model: nn.Module, batches: list[Any], cfg: Any, progress: bool = False,
              float_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Learn step sizes (and affine zero points) of ``qmodel``'s quantizers against ``fp_model``; in place.

    ``batches``: the first ``cfg.num_samples`` samples, in pieces of ``cfg.batch_size``, are both the
    training data and the fixed set the loss is measured on. ``cfg`` (:class:`qsweep.config.LSQConfig`):
    ``act`` learns static per-tensor activation quantizers, ``weight`` per-row / group weight scales (codes
    re-rounded to nearest from the float weight, so learned AdaRound codes are replaced), ``both``.
    ``float_weights``: the float weights the layers were made from, when they differ from ``fp_model``'s
    (``quant.vit.post_ln`` rewrites them). Returns ``loss_before`` / ``loss_after`` (output MSE on the
    calibration samples; after <= before), ``best_iter`` (0: the initial state was kept), counts and seconds.
    """
    cfg = merge_config(LSQConfig, cfg, "lsq", validate_lsq)
    if cfg.mode == "off":
        return {}
    start = time.perf_counter()
    samples = take_samples(batches, cfg.num_samples, cfg.batch_size, "lsq")
    training = qmodel.training
    qmodel.eval()
    ref = reference_model(qmodel, fp_model, samples[0])
    device = device_of(qmodel)
    samples = [to_device(s, device) for s in samples]
    with torch.no_grad():
        targets = [_output(call_model(ref, s)) for s in samples]

    acts, weights = _learnables(qmodel, ref, cfg.mode, float_weights)
    try:
        before, best_loss, best_iter = _fit(qmodel, acts, weights, samples, targets, cfg, progress)
    finally:
        qmodel.train(training)
    return {"loss_before": before, "loss_after": best_loss, "best_iter": best_iter, "acts": len(acts),
            "weights": len(weights), "iters": cfg.iters, "samples": sum(t.shape[0] for t in targets),
            "seconds": time.perf_counter() - start}
