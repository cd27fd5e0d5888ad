"""Resolve a recipe's globs, skips and per-layer overrides into a per-module plan."""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from timm.layers import Linear as TimmLinear
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn

from qsweep.config import ConfigError, TensorQuantConfig

QUANTIZABLE = (nn.Linear, nn.Conv2d)
log = logging.getLogger(__name__)
# Subclasses whose forward is the base op on their own weight and bias, TF-"same" padding aside.
SAME_AS_LINEAR = (TimmLinear,)
SAME_PADDING_CONVS = (Conv2dSame, Conv2dSameExport)


def unreproducible(module: nn.Module) -> str | None:
    """Why a quantized layer could not compute what ``module``'s forward does, or None if it can.

    Plain ``nn.Linear`` / ``nn.Conv2d`` (any padding mode) and subclasses that keep their forward
    are reproduced, and so are the known subclasses above; any other subclass overriding
    ``forward`` may transform its weight or input in ways a quantized weight would not go through.
    """
    cls = type(module)
    if isinstance(module, nn.Conv2d):
        if cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward:
            return None
        if isinstance(module, SAME_PADDING_CONVS) and cls.forward in (c.forward for c in SAME_PADDING_CONVS):
            return None
    elif isinstance(module, nn.Linear):
        if cls.forward is nn.Linear.forward or cls.forward in (c.forward for c in SAME_AS_LINEAR):
            return None
    else:
        return f"{cls.__name__} is not a Linear or Conv2d"
    return f"{cls.__module__}.{cls.__qualname__} overrides forward, which qsweep cannot run on a quantized weight"


@dataclass(frozen=True)
class LayerPlan:
    """What one module gets: a weight spec and an input-activation spec (None = float)."""

    name: str
    weight: TensorQuantConfig | None
    act: TensorQuantConfig | None


