"""Online Hadamard rotation of quantized Linears' inputs (``quant.rotate``, as in QuaRot).

For an orthogonal ``R`` and row vectors ``x``, ``x W^T = (x R)(W R)^T``. ``R`` here is
block-diagonal, each block a normalized Sylvester Hadamard matrix (symmetric, so ``R^T = R``):
rotating spreads each outlier input channel over its block, which suits both a per-tensor
activation grid and per-channel weight grids. The float Linear's weight is replaced by ``W R``
(after ``quant.smooth``'s scaling) and the block size is recorded on it as ``input_rotation``;
:class:`~qsweep.quant.modules.QuantLayer` rotates its input after smoothing's division.
``R`` is never stored, only its block size: the same few ops rebuild it in the exported program
and on integer kernels, so an artifact grows by nothing.
"""

from __future__ import annotations

import functools

from collections.abc import Mapping

import torch
from torch import nn

from qsweep.quant.plan import LayerPlan


def hadamard_matrix(block: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
                    ) -> torch.Tensor:
    """``H_block / sqrt(block)``, Sylvester's construction (``block`` a power of two): orthogonal, symmetric."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < block:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h * block ** -0.5


@functools.lru_cache(maxsize=32)
def _cached_matrix(block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(block, dtype, device)


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ R`` over the last dimension, ``R`` block-diagonal of :func:`hadamard_matrix` ``(block)``.

    A blocked matmul is faster than a butterfly transform in eager PyTorch. Eager runs reuse one
    matrix per block size (building it is ~50 us, x48 layers a forward); a traced program builds it
    in the graph instead, so the artifact stores no extra tensor.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        h = hadamard_matrix(block, x.dtype, x.device)
    else:
        h = _cached_matrix(block, x.dtype, x.device)
    return (x.reshape(-1, block) @ h).reshape(x.shape)


def rotation_block(in_features: int, block_size: int) -> int | None:
    """The largest power of two dividing ``in_features``, at most ``block_size`` (None: 1, no rotation)."""
    block = min(block_size, in_features & -in_features)
    return block if block > 1 else None


@torch.no_grad()
def rotate_linears(model: nn.Module, plans: Mapping[str, LayerPlan], block_size: int) -> dict[str, int | None]:
    """Rotate the planned float Linears of ``model`` in place (before their weights are quantized).

    Returns ``{layer name: block size}`` (None where ``in_features`` is odd: left alone).
    """
    blocks: dict[str, int | None] = {}
    for name, plan in plans.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or (plan.weight is None and plan.act is None):
            continue
        blocks[name] = block = rotation_block(linear.in_features, block_size)
        if block is not None:
            # In place: GPTQ / AdaRound / LSQ read this module's weight as the float reference.
            linear.weight.copy_(hadamard(linear.weight.float(), block).to(linear.weight.dtype))
            linear.input_rotation = block
    return blocks
