"""Integer-only Softmax, GELU and LayerNorm in the style of I-ViT (Li & Gu, ICCV 2023): ``quant.intops=ivit``.

Each op quantizes its input with a calibrated static per-tensor scale, computes on integer
tensors (int64 holding small fixed-point values: adds, multiplies by dyadic constants ``m / 2^s``,
shifts, integer divisions) and returns its integer output dequantized, so it drops into the
fake-quant model. The dyadic constants are derived in the forward from the persistent scale
buffers and the LN affine: nothing extra is stored, and an exported program recomputes them.

* :class:`IntSoftmax` (Shiftmax): INT8 input; ``e^x = 2^(x log2 e)`` split into an integer power
  (a right shift) and a fraction ``f`` approximated as ``2^-f ~ 1 - f/2``; the exponentials are
  unsigned 16-bit (Q15); the row sum divides once per row; UINT8 output on the grid ``2^-8``.
* :class:`IntGELU` (ShiftGELU): INT8 input; ``GELU(x) ~ x * sigmoid(1.702 x)`` with the sigmoid
  from the same shift exponential; output on the input's INT8 grid.

Both INT8-input ops evaluate their integer function on all 256 codes (or code differences) once per
forward and gather from that table: bit-identical to the elementwise computation, a few passes
over the activations instead of ~30.
* :class:`IntLayerNorm` (I-LayerNorm): INT16 input; integer mean and variance, ``floor(sqrt)`` by
  bit iteration (one result bit per step), one integer reciprocal of the standard deviation per
  token, fixed-point normalization, per-channel dyadic affine straight onto the INT8 output grid.
* :class:`IntBlock`: the residual stream (both adds of a timm ``Block``) on a ``quant.residual_bits``
  symmetric grid.

While any of an op's quantizers observes (calibration) it returns the float op's result, so
calibration sees the float model's activations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from qsweep.config import ConfigError, TensorQuantConfig
from qsweep.quant.grid import quantize
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.vit import act_config, attention_sites, log_skipped

log = logging.getLogger(__name__)

__all__ = ["IntBlock", "IntGELU", "IntLayerNorm", "IntSoftmax", "apply_intops", "dyadic", "int_codes", "isqrt",
           "shift_exp2"]

LOG2E = math.log2(math.e)
GELU_SIGMOID = 1.702  # GELU(x) ~ x * sigmoid(1.702 x)
EXP_FRAC = 14  # fraction bits of the fixed-point exponent
ONE = 1 << 15  # 1.0 of the Q15 exponentials and sigmoid
MUL_SHIFT = 24  # dyadic multipliers m / 2^MUL_SHIFT: 24 bits of precision for multipliers near 1
SOFTMAX_IN_BITS, SOFTMAX_OUT_BITS = 8, 8
GELU_BITS = 8
LN_IN_BITS, LN_OUT_BITS = 16, 8
LN_FRAC = 12  # fraction bits of the normalized LN value
LN_STD_FRAC = 12  # fraction bits of the integer standard deviation
LN_AFFINE_SHIFT = 16  # dyadic shift of the per-channel LN affine
LN_RECIP_SHIFT = 20  # extra precision bits of the per-token reciprocal of the standard deviation
DIV_BITS = 40  # softmax: one integer reciprocal 2^40 // sum per row


def dyadic(c: torch.Tensor, shift: int) -> torch.Tensor:
    """The integer ``m`` with ``m / 2^shift`` closest to the real ``c`` (any shape)."""
    return torch.round(c.double() * 2.0**shift).to(torch.int64)


def rshift_round(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``round(x / 2^shift)`` of an integer tensor (halves up) with a shift."""
    return (x + (1 << (shift - 1))) >> shift


def int_codes(x: torch.Tensor, quantizer: ActQuantizer) -> torch.Tensor:
    """``x`` on ``quantizer``'s frozen grid as int64 codes (the fake-quant forward's integers)."""
    return quantize(x, quantizer.scale, quantizer.zero_point, quantizer.grid).to(torch.int64)


def shift_exp2(t: torch.Tensor, frac: int = EXP_FRAC) -> torch.Tensor:
    """``2^(t / 2^frac)`` in Q15 for int64 ``t <= 0``: a right shift by the integer part of ``-t``
    and I-ViT's ``2^-f ~ 1 - f / 2`` for the fraction (exact at ``f = 0`` and ``1``, 6 % low at worst)."""
    u = -t
    whole = (u >> frac).clamp_max(31)  # 2^-31 is 0 in Q15 anyway
    f = u & ((1 << frac) - 1)
    return (ONE - (f << (15 - frac - 1))) >> whole