def matches(name: str, pattern: str) -> bool:
    """A glob matches a module and, like a path prefix, everything inside it (``blocks.9``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _is_depthwise(module: nn.Module) -> bool:
    """A conv with one input channel per group (an ``nn.Conv2d`` or the quantized conv made from one)."""
    groups = getattr(module, "groups", 1)
    return isinstance(groups, int) and groups > 1 and module.weight.dim() == 4 and module.weight.shape[1] == 1


# Layer kinds a recipe can name in quant.layers / quant.skip instead of a glob, so that one recipe fits any
# CNN (a depthwise conv is `conv_dw` in timm, `features.2.conv.1.0` in torchvision). A model without such a
# layer is no error: the recipe simply has nothing to say about it.
KINDS: dict[str, Callable[[str, nn.Module, list[str]], bool]] = {
    "@conv": lambda name, module, names: module.weight.dim() == 4,  # any Conv2d (or its quantized form)
    "@depthwise": lambda name, module, names: _is_depthwise(module),
    "@first": lambda name, module, names: name == names[0],  # the stem, in module order
    "@last": lambda name, module, names: name == names[-1],  # the classifier, in module order
}


def selects(pattern: str, name: str, module: nn.Module, names: list[str]) -> bool:
    """``pattern`` (a glob or a :data:`KINDS` name) selects module ``name`` among the quantizable ``names``."""
    kind = KINDS.get(pattern)
    return kind(name, module, names) if kind is not None else matches(name, pattern)


def _unmatched(key: str, pattern: str, candidates: list[str], all_names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(pattern, all_names, n=5, cutoff=0.4)
    # Nothing alike (timm's `head` is Hugging Face's `classifier`): show both ends, where rules usually point.
    names = f"closest module names: {close}" if close else (
        f"the {len(candidates)} quantizable modules run from {candidates[:3]} to {candidates[-2:]}")
    # A rule an experiment file sets (e.g. deit_w4a8's `head`) may name another model's module.
    simple = key == "quant.layers" and "." not in pattern
    fix = f"drop it with '~quant.layers.{pattern}'" if simple else f"set the whole of {key} on the command line"
    return ConfigError(
        f"{key} pattern {pattern!r} matches no Linear/Conv2d module; {names}. "
        f"If an experiment set it for another model, {fix}"
    )


def _tensor_cfg(cfg: Any) -> TensorQuantConfig:
    if isinstance(cfg, TensorQuantConfig):
        return cfg
    return TensorQuantConfig(**OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else TensorQuantConfig(**cfg)


def _apply_override(weight: TensorQuantConfig | None, act: TensorQuantConfig | None, base_w: TensorQuantConfig,
                    base_a: TensorQuantConfig, override: dict) -> tuple[TensorQuantConfig | None, TensorQuantConfig | None]:
    if "w_bits" in override:
        bits = override["w_bits"]
        weight = None if bits is None else replace(weight or base_w, bits=bits)
    if weight is not None and "w_granularity" in override:
        weight = replace(weight, granularity=override["w_granularity"])
    if weight is not None and "group_size" in override:
        weight = replace(weight, group_size=override["group_size"])
    if "a_bits" in override:
        bits = override["a_bits"]
        act = None if bits is None else replace(act or base_a, bits=bits)
    return weight, act


def left_float(model: nn.Module) -> dict[str, str]:
    """Linear / Conv2d modules a quantized copy could not stand in for: ``{name: why}``.

    Linears that are never called (a quantized copy would never run), and subclasses whose
    forward qsweep cannot reproduce on a quantized weight (swapping them would change the model).
    """
    never_called = {f"{name}.out_proj".lstrip("."): "nn.MultiheadAttention reads out_proj.weight directly in its "
                    "fused path and never calls the module"
                    for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    own_forward = {name: why for name, m in model.named_modules()
                   if isinstance(m, QUANTIZABLE) and (why := unreproducible(m)) is not None}
    return {**own_forward, **never_called}


def resolve_plan(model: nn.Module, recipe: DictConfig) -> dict[str, LayerPlan]:
    """Map every quantizable module name to its :class:`LayerPlan`.

    ``skip`` globs leave modules in float; ``layers`` overrides apply in the order written, a
    later glob overriding an earlier one. A glob that matches nothing is an error, since a typo
    there silently changes what is measured. :data:`KINDS` (``@depthwise``, ``@first``, ``@last``)
    select layers by what they are.
    """
    all_names = [n for n, _ in model.named_modules() if n]
    candidates = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not candidates:
        raise ConfigError("the model has no nn.Linear or nn.Conv2d module to quantize")
    base_w = _tensor_cfg(recipe.weight)
    base_a = _tensor_cfg(recipe.act)
    skips = list(recipe.skip or [])
    overrides = OmegaConf.to_container(recipe.layers, resolve=True) if isinstance(recipe.layers, DictConfig) else dict(recipe.layers or {})

    modules = dict(model.named_modules())
    corrected = list(recipe.bias_correction.layers or [])
    matched = list(recipe.bias_correction.match_float or [])
    mixed = list(recipe.mixed.layers) if recipe.mixed.enabled else []
    # quant.layers and quant.mixed.layers may name the tables quant.embeddings quantizes (their width).
    tables = [n for n, m in modules.items() if isinstance(m, nn.Embedding)] if recipe.embeddings.bits is not None else []
    for key, patterns in (("quant.skip", skips), ("quant.layers", overrides),
                          ("quant.bias_correction.layers", corrected), ("quant.bias_correction.match_float", matched),
                          ("quant.mixed.layers", mixed)):
        named = candidates + tables if key in ("quant.layers", "quant.mixed.layers") else candidates
        for pattern in patterns:
            if pattern not in KINDS and not any(matches(n, pattern) for n in named):
                raise _unmatched(key, pattern, candidates, all_names)

    unreached = left_float(model)
    for name, why in unreached.items():
        log.warning("left %s in float: %s", name, why)
    plan: dict[str, LayerPlan] = {}
    for name in candidates:
        if name in unreached or any(selects(p, name, modules[name], candidates) for p in skips):
            continue
        weight: TensorQuantConfig | None = base_w
        act: TensorQuantConfig | None = base_a if base_a.bits is not None else None
        for pattern, override in overrides.items():
            if selects(pattern, name, modules[name], candidates):
                weight, act = _apply_override(weight, act, base_w, base_a, override)
        if weight is not None or act is not None:
            plan[name] = LayerPlan(name=name, weight=weight, act=act)
    return plan
