"""``quant.mixed``: one weight width per layer under an artifact-size budget, chosen before quantizing.

A layer's cost at ``b`` bits is the increase of KL(FP || quantized) that its rounding error alone
predicts to second order, ``0.5 * sum_i F_ii (Q_b(w)_i - w_i)^2``, with ``F`` the diagonal of the
model's Fisher information (per-sample gradients of ``log p(y | x)``, ``y`` drawn from the model itself
on calibration samples: no labels needed), and ``Q_b`` the recipe's weight quantizer at ``b`` bits.
The output model (``quant.mixed.fisher``) is ``categorical`` for class logits (``y`` drawn from their
softmax) or ``gaussian`` for features such as a sentence embedding or a hidden state (``y = f(x) + eps``
with ``eps ~ N(0, I)``, so ``F`` estimates the diagonal of ``J^T J`` and the cost predicts the output's
squared error). Every (layer, width) is sized exactly as the artifact stores it (packed codes and
scales), the rest of the artifact once, and the exact multiple-choice knapsack picks the widths of least
summed cost that fit. On EfficientNet-Lite0 this Fisher cost picks better layouts than HAWQ's
Hessian-trace cost and as good as measuring every layer at every width, at 1/100 of the latter's time
(experiments/realvision).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qsweep.config import ConfigError, quant_recipe
from qsweep.export import artifact_bytes
from qsweep.quant.batches import call_model, to_device
from qsweep.quant.calibrate import prepare
from qsweep.quant.embedding import QuantEmbedding, quant_embeddings
from qsweep.quant.knapsack import knapsack
from qsweep.quant.modules import QuantLayer, quant_layers
from qsweep.quant.packed import packed_bytes
from qsweep.quant.plan import matches, selects
from qsweep.quant.quantizer import QuantizedWeight, quantize_weight

FIT_TRIES = 8  # knapsack solves per budget before settling for the narrowest layout
FLOAT = 32  # the knapsack's key for a float weight (``null`` in quant.mixed.widths)


def width_options(layer: QuantLayer | QuantEmbedding, float_weight: torch.Tensor, widths: Sequence[int]
                  ) -> dict[int, QuantizedWeight]:
    """``layer``'s weight (or table) rounded to nearest on the recipe's grid at each width."""
    spec = layer.spec if isinstance(layer, QuantEmbedding) else layer.plan.weight
    return {b: quantize_weight(float_weight, replace(spec, bits=b), layer.layer_name) for b in widths}


def fisher_output(out: Any, fisher: str) -> torch.Tensor:
    """The output the Fisher information is taken on: a tensor itself; of a ModelOutput or dict, its ``logits``
    (categorical) or ``last_hidden_state`` (gaussian), else its first tensor; of a tuple, its first tensor."""
    if torch.is_tensor(out):
        return out
    values: list[Any] = []
    if isinstance(out, Mapping):
        key = "logits" if fisher == "categorical" else "last_hidden_state"
        if key in out:
            return out[key]
        if fisher == "categorical":
            raise ConfigError(f"quant.mixed.fisher=categorical draws labels from class logits, and the model returns "
                              f"a {type(out).__name__} without 'logits' (it holds {list(out)}); set "
                              "quant.mixed.fisher=gaussian for features such as embeddings or hidden states")
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    first = next((v for v in values if torch.is_tensor(v)), None)
    if first is None:
        raise ConfigError(f"quant.mixed: the model returns a {type(out).__name__} holding no tensor to measure the "
                          "Fisher information on")
    return first


def drawn_log_likelihood(out: torch.Tensor, fisher: str, gen: torch.Generator) -> torch.Tensor:
    """``log p(y | x)`` of one ``y`` drawn from the output model at one sample's output ``out``."""
    if fisher == "categorical":
        logp = torch.log_softmax(out.float().flatten(1), dim=1)
        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen)[0, 0]
        return logp[0, y]
    mean = out.float()
    y = mean.detach() + torch.randn(mean.shape, generator=gen).to(mean.device)
    return -0.5 * (y - mean).pow(2).sum()  # log N(y; f(x), I) up to a constant: its gradient is J^T eps


