"""Quantized stand-ins for ``nn.Linear`` and ``nn.Conv2d`` (fake-quant forward).

A quantized layer is the float module plus its grids: it runs the float module's own op (its
padding mode, TF-"same" padding, a known subclass's forward) on the quantized weight, so with
quantization off it computes exactly what the float module did. A Linear/Conv2d subclass
whose forward qsweep cannot reproduce with another weight is left in float
(:func:`qsweep.quant.plan.unreproducible`). Each keeps its frozen integer state explicit (``qweight``: codes,
scales, zero points; ``act``: input qparams) for the three readers: this forward, the exporter
and an integer-kernel path. The dequantized weight is computed once and cached, so a forward
costs one activation fake-quant plus the float op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import conv2d_same
from timm.layers.padding import pad_same
from torch import nn

from qsweep.quant.plan import SAME_PADDING_CONVS, LayerPlan, unreproducible
from qsweep.quant.quantizer import ActQuantizer, QuantizedWeight, quantize_weight, sqnr_db
from qsweep.quant.rotate import hadamard

class QuantLayer(nn.Module):
    """Shared state of a quantized Linear / Conv2d; subclasses define the float op."""

    feature_dim = -1

    def __init__(self, layer: nn.Linear | nn.Conv2d, plan: LayerPlan):
        super().__init__()
        self.layer_name = plan.name
        self.plan = plan
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.qweight: QuantizedWeight | None = None
        if plan.weight is not None:
            self.qweight = quantize_weight(layer.weight, plan.weight, plan.name)
            weight = self.qweight.dequantize()
            self.weight_sqnr_db = sqnr_db(layer.weight, weight)
        else:
            weight = layer.weight.detach().clone()
            self.weight_sqnr_db = float("inf")
        # Not persistent: the in-process model is not the artifact (see qsweep.export).
        self.register_buffer("weight", weight, persistent=False)
        self.packed: nn.Module | None = None  # set by the exporter: weight comes from packed codes
        # quant.smooth: the weight above was multiplied by s per input channel; inputs are divided by it.
        divisor = getattr(layer, "input_divisor", None)
        self.register_buffer("input_divisor", None if divisor is None else divisor.detach().clone())
        # quant.rotate: the weight above is W R; inputs are rotated by R (a block size: R is rebuilt, not stored).
        self.input_rotation: int | None = getattr(layer, "input_rotation", None)
        self.act = ActQuantizer(plan.act, self.feature_dim, plan.name) if plan.act is not None else None

    @property
    def w_bits(self) -> int:
        return self.qweight.grid.bits if self.qweight is not None else 32

    @property
    def a_bits(self) -> int | None:
        return self.act.grid.bits if self.act is not None else None

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        """Replace the frozen weight (AdaRound / LSQ write their result through here)."""
        self.qweight = qweight
        self.weight = qweight.dequantize().to(self.weight.device)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` divided per channel by ``quant.smooth``'s ``s``, then rotated by ``quant.rotate``'s
        Hadamard blocks (each step skipped when off): what the input quantizer and the weight see."""
        if self.input_divisor is not None:
            x = x / self.input_divisor
        return x if self.input_rotation is None else hadamard(x, self.input_rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale_input(x)
        if self.act is not None:
            x = self.act(x)
        return self.op(x, self.packed() if self.packed is not None else self.weight)

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, w_bits={self.w_bits}, a_bits={self.a_bits}, shape={tuple(self.weight.shape)}"


class QuantLinear(QuantLayer):
    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)


class QuantConv2d(QuantLayer):
    """The float conv's own op on the quantized weight: its padding mode, or TF-"same" padding
    computed from the input size as timm's ``Conv2dSame`` does."""

    feature_dim = 1

    def __init__(self, layer: nn.Conv2d, plan: LayerPlan):
        super().__init__(layer, plan)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.padding_mode = layer.padding_mode
        self.same_padding = isinstance(layer, SAME_PADDING_CONVS)
        # Explicit (left, right, top, bottom) pads for string padding or a non-zero padding mode.
        self.explicit_pads = tuple(layer._reversed_padding_repeated_twice)

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            return conv2d_same(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.explicit_pads, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The op's input as ``F.unfold`` columns ``[B, C * kh * kw, L]``, padded as the op pads it."""
        kernel = self.weight.shape[2:]
        if self.same_padding:
            x, padding = pad_same(x, kernel, self.stride, self.dilation), 0
        elif self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, self.explicit_pads, mode=mode), 0
        else:
            padding = self.padding
        return F.unfold(x, kernel, dilation=self.dilation, padding=padding, stride=self.stride)

    @property
    def zero_padding(self) -> bool:
        """True when the op reads no padding at all (its input rows are the input's own pixels)."""
        kernel = tuple(self.weight.shape[2:])
        if self.same_padding:
            return kernel == (1, 1)
        return not any(self.explicit_pads) if isinstance(self.padding, str) else not any(self.padding)


def quant_module_for(layer: nn.Module, plan: LayerPlan) -> QuantLayer:
    why = unreproducible(layer)
    if why is not None:
        raise TypeError(f"{plan.name}: cannot quantize: {why}")
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d(layer, plan)
    if isinstance(layer, nn.Linear):
        return QuantLinear(layer, plan)
    raise TypeError(f"{plan.name}: cannot quantize {type(layer).__name__}")


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The quantized Linear / Conv2d layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
