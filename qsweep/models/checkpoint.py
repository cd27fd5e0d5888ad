"""Loading user checkpoints into a model, with errors that say what is wrong and what to do.

Supported: ``.safetensors`` state dicts and ``torch.save`` files (``.pth``/``.pt``/``.bin``/...)
holding a state dict, optionally wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` and/or
with ``module.`` prefixes. Files are read with ``weights_only=True``; a file that holds pickled
Python objects (e.g. a whole ``nn.Module``) is only unpickled when the user trusts it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from qsweep.errors import QsweepError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
STRIP_PREFIXES = ("module.", "_orig_mod.")
TRUST_HINT = "pass model.trust_checkpoint=true if you trust the file"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(QsweepError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


class _NeedsTrust(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _list(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix in TORCH_SUFFIXES:
        return False
    with open(path, "rb") as f:  # sniff: 8-byte little-endian header size, then a JSON object
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _torch_load(path: Path, trust: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        match = _GLOBAL_RE.search(str(exc))
        if match is None:
            raise
        if not trust:
            raise _NeedsTrust(match.group(1)) from None
    log.warning("unpickling trusted checkpoint %s (weights_only=False)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | Path, trust: bool = False):
    """The raw contents of ``path``: a flat ``{name: tensor}`` dict, or (trusted only) an ``nn.Module``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; check model.checkpoint")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file; model.checkpoint must name a weights file")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path, trust)
    except _NeedsTrust as need:
        raise CheckpointError(
            f"checkpoint {str(path)!r} contains a pickled Python object ({need.what}), e.g. a whole "
            f"nn.Module, not just tensors. Unpickling it runs code from the file, so it is refused by "
            f"default; {TRUST_HINT}, or re-save it as a state dict "
            f"(torch.save(model.state_dict(), ...) or safetensors)"
        ) from None
    except (OSError, MemoryError) as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (corrupt, truncated or not a torch/safetensors "
            f"file: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"re-download or re-save it"
        ) from exc
    return _unwrap(obj, path)


def _unwrap(obj, path: Path):
    for _ in range(4):  # {"state_dict": {"model": {...}}} and similar nestings
        if isinstance(obj, nn.Module):
            return obj
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict "
                f"(a mapping of parameter names to tensors)"
            )
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if obj and len(tensors) == len(obj):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
        if inner is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not look like a state dict: top-level keys are "
                f"{_list(obj.keys())}; expected parameter tensors, or a 'state_dict'/'model' entry holding them"
            )
        obj = inner
    else:
        raise CheckpointError(f"checkpoint {str(path)!r}: state dict nested too deeply")
    state = {}
    for key, value in obj.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def classifier_name(model: nn.Module) -> str | None:
    """Qualified name of the final classifier layer (timm's ``get_classifier()``, else the last Linear)."""
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
            name = names.get(id(head))
            if name is not None:
                return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def num_classes_of(model: nn.Module) -> int | None:
    """Output classes of ``model``'s classifier, or None if it has none."""
    name = classifier_name(model)
    if name is None:
        return None
    return int(model.get_submodule(name).weight.shape[0])


def _check_classes(path: Path, found: int | None, expected: int | None) -> None:
    if found is not None and expected is not None and found != expected:
        raise CheckpointError(
            f"{str(path)!r}: checkpoint has {found} classes but the data has {expected}; its classifier "
            f"was trained for a different label set. Use a checkpoint fine-tuned on this data "
            f"(or pick the data set it was trained on)"
        )


def _check_keys_and_shapes(path: Path, model: nn.Module, state: dict) -> None:
    """The state dict names exactly the model's tensors, each with the model's shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model architecture ({type(model).__name__}): "
            f"{'; '.join(parts)}. Check model.name / model.kwargs match the model the checkpoint was saved from"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has tensors of the wrong shape for the model: {'; '.join(mismatched[:5])}"
            f"{f' ... ({len(mismatched)} in all)' if len(mismatched) > 5 else ''}. "
            f"Check model.name / model.kwargs (e.g. img_size, patch_size) match the checkpoint"
        )


def load_checkpoint(
    path: str | Path, model: nn.Module | None, trust: bool, num_classes: int | None = None
) -> nn.Module:
    """``model`` with the weights of ``path`` loaded, in eval mode.

    If the file holds a whole pickled module (only read with ``trust=True``) that module is
    returned instead. ``num_classes`` (default: the model's classifier width) is the class count
    the classifier must have.
    """
    path = Path(path).expanduser()
    obj = read_checkpoint(path, trust)
    if isinstance(obj, nn.Module):
        expected = num_classes if num_classes is not None else (num_classes_of(model) if model is not None else None)
        _check_classes(path, num_classes_of(obj), expected)
        return obj.eval()
    if model is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a state dict; it needs a model architecture to load into "
            f"(set model.name)"
        )
    state = obj
    head = classifier_name(model)
    if head is not None and f"{head}.weight" in state:
        expected = num_classes if num_classes is not None else num_classes_of(model)
        _check_classes(path, int(state[f"{head}.weight"].shape[0]), expected)

    _check_keys_and_shapes(path, model, state)
    model.load_state_dict(state, strict=False)
    return model.eval()
