"""The search space: which layers are searched, how they are tied into groups, which widths."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from torch import nn

from qsweep.config import ConfigError
from qsweep.quant.plan import KINDS, QUANTIZABLE, matches

FLOAT = 32  # the "keep in float" choice, as a bit width a table can sort

# A path component that is an index ("blocks.3", "layer2.1", "stages.0") ends a block prefix.
_INDEX = re.compile(r"^\d+$")


def block_of(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``blocks.3``; ``layer2.1.conv1`` -> ``layer2.1``; ``head`` -> ``head``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return name


def type_of(name: str) -> str:
    """The layer's role without its block index: ``blocks.3.attn.qkv`` -> ``attn.qkv``."""
    block = block_of(name)
    return name[len(block) + 1:] if block != name else name


GROUPERS = {"layer": lambda n: n, "block": block_of, "type": type_of}


def role_grouper(model: nn.Module) -> Callable[[str], str]:
    """``group_by=role``: the first and the last quantizable layer and every depthwise conv alone (the layer kinds
    ``@first``, ``@last`` and ``@depthwise`` of ``quant.layers``, :data:`qsweep.quant.plan.KINDS`), others per block."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, QUANTIZABLE)]
    alone = ("@first", "@last", "@depthwise")

    def group(name: str) -> str:
        return name if any(KINDS[kind](name, modules[name], names) for kind in alone) else block_of(name)

    return group


@dataclass(frozen=True)
class SearchSpace:
    """Groups of layers that share one weight (and optionally activation) width per trial.

    Embedding tables the recipe quantizes (``quant.embeddings``) are searched like layers; having no input
    to quantize, a group of tables alone takes no activation width.
    """

    groups: dict[str, tuple[str, ...]]  # group name -> layer names, in model order
    w_choices: tuple[int, ...]  # FLOAT included where allowed
    a_choices: tuple[int, ...] | None  # None: activations keep the recipe's width
    tables: frozenset[str] = frozenset()  # the searched layers that are embedding tables

    @classmethod
    def build(cls, layer_names: list[str], search: Any, model: nn.Module | None = None) -> "SearchSpace":
        """``layer_names``: the recipe's quantized-weight layers in model order; ``search``: the search config;
        ``model``: the float model (``group_by=role`` asks its layers what they are; it tells tables from layers)."""
        picked = [n for n in layer_names if any(matches(n, p) for p in search.layers)]
        if not picked:
            raise ConfigError(f"search.layers={list(search.layers)} matches none of the quantized layers; "
                              f"first layer names: {layer_names[:6]}")
        if search.group_by == "role" and model is None:
            raise ValueError("search.group_by=role needs the model to tell depthwise, first and last layers")
        grouper = role_grouper(model) if search.group_by == "role" else GROUPERS[search.group_by]
        groups: dict[str, list[str]] = {}
        for name in picked:
            groups.setdefault(grouper(name), []).append(name)
        w = tuple(sorted(set(int(b) for b in search.w_bits))) + ((FLOAT,) if search.allow_float else ())
        a = tuple(sorted(set(int(b) for b in search.a_bits))) if search.a_bits else None
        tables = frozenset(n for n in picked if model is not None and isinstance(model.get_submodule(n), nn.Embedding))
        return cls({g: tuple(names) for g, names in groups.items()}, w, a, tables)

    @property
    def layers(self) -> list[str]:
        return [n for names in self.groups.values() for n in names]

    def has_act(self, group: str) -> bool:
        """Whether ``group`` takes an activation width (it is searched and the group is not all tables)."""
        return self.a_choices is not None and not self.tables.issuperset(self.groups[group])

    def suggest(self, trial: optuna.Trial) -> dict[str, dict[str, int]]:
        """Ask ``trial`` for one width per group; returns the layout ``{group: {"w": bits, "a": bits}}``."""
        layout = {}
        for group in self.groups:
            choice = {"w": trial.suggest_categorical(f"w:{group}", list(self.w_choices))}
            if self.has_act(group) and choice["w"] != FLOAT:
                choice["a"] = trial.suggest_categorical(f"a:{group}", list(self.a_choices))
            layout[group] = choice
        return layout

    def params(self, layout: dict[str, dict[str, int]]) -> dict[str, int]:
        """The Optuna params that make ``suggest`` return ``layout`` (for ``enqueue_trial``)."""
        out = {}
        for group, choice in layout.items():
            out[f"w:{group}"] = choice["w"]
            if "a" in choice:
                out[f"a:{group}"] = choice["a"]
        return out

    def layout_of(self, params: dict[str, Any]) -> dict[str, dict[str, int]]:
        """The layout a finished trial's ``params`` describe."""
        layout = {}
        for group in self.groups:
            choice = {"w": int(params[f"w:{group}"])}
            if f"a:{group}" in params:
                choice["a"] = int(params[f"a:{group}"])
            layout[group] = choice
        return layout

    def uniform(self, w_bits: int) -> dict[str, dict[str, int]]:
        """Every group at ``w_bits``, activations at the widest searched width."""
        return self.with_widths({g: w_bits for g in self.groups})

    def with_widths(self, w_bits: dict[str, int]) -> dict[str, dict[str, int]]:
        """The layout of one weight width per group, activations at the widest searched width (float: none)."""
        a = {"a": max(self.a_choices)} if self.a_choices is not None else {}
        return {g: {"w": w, **(a if w != FLOAT and self.has_act(g) else {})} for g, w in w_bits.items()}

    def per_layer(self, layout: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """``{layer: {"w": bits, "a": bits}}`` from a group layout."""
        return {name: layout[g] for g, names in self.groups.items() for name in names}

    def overrides(self, layout: dict[str, dict[str, int]]) -> dict[str, dict[str, int | None]]:
        """The layout as ``quant.layers`` overrides (float = ``w_bits: null, a_bits: null``; a table: its ``w_bits``)."""
        out: dict[str, dict[str, int | None]] = {}
        for name, choice in self.per_layer(layout).items():
            if name in self.tables:
                out[name] = {"w_bits": None if choice["w"] == FLOAT else choice["w"]}
            elif choice["w"] == FLOAT:
                out[name] = {"w_bits": None, "a_bits": None}
            else:
                out[name] = {"w_bits": choice["w"], **({"a_bits": choice["a"]} if "a" in choice else {})}
        return out

    def fingerprint(self, extra: dict[str, Any]) -> str:
        """Identifies the space (and ``extra``: objective, model, data); a resumed study must match it."""
        blob = json.dumps({"groups": self.groups, "w": self.w_choices, "a": self.a_choices, **extra},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        a = f", activation widths {list(self.a_choices)}" if self.a_choices else ""
        widths = ["float" if b == FLOAT else b for b in self.w_choices]
        tables = f" ({len(self.tables)} of them embedding tables)" if self.tables else ""
        return f"{len(self.groups)} groups over {len(self.layers)} layers{tables}, weight widths {widths}{a}"
