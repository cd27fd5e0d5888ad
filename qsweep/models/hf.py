"""Local Hugging Face image classifiers (``model.source=hf model.path=DIR``), offline.

``DIR`` is a ``save_pretrained`` directory (``config.json`` + weights). The model is loaded with
``transformers.AutoModelForImageClassification`` from local files only and wrapped in
:class:`HFImageClassifier`, so the rest of qsweep (evaluation, ``torch.export``, the grader) sees
a tensor -> tensor model. ``transformers`` is an optional extra: ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from qsweep.config import ConfigError
from qsweep.models.checkpoint import TRUST_HINT, CheckpointError, _check_classes, num_classes_of

log = logging.getLogger(__name__)

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HFImageClassifier(nn.Module):
    """``forward(pixel_values) -> logits`` around an HF ``*ForImageClassification`` (names under ``model.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("model.source=hf needs the optional dependency transformers: "
                          "pip install -e '.[hf]' (or pip install transformers)") from exc
    return transformers


def _use_safetensors(path: Path, trust: bool) -> bool:
    """True for safetensors weights; a pickled ``pytorch_model.bin`` only with ``trust``."""
    names = set(os.listdir(path))
    if names.intersection(SAFETENSORS_FILES):
        return True
    if names.intersection(PICKLE_FILES):
        if not trust:
            raise CheckpointError(
                f"model.path={str(path)!r} holds pickled weights (pytorch_model.bin), no model.safetensors. "
                f"Unpickling runs code from the file, so it is refused by default; {TRUST_HINT}, or re-save "
                f"the model with save_pretrained(..., safe_serialization=True)")
        log.warning("unpickling trusted HF weights in %s (pytorch_model.bin)", path)
        return False
    raise CheckpointError(f"model.path={str(path)!r} has no weights: expected one of "
                          f"{list(SAFETENSORS_FILES + PICKLE_FILES)} next to config.json "
                          f"(or use model.weights=random for size/speed benchmarks)")


def _check_input(path: Path, config, input_shape: tuple[int, int, int]) -> None:
    """The model's channels and image size (where its config states them) must match the data's."""
    c, h, w = input_shape
    channels = getattr(config, "num_channels", None)
    if channels is not None and int(channels) != c:
        raise ConfigError(f"model.path={str(path)!r}: the model takes num_channels={channels} but the data "
                          f"has {c}; use data matching the model (or a model trained on this data)")
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and (size, size) != (h, w):
        raise ConfigError(f"model.path={str(path)!r}: the model takes image_size={size} but the data gives "
                          f"{h}x{w}; set data.image_size={size} (cifar100/imagefolder) or use matching data")


def build_hf_model(cfg, bundle) -> tuple[nn.Module, str]:
    """The wrapped, eval-mode HF classifier in ``cfg.path`` and its weights tag."""
    transformers = _transformers()
    path = Path(str(cfg.path)).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={str(path)!r} is not allowed with model.source=hf: give a local "
                          "directory holding a Hugging Face model's config.json (save_pretrained output)")
    weights, trust = cfg.weights, cfg.trust_checkpoint
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    _check_input(path, config, bundle.input_shape)
    auto = transformers.AutoModelForImageClassification
    if weights == "random":
        torch.manual_seed(0)
        model, tag = auto.from_config(config, trust_remote_code=False), "random"
    else:
        model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=torch.float32,
                                     use_safetensors=_use_safetensors(path, trust))
        tag = f"hf:{path.name}"
    wrapped = HFImageClassifier(model.float()).eval()
    _check_classes(path, num_classes_of(wrapped), bundle.num_classes)
    return wrapped, tag
