"""What a layout's outputs are worth: top-1 against labels, or fidelity to the FP32 model's outputs (no labels).

Each quality is a mean over inputs of a per-input value, so a partial evaluation is a running sum a
pruner can bound: the rest of the inputs can add at most ``ceiling`` each. Fidelity compares outputs
of any shape: agreement and KL over the last dimension (the classes; for per-token outputs averaged over
the positions of an input), cosine over an input's whole output vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qsweep.quant.batches import to_device

PerInput = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def _positions(out: torch.Tensor) -> torch.Tensor:
    """``(batch, ..., classes)`` as ``(batch, positions, classes)`` in float64."""
    return out.reshape(out.shape[0], -1, out.shape[-1]).double()


def _top1(out: torch.Tensor, ref: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    return (out.argmax(dim=-1) == labels.to(out.device)).double()


def _agreement(out: torch.Tensor, ref: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    return (_positions(out).argmax(-1) == _positions(ref).argmax(-1)).double().mean(1)


def _kl(out: torch.Tensor, ref: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    """KL(FP32 || quantized) of the softmax distributions, >= 0 (rounding clamped)."""
    p, q = F.log_softmax(_positions(ref), -1), F.log_softmax(_positions(out), -1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0).mean(1)


def _cosine(out: torch.Tensor, ref: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    return F.cosine_similarity(out.reshape(len(out), -1).double(), ref.reshape(len(ref), -1).double(), dim=1)


@dataclass(frozen=True)
class Quality:
    """One way to score a layout's outputs: a mean over inputs of ``per_input``, times ``scale``."""

    name: str
    maximize: bool
    scale: float  # 100: a percentage
    ceiling: float  # the best value one input can have (what an unevaluated input adds at most)
    needs_labels: bool
    per_input: PerInput  # (outputs, FP32 outputs, labels) -> one value per input
    unit: str

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"

    def mean(self, total: float, seen: int) -> float:
        return self.scale * total / seen

    def optimistic(self, total: float, seen: int, n: int) -> float:
        """The best mean over ``n`` inputs once ``seen`` of them summed to ``total``."""
        return self.scale * (total + (n - seen) * self.ceiling) / n

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def key(self, value: float) -> float:
        """Sorts best first."""
        return -value if self.maximize else value

    def format(self, value: float) -> str:
        return f"{self.unit} {value:.2f} %" if self.scale == 100 else f"{self.unit} {value:.5g}"


QUALITIES: dict[str, Quality] = {
    "top1": Quality("top1", True, 100.0, 1.0, True, _top1, "top-1"),
    "agreement": Quality("agreement", True, 100.0, 1.0, False, _agreement, "agreement"),
    "kl": Quality("kl", False, 1.0, 0.0, False, _kl, "KL"),
    "cosine": Quality("cosine", True, 1.0, 1.0, False, _cosine, "cosine"),
}


def describe(quality: Quality, score: float | None, value: float | None, top1: float | None) -> str:
    """``score S, <quality> Q, top-1 T %``, each where it was measured (the quality once, when it is top-1)."""
    parts = [f"score {score:g}" if score is not None else None,
             quality.format(value) if quality.name != "top1" and value is not None else None,
             f"top-1 {top1:.2f} %" if top1 is not None else None]
    return ", ".join(p for p in parts if p)


def quality_of(search) -> Quality:
    """A study's quality measure: its fidelity objective, pareto's ``search.quality``, or top-1 for the score."""
    if search.objective in QUALITIES:
        return QUALITIES[search.objective]
    return QUALITIES[search.quality if search.objective == "pareto" else "top1"]


def inputs_of(batch) -> torch.Tensor:
    """A batch's model input: ``(x, y)`` / ``[x, ...]`` give ``x``, a bare tensor is the input itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def labels_of(batch) -> torch.Tensor | None:
    """A batch's labels, or None when it has none (a bare tensor, or a 1-tuple)."""
    return batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The float model's outputs on each batch (kept on the CPU): computed once, compared with every layout."""
    model.eval()
    return [model(to_device(inputs_of(batch), device)).detach().float().cpu() for batch in batches]


@torch.no_grad()
def mean_quality(model: nn.Module, batches: Iterable, quality: Quality, reference: list[torch.Tensor] | None,
                 device: torch.device | str = "cpu") -> float:
    """``quality`` of ``model`` over ``batches`` (labels ignored unless the quality needs them)."""
    model.eval()
    total, seen = 0.0, 0
    for i, batch in enumerate(batches):
        out = model(to_device(inputs_of(batch), device)).float().cpu()
        total += float(quality.per_input(out, reference[i] if reference is not None else None, labels_of(batch)).sum())
        seen += len(out)
    return quality.mean(total, seen)
