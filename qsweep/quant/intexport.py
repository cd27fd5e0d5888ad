"""The exported form of the integer backend (``export.kernels=int``): ``torch._int_mm`` in the artifact.

:func:`int_artifact_layers` converts a calibrated model like :func:`~qsweep.quant.intkernel.to_int_backend`,
but each integer layer stores only what the fake-quant artifact stores (the weight codes at their
bit width, the weight scales in their dtype, affine zero points, the bias, the activation scale),
so the grader's size does not grow. Everything else :class:`~qsweep.quant.intkernel.IntGemm`
keeps precomputed (the int8 ``[K, N]`` weight, the column sums of the zero-point correction, the
combined scales) is derived in the forward with the same integer and float operations, which is
what makes the artifact's output ``torch.equal`` to the in-process int backend's. Activations
are quantized by the float round/clamp kernel: ``torch.quantize_per_tensor``'s qint8 tensors do
not export, and :func:`~qsweep.quant.intkernel.torch_quantize_matches` checks that the two give
the same codes.

Weight layout. Codes are signed ``b``-bit fields (:func:`~qsweep.quant.intkernel._weight_shift`),
stored as int8 "planes" over the reduction dimension: ``b`` is split into widths 4, 2, 1 (8 stays
whole), and a plane of width ``p`` packs rows ``k, k + R, k + 2R, ...`` (``R = ceil(K / (8 / p))``)
of the ``[K, N]`` field into one ``[R, N]`` byte row each. Unpacking is then a few whole-tensor
shifts and one concatenation along ``K`` (no interleaving): for 4 bits ``(p << 4) >> 4`` and
``p >> 4`` (arithmetic shifts sign-extend), for 8 bits nothing at all. The bytes are exactly
``ceil(K * b / 8) * N`` per layer, as the fake-quant artifact's bit stream, up to row padding.
A ``torch.export`` program has no load step, so this unpacking runs in every forward (measured
in experiments/bench/INT.md); storing unpacked int8 instead would double a 4-bit artifact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qsweep.quant.intkernel import (
    GemmConsts,
    IntAttention,
    IntConv2d,
    IntGemm,
    IntLinear,
    _weight_shift,
    to_int_backend,
)
from qsweep.quant.modules import QuantConv2d, QuantLayer
from qsweep.quant.quantizer import SCALE_DTYPES

__all__ = ["PackedIntConv2d", "PackedIntLinear", "int_artifact_layers", "pack_planes", "plane_widths",
           "unpack_planes"]


def plane_widths(bits: int) -> list[int]:
    """Widths of the planes a ``bits``-wide field is stored in, most significant (signed) first."""
    return [8] if bits == 8 else [w for w in (4, 2, 1) if bits & w]


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 ``[sum_p ceil(K / (8 / p)), N]`` planes of signed ``bits``-wide codes ``[K, N]``."""
    k, n = codes.shape
    s = codes.to(torch.int32)
    if int(s.min()) < -(2 ** (bits - 1)) or int(s.max()) >= 2 ** (bits - 1):
        raise ValueError(f"codes outside the signed {bits}-bit range cannot be packed")
    planes, shift = [], bits
    for width in plane_widths(bits):
        shift -= width
        per, mask = 8 // width, 2**width - 1
        field = (s >> shift) & mask  # two's complement bits of the (signed) top field, plain bits below
        rows = math.ceil(k / per)
        field = torch.cat([field, field.new_zeros(rows * per - k, n)]).view(per, rows, n)
        byte = sum(field[j] << (width * j) for j in range(per))
        planes.append(byte.to(torch.uint8).view(torch.int8))
    return torch.cat(planes)


