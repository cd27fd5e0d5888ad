"""The integer grid: ranges -> (scale, zero point), quantize / dequantize, bit packing.

Conventions follow torch's own fake-quantize ops so results are bit-identical:
``q = clamp(round_half_even(x * (1 / scale)) + zp, qmin, qmax)``, ``x_hat = (q - zp) * scale``.
Symmetric grids are signed ``[-2^(b-1), 2^(b-1) - 1]`` with ``zp = 0``; affine grids are
unsigned ``[0, 2^b - 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale allowed: a constant range (e.g. an all-zero channel) would otherwise divide by 0.
EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Grid:
    """An integer grid of ``bits`` levels, signed (symmetric) or unsigned (affine)."""

    bits: int
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits


def qparams(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (any matching shapes) on ``grid``.

    The range is widened to contain 0 so that zero is exactly representable (padding,
    ReLU outputs). Symmetric: ``scale = max|x| / ((qmax - qmin) / 2)`` as torch's observers do.
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if grid.symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = (absmax / ((grid.qmax - grid.qmin) / 2)).clamp_min(EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(EPS)
        zero_point = (grid.qmin - torch.round(lo / scale)).clamp(grid.qmin, grid.qmax).to(torch.int32)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes of ``x`` (as float tensor holding whole numbers, to stay on fast float kernels)."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Quantize-dequantize; bit-identical to ``torch.fake_quantize_per_*_affine`` and exportable.

    Computed as ``clamp(round(x / s), qmin - zp, qmax - zp) * s``: the same integers as adding
    and removing ``zp`` (exact in float32 below 2^24), in four memory passes instead of six,
    which is most of the fake-quant overhead on a ViT's activations.
    """
    q = x * (1.0 / scale)
    q.round_()
    return q.clamp_(grid.qmin - zero_point, grid.qmax - zero_point).mul_(scale)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in ``[0, 2^bits)`` into a flat uint8 tensor, ``bits`` bytes per 8 codes.

    Widths that divide 8 pack whole codes into each byte; other widths are packed as a
    bit stream over groups of 8 codes (8 codes x ``bits`` bits = ``bits`` bytes).
    """
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2 ** bits}) cannot be packed into {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        groups = flat.reshape(-1, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.int64) * bits
        return (groups << shifts).sum(dim=1).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (flat << shifts).sum(dim=1, keepdim=True)  # 8 * bits <= 56 bits: fits int64
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words >> byte_shifts) & 0xFF).reshape(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8 (traceable by torch.export)."""
    if bits == 8:
        return packed[:numel]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:numel]
    words = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (words << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (words >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