def isqrt(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``floor(sqrt(v))`` of int64 ``0 <= v < 4^bits``, deciding one result bit per step from the top."""
    r = torch.zeros_like(v)
    for b in range(bits - 1, -1, -1):
        candidate = r + (1 << b)
        r = torch.where(candidate * candidate <= v, candidate, r)
    return r


def _observing(*quantizers: ActQuantizer) -> bool:
    return any(q.observer is not None for q in quantizers)


def _signed(bits: int, base: TensorQuantConfig | None = None) -> TensorQuantConfig:
    """A static symmetric per-tensor grid of ``bits``, with ``base``'s observer settings (default: minmax)."""
    cfg = base if base is not None else TensorQuantConfig(observer="minmax")
    return replace(cfg, bits=bits, symmetric=True, granularity="per_tensor")


class IntSoftmax(nn.Module):
    """Shiftmax over the last dim: INT8 in, Q15 exponentials, UINT8 out (scale ``2^-8``).

    Masked (``-inf``) scores clamp to the lowest INT8 code and keep a tiny weight, as in I-ViT, unless
    ``mask`` (True: masked out, broadcast to the scores) names them: then calibration does not see them
    and their exponentials are zero.
    """

    accepts_mask = True  # HFAttentionQuant passes the masked-out positions of its additive mask

    def __init__(self, cfg: TensorQuantConfig, name: str = ""):
        super().__init__()
        self.inq = ActQuantizer(cfg, -1, f"{name}.softmax_in")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if _observing(self.inq):
            if mask is None:
                return self.inq(x).softmax(dim=-1)
            self.inq(x.masked_select(~mask))  # the range of the scores that count
            return x.softmax(dim=-1)
        i = int_codes(x, self.inq)
        span = self.inq.grid.qmax - self.inq.grid.qmin
        # exp of every possible code difference -span..0 once, then gathered: same integers, far fewer passes.
        d = torch.arange(-span, 1, device=i.device)
        table = shift_exp2(rshift_round(d * dyadic(self.inq.scale * LOG2E, EXP_FRAC + MUL_SHIFT), MUL_SHIFT))
        e = table[i - i.amax(dim=-1, keepdim=True) + span]
        total = e.sum(dim=-1, keepdim=True)  # the row maximum gives e = 2^15: sum >= 2^15
        if mask is not None:  # masked codes sit at the bottom of the grid: the maximum is unmasked unless all are
            e = e.masked_fill(mask, 0)
            total = e.sum(dim=-1, keepdim=True).clamp_min(1)
        inv = (1 << DIV_BITS) // total
        p = rshift_round(e * inv, DIV_BITS - SOFTMAX_OUT_BITS).clamp_max((1 << SOFTMAX_OUT_BITS) - 1)
        return p.to(x.dtype) * 2.0**-SOFTMAX_OUT_BITS

    def extra_repr(self) -> str:
        return f"in=int{SOFTMAX_IN_BITS}, exp=Q15, out=uint{SOFTMAX_OUT_BITS}"


class IntGELU(nn.Module):
    """ShiftGELU: ``x * sigmoid(1.702 x)`` on INT8 codes; output on the input's grid."""

    def __init__(self, cfg: TensorQuantConfig, name: str = ""):
        super().__init__()
        self.inq = ActQuantizer(cfg, -1, f"{name}.in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _observing(self.inq):
            return F.gelu(self.inq(x))
        grid = self.inq.grid
        # GELU of every INT8 code once, then gathered: the same integers as elementwise, far fewer passes.
        table = self.gelu_codes(torch.arange(grid.qmin, grid.qmax + 1, device=x.device))
        return table[int_codes(x, self.inq) - grid.qmin].to(x.dtype) * self.inq.scale

    def gelu_codes(self, i: torch.Tensor) -> torch.Tensor:
        """Integer ShiftGELU of int64 input codes: output codes on the input grid."""
        t = rshift_round(i * dyadic(self.inq.scale * (GELU_SIGMOID * LOG2E), EXP_FRAC + MUL_SHIFT), MUL_SHIFT)
        # sigmoid(z) = 2^(t - m) / (2^(t - m) + 2^-m) with m = max(t, 0): both exponents <= 0.
        m = t.clamp_min(0)
        num = shift_exp2(t - m)
        sigmoid = (num << 15) // (num + shift_exp2(-m))  # Q15; the denominator is >= 2^15
        return rshift_round(i * sigmoid, 15)

    def extra_repr(self) -> str:
        return f"int{GELU_BITS}, sigmoid=Q15"


class IntLayerNorm(nn.Module):
    """I-LayerNorm over the last dim: INT16 in, integer statistics and square root, INT8 out."""

    def __init__(self, norm: nn.LayerNorm, out_cfg: TensorQuantConfig, name: str = ""):
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ConfigError(f"quant.intops='ivit': {name} normalizes over {tuple(norm.normalized_shape)}; "
                              "only LayerNorms over the last dim are supported")
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.inq = ActQuantizer(_signed(LN_IN_BITS), -1, f"{name}.in")
        self.outq = ActQuantizer(out_cfg, -1, f"{name}.out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _observing(self.inq, self.outq):
            return self.outq(F.layer_norm(self.inq(x), self.normalized_shape, self.weight, self.bias, self.eps))
        s_in, s_out, zp = self.inq.scale, self.outq.scale, self.outq.zero_point
        i = int_codes(x, self.inq)
        n_ch = i.shape[-1]
        mean = torch.div(2 * i.sum(dim=-1, keepdim=True) + n_ch, 2 * n_ch, rounding_mode="floor")
        d = i - mean  # |d| < 2^17
        var = torch.div((d * d).sum(dim=-1, keepdim=True), n_ch, rounding_mode="floor")  # < 2^34
        eps = dyadic(self.eps / (s_in * s_in), 2 * LN_STD_FRAC)
        std = isqrt((var << (2 * LN_STD_FRAC)) + eps, 30).clamp_min(1)  # sqrt(var + eps) * 2^LN_STD_FRAC
        # One integer reciprocal per token, then a multiply and shift per element (|d| / std <= sqrt(C): no overflow).
        inv = torch.div(1 << (LN_FRAC + LN_STD_FRAC + LN_RECIP_SHIFT), std, rounding_mode="floor")
        n = rshift_round(d * inv, LN_RECIP_SHIFT)  # Q(LN_FRAC)
        weight = self.weight if self.weight is not None else torch.ones_like(s_out)
        y = n * dyadic(weight / s_out, LN_AFFINE_SHIFT)
        if self.bias is not None:
            y = y + dyadic(self.bias / s_out, LN_AFFINE_SHIFT + LN_FRAC)
        q = (rshift_round(y, LN_AFFINE_SHIFT + LN_FRAC) + zp).clamp(self.outq.grid.qmin, self.outq.grid.qmax)
        return (q - zp).to(x.dtype) * s_out

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, in=int{LN_IN_BITS}, out=int{self.outq.grid.bits}"


class IntBlock(nn.Module):
    """A timm pre-norm ``Block`` whose two residual sums are fake-quantized to ``bits`` (symmetric)."""

    def __init__(self, block: Block, bits: int, name: str = ""):
        super().__init__()
        for key in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, key, getattr(block, key))
        self.res1 = ActQuantizer(_signed(bits), -1, f"{name}.res1")
        self.res2 = ActQuantizer(_signed(bits), -1, f"{name}.res2")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.res1(x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))))
        return self.res2(x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


def _is_gelu(module: nn.Module) -> bool:
    """``nn.GELU``, or transformers' ``GELUActivation`` (``hidden_act="gelu"``: erf GELU, as F.gelu)."""
    cls = type(module)
    return isinstance(module, nn.GELU) or (cls.__name__ == "GELUActivation"
                                           and cls.__module__.startswith("transformers."))


def apply_intops(model: nn.Module, recipe: Any, run: Callable[..., Any] | None = None) -> dict[str, str]:
    """``quant.intops=ivit``: integer Softmax (in every attention), GELU, LayerNorm and residual stream.

    Call before the planned Linear layers are swapped (module names stay the same) or after. ``run(1)``
    feeds one calibration batch: it finds Hugging Face attention (:func:`qsweep.quant.vit.attention_sites`).
    Returns the attention layers whose softmax it cannot reach, ``{name: reason}`` (also logged).
    """
    if recipe.intops == "off":
        return {}
    sites, skipped = attention_sites(model, run)
    if not sites and not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise ConfigError(f"quant.intops={recipe.intops!r} needs a transformer with nn.LayerNorm or attention "
                          f"(integer Softmax / GELU / LayerNorm); {type(model).__name__} has neither. "
                          "Use quant.intops=off")
    act = act_config(recipe)
    for name, attn in sites.items():
        attn.softmax = IntSoftmax(_signed(SOFTMAX_IN_BITS, act), name)
    out_cfg = replace(act, bits=LN_OUT_BITS)
    blocks = [name for name, module in model.named_modules() if type(module) is Block]
    if recipe.residual_bits is not None:
        for name in blocks:
            model.set_submodule(name, IntBlock(model.get_submodule(name), int(recipe.residual_bits), name))
        if not blocks:
            log.warning("quant.residual_bits=%s: %s has no timm Block, so its residual stream stays float "
                        "(the integer residual add is built for timm's Block only)", recipe.residual_bits,
                        type(model).__name__)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            model.set_submodule(name, IntLayerNorm(module, out_cfg, name))
        elif _is_gelu(module):
            model.set_submodule(name, IntGELU(_signed(GELU_BITS, act), name))
    log_skipped(f"quant.intops={recipe.intops}", skipped)
    return skipped
