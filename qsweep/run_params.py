"""What a run records as MLflow params: its recipe in a few comparable values, and what the command line changed.

The whole resolved config is the run's ``config.yaml`` artifact; params are the runs table's columns, so
only the values people compare go there (every flattened key made ~210 columns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from qsweep.tracking import flatten

# Config keys logged under their own names (filterable as params.`quant.act.observer` in the UI).
RECIPE_KEYS = ("mode", "model.name", "model.source", "data.name", "quant.name", "score.name",
               "quant.weight.bits", "quant.weight.granularity", "quant.weight.observer",
               "quant.act.bits", "quant.act.granularity", "quant.act.observer")
# Command-line overrides of these do not change a result, or are in the recipe params already.
UNCOMPARED = ("hydra", "progress", "cache_dir", "tracking", "name")
SUMMARIZED_GROUPS = ("quant", "model", "data", "score", "adaround", "lsq", "search")
MAX_OVERRIDES = 20  # with the recipe's 14, under 40 columns per run
VALUE_MAX = 250  # longer values are cut: the full value is in config.yaml
TRUNCATED = " ... (cut; see config.yaml)"


def run_params(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, str]:
    """The recipe's params, then each key the command line ``overrides`` set, flattened (globs included)."""
    params = recipe_params(cfg)
    extra = override_params(cfg, overrides)
    if len(extra) > MAX_OVERRIDES:
        kept = dict(list(extra.items())[:MAX_OVERRIDES - 1])
        kept["more_overrides"] = f"{len(extra) - len(kept)} more in config.yaml"
        extra = kept
    return {**params, **extra}


def recipe_params(cfg: DictConfig) -> dict[str, str]:
    """Recipe name, widths, observers, granularity, rounding method and layout hash, model, data, mode."""
    params = {key: text(_get(cfg, key)) for key in RECIPE_KEYS}
    params["rounding"] = rounding(cfg)
    params["layout"] = layout_hash(_get(cfg, "quant.skip"), _get(cfg, "quant.layers"))
    return params


def rounding(cfg: DictConfig) -> str:
    """How weights are rounded: ``adaround:<mode>``, ``lsq:<mode>``, ``gptq`` or ``nearest``; ``+lsq:act`` if
    activation step sizes are learned too (AdaRound and LSQ on weights replace GPTQ)."""
    adaround, lsq = _get(cfg, "adaround.mode") or "off", _get(cfg, "lsq.mode") or "off"
    if adaround != "off":
        method = f"adaround:{adaround}"
    elif lsq in ("weight", "both"):
        return f"lsq:{lsq}"
    else:
        method = "gptq" if _get(cfg, "quant.gptq.enabled") else "nearest"
    return method + ("+lsq:act" if lsq == "act" else "")


def layout_hash(skip: Any, layers: Any) -> str:
    """``uniform`` without per-layer rules, else 8 hex digits of the skip list and overrides (in order: later wins)."""
    skip, layers = _plain(skip) or [], _plain(layers) or {}
    if not skip and not layers:
        return "uniform"
    return hashlib.sha256(json.dumps([skip, layers], default=str).encode()).hexdigest()[:8]


def override_params(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, str]:
    """Each overridden key's resolved value; a mapping (``quant.layers``) flattened to one param per leaf.
    Group choices are the recipe params already, except ``+experiment=NAME`` (logged as ``experiment``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0].split("/")[0] in UNCOMPARED:
            continue
        node = _get(cfg, key)
        if isinstance(node, DictConfig) and isinstance(override.value(), str):  # a config group's option
            if key not in SUMMARIZED_GROUPS:
                out[key] = text(override.value())
        elif isinstance(node, DictConfig) and len(node):
            out.update({k: text(v) for k, v in flatten(_plain(node), key).items()})
        else:
            out[key] = text(node if node is not None else override.value())
    return out


def text(value: Any) -> str:
    """A param value: lists and mappings as JSON, cut at :data:`VALUE_MAX` characters."""
    value = _plain(value)
    s = json.dumps(value, default=str) if isinstance(value, (list, dict)) else "null" if value is None else str(value)
    return s if len(s) <= VALUE_MAX else s[:VALUE_MAX - len(TRUNCATED)] + TRUNCATED


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _get(cfg: DictConfig, key: str) -> Any:
    """``cfg``'s value at ``key``, None if absent or unreadable: a refused config is recorded with what can be read."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation or value that cannot be resolved
        return None
