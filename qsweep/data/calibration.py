"""Which training images calibrate the quantizer, and batching them.

Calibration always draws from ``bundle.train``: calibrating on test images would leak the
evaluation set into the quantization parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qsweep.config import ConfigError


def calibration_indices(labels: Tensor, num_images: int, class_balanced: bool, seed: int) -> Tensor:
    """``num_images`` distinct indices into ``labels`` (int64, in draw order), reproducible by ``seed``.

    With ``class_balanced`` the classes take turns (round robin, each class's images in seeded
    random order), so every class gets ``num_images // C`` or one more; a class that runs out
    drops out of the rotation. Otherwise a seeded uniform sample without replacement.
    """
    labels = torch.as_tensor(labels).reshape(-1).long()
    n = labels.numel()
    if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 1:
        raise ConfigError(f"quant.calib.num_images={num_images!r} is not allowed; need at least 1 calibration image")
    num_images = int(num_images)
    if num_images > n:
        raise ConfigError(
            f"quant.calib.num_images={num_images} is not allowed; the training split has only "
            f"{n} images; set quant.calib.num_images <= {n}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    if not class_balanced:
        return torch.randperm(n, generator=gen)[:num_images]

    classes = torch.unique(labels)
    # Seeded class order, so the remainder (num_images % C extra images) is spread fairly.
    classes = classes[torch.randperm(classes.numel(), generator=gen)]
    pools = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c, as_tuple=False).reshape(-1)
        pools.append(members[torch.randperm(members.numel(), generator=gen)].tolist())
    out: list[int] = []
    depth = 0
    while len(out) < num_images:
        for pool in pools:
            if depth < len(pool):
                out.append(pool[depth])
                if len(out) == num_images:
                    break
        depth += 1
    return torch.tensor(out, dtype=torch.long)


def calibration_batches(bundle, calib_cfg) -> list[Tensor]:
    """Image-only batches (``[B, C, H, W]``) of ``calib_cfg.batch_size`` from ``bundle.train``."""
    batch_size = calib_cfg.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"quant.calib.batch_size={batch_size!r} is not allowed; batch_size must be >= 1")
    idx = calibration_indices(
        bundle.train_labels, calib_cfg.num_images, bool(calib_cfg.class_balanced), int(calib_cfg.seed)
    )
    train = bundle.train
    tensors = getattr(train, "tensors", None)
    if tensors is not None:  # TensorDataset: gather directly
        images = tensors[0][idx]
    else:
        images = torch.stack([torch.as_tensor(train[i][0]) for i in idx.tolist()])
    images = images.float()
    return [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
