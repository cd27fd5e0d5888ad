"""Models: :func:`build_model` turns a ``ModelConfig`` (+ the data it runs on) into weights.

The weights tag returned with the model says where the weights came from: ``"embedded"``
(digits_vit trained by qsweep / cached), ``"checkpoint:<file name>"``, ``"random"`` or
``"pretrained"`` (timm hub weights).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from qsweep.config import WEIGHT_SOURCES, ConfigError
from qsweep.models.cache import cache_dir
from qsweep.models.checkpoint import CheckpointError, load_checkpoint, num_classes_of
from qsweep.models.digits_vit import NAME as DIGITS_VIT
from qsweep.models.digits_vit import build_digits_vit, load_digits_vit

log = logging.getLogger(__name__)

RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained")


def _kwargs(cfg) -> dict:
    raw = cfg.kwargs or {}
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = dict(raw)
    clash = [k for k in RESERVED_KWARGS if k in raw]
    if clash:
        raise ConfigError(
            f"model.kwargs may not set {clash}: num_classes and in_chans come from the data, "
            f"and pretrained from model.weights"
        )
    return raw


def _check_timm_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    candidates = timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not close:
        close = [m for m in candidates if name.lower() in m][:5]
    hint = f"; close matches: {close}" if close else ""
    raise ConfigError(
        f"model.name={name!r} is not allowed: it is neither {DIGITS_VIT!r} nor a timm model{hint} "
        f"(see timm.list_models())"
    )


def _create(cfg, bundle, pretrained: bool) -> nn.Module:
    """The architecture named by ``cfg.name`` sized for ``bundle`` (current torch RNG for init)."""
    c, h, w = bundle.input_shape
    if cfg.name == DIGITS_VIT:
        if pretrained:
            raise ConfigError(
                f"model.name={DIGITS_VIT} has no hub weights: leave model.weights=auto to train it "
                f"(cached after the first run), or give model.checkpoint=PATH"
            )
        if _kwargs(cfg):
            raise ConfigError(f"model.kwargs is not supported for model.name={DIGITS_VIT}; leave it empty")
        return build_digits_vit(bundle.num_classes, c, (h, w))
    import timm

    _check_timm_name(cfg.name)
    kwargs = _kwargs(cfg)
    try:
        return timm.create_model(
            cfg.name, pretrained=pretrained, num_classes=bundle.num_classes, in_chans=c, **kwargs
        )
    except TypeError as exc:
        raise ConfigError(f"model.kwargs={kwargs!r} is not accepted by timm model {cfg.name!r}: {exc}") from exc
    except Exception as exc:
        if not pretrained:
            raise
        raise ConfigError(
            f"could not get pretrained weights for model.name={cfg.name!r} ({type(exc).__name__}: {exc}). "
            f"qsweep runs offline: download the weights elsewhere and pass model.checkpoint=PATH, "
            f"or use model.weights=random for speed/size benchmarks only"
        ) from exc


def build_model(cfg, bundle, cache_dir: Path, progress: bool = True) -> tuple[nn.Module, str]:
    """The eval-mode model for ``cfg`` on ``bundle`` and its weights tag (see module docstring)."""
    name = cfg.name
    weights, checkpoint, trust = cfg.weights, cfg.checkpoint, cfg.trust_checkpoint
    if weights not in WEIGHT_SOURCES:
        raise ConfigError(f"model.weights={weights!r} is not allowed; choose one of {list(WEIGHT_SOURCES)}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name={name!r} is not allowed; give 'digits_vit' or a timm model name")
    if cfg.source == "hf":
        from qsweep.models.hf import build_hf_model  # transformers is an optional extra

        return build_hf_model(cfg, bundle)

    if checkpoint:
        if weights != "auto":
            log.warning("model.checkpoint is set: ignoring model.weights=%s", weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _create(cfg, bundle, pretrained=False)
        model = load_checkpoint(checkpoint, model, trust=trust, num_classes=bundle.num_classes)
        return model.eval(), f"checkpoint:{Path(str(checkpoint)).name}"

    if weights == "random":
        torch.manual_seed(0)
        model = _create(cfg, bundle, pretrained=False)
        return model.eval(), "random"

    if weights == "pretrained":
        model = _create(cfg, bundle, pretrained=True)
        return model.eval(), "pretrained"

    # weights == "auto", no checkpoint
    if name == DIGITS_VIT:
        if bundle.name != "digits":
            raise ConfigError(
                f"model.name={DIGITS_VIT} is trained by qsweep on data.name=digits only, but data.name="
                f"{bundle.name}: use data=digits, pass model.checkpoint=PATH, or choose a timm model"
            )
        return load_digits_vit(bundle, Path(cache_dir), progress=progress).eval(), "embedded"
    _check_timm_name(name)
    raise ConfigError(
        f"model.name={name} has no weights: pass model.checkpoint=PATH, or model.weights=random for a "
        f"random-weight model (speed/size benchmarks only)"
    )


__all__ = [
    "CheckpointError",
    "build_digits_vit",
    "build_model",
    "cache_dir",
    "load_checkpoint",
    "load_digits_vit",
    "num_classes_of",
]
