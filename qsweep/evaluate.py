"""Top-1 / top-5 accuracy with torchmetrics, and the FP32 accuracy cache."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from qsweep.files import atomic_write


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


def _read_cached(path: Path) -> EvalResult | None:
    """The result cached at ``path``, or None if it is missing or unreadable (empty, cut short, not ours)."""
    try:
        result = EvalResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # missing / not JSON / not an EvalResult's fields
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in asdict(result).values()):
        return None
    return result


def cached_fp_eval(model: nn.Module, loader: DataLoader, num_classes: int, cache_dir: Path, key: str,
                   device: str | torch.device = "cpu", progress: bool = False) -> tuple[EvalResult, bool]:
    """The float model's accuracy, computed once per model+data ``key``; returns (result, from_cache).

    An unreadable entry counts as a miss: it is recomputed and rewritten. Entries are written to a
    unique temp file and renamed into place, so concurrent runs never read or leave a partial one.
    """
    path = Path(cache_dir) / "fp_eval" / f"{key}.json"
    cached = _read_cached(path)
    if cached is not None:
        return cached, True
    result = evaluate(model, loader, num_classes, device, progress, desc="evaluate FP32")
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(result))))
    return result, False