def fisher_diagonals(model: nn.Module, layers: dict[str, QuantLayer], weights: dict[str, torch.Tensor],
                     samples: Sequence[Any], draws: int, seed: int, fisher: str = "categorical"
                     ) -> dict[str, torch.Tensor]:
    """Per-weight Fisher information of ``layers`` in the float model under the output model ``fisher``
    (``categorical`` | ``gaussian``): quantized layers run their float weight with their input quantizers
    off (what the float model computes)."""
    device = next(iter(weights.values())).device
    acts = {n: layer.act for n, layer in layers.items()}
    params = {n: weights[n].detach().clone().requires_grad_(True) for n in layers}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    try:
        for n, layer in layers.items():
            layer.act, layer.weight = None, params[n]
        for sample in samples:
            out = fisher_output(call_model(model, to_device(sample, device)), fisher)
            for draw in range(draws):
                grads = torch.autograd.grad(drawn_log_likelihood(out, fisher, gen), list(params.values()),
                                            retain_graph=draw < draws - 1, allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        sums[n].add_(g.detach().pow(2))
                count += 1
    finally:
        for n, layer in layers.items():
            layer.act, layer.weight = acts[n], weights[n].detach().clone()
    return {n: s / max(count, 1) for n, s in sums.items()}


def single_samples(batches: Sequence[Any], limit: int) -> list[Any]:
    """The first ``limit`` calibration samples, one per batch (per-sample gradients)."""
    out: list[Any] = []
    for batch in batches:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = len(next(iter(first.values()))) if isinstance(first, dict) else len(first)
        for i in range(n):
            if len(out) == limit:
                return out
            if isinstance(batch, dict):
                out.append({k: v[i:i + 1] for k, v in batch.items()})
            elif isinstance(batch, (tuple, list)):
                out.append(type(batch)(t[i:i + 1] if torch.is_tensor(t) else t for t in batch))
            else:
                out.append(batch[i:i + 1])
    return out


class WidthPlanner:
    """Each chosen layer's bytes and Fisher cost at every width of ``recipe.mixed``, measured once; then
    :meth:`choose` picks the least-cost layout under any budget, checked in the artifact's exact bytes.

    A copy of the model is folded and rewritten by :func:`~qsweep.quant.calibrate.prepare` exactly as the
    quantization that follows will, so the float weights measured are the ones that will be rounded.
    """

    def __init__(self, model: nn.Module, recipe: Any, batches: Sequence[Any]):
        start = time.perf_counter()
        recipe = quant_recipe(recipe)
        self.mixed = mixed = recipe.mixed
        self.widths = sorted(int(b) for b in mixed.widths if b is not None)
        self.work = copy.deepcopy(model).eval()
        floats: dict[str, torch.Tensor] = {}
        prepare(self.work, recipe, batches, float_weights=floats)  # its plan checks that quant.mixed.layers match
        self.floats = floats = {n: w.detach() for n, w in floats.items()}
        quantized = quant_layers(self.work)
        names = list(quantized)
        self.layers = {n: m for n, m in quantized.items() if m.qweight is not None
                       and any(selects(p, n, m, names) for p in mixed.layers)}
        self.layers.update({n: t for n, t in quant_embeddings(self.work).items()
                            if any(matches(n, p) for p in mixed.layers)})
        self.float_tables = {n: model.get_submodule(n) for n, t in self.layers.items() if isinstance(t, QuantEmbedding)}
        self.acts = {n: m.act for n, m in self.layers.items()}
        if not self.layers:
            raise ConfigError(f"quant.mixed.layers={list(mixed.layers)} selects no layer with quantized weights")
        self.rounded = {n: width_options(layer, floats[n], self.widths) for n, layer in self.layers.items()}
        self.samples = len(samples := single_samples(batches, int(mixed.num_samples)))
        fisher = fisher_diagonals(self.work, self.layers, floats, samples, int(mixed.draws), int(recipe.calib.seed),
                                  str(mixed.fisher))
        self.options = {n: {b: (packed_bytes(q), 0.5 * float((fisher[n] * (q.dequantize() - floats[n]).pow(2)).sum()))
                            for b, q in self.rounded[n].items()} for n in self.layers}
        if None in mixed.widths:  # kept in float: no rounding error, its fp32 bytes (activation error not counted)
            for n in self.layers:
                self.options[n][FLOAT] = (floats[n].numel() * floats[n].element_size(), 0.0)
        self.uniform = {b: self.exact(dict.fromkeys(self.layers, b)) for b in (self.widths[0], self.widths[-1])}
        self.seconds = time.perf_counter() - start

    def exact(self, widths: dict[str, int]) -> int:
        """The artifact's bytes (``quant.mixed.kernels`` form) with the chosen layers at ``widths``."""
        for n, b in widths.items():
            layer = self.layers[n]
            if n in self.float_tables:  # a table kept float is the float module itself
                self.work.set_submodule(n, self.float_tables[n] if b == FLOAT else layer)
                if b != FLOAT:
                    layer.set_qweight(self.rounded[n][b])
            elif b == FLOAT:
                layer.qweight, layer.weight, layer.act = None, self.floats[n].clone(), None
            else:
                layer.set_qweight(self.rounded[n][b])
                layer.act = self.acts[n]
        return artifact_bytes(self.work, self.mixed.kernels)

    def choose(self, budget: int) -> dict[str, Any]:
        """The least-cost widths within ``budget`` bytes: ``widths`` ({layer: bits, None: float}), ``budget_bytes``, the
        layout's exact ``bytes``, the narrowest and widest uniform layouts' bytes, samples and seconds."""
        start = time.perf_counter()
        low, high = self.widths[0], self.widths[-1]
        if self.uniform[low] > budget:
            raise ConfigError(f"quant.mixed: the budget of {budget / 1e6:.6f} MB is below the artifact with every "
                              f"chosen layer at {low} bits ({self.uniform[low] / 1e6:.6f} MB); raise the budget or "
                              "add narrower widths to quant.mixed.widths")
        fixed = self.uniform[high] - sum(self.options[n][high][0] for n in self.layers)
        # The planned bytes leave out the zip's per-record alignment: shrink the target by any overshoot.
        target, pick = budget - fixed, dict.fromkeys(self.layers, low)
        for _ in range(FIT_TRIES):
            candidate = knapsack(self.options, target)
            if candidate is None:
                break
            size = self.exact(candidate)
            if size <= budget:
                pick = candidate
                break
            target -= size - budget
        return {"widths": {n: None if b == FLOAT else b for n, b in pick.items()}, "budget_bytes": budget, "bytes": self.exact(pick), "kernels": self.mixed.kernels,
                "uniform_bytes": self.uniform, "samples": self.samples,
                "seconds": round(self.seconds + time.perf_counter() - start, 2)}


def choose_widths(model: nn.Module, recipe: Any, batches: Sequence[Any]) -> dict[str, Any]:
    """``recipe.mixed``'s widths for ``model`` under its budget (:meth:`WidthPlanner.choose`'s report)."""
    planner = WidthPlanner(model, recipe, batches)
    return planner.choose(budget_bytes(planner.mixed, planner.uniform[planner.widths[-1]]))


def budget_bytes(mixed: DictConfig, widest_bytes: int) -> int:
    """``quant.mixed``'s budget in bytes: ``budget_mb``, else ``budget_fraction`` of the widest layout's artifact."""
    if mixed.budget_mb is not None:
        return int(float(mixed.budget_mb) * 1e6)
    return int(float(mixed.budget_fraction) * widest_bytes)


def with_widths(recipe: DictConfig, widths: dict[str, int]) -> DictConfig:
    """``recipe`` with each chosen layer's width written out in ``layers`` (after its own overrides) and
    ``mixed`` off: the layout as a plain recipe, which a run can reproduce without choosing again."""
    plain = OmegaConf.to_container(recipe, resolve=True)
    kept = {"w_bits": None, "a_bits": None}  # float: weight and input, as quant.skip leaves a layer
    plain["layers"] = {**plain.get("layers", {}), **{n: {"w_bits": b} if b else kept for n, b in widths.items()}}
    plain["mixed"] = {**plain["mixed"], "enabled": False}
    return quant_recipe(plain)
