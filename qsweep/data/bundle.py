"""The dataset bundle every data source returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """A train/test split ready for a model, plus what callers need to know about it.

    ``train``/``test`` yield ``(image[C, H, W] float32, int label)``. ``train_labels`` holds the
    labels of ``train`` in order (int64), for class-balanced calibration sampling.
    ``fingerprint`` identifies data + preprocessing + split, for cache keys.
    """

    name: str
    train: Dataset
    test: Dataset
    train_labels: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    fingerprint: str
