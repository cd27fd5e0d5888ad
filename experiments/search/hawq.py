"""The sensitivity baseline as the literature builds it (HAWQ-V2 / V3): a Hessian-trace-weighted
perturbation per layer and width, and the exact multiple-choice knapsack under a size budget.

HAWQ-V2 measures a layer's sensitivity as the average Hessian trace of the loss with respect to its
weights, ``Tr(H_l) / n_l``, estimated with Hutchinson's method, times the squared norm of the
quantization perturbation ``||Q_b(W_l) - W_l||^2``; HAWQ-V3 picks one width per layer by an integer
program minimizing the summed sensitivity under a size (or latency) budget: here the exact
multiple-choice knapsack of :func:`qsweep.quant.knapsack.knapsack`. A model without class logits (a
sentence embedding) takes the squared error of its output against its float output as the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from qsweep.quant.batches import call_model

Loss = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> the scalar whose Hessian is traced


def hessian_traces(model: nn.Module, batches: Sequence[torch.Tensor], names: Sequence[str], iters: int = 16,
                   seed: int = 0) -> dict[str, float]:
    """``Tr(H_l) / n_l`` of the cross-entropy of ``model`` against its own top-1 on ``batches``, per layer
    in ``names`` (modules with a ``weight``), by Hutchinson's estimator with ``iters`` Rademacher probes."""
    return hutchinson_traces(model, batches, names, own_top1_cross_entropy, iters, seed)


def embedding_hessian_traces(model: nn.Module, batches: Sequence[Any], names: Sequence[str], iters: int = 16,
                             seed: int = 0) -> dict[str, float]:
    """``Tr(H_l) / n_l`` of the mean squared error between ``model``'s output (an embedding) and its own float
    output on ``batches`` (tensors, tuples or dicts of keywords), as :func:`hessian_traces` does for logits."""
    return hutchinson_traces(model, batches, names, own_output_mse, iters, seed)


def own_top1_cross_entropy(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        target = call_model(model, x).argmax(1)
    return F.cross_entropy(call_model(model, x), target)


def own_output_mse(model: nn.Module, x: Any) -> torch.Tensor:
    """Zero at the float weights, where its Hessian is the Gauss-Newton ``2 J^T J / n`` of the output."""
    with torch.no_grad():
        target = call_model(model, x)
    return F.mse_loss(call_model(model, x), target)


def hutchinson_traces(model: nn.Module, batches: Sequence[Any], names: Sequence[str], loss_of: Loss, iters: int,
                      seed: int) -> dict[str, float]:
    """``Tr(H_l) / n_l`` of ``loss_of(model, batch)`` summed over ``batches``, per layer in ``names``, with
    ``iters`` Rademacher probes per batch."""
    model = model.eval()
    params = [model.get_submodule(n).weight for n in names]
    kept = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(params)
    try:
        for x in batches:
            # The fused attention kernels have no second derivative; the plain one computes the same.
            with sdpa_kernel(SDPBackend.MATH):
                grads = torch.autograd.grad(loss_of(model, x), params, create_graph=True)
            for _ in range(iters):
                probes = [torch.randint(0, 2, p.shape, generator=gen).float().mul_(2).sub_(1) for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
                for i, (h, v) in enumerate(zip(hv, probes)):
                    sums[i] += float((h * v).sum())
    finally:
        for p, k in zip(model.parameters(), kept):
            p.requires_grad_(k)
    n = len(batches) * iters
    traces = {name: sums[i] / n / params[i].numel() for i, name in enumerate(names)}
    # A few probes can put a small trace below zero, which would make more error look cheaper.
    floor = min((t for t in traces.values() if t > 0), default=1e-12)
    return {name: max(t, floor) for name, t in traces.items()}
