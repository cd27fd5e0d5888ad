"""Datasets: :func:`build_data` turns a data config (``qsweep.config.DATA_SCHEMAS``) into a :class:`DataBundle`."""

from __future__ import annotations

from typing import Callable

from torch.utils.data import DataLoader, Subset

from qsweep.config import ConfigError, data_config
from qsweep.data.bundle import DataBundle
from qsweep.data.calibration import calibration_batches, calibration_indices
from qsweep.data.cifar100 import build_cifar100
from qsweep.data.digits import build_digits
from qsweep.data.imagefolder import build_imagefolder

# name -> builder(cfg) -> DataBundle; each name also has its schema in qsweep.config.DATA_SCHEMAS.
REGISTRY: dict[str, Callable[..., DataBundle]] = {
    "digits": build_digits,
    "cifar100": build_cifar100,
    "imagefolder": build_imagefolder,
}


def build_data(cfg) -> DataBundle:
    """The bundle named by ``cfg.name`` (see :data:`REGISTRY`), ``cfg`` read on that dataset's schema."""
    cfg = data_config(cfg)
    return REGISTRY[cfg.name](cfg)


def eval_loader(bundle: DataBundle, cfg) -> DataLoader:
    """Unshuffled loader over ``bundle.test`` (first ``cfg.max_eval_images`` only, if set)."""
    batch_size = cfg.eval_batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.eval_batch_size={batch_size!r} is not allowed; must be >= 1")
    dataset = bundle.test
    limit = cfg.max_eval_images
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"data.max_eval_images={limit!r} is not allowed; must be >= 1")
        if limit < len(dataset):
            dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


__all__ = [
    "REGISTRY",
    "DataBundle",
    "build_data",
    "calibration_batches",
    "calibration_indices",
    "eval_loader",
]
