"""Export a quantized model as a ``torch.export`` program with bit-packed weights, and measure it."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from qsweep.errors import QsweepError
from qsweep.quant.calibrate import quant_layers
from qsweep.quant.packed import PackedWeight


def artifact_form(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose quantized weights live in packed integer buffers.

    Every tensor the forward reads is a persistent parameter or buffer, so the grader's size
    (``torch.save(state_dict)``) counts all of it: nothing hides as an exported constant.
    """
    model = copy.deepcopy(qmodel).cpu().eval()
    for layer in quant_layers(model).values():
        weight = layer.weight
        del layer._buffers["weight"]
        if layer.qweight is not None:
            layer.packed = PackedWeight(layer.qweight)
            layer.qweight = None
        else:
            layer.register_buffer("weight", weight)  # float weight: persistent, counted
    return model


def export_artifact(qmodel: nn.Module, example: torch.Tensor, max_batch: int | None = None) -> torch.export.ExportedProgram:
    """The artifact form traced by ``torch.export``, dynamic in the batch dimension (up to ``max_batch``)."""
    model = artifact_form(qmodel)
    # Two examples: a batch of 1 would let export specialize the batch dimension to a constant.
    example = example[:1].cpu().expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},))


def export_program(qmodel: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Save the artifact form with ``torch.export.save``; the batch dimension is dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_artifact(qmodel, example), str(path))
    return path


def export_pte(qmodel: nn.Module, example: torch.Tensor, path: str | Path, max_batch: int = 16) -> Path:
    """An ExecuTorch ``.pte`` of the artifact form (needs the optional ``executorch`` package).

    ExecuTorch plans memory ahead of time, so the batch dimension is bounded by ``max_batch``.
    """
    try:
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise QsweepError("export.pte=true needs ExecuTorch: pip install -e '.[executorch]'") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = to_edge_transform_and_lower(export_artifact(qmodel, example, max_batch)).to_executorch()
    path.write_bytes(program.buffer)
    return path


def load_program(path: str | Path) -> nn.Module:
    """Load an artifact exactly as the lab grader does."""
    return torch.export.load(str(path)).module()


def state_dict_size_mb(module: nn.Module | dict) -> float:
    """The grader's size: bytes / 1e6 of ``torch.save(module.state_dict())`` written to a file."""
    fd, tmp = tempfile.mkstemp(suffix=".pth")
    os.close(fd)
    try:
        torch.save(module.state_dict() if isinstance(module, nn.Module) else module, tmp)
        return os.path.getsize(tmp) / 1e6
    finally:
        os.unlink(tmp)


def artifact_size_mb(qmodel: nn.Module) -> float:
    """The size the grader would measure on ``qmodel``'s exported program, without exporting it.

    The tensors are the artifact form's. ``torch.save`` also pickles one metadata entry per
    module, and the module ``torch.export.load(...).module()`` rebuilds holds only the modules
    that own tensors, so the same entries are kept here: equal to the exported size within a
    few bytes (tested), at a fraction of an export's cost.
    """
    state = artifact_form(qmodel).state_dict()
    owners = {""} | {name.rsplit(".", i)[0] for name in state for i in range(1, name.count(".") + 1)}
    state._metadata = type(state._metadata)((k, v) for k, v in state._metadata.items() if k in owners)
    return state_dict_size_mb(state)
