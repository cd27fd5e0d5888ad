"""The artifact form of a quantized weight: bit-packed codes plus scales, unpacked in forward."""

from __future__ import annotations

import torch
from torch import nn

from qsweep.quant.grid import pack, unpack
from qsweep.quant.quantizer import SCALE_DTYPES, QuantizedWeight


class PackedWeight(nn.Module):
    """Holds ``bits``-wide codes packed into bytes; ``forward()`` returns the dequantized weight.

    Codes are stored offset to unsigned (``q - qmin``). The zero point is folded into one
    per-(row, group) ``offset = qmin - zp`` so that dequantization is ``(u + offset) * scale``,
    the same float arithmetic as the in-process fake-quant weight, hence bit-identical.
    Symmetric grids need no stored offset (it is the constant ``qmin``).
    """

    def __init__(self, q: QuantizedWeight):
        super().__init__()
        self.bits = q.grid.bits
        self.numel = q.codes.numel()
        self.view_shape = tuple(q.codes.shape)
        self.shape = tuple(q.shape)
        self.qmin = q.grid.qmin
        self.symmetric = q.grid.symmetric
        self.register_buffer("packed", pack((q.codes.to(torch.int32) - q.grid.qmin), self.bits))
        self.register_buffer("scale", q.scale.to(SCALE_DTYPES[q.scale_dtype]))
        if not self.symmetric:
            # offset = qmin - zp lies in [-(2^b - 1), 0]: int16 covers every width up to 8 bits.
            self.register_buffer("offset", (q.grid.qmin - q.zero_point).to(torch.int16))

    def forward(self) -> torch.Tensor:
        codes = unpack(self.packed, self.bits, self.numel).reshape(self.view_shape).float()
        offset = self.offset.float() if not self.symmetric else float(self.qmin)
        return ((codes + offset) * self.scale.float()).reshape(self.shape)


def packed_bytes(q: QuantizedWeight) -> int:
    """The bytes a weight's codes and scales take in the artifact (its :class:`PackedWeight`'s tensors)."""
    return sum(t.numel() * t.element_size() for t in PackedWeight(q).state_dict().values())
