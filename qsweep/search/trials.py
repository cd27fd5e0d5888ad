"""Cheap trials: any layout of a space assembled from caches, measured, and evaluated in steps.

Activations are calibrated once (per searched activation width) and every weight width is
quantized once, so a trial costs one size measurement plus one evaluation of the trial images.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from qsweep.config import quant_recipe
from qsweep.evaluate import top1_correct
from qsweep.export import artifact_bytes
from qsweep.search.fidelity import QUALITIES, Quality, inputs_of, labels_of
from qsweep.quant.pipeline import quantize
from qsweep.quant.smooth import input_divisors
from qsweep.quant.intkernel import to_int_backend
from qsweep.quant.packed import packed_bytes
from qsweep.search.space import FLOAT, SearchSpace


def recipe_with(recipe: DictConfig, layers: Iterable[str], **override: int | None) -> DictConfig:
    """``recipe`` with ``override`` (``w_bits`` / ``a_bits``) applied to every layer in ``layers``."""
    plain = OmegaConf.to_container(recipe, resolve=True)
    plain["layers"] = {**plain.get("layers", {}), **{name: dict(override) for name in layers}}
    return quant_recipe(plain)


@dataclass
class TrialImages:
    """The trial evaluation set held in memory as ``(inputs, labels)`` batches, in a seeded random order.

    A random order makes every prefix an unbiased sample, so a partial evaluation after any
    step estimates the accuracy a pruner can act on. Labels are None for a dataset without them
    (its items bare inputs): the fidelity qualities need none.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor | None]]

    @classmethod
    def from_dataset(cls, dataset, limit: int | None, batch_size: int, seed: int, steps: int = 1) -> "TrialImages":
        """``limit`` images of ``dataset`` in batches of at most ``batch_size``, and small enough to
        make ``steps`` evaluation steps (one batch would give a pruner nothing to act on)."""
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        if limit is not None:
            order = order[:limit]
        batch_size = max(1, min(batch_size, math.ceil(len(order) / max(1, steps))))
        loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False)
        return cls([(inputs_of(batch), labels_of(batch)) for batch in loader])

    @property
    def images(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    @property
    def labelled(self) -> bool:
        return all(y is not None for _, y in self.batches)

    def steps(self, n: int) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """The batches cut into ``n`` consecutive steps of near-equal size (fewer if there are fewer batches)."""
        n = max(1, min(n, len(self.batches)))
        bounds = [round(i * len(self.batches) / n) for i in range(n + 1)]
        return [self.batches[bounds[i]:bounds[i + 1]] for i in range(n)]


class LayoutModels:
    """Quantized models for the layouts of ``space``, from one calibration and one weight pass per width.

    The working model starts from the recipe with every searched layer at the widest weight
    width; a layout swaps in cached weight codes, activation quantizers and float layers.
    """

    def __init__(self, model: nn.Module, recipe: DictConfig, calib: list[Any], space: SearchSpace,
                 adaround: Any = None, lsq: Any = None, progress: bool = False, kernels: str = "fake"):
        self.space, self.kernels = space, kernels  # kernels: the artifact form sized (export.kernels)
        widths = [w for w in space.w_choices if w != FLOAT]
        top_w = max(widths)
        a_default = max(space.a_choices) if space.a_choices else None
        a_override = {"a_bits": a_default} if a_default is not None else {}
        learned = any(c is not None and c.mode != "off" for c in (adaround, lsq))
        reconstruct = {"adaround": adaround, "lsq": lsq} if learned else {}
        # Weights need all the calibration data only where something learns from it (AdaRound, LSQ)
        # or rewrites float weights from activation statistics (quant.vit.post_ln), or GPTQ needs Hessians.
        weight_calib = calib if learned or recipe.vit.post_ln != "off" or recipe.gptq.enabled else calib[:1]

        self.model = quantize(model, recipe_with(recipe, space.layers, w_bits=top_w, **a_override), calib,
                              progress=progress, **reconstruct)
        # quant.smooth: every width reuses the widest one's input scales, since a layout pairs one
        # width's weight codes with another's activation quantizer (which quantizes x / s).
        reconstruct["smoothing"] = input_divisors(self.model) if recipe.smooth.enabled else None
        self.quant_modules = {n: self.model.get_submodule(n) for n in space.layers}
        layers = [n for n in space.layers if n not in space.tables]  # tables have neither bias nor input quantizer
        self.weights = {(n, top_w): m.qweight for n, m in self.quant_modules.items()}
        # quant.bias_correction: a bias corrected for one width's weights goes with them.
        self.biases = {(n, top_w): self.quant_modules[n].bias for n in layers}
        for w in widths:
            if w == top_w:
                continue
            base = quantize(model, recipe_with(recipe, space.layers, w_bits=w, **a_override), weight_calib,
                            **reconstruct)
            self.weights.update({(n, w): base.get_submodule(n).qweight for n in space.layers})
            self.biases.update({(n, w): base.get_submodule(n).bias for n in layers})
        self.acts = {(n, a_default): self.quant_modules[n].act for n in layers}
        for a in space.a_choices or ():
            if a == a_default:
                continue
            base = quantize(model, recipe_with(recipe, space.layers, w_bits=top_w, a_bits=a), calib, **reconstruct)
            self.acts.update({(n, a): base.get_submodule(n).act for n in layers})
        self.floats: dict[str, nn.Module] = {}
        if FLOAT in space.w_choices:
            base = quantize(model, recipe_with(recipe, space.layers, w_bits=None, a_bits=None), weight_calib)
            self.floats = {n: base.get_submodule(n) for n in space.layers}
        self.param_counts = {n: m.weight.numel() for n, m in self.quant_modules.items()}
        self.packed_bytes = {key: packed_bytes(q) for key, q in self.weights.items()}
        self._fixed_bytes = artifact_bytes(self.model, kernels) - sum(
            self.packed_bytes[(n, top_w)] for n in space.layers)
        self._float_bytes = {n: sum(t.numel() * t.element_size() for t in m.state_dict().values())
                             for n, m in self.floats.items()}
        self._current: dict[str, dict[str, int]] = {}

    def apply(self, layout: dict[str, dict[str, int]]) -> nn.Module:
        """The working model set to ``layout`` (in place; returned for convenience)."""
        for name, choice in self.space.per_layer(layout).items():
            if self._current.get(name) == choice:
                continue
            if choice["w"] == FLOAT:
                self.model.set_submodule(name, self.floats[name])
            else:
                module = self.quant_modules[name]
                self.model.set_submodule(name, module)
                if module.qweight is not self.weights[(name, choice["w"])]:
                    module.set_qweight(self.weights[(name, choice["w"])])
                    if name not in self.space.tables:
                        module.bias = self.biases[(name, choice["w"])]
                if "a" in choice and name not in self.space.tables:
                    module.act = self.acts[(name, choice["a"])]
            self._current[name] = dict(choice)
        return self.model

    def size_bytes(self) -> int:
        """The current layout's artifact size in exact bytes, as its exported run measures it."""
        return artifact_bytes(self.model, self.kernels)

    def size_mb(self) -> float:
        """The artifact size of the current layout as the grader measures it (exact bytes / 1e6)."""
        return self.size_bytes() / 1e6

    def layout_bytes(self, layout: dict[str, dict[str, int]]) -> int:
        """``layout``'s exact artifact bytes (sets the working model to it)."""
        self.apply(layout)
        return self.size_bytes()

    @property
    def fixed_bytes(self) -> int:
        """The artifact's bytes besides the searched layers' weights (scales, biases, the rest), as planned."""
        return self._fixed_bytes

    def choice_bytes(self, group: str, w_bits: int) -> int:
        """The weight bytes of ``group``'s layers at ``w_bits`` (FLOAT: their float tensors), as planned."""
        names = self.space.groups[group]
        if w_bits == FLOAT:
            return sum(self._float_bytes[n] for n in names)
        return sum(self.packed_bytes[(n, w_bits)] for n in names)

    def estimate_mb(self, layout: dict[str, dict[str, int]]) -> float:
        """The artifact size from cached per-layer packed sizes, without serializing (for planning)."""
        return (self.fixed_bytes + sum(self.choice_bytes(g, c["w"]) for g, c in layout.items())) / 1e6

    def runner(self, backend: str) -> tuple[nn.Module, dict[str, str]]:
        """The model to evaluate: the integer-kernel copy (``int``) or the fake-quant model itself."""
        return to_int_backend(self.model) if backend == "int" else (self.model, {})


@dataclass
class Tally:
    """A (partial) evaluation: inputs seen, the quality summed over them, top-1 hits (None without labels)."""

    seen: int = 0
    total: float = 0.0
    correct: int | None = 0

    def top1(self) -> float | None:
        return None if self.correct is None else 100.0 * self.correct / self.seen


@torch.no_grad()
def evaluate_in_steps(model: nn.Module, images: TrialImages, steps: int, device: torch.device,
                      on_step: Callable[[int, Tally], None], quality: Quality = QUALITIES["top1"],
                      reference: list[torch.Tensor] | None = None) -> Tally:
    """``quality`` (and top-1 where there are labels) over ``images`` in ``steps`` parts, calling
    ``on_step(step, tally)`` after each; ``reference``: the FP32 outputs of each batch, for fidelity.

    ``on_step`` may raise (e.g. ``optuna.TrialPruned``) to stop early. Returns the tally.
    """
    tally = Tally()
    model.eval()
    i = 0
    for step, part in enumerate(images.steps(steps)):
        for x, y in part:
            logits = model(x.to(device)).float()
            ref = reference[i] if reference is not None else None
            tally.total += float(quality.per_input(logits.cpu(), ref, y).sum())
            tally.correct = None if y is None or tally.correct is None else tally.correct + top1_correct(logits, y)
            tally.seen += len(x)
            i += 1
        on_step(step, tally)
    return tally
