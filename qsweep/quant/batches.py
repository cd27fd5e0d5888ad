"""Calibration batches as users give them: a tensor, a tuple of positional args, or a dict of keywords."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch given as a tensor, a tuple/list (positional) or a dict (keywords)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"calibration batch of type {type(batch).__name__}: give tensors, tuples or dicts")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
