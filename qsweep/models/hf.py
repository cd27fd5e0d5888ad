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

from qsweep.errors import ConfigError, QsweepError
from qsweep.models.checkpoint import TRUST_HINT, CheckpointError, _check_classes, _list, num_classes_of
from qsweep.models.hf_files import INDEX_FILE, SAFETENSORS_FILE, check_config, check_weights

log = logging.getLogger(__name__)

SAFETENSORS_FILES = (SAFETENSORS_FILE, INDEX_FILE)
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


def _transformers_call(path: Path, what: str, call):
    """``call()``; a failure inside transformers the file checks did not foresee still names the folder."""
    try:
        return call()
    except QsweepError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for one damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"model.path={str(path)!r}: transformers cannot {what} ({type(exc).__name__}: "
                              f"{first}); check the folder holds a complete save_pretrained output") from None


def _weights_file(path: Path) -> Path:
    return next((path / name for name in SAFETENSORS_FILES + PICKLE_FILES if (path / name).is_file()), path)


def _check_loading(path: Path, info: dict, strict: bool) -> str:
    """What the weights lacked or held beyond the model, as a note for the weights tag ('' if nothing).

    A tensor of the wrong shape is always an error; missing or unexpected tensors are one unless
    ``model.strict=false`` (then they are freshly initialised / dropped, with a warning).
    """
    where = str(_weights_file(path))
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        shown = "; ".join(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched[:5])
        raise CheckpointError(f"{where!r} has tensors of the wrong shape for the model its config.json describes "
                              f"({len(mismatched)} in all): {shown}; re-save the model or fix config.json")
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if not missing and not unexpected:
        return ""
    found = "; ".join(f"{what} tensors: {_list(names)}" for what, names in (("missing", missing),
                                                                            ("unexpected", unexpected)) if names)
    if strict:
        raise CheckpointError(f"{where!r} does not match the model its config.json describes: {found}. The model "
                              "measured would not be the saved one; re-save it, or pass model.strict=false to "
                              "initialise missing tensors afresh and drop unexpected ones")
    log.warning("model.strict=false: %s loaded anyway: %s", where, found)
    return f" (model.strict=false: {len(missing)} missing, {len(unexpected)} unexpected tensors)"


def _pretrained(transformers, path: Path, config, cfg) -> tuple[nn.Module, str]:
    """The classifier with the folder's weights (checked first), and the weights tag."""
    use_safetensors = _use_safetensors(path, cfg.trust_checkpoint)
    if use_safetensors:
        check_weights(path)
    model, info = _transformers_call(path, "load the weights", lambda: (
        transformers.AutoModelForImageClassification.from_pretrained(
            path, config=config, local_files_only=True, trust_remote_code=False, dtype=torch.float32,
            use_safetensors=use_safetensors, output_loading_info=True, ignore_mismatched_sizes=True)))
    return model, f"hf:{path.name}{_check_loading(path, info, cfg.strict)}"


def build_hf_model(cfg, bundle) -> tuple[nn.Module, str]:
    """The wrapped, eval-mode HF classifier in ``cfg.path`` and its weights tag."""
    transformers = _transformers()
    path = Path(str(cfg.path)).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={str(path)!r} is not allowed with model.source=hf: give a local "
                          "directory holding a Hugging Face model's config.json (save_pretrained output)")
    check_config(path, transformers.CONFIG_MAPPING)
    config = _transformers_call(path, "read config.json", lambda: transformers.AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=False))
    _check_input(path, config, bundle.input_shape)
    if cfg.weights == "random":
        torch.manual_seed(0)
        model, tag = _transformers_call(path, "build an image classifier from config.json", lambda: (
            transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False))), "random"
    else:
        model, tag = _pretrained(transformers, path, config, cfg)
    wrapped = HFImageClassifier(model.float()).eval()
    _check_classes(path, num_classes_of(wrapped), bundle.num_classes)
    return wrapped, tag
