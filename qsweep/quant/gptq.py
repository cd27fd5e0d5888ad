"""GPTQ: round weights column by column, folding each column's rounding error into the columns not
yet rounded (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers").

For a layer with weight ``W [rows, cols]`` and inputs ``X [n, cols]`` as its op sees them (after
``quant.smooth``'s divisor and its input quantizer; a conv's unfolded into patches), rounding
``W`` to ``Q`` costs ``tr((W - Q) H (W - Q)^T)`` on the calibration data, with ``H = 2/n X^T X``.
With ``U`` the upper Cholesky factor of ``H^-1``, rounding column ``j`` and subtracting
``(w_j - q_j) / U_jj * U_j,j+1:`` from the later columns is the Optimal Brain Surgeon update for
that column. Within a block of ``block_size`` columns it is applied column by column, to the
columns after the block once per block (lazy batch updates). Codes stay on the layer's own grid:
the scales and zero points the recipe's observer chose are kept (looked up per column, so
``act_order`` works with static groups), and the exporter packs the result like any other layer.

With ``sequential`` the layers go one at a time in execution order, each one's inputs taken from
the model with every earlier layer already rounded (GPTQ's "true sequential"; on MiniLM-L6 and
the digits ViT it beats capturing a whole transformer block's inputs at once).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from qsweep.config import GPTQConfig, validate_gptq
from qsweep.quant.batches import call_model, to_device
from qsweep.quant.grid import Grid, dequantize, quantize
from qsweep.quant.modules import QuantConv2d, QuantLayer
from qsweep.quant.reconstruct import (
    ReconstructionError,
    device_of,
    execution_order,
    find_blocks,
    float_weight,
    merge_config,
    take_samples,
    weighted_layers,
)


class _Stop(Exception):
    """Raised after the last module a collection pass needs."""


def _stop(*_: Any) -> None:
    raise _Stop


class Hessian:
    """Running mean of ``2 x x^T`` over the input rows seen so far, one ``[cols, cols]`` matrix per
    conv group (a grouped conv's output channels each read their own group's input channels)."""

    def __init__(self, groups: int, cols: int, device: torch.device):
        self.h = torch.zeros(groups, cols, cols, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """``x [groups, n, cols]``."""
        x = x.float()
        self.rows += x.shape[1]
        self.h.mul_((self.rows - x.shape[1]) / self.rows).baddbmm_(x.transpose(1, 2), x, alpha=2.0 / self.rows)


def input_rows(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s op input as ``[groups, n, cols]`` rows matching each group's ``[rows, cols]`` weight.

    A conv's patches come from ``F.unfold`` of the input padded as the conv pads it; their
    (channel, kh, kw) order is the row-major reshape of its ``[out, in / groups, kh, kw]`` weight,
    and group ``g``'s columns are its input channels' patches.
    """
    if isinstance(layer, QuantConv2d):
        x = layer.patches(x)  # [B, C * kh * kw, L]
        b, _, length = x.shape
        return x.view(b, layer.groups, -1, length).permute(1, 0, 3, 2).reshape(layer.groups, b * length, -1)
    return x.reshape(1, -1, x.shape[-1])


class _OpInputHook:
    """Calls ``fn`` on each input of ``layer.op``: the layer's input as its weight sees it, after
    whatever its forward does first (``quant.smooth``'s divisor, the input quantizer)."""

    def __init__(self, layer: QuantLayer, fn: Callable[[torch.Tensor], None]):
        self.layer = layer
        op = type(layer).op

        def observed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            fn(x)
            return op(layer, x, weight)

        layer.op = observed

    def remove(self) -> None:
        del self.layer.op


