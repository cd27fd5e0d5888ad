"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no download needed.

Preprocessing: ``pixel / 16`` -> bilinear upsample to 16x16 -> normalize with the mean/std of
the train split. The whole set is a few hundred KB, so it is held as tensors.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from qsweep.config import ConfigError
from qsweep.data.bundle import DataBundle

IMAGE_SIZE = 16
NUM_CLASSES = 10
# Bump when the preprocessing below changes, so caches keyed on the fingerprint are invalidated.
PREPROCESS_VERSION = 1


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: sorted train and test index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=test_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


def _upsample(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def build_digits(cfg) -> DataBundle:
    """The digits bundle for ``cfg`` (a DigitsDataConfig: ``seed`` and ``test_fraction``)."""
    from sklearn.datasets import load_digits

    seed, test_fraction = cfg.seed, cfg.test_fraction
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={test_fraction!r} is not allowed; must be in (0, 1)")

    raw = load_digits()
    pixels, labels = np.asarray(raw.data), np.asarray(raw.target, dtype=np.int64)
    n_test = int(np.ceil(test_fraction * len(labels)))
    if n_test < NUM_CLASSES or len(labels) - n_test < NUM_CLASSES:
        raise ConfigError(
            f"data.test_fraction={test_fraction!r} is not allowed; both splits need at least "
            f"{NUM_CLASSES} images (one per class) out of {len(labels)}"
        )
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)

    images = _upsample(pixels)
    train_x, test_x = images[train_idx], images[test_idx]
    mean = float(train_x.mean())
    std = float(train_x.std())
    train_x = ((train_x - mean) / std).contiguous()
    test_x = ((test_x - mean) / std).contiguous()
    train_y = torch.from_numpy(labels[train_idx]).long()
    test_y = torch.from_numpy(labels[test_idx]).long()

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(pixels).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    h.update(train_idx.astype(np.int64).tobytes())
    data_hash = h.hexdigest()[:16]
    fingerprint = (
        f"digits-v{PREPROCESS_VERSION}:size={IMAGE_SIZE}:seed={seed}:test={test_fraction:g}"
        f":norm={mean:.6f},{std:.6f}:data={data_hash}"
    )
    return DataBundle(
        name="digits",
        train=TensorDataset(train_x, train_y),
        test=TensorDataset(test_x, test_y),
        train_labels=train_y.clone(),
        num_classes=NUM_CLASSES,
        input_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        fingerprint=fingerprint,
    )
