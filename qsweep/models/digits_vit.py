"""The embedded model: a small DeiT-style ViT that qsweep trains itself on the digits data.

Nothing is downloaded: on first use the model is trained (deterministically, ~20-40 s on two
CPU cores) and cached as a safetensors state dict whose file name hashes the architecture,
the training recipe and the data fingerprint, so changing any of them retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from qsweep.files import atomic_write

log = logging.getLogger(__name__)

NAME = "digits_vit"
# Bump to invalidate cached weights when the training code changes in a way the hashed
# hyper-parameters below do not capture.
TRAIN_CODE_VERSION = 1

# Embed/MLP widths (64/128) are multiples of 32 and 64 so per-group quantization divides evenly.
ARCH: dict = dict(
    img_size=16,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)

TRAIN: dict = dict(
    seed=0,
    epochs=60,
    batch_size=64,
    lr=2e-3,
    weight_decay=0.05,
    pct_start=0.15,
    label_smoothing=0.1,
    max_shift=1,  # random translation in pixels of the 16x16 input
    # Intra-op threads while training (restored afterwards). The ops are tiny, so one thread is
    # about as fast as two on an idle machine, and far faster on a busy one (OpenMP threads
    # spin-wait on each other when the CPUs are oversubscribed); it also makes the weights
    # independent of the host's thread count.
    num_threads=1,
)


def build_digits_vit(num_classes: int = 10, in_chans: int = 1, img_size: int | tuple[int, int] = 16) -> nn.Module:
    """The architecture (random init with the current torch RNG)."""
    arch = dict(ARCH, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    return VisionTransformer(**arch)


def cache_key(fingerprint: str) -> str:
    blob = json.dumps(
        {"arch": ARCH, "train": TRAIN, "data": fingerprint, "version": TRAIN_CODE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(bundle, cache: Path) -> Path:
    """The cache file for the model trained on ``bundle``."""
    return Path(cache) / f"{NAME}-{cache_key(bundle.fingerprint)}.safetensors"


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return tensors[0].float(), tensors[1].long()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in xs]).float(), torch.as_tensor(ys, dtype=torch.long)


def _shift(x: torch.Tensor, max_shift: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-max_shift, max_shift], filling with ``fill``."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)
    offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


@contextmanager
def _intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(labels), 1)


def train_digits_vit(bundle, progress: bool = True, **overrides) -> tuple[nn.Module, dict]:
    """Train the embedded ViT on ``bundle.train``; returns the eval-mode model and run info.

    ``overrides`` replace entries of :data:`TRAIN` (for tests; the cache key ignores them).
    """
    from tqdm.auto import tqdm

    unknown = set(overrides) - set(TRAIN)
    if unknown:
        raise TypeError(f"unknown training hyper-parameters {sorted(unknown)}; known: {sorted(TRAIN)}")
    hp = {**TRAIN, **overrides}
    x, y = _as_tensors(bundle.train)
    fill = float(x.amin())  # background value after normalization
    gen = torch.Generator().manual_seed(hp["seed"])
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(hp["seed"])
        model = build_digits_vit(bundle.num_classes, bundle.input_shape[0], tuple(bundle.input_shape[1:]))

    steps_per_epoch = math.ceil(len(y) / hp["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=hp["lr"], total_steps=hp["epochs"] * steps_per_epoch, pct_start=hp["pct_start"]
    )
    start = time.perf_counter()
    with _intra_op_threads(hp["num_threads"]):
        model.train()
        bar = tqdm(range(hp["epochs"]), desc="training digits_vit (first use, cached after)", disable=not progress, leave=False)
        for _ in bar:
            perm = torch.randperm(len(y), generator=gen)
            total, seen = 0.0, 0
            for i in range(0, len(y), hp["batch_size"]):
                idx = perm[i : i + hp["batch_size"]]
                xb = _shift(x[idx], hp["max_shift"], fill, gen)
                loss = F.cross_entropy(model(xb), y[idx], label_smoothing=hp["label_smoothing"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    xt, yt = _as_tensors(bundle.test)
    acc = accuracy(model, xt, yt)
    info = {"train_seconds": f"{seconds:.2f}", "test_acc": f"{acc:.6f}"}
    log.info("trained digits_vit in %.1f s: test accuracy %.2f %%", seconds, 100 * acc)
    return model, info


def load_digits_vit(bundle, cache: Path, progress: bool = True) -> nn.Module:
    """The embedded ViT for ``bundle`` in eval mode: from ``cache`` if present, else trained and cached.

    The returned module carries ``qsweep_source`` = ``"cache"`` or ``"trained"``.
    """
    from safetensors.torch import load_file, save_file

    path = cache_path(bundle, cache)
    if path.is_file():
        try:
            state = load_file(str(path))
            if not all(t.isfinite().all() for t in state.values() if t.is_floating_point()):
                raise ValueError("it holds NaN or infinite weights")
            with torch.random.fork_rng(devices=[]):
                model = build_digits_vit(bundle.num_classes, bundle.input_shape[0], tuple(bundle.input_shape[1:]))
            model.load_state_dict(state)
            model.eval()
            model.qsweep_source = "cache"
            log.info("loaded digits_vit from %s", path)
            return model
        except Exception as exc:  # unreadable or stale cache entry: retrain and overwrite it
            log.warning("cached digits_vit at %s is unusable (%s); retraining", path, exc)

    model, info = train_digits_vit(bundle, progress=progress)
    metadata = {"name": NAME, "data": bundle.fingerprint, "key": cache_key(bundle.fingerprint), **info}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    model.qsweep_source = "trained"
    return model


def cached_metadata(bundle, cache: Path) -> dict[str, str] | None:
    """The metadata (test accuracy, training time, ...) stored with the cached weights, if any."""
    from safetensors import safe_open

    path = cache_path(bundle, cache)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
