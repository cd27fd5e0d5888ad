"""Top-1 / top-5 accuracy with torchmetrics, and the FP32 accuracy cache."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qsweep.files import atomic_write

log = logging.getLogger(__name__)

# Bump when an entry's fields change: older entries are then measured again.
FP_CACHE_SCHEMA = 2


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    images: int
    seconds: float


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: str | torch.device = "cpu",
             progress: bool = False, desc: str = "evaluate") -> EvalResult:
    """Micro-averaged top-1/top-5 accuracy (what people report as accuracy) over ``loader``."""
    from torchmetrics.classification import MulticlassAccuracy  # seconds to import: only where a run evaluates

    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(device)
    images = 0
    start = time.perf_counter()
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        top1.update(logits, y)
        top5.update(logits, y)
        images += len(y)
    seconds = time.perf_counter() - start
    return EvalResult(100.0 * top1.compute().item(), 100.0 * top5.compute().item(), images, seconds)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and every state-dict tensor (name, dtype, shape, bytes): same weights, same hash."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """How many rows of ``logits`` rank their label first."""
    return int((logits.argmax(dim=-1) == labels.to(logits.device)).sum())


def fp_cache_path(cache_dir: Path, key: str) -> Path:
    """Where the FP32 result for ``key`` is cached: a hash of the key, whatever paths the key embeds."""
    return Path(cache_dir) / "fp_eval" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _entry_problem(doc, key: str) -> str | None:
    """Why ``doc`` is not a trustworthy cache entry for ``key``, or None."""
    if not isinstance(doc, dict) or doc.get("schema") != FP_CACHE_SCHEMA:
        return f"not a schema-{FP_CACHE_SCHEMA} entry"
    if doc.get("key") != key:
        return "it belongs to another model or data set"
    values = {name: doc.get(name) for name in ("top1", "top5", "images", "seconds")}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
        return f"it holds a missing, non-numeric or non-finite value: {values}"
    if not (0 <= values["top1"] <= values["top5"] <= 100 and values["images"] >= 1 and values["seconds"] >= 0):
        return f"its values are out of range (0 <= top1 <= top5 <= 100, images >= 1, seconds >= 0): {values}"
    return None


def _read_cached(path: Path, key: str) -> EvalResult | None:
    """The result cached at ``path`` for ``key``, or None (with a warning if an entry is there but not usable)."""
    try:
        doc = json.loads(path.read_text())
        problem = _entry_problem(doc, key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, cut short, not UTF-8 or not JSON
        problem = f"it is unreadable ({exc})"
    if problem:
        log.warning("ignoring the cached FP32 accuracy %s: %s; measuring it again", path, problem)
        return None
    return EvalResult(float(doc["top1"]), float(doc["top5"]), int(doc["images"]), float(doc["seconds"]))


def cached_fp_eval(model: nn.Module, loader: DataLoader, num_classes: int, cache_dir: Path, key: str,
                   device: str | torch.device = "cpu", progress: bool = False) -> tuple[EvalResult, bool]:
    """The float model's accuracy, computed once per model+data ``key``; returns (result, from_cache).

    An entry is checked when read (schema, key, finite values in range); one that fails is
    recomputed and rewritten. Entries are written to a unique temp file and renamed into place,
    so concurrent runs never read or leave a partial one.
    """
    path = fp_cache_path(cache_dir, key)
    cached = _read_cached(path, key)
    if cached is not None:
        return cached, True
    result = evaluate(model, loader, num_classes, device, progress, desc="evaluate FP32")
    doc = {"schema": FP_CACHE_SCHEMA, "key": key, **asdict(result)}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc)))
    return result, False