class Collector:
    """Forward passes over the calibration samples that collect the Hessians of some layers.

    A finished module (a block, or a layer outside blocks, with all its weights rounded) has its
    outputs recorded in the next pass and replayed in later passes instead of being recomputed, so
    a sequential run costs a few forwards of the model rather than one per layer, at the memory of
    the finished modules' outputs on the samples.
    """

    def __init__(self, model: nn.Module, samples: list[Any]):
        self.model, self.samples = model, samples
        self.finished: dict[str, nn.Module] = {}
        self.outputs: dict[str, list[list[Any]]] = {}  # module -> per sample piece: its outputs, one per call

    def finish(self, name: str, module: nn.Module) -> None:
        # A module with its own instance-level forward (a wrapper) is not replaced: it is recomputed.
        if "forward" not in vars(module):
            self.finished[name] = module

    @torch.no_grad()
    def collect(self, layers: Mapping[str, QuantLayer], stop: nn.Module | None = None) -> dict[str, Hessian]:
        """Hessians of ``layers`` (layers never called get none); each forward ends after ``stop``
        (None: the whole model)."""
        hessians: dict[str, Hessian] = {}
        record = {m: [[] for _ in self.samples] for m in self.finished if m not in self.outputs}
        replay: dict[str, Iterator[Any]] = {}
        piece = 0

        def add(name: str, layer: QuantLayer) -> _OpInputHook:
            def hook(x: torch.Tensor) -> None:
                rows = input_rows(layer, x)
                if name not in hessians:
                    hessians[name] = Hessian(rows.shape[0], rows.shape[2], rows.device)
                hessians[name].add(rows)
            return _OpInputHook(layer, hook)

        def keep(module: str):
            return lambda mod, args, out: record[module][piece].append(out)

        def replayed(module: str):
            # Cloned: the model may change a module's output in place.
            return lambda *args, **kwargs: tree_map_only(torch.Tensor, torch.clone, next(replay[module]))

        handles = [add(name, layer) for name, layer in layers.items()]
        handles += [self.finished[m].register_forward_hook(keep(m)) for m in record]
        if stop is not None:
            handles.append(stop.register_forward_hook(_stop))
        for m in self.outputs:
            self.finished[m].forward = replayed(m)
        device = device_of(self.model)
        try:
            for piece, sample in enumerate(self.samples):
                replay.update({m: iter(outs[piece]) for m, outs in self.outputs.items()})
                try:
                    call_model(self.model, to_device(sample, device))
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            for m in self.outputs:
                del self.finished[m].forward
        self.outputs.update({m: outs for m, outs in record.items() if all(outs)})
        return hessians


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run GPTQ's many small per-column ops on one thread: with more, each op pays a fork-join,
    which costs more than the op (and many times more when other processes hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid,
               damp: float, act_order: bool, block_size: int) -> torch.Tensor:
    """GPTQ codes (float, whole numbers) of ``w [rows, cols]`` given per-element ``scale`` / ``zero_point``.

    Raises ``torch.linalg.LinAlgError`` when the damped Hessian ``h [cols, cols]`` is not positive definite.
    """
    w, h = w.clone(), h.clone()
    dead = h.diagonal() == 0  # inputs that are always 0: any weight there is free, make it exactly 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h, scale, zero_point = w[:, perm], h[perm][:, perm], scale[:, perm], zero_point[:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    # float64: the inverse of a poorly conditioned H loses too much in float32.
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h.double()))
    u = torch.linalg.cholesky(hinv, upper=True).to(w.dtype)
    # Transposed, so that each column is contiguous for the per-column ops below.
    wt, scale, zero_point = w.T.contiguous(), scale.T.contiguous(), zero_point.T.contiguous()
    codes = torch.empty_like(wt)
    cols = wt.shape[0]
    for lo in range(0, cols, block_size):
        hi = min(lo + block_size, cols)
        block, ub = wt[lo:hi], u[lo:hi, lo:hi]
        err = torch.empty_like(block)
        for i in range(hi - lo):
            j = lo + i
            codes[j] = quantize(block[i], scale[j], zero_point[j], grid)
            torch.div(block[i] - dequantize(codes[j], scale[j], zero_point[j]), ub[i, i], out=err[i])
            block[i + 1:].addr_(ub[i, i + 1:], err[i], alpha=-1.0)
        wt[hi:].addmm_(u[lo:hi, hi:].T, err, alpha=-1.0)
    codes = codes.T
    return codes[:, torch.argsort(perm)] if act_order else codes


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((w - w_hat) h (w - w_hat)^T)`` summed over groups (``[groups, rows, cols]`` weights, ``[groups,
    cols, cols]`` Hessians): the summed squared output error on the calibration inputs."""
    d = w - w_hat
    return float((torch.bmm(d, h) * d).sum())


def _round_layer(name: str, layer: QuantLayer, w_view: torch.Tensor, hessian: Hessian, cfg: Any) -> dict:
    """GPTQ codes for ``layer``, one group's rows at a time (a depthwise conv: each channel alone)."""
    start = time.perf_counter()
    q = layer.qweight
    rows, groups = q.shape[0], hessian.h.shape[0]
    w = w_view.reshape(groups, rows // groups, -1)
    scale = q.scale.expand(q.codes.shape).reshape(w.shape)
    zero_point = q.zero_point.expand(q.codes.shape).reshape(w.shape).float()
    try:
        with _one_thread():
            codes = torch.stack([gptq_codes(w[g], hessian.h[g], scale[g], zero_point[g], q.grid, cfg.damp,
                                            cfg.act_order, cfg.block_size) for g in range(groups)])
    except torch.linalg.LinAlgError:
        raise ReconstructionError(
            f"{name}: its damped Hessian is not positive definite (quant.gptq.damp={cfg.damp}); raise quant.gptq.damp"
        ) from None
    before = output_error(w, q.dequantize().reshape(w.shape), hessian.h)
    after = output_error(w, dequantize(codes, scale, zero_point), hessian.h)
    # GPTQ is greedy; on rare layers (heavy damping) nearest rounding is better on the same data.
    kept = "gptq" if after <= before else "nearest"
    if kept == "gptq":
        layer.set_qweight(dataclasses.replace(q, codes=codes.reshape(q.codes.shape).to(torch.int16)))
    return {"error_before": before, "error_after": min(before, after), "kept": kept, "rows": hessian.rows,
            "seconds": time.perf_counter() - start}


def _rank_deficient(hessian: Hessian) -> str | None:
    """Why GPTQ would fit the calibration inputs rather than the data (fewer rows than columns), or None."""
    rows, cols = hessian.rows, hessian.h.shape[-1]
    if rows >= cols:
        return None
    return (f"{rows} calibration input rows for {cols} weight columns (a classifier sees one row per image): "
            "more samples, quant.gptq.num_samples, would round it")


def _finishing(order: list[str], layers: Mapping[str, QuantLayer], blocks: Mapping[str, nn.Module]
               ) -> dict[str, tuple[str, nn.Module]]:
    """Layer -> (name, module) whose every layer is rounded once that layer is: the layer itself
    outside blocks, its block after the block's last layer in execution order."""
    last: dict[str, str] = {}
    for name in order:
        last[next((b for b in blocks if name.startswith(b + ".")), name)] = name
    return {layer: (key, blocks[key] if key in blocks else layers[key]) for key, layer in last.items()}


@torch.no_grad()
def _within_max_bits(layers: Mapping[str, QuantLayer], max_bits: int | None) -> tuple[dict, dict[str, str]]:
    """The layers GPTQ rounds (``quant.gptq.max_bits`` bits or fewer), and why each other one keeps nearest rounding."""
    wide = {n: layer.qweight.grid.bits for n, layer in layers.items()
            if max_bits is not None and layer.qweight.grid.bits > max_bits}
    todo = {n: layer for n, layer in layers.items() if n not in wide}
    return todo, {n: f"{b} bits > quant.gptq.max_bits={max_bits}: nearest rounding" for n, b in wide.items()}


def apply_gptq(model: nn.Module, batches: list[Any], cfg: Any, float_weights: Mapping[str, torch.Tensor],
               progress: bool = False) -> dict[str, Any]:
    """Re-round every integer weight of a calibrated ``model`` with GPTQ; in place.

    ``batches``: the first ``cfg.num_samples`` samples are used. ``float_weights``: every quantized
    layer's float weight by name (after BN folding and ``quant.vit.post_ln``; what :func:`qsweep.quantize`
    keeps). Returns ``layers`` (per layer: output error on the calibration inputs before / after, ``kept``
    "gptq" or "nearest", input rows, seconds), ``skipped`` (layer: reason), ``error_reduction`` (mean of
    ``1 - after / before``) and the seconds spent in all, collecting Hessians and rounding.
    """
    start = time.perf_counter()
    cfg = merge_config(GPTQConfig, cfg, "quant.gptq", validate_gptq)
    weighted = weighted_layers(model)
    todo, skipped = _within_max_bits(weighted, cfg.max_bits)
    missing = [name for name in todo if name not in float_weights]
    if missing:
        raise ReconstructionError(f"quant.gptq: no float weights for {missing[:3]}; run GPTQ through qsweep.quantize "
                                  "with quant.gptq.enabled=true, which keeps them")
    samples = take_samples(batches, cfg.num_samples, cfg.num_samples, "quant.gptq")
    training = model.training
    model.eval()
    order = execution_order(model, todo, take_samples(samples, 1, 1, "quant.gptq")[0])
    # Sequential: a pass per layer, stopping right after it; else one pass for all layers.
    passes = ([({n: todo[n]}, todo[n]) for n in order] if cfg.sequential
              else [({n: todo[n] for n in order}, None)])
    finishing = _finishing(order, todo, find_blocks(model)) if cfg.sequential else {}
    collector = Collector(model, samples)
    layers: dict[str, dict] = {}
    hessian_s = 0.0
    try:
        for group, stop in tqdm(passes, desc="gptq", disable=not progress, leave=False):
            t = time.perf_counter()
            hessians = collector.collect(group, stop)
            hessian_s += time.perf_counter() - t
            for name, layer in group.items():
                why = _rank_deficient(hessians[name]) if name in hessians else "not called on the calibration samples"
                if why:
                    skipped[name] = why
                    continue
                w = float_weight(model, name, layer, float_weights)
                layers[name] = _round_layer(name, layer, w, hessians.pop(name), cfg)
                if name in finishing:
                    collector.finish(*finishing[name])
    finally:
        model.train(training)
    reductions = [1.0 - s["error_after"] / s["error_before"] for s in layers.values() if s["error_before"] > 0]
    seconds = time.perf_counter() - start
    return {"layers": layers, "skipped": skipped,
            "error_reduction": sum(reductions) / len(reductions) if reductions else 0.0,
            "seconds": seconds, "hessian_s": hessian_s, "round_s": sum(s["seconds"] for s in layers.values())}