def unpack_planes(planes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The signed int8 codes ``[K, N]`` of :func:`pack_planes` (whole-tensor shifts; exportable)."""
    out, row, shift = None, 0, bits
    for i, width in enumerate(plane_widths(bits)):
        per = 8 // width
        rows = math.ceil(k / per)
        p = planes[row:row + rows]
        row += rows
        shift -= width
        if per == 1:
            field = p
        elif i == 0:  # the sign-carrying field: shift it to the top, then arithmetic-shift down
            field = torch.cat([p >> (8 - width) if j == per - 1 else (p << (8 - width * (j + 1))) >> (8 - width)
                               for j in range(per)])
        else:
            field = torch.cat([(p >> (width * j) if j else p) & (2**width - 1) for j in range(per)])
        if rows * per != k:
            field = field[:k]
        if shift:
            field = field << shift
        out = field if out is None else out | field  # the low fields fill the zero bits left by the shift
    return out


class _PackedConsts:
    """Mixin over :class:`IntGemm`: stores packed codes and raw qparams, derives the GEMM constants per call."""

    def __init__(self, layer: QuantLayer, act_kernel: str = "float"):
        super().__init__(layer, "float")  # the fused torch.quantize_per_tensor kernel does not export
        qw = layer.qweight
        self.bits = qw.grid.bits
        g = self.groups
        # The stored forms of IntGemm's constants; everything else is derived in consts().
        self.register_buffer("packed_codes", pack_planes(self.weight_t, self.bits))
        s_w = qw.scale.reshape(-1, g).t().contiguous()  # [G, N] or [G, 1] (per-tensor)
        self.register_buffer("w_scale", s_w.to(SCALE_DTYPES[qw.scale_dtype]))
        # d = zp - qmin - 2^(b-1) (IntGemm.w_offset, unexpanded) lies in [-2^(b-1), 2^(b-1)): int8 at any width.
        d = qw.zero_point.reshape(-1, g).t().to(torch.int32) + _weight_shift(qw.grid)
        self.register_buffer("w_zero", None if self.w_offset is None else d.to(torch.int8).contiguous())
        self.register_buffer("act_scale", None if self.dynamic else layer.act.scale.float().reshape(()).clone())
        for name in ("weight_t", "col_term", "w_offset", "scale", "col_corr", "a_inv"):
            self._buffers.pop(name, None)

    def consts(self) -> GemmConsts:
        g, n = self.groups, self.out_features
        w = unpack_planes(self.packed_codes, self.bits, self.in_features)
        d = None if self.w_zero is None else self.w_zero.to(torch.int32).expand(g, n).contiguous()
        s_w = self.w_scale.float().expand(g, n)
        col_term = col_corr = a_inv = None
        if self.dynamic or self.a_c:
            col_term = w.view(g, self.group_len, n).sum(1, dtype=torch.int32)
            if d is not None:
                col_term = col_term - self.group_len * d
        if self.dynamic:
            scale = s_w.contiguous()
        else:
            scale = (self.act_scale * s_w).contiguous()
            a_inv = 1.0 / self.act_scale
            if self.a_c:
                col_corr = self.a_c * col_term
        return GemmConsts(w, col_term, d, scale, col_corr, a_inv)


class PackedIntLinear(_PackedConsts, IntLinear):
    """:class:`IntLinear` whose weight is stored packed at its bit width (the artifact form)."""


class PackedIntConv2d(_PackedConsts, IntConv2d):
    """:class:`IntConv2d` whose weight is stored packed at its bit width (the artifact form)."""


def packed_module_for(layer: QuantLayer, act_kernel: str = "float") -> IntGemm:
    return PackedIntConv2d(layer) if isinstance(layer, QuantConv2d) else PackedIntLinear(layer)


def int_artifact_layers(qmodel: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``qmodel`` whose eligible quantized layers are packed integer layers.

    The layers left on fake-quant (``{name: reason}``, as :func:`to_int_backend` reports) are
    still :class:`~qsweep.quant.modules.QuantLayer` s: :func:`qsweep.export.artifact_form` packs them.
    Integer attention takes its exportable route (float matmuls of the codes, the same values).
    """
    model, fallbacks = to_int_backend(qmodel, "float", packed_module_for)
    for m in model.modules():
        if isinstance(m, IntAttention):
            m.int_mm = False
    return model, fallbacks
