"""Integer execution of quantized Linear / GEMM-shaped Conv2d layers with ``torch._int_mm``.

:func:`to_int_backend` turns a calibrated fake-quant model into a copy whose eligible
:class:`~qsweep.quant.modules.QuantLayer` s are :class:`IntLinear` / :class:`IntConv2d`: the
input is quantized straight to int8 codes, multiplied with the int8 weight codes in int32
(``torch._int_mm``), corrected exactly for zero points in int32, and only then scaled to float.

Arithmetic, per output ``y[m, n]`` and weight group ``g`` (one group unless per-group):

* activation codes as the fake-quant forward computes them,
  ``v = clamp(round_half_even(x * (1 / s_a)), qmin - zp_a, qmax - zp_a)``, are stored shifted into
  int8 as ``a8 = v + c`` with ``c = zp_a + off_a`` (``off_a = -128`` for the unsigned 8-bit grid,
  else 0), in one fused pass by ``torch.quantize_per_tensor`` (or ``quantize_per_channel`` for
  per-token scales) when it is bit-identical here (:func:`torch_quantize_matches`), else by
  ``round_`` / ``add_`` / ``clamp_`` / ``to(int8)``;
* weight codes ``w`` become signed ``w8 = w - qmin - 2^(b-1)`` (symmetric grids: ``w8 = w``;
  affine ones are centred), and ``u = w - zp_w = w8 - d`` with ``d = zp_w - qmin - 2^(b-1)``;
* ``sum_k v u = sum_k a8 w8 - c * (sum_k w8 - K_g d) - d * sum_k a8``: the first term is the
  int32 GEMM, the column term ``sum_k w8 - K_g d`` is precomputed per (group, channel), the row
  sums of ``a8`` are computed only when some ``d != 0`` (affine weights). All of it is exact
  int32 arithmetic for ``K <= MAX_K``;
* the exact accumulator is converted to float32 in place and scaled,
  ``y = sum_g (s_a * s_w[g, n]) * acc_g + bias`` (per-token: ``s_a[m] * sum_g s_w[g, n] acc_g + bias``).

The integer accumulators equal the fake-quant forward's ``sum_k v u`` exactly, so the two
paths differ only by float rounding: the fake path's float32 GEMM accumulates ``K`` rounded
products, the int path rounds a handful of times. Per output element,

    |y_int - y_fake| <= (K + G + 6) * u * sum_k |x_hat_k * w_hat_k| + 4 * u * (|y| + |bias|),
    u = 2^-24 (float32 unit roundoff)

(:func:`output_error_bound`); measured, the difference is ~4e-7 of the output's largest value.
Through a whole network an ulp-sized difference occasionally moves an activation sitting on a
rounding tie of the next layer's grid by one code, and that step propagates; end to end the
logits therefore agree to a fraction of the quantization error itself, not to an ulp
(tests/test_intkernel.py, experiments/bench/INT.md).

Whatever the path cannot run exactly stays on the fake-quant forward; :func:`to_int_backend`
reports those layers and why (:func:`int_ineligible`). ``torch._int_mm`` has no shape limits on
CPU (probed: M, K, N of any size, M = 1 included); on CUDA (M > 16, K and N multiples of 8)
:func:`_int_mm` pads, which is untested here (no GPU).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch import nn

from qsweep.quant.grid import Grid, qparams
from qsweep.quant.modules import QuantConv2d, QuantLayer, QuantLinear
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.vit import QuantAttention
from qsweep.quant.rotate import hadamard

# Largest reduction length with exact int32 accumulation: |sum v u| <= K * 255 * 255 < 2^31.
MAX_K = 32768

ACT_KERNELS = ("auto", "torch_quantize", "float")

# IntAttention's batch chunk: this many bytes of int32 scores per chunk (L2 + a share of L3).
_ATTN_CHUNK_BYTES = 4 << 20

__all__ = ["GemmConsts", "IntAttention", "IntConv2d", "IntGemm", "IntLinear", "int_ineligible", "output_error_bound",
           "to_int_backend", "torch_quantize_matches"]

_torch_quantize_ok: bool | None = None


def torch_quantize_matches() -> bool:
    """Whether ``torch.quantize_per_tensor`` / ``quantize_per_channel`` give our grid's exact codes.

    They compute ``clamp(nearbyint(x * (1 / s)) + zp)`` in one fused pass (the float path takes
    four); we use them only if that is bit-identical to ``round_half_even(x * (1 / s))`` followed
    by adding the zero point, which is checked once per process on values at and next to every
    rounding tie (where a fused multiply-add or a different rounding mode would show).
    """
    global _torch_quantize_ok
    if _torch_quantize_ok is None:
        try:
            with warnings.catch_warnings():  # "deprecated" UserWarning, emitted once per process
                warnings.simplefilter("ignore")
                _torch_quantize_ok = _check_torch_quantize()
        except (RuntimeError, NotImplementedError, AttributeError):  # removed, or no quantized backend
            _torch_quantize_ok = False
    return _torch_quantize_ok


def _check_torch_quantize() -> bool:
    gen = torch.Generator().manual_seed(0)
    ties = torch.arange(-300, 300, dtype=torch.float32) + 0.5
    inf = torch.tensor(float("inf"))

    def near_ties(base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        up, down = torch.nextafter(base, inf), torch.nextafter(base, -inf)
        noise = torch.randn(base.shape[0], 512, generator=gen) * scale * 100
        return torch.cat([base, up, down, torch.nextafter(up, inf), torch.nextafter(down, -inf), noise], dim=1)

    scales = torch.cat([torch.rand(6, generator=gen) * 0.2 + 1e-3, torch.tensor([1.0, 0.0078125, 3e-5])])
    for i, s in enumerate(scales.tolist()):
        s32 = torch.tensor(s, dtype=torch.float32)
        x = near_ties(ties[None] * s32, s32).view(-1)
        for c in (0, (37 * i) % 256 - 128, 127, -128):
            ref = (torch.round(x * (1.0 / s32)) + c).clamp_(-128, 127).to(torch.int8)
            got = _int8_view(torch.quantize_per_tensor(x, float(s32), c, torch.qint8))
            if not torch.equal(ref, got):
                return False
    row_s = torch.rand(64, 1, generator=gen) * 0.2 + 1e-3
    row_c = torch.randint(-128, 128, (64, 1), generator=gen, dtype=torch.int32)
    rows = near_ties(ties[None] * row_s, row_s)
    ref = (torch.round(rows * (1.0 / row_s)) + row_c).clamp_(-128, 127).to(torch.int8)
    got = torch.quantize_per_channel(rows, row_s.view(-1).double(), row_c.view(-1).long(), 0, torch.qint8)
    return torch.equal(ref, _int8_view(got))


def _int8_view(q: torch.Tensor) -> torch.Tensor:
    """The int8 codes of a qint8 tensor without copying them (``int_repr`` copies, unvectorized)."""
    return torch.empty(0, dtype=torch.int8, device=q.device).set_(
        q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def _shift(grid: Grid) -> int:
    """Offset that moves ``grid``'s codes into int8: -128 for the unsigned 8-bit grid, else 0."""
    return -128 if grid.qmax > 127 else 0


def _weight_shift(grid: Grid) -> int:
    """Offset that centres ``grid``'s codes on zero (``[-2^(b-1), 2^(b-1))``): 0 for symmetric grids,
    so their ``d`` is 0, and a signed field of ``b`` bits, which the packed artifact stores as is."""
    return -grid.qmin - 2 ** (grid.bits - 1)


class GemmConsts(NamedTuple):
    """Everything the GEMM reads besides the activation codes (see :class:`IntGemm`'s buffers).

    :class:`IntGemm` stores them; the exported form (:mod:`qsweep.quant.intexport`) derives them
    in its forward from the packed codes, with the same integer and float operations.
    """

    weight_t: torch.Tensor
    col_term: torch.Tensor | None
    w_offset: torch.Tensor | None
    scale: torch.Tensor
    col_corr: torch.Tensor | None
    a_inv: torch.Tensor | None

    def columns(self, cols: slice) -> GemmConsts:
        """The constants of output columns ``cols`` (``[K, N]`` / ``[G, N]`` tensors sliced, ``a_inv`` kept)."""
        return GemmConsts(*(t if t is None or t.dim() == 0 else t[:, cols] for t in self))


def int_ineligible(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot run on integer kernels exactly, or None if it can."""
    if layer.qweight is None:
        return "float weights (no qweight)"
    if layer.qweight.grid.bits > 8:
        return f"weight bits {layer.qweight.grid.bits} > 8"
    act = layer.act
    if act is None:
        return "float activations (act is None)"
    if act.observer is not None:
        return "activation quantizer not calibrated (still observing)"
    if act.grid.bits > 8:
        return f"activation bits {act.grid.bits} > 8 (int8 GEMM needs <= 8)"
    if not act.dynamic and not (torch.isfinite(act.scale).all() and float(act.scale) > 0):
        return f"non-finite or non-positive activation scale {float(act.scale)}"
    rows = layer.qweight.shape[0]
    k = layer.qweight.codes.numel() // rows
    if k > MAX_K:
        return f"reduction length {k} > {MAX_K}: int32 accumulation could overflow"
    if isinstance(layer, QuantConv2d):
        kh, kw = layer.qweight.shape[2:]
        if layer.groups != 1:
            return f"grouped conv (groups={layer.groups})"
        if not layer.zero_padding:
            padding = "TF-same" if layer.same_padding else layer.padding
            return f"padded conv (padding={padding}) is not a GEMM"
        if (kh, kw) != (1, 1):
            if tuple(layer.stride) != (kh, kw):
                stride = tuple(layer.stride)
                return f"conv kernel {(kh, kw)} with stride {stride}: overlapping patches are not a GEMM"
            if tuple(layer.dilation) != (1, 1):
                return f"dilated conv (dilation={tuple(layer.dilation)})"
            if act.dynamic:
                return "per-token activations on a conv with kernel > 1 (scale varies inside a patch)"
        return None
    if not isinstance(layer, QuantLinear):
        return f"unsupported layer type {type(layer).__name__}"
    return None


class IntGemm(nn.Module):
    """``y = dequant(quant(x) @ w_codes^T) + bias`` on int8 codes; subclasses map inputs to ``[M, K]``.

    Buffers (all computed once, at conversion): ``weight_t`` int8 ``[K, N]`` (contiguous, so each
    group's rows are contiguous too), ``col_term`` int32 ``[G, N]`` (``sum_k w8 - K_g d``),
    ``w_offset`` int32 ``[G, N]`` (``d``; absent when all zero), ``scale`` float32 ``[G, N]``
    (``s_a * s_w`` for static activations, ``s_w`` for per-token ones), ``col_corr`` int32
    ``[G, N]`` (``c * col_term``, static activations) and ``bias`` float32 ``[N]``.
    """

    @property
    def weight(self) -> torch.Tensor:
        """An empty float32 tensor, not the weight (that is integer codes): models that read a layer's
        ``weight.dtype`` to cast their input (Hugging Face ViT's patch embedding) keep feeding float."""
        return torch.empty(0)

    def __init__(self, layer: QuantLayer, act_kernel: str = "auto"):
        super().__init__()
        if act_kernel not in ACT_KERNELS:
            raise ValueError(f"act_kernel={act_kernel!r}; choose one of {list(ACT_KERNELS)}")
        qw, act = layer.qweight, layer.act
        self.layer_name = layer.layer_name
        self.w_grid, self.a_grid = qw.grid, act.grid
        self.dynamic = act.dynamic
        _, groups, _ = qw.codes.shape
        n = qw.shape[0]
        k = qw.codes.numel() // n
        self.in_features, self.out_features = k, n
        self.groups = groups  # per-tensor codes are one [1, 1, N*K] row: one group
        self.group_len = k // groups

        off_w = _weight_shift(qw.grid)
        w8 = (qw.codes.reshape(n, k).to(torch.int32) + off_w)
        g, glen = self.groups, self.group_len
        d = (qw.zero_point.reshape(-1, g).to(torch.int32) + off_w).expand(n, g)  # [N, G]
        s_w = qw.scale.reshape(-1, g).float().expand(n, g)
        col_sum = w8.reshape(n, g, glen).sum(-1, dtype=torch.int32)  # [N, G]
        self.register_buffer("weight_t", w8.to(torch.int8).t().contiguous())
        self.register_buffer("col_term", (col_sum - glen * d).t().contiguous())
        self.register_buffer("w_offset", d.t().contiguous() if bool((d != 0).any()) else None)

        self.off_a = _shift(act.grid)
        self.q_lo, self.q_hi = act.grid.qmin + self.off_a, act.grid.qmax + self.off_a
        self.narrow = (self.q_lo, self.q_hi) != (-128, 127)
        if self.dynamic:
            self.register_buffer("scale", s_w.t().contiguous())
            self.register_buffer("col_corr", None)
        else:
            s_a = act.scale.float().reshape(())
            c = int(act.zero_point) + self.off_a
            self.a_scale, self.a_c = float(s_a), c
            self.register_buffer("a_inv", 1.0 / s_a)  # the same float32 reciprocal as fake_quantize
            self.register_buffer("scale", (s_a * s_w).t().contiguous())
            corr = c * self.col_term
            self.register_buffer("col_corr", corr if bool((corr != 0).any()) else None)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.register_buffer("input_divisor", None if layer.input_divisor is None else layer.input_divisor.clone())
        self.input_rotation = getattr(layer, "input_rotation", None)  # quant.rotate (None on convs)
        use_torch = act_kernel == "torch_quantize" or (act_kernel == "auto" and torch_quantize_matches())
        if act_kernel == "torch_quantize" and not torch_quantize_matches():
            raise RuntimeError("torch.quantize_per_tensor does not reproduce the fake-quant grid here")
        self.act_kernel = "torch_quantize" if use_torch else "float"

    # -- pieces (public so tests can check the integer part on its own) ------------------------

    def consts(self) -> GemmConsts:
        return GemmConsts(self.weight_t, self.col_term, self.w_offset, self.scale, self.col_corr,
                          None if self.dynamic else self.a_inv)

    def quantize_input(self, x2: torch.Tensor, k: GemmConsts | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """int8 codes ``a8 = v + c`` of ``x2 [M, K]``; for per-token also ``(s_a [M, 1], c [M, 1])``."""
        if not self.dynamic:
            if self.act_kernel == "torch_quantize":
                q = _int8_view(torch.quantize_per_tensor(x2, self.a_scale, self.a_c, torch.qint8))
                return (q.clamp_(self.q_lo, self.q_hi) if self.narrow else q), None, None
            t = x2 * (k or self.consts()).a_inv
            t.round_()
            if self.a_c:
                t.add_(self.a_c)
            return t.clamp_(self.q_lo, self.q_hi).to(torch.int8), None, None
        # Per token: the same ops on the same values as ActQuantizer's dynamic branch.
        lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)
        s_a, zp = qparams(lo, hi, self.a_grid)
        c = zp + self.off_a
        if self.act_kernel == "torch_quantize":
            q = _int8_view(torch.quantize_per_channel(x2, s_a.view(-1).double(), c.view(-1).long(), 0, torch.qint8))
            q = q.clamp_(self.q_lo, self.q_hi) if self.narrow else q
        else:
            t = x2 * (1.0 / s_a)
            t.round_()
            t.add_(c)
            q = t.clamp_(self.q_lo, self.q_hi).to(torch.int8)
        return q, s_a, c

    def accumulate(self, q: torch.Tensor, g: int, c_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Exact int32 ``sum_{k in group g} v u`` for codes ``q [M, K]`` (``c_rows``: per-token c)."""
        return self._acc(q, g, c_rows, as_float=False, k=self.consts())

    def _acc(self, q: torch.Tensor, g: int, c_rows: torch.Tensor | None, as_float: bool, k: GemmConsts
             ) -> torch.Tensor:
        if self.groups == 1:
            qg, wg = q, k.weight_t
        else:
            sl = slice(g * self.group_len, (g + 1) * self.group_len)
            qg, wg = q[:, sl], k.weight_t[sl]
        acc = _int_mm(qg, wg)
        if k.w_offset is not None:
            acc.addr_(qg.sum(1, dtype=torch.int32), k.w_offset[g], alpha=-1)
        if c_rows is not None:
            acc.addr_(c_rows.view(-1), k.col_term[g], alpha=-1)
        elif k.col_corr is not None:
            acc.sub_(k.col_corr[g])
        if not as_float:
            return acc
        # Convert in place (same bytes, same positions): the exact integer, rounded once to float32.
        # (torch.sub(acc, corr, out=float_view) would fuse the two passes but takes a slow casting path.)
        return acc.view(torch.float32).copy_(acc)

    def dequant(self, q: torch.Tensor, s_a: torch.Tensor | None = None, c_rows: torch.Tensor | None = None,
                k: GemmConsts | None = None, cols: slice | None = None) -> torch.Tensor:
        """Float output ``[M, N]`` from int8 codes ``q [M, K]`` (``s_a``, ``c_rows``: per-token qparams);
        with ``cols``, only those output columns (contiguous ``[M, len(cols)]``)."""
        k = k or self.consts()
        bias = self.bias
        if cols is not None:
            k = k.columns(cols)
            bias = None if bias is None else bias[cols]
        out = self._acc(q, 0, c_rows, as_float=True, k=k)
        if self.groups == 1 and s_a is None:  # the common case: one fused pass after the cast
            if bias is None:
                return out.mul_(k.scale[0])
            return torch.addcmul(bias, out, k.scale[0], out=out)
        out.mul_(k.scale[0])
        for g in range(1, self.groups):
            out.addcmul_(self._acc(q, g, c_rows, as_float=True, k=k), k.scale[g])
        if s_a is not None:
            return out.mul_(s_a) if bias is None else torch.addcmul(bias, out, s_a, out=out)
        return out if bias is None else out.add_(bias)

    def gemm(self, x2: torch.Tensor, parts: int = 1) -> torch.Tensor | list[torch.Tensor]:
        """Float output ``[M, N]`` for float input ``[M, K]``; with ``parts > 1`` a list of ``parts``
        contiguous ``[M, N / parts]`` column blocks from one quantization of the input (a fused qkv
        Linear's q, k, v: a column slice of one output would have to be copied to be quantized)."""
        k = self.consts()
        q, s_a, c_rows = self.quantize_input(x2, k)
        if parts == 1:
            return self.dequant(q, s_a, c_rows, k)
        n = self.out_features // parts
        return [self.dequant(q, s_a, c_rows, k, slice(i * n, (i + 1) * n)) for i in range(parts)]

    def extra_repr(self) -> str:
        kind = "per_token" if self.dynamic else "per_tensor"
        return (f"{self.layer_name!r}, in={self.in_features}, out={self.out_features}, groups={self.groups}, "
                f"w={self.w_grid.bits}b {'sym' if self.w_grid.symmetric else 'affine'}, "
                f"a={self.a_grid.bits}b {'sym' if self.a_grid.symmetric else 'affine'} {kind}, "
                f"act_kernel={self.act_kernel}")


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` (int8 x int8 -> int32); pads to CUDA's shape rules there (CPU has none)."""
    if a.is_cuda:
        m, k = a.shape
        n = b.shape[1]
        pm, pk, pn = max(0, 17 - m), -k % 8, -n % 8
        if pm or pk or pn or not a.is_contiguous():
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
            b = torch.nn.functional.pad(b, (0, pn, 0, pk))
            return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


class IntLinear(IntGemm):
    """Integer stand-in for :class:`~qsweep.quant.modules.QuantLinear` (``x [..., K] -> [..., N]``)."""

    def forward(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor | list[torch.Tensor]:
        """``[..., N]``; with ``parts > 1`` the :meth:`IntGemm.gemm` column blocks ``[M, N / parts]``."""
        lead = x.shape[:-1]
        if self.input_divisor is not None:
            x = x / self.input_divisor  # quant.smooth, as QuantLayer.scale_input
        if self.input_rotation is not None:
            x = hadamard(x, self.input_rotation)  # quant.rotate, likewise
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if parts > 1:
            return self.gemm(x2, parts)
        return self.gemm(x2).view(*lead, self.out_features)


class IntConv2d(IntGemm):
    """Integer stand-in for a GEMM-shaped :class:`~qsweep.quant.modules.QuantConv2d`.

    Handles non-overlapping patches (``stride == kernel``, no padding: the ViT patch embedding)
    and 1x1 convolutions (any stride). Static activations are quantized on the NCHW input in one
    pass and the int8 codes are rearranged into ``[B * Ho * Wo, C * kh * kw]`` patch rows (a copy
    at a quarter of the float cost). The output is returned as an NCHW-shaped, channels-last
    strided view (``flatten(2).transpose(1, 2)`` of a ViT patch embedding then costs nothing).
    """

    def __init__(self, layer: QuantConv2d, act_kernel: str = "auto"):
        super().__init__(layer, act_kernel)
        self.kernel_size = tuple(layer.qweight.shape[2:])
        self.stride = tuple(layer.stride)
        self.in_channels = layer.qweight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        if (kh, kw) == (1, 1):
            if (sh, sw) != (1, 1):
                x = x[:, :, ::sh, ::sw]
        else:  # stride == kernel: drop the rows / columns the conv would not reach
            h, w = x.shape[-2:]
            x = x[:, :, : h - h % kh, : w - w % kw]
        b, ch, h, w = x.shape
        ho, wo = h // kh, w // kw
        if self.dynamic:  # 1x1 only: one token per pixel, features over channels
            x2 = x.permute(0, 2, 3, 1).reshape(-1, ch)
            out = self.gemm(x2 if x2.is_contiguous() else x2.contiguous())
        else:
            k = self.consts()
            q, _, _ = self.quantize_input(x if x.is_contiguous() else x.contiguous(), k)
            patches = q.view(b, ch, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(b * ho * wo, ch * kh * kw)
            out = self.dequant(patches, k=k)
        return out.view(b, ho, wo, self.out_features).permute(0, 3, 1, 2)


def int_module_for(layer: QuantLayer, act_kernel: str = "auto") -> IntGemm:
    if isinstance(layer, QuantConv2d):
        return IntConv2d(layer, act_kernel)
    return IntLinear(layer, act_kernel)


def to_int_backend(qmodel: nn.Module, act_kernel: str = "auto",
                   module_for: Callable[[QuantLayer, str], IntGemm] | None = None
                   ) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``qmodel`` whose eligible quantized layers run on integer kernels.

    Args:
        qmodel: a calibrated model from :func:`qsweep.quantize` (left unchanged).
        act_kernel: how inputs are quantized: ``torch_quantize`` (fused, one pass), ``float``
            (round/clamp/cast) or ``auto`` (the fused one when it is bit-identical here).
        module_for: builds one layer's integer module (default :func:`int_module_for`; the exported
            form passes its own).

    Returns:
        ``(model, fallbacks)``: the model in eval mode, where each eligible ``QuantLayer`` is an
        :class:`IntLinear` / :class:`IntConv2d` holding only int8 weight codes and per-channel
        constants (no float weight), and ``{layer_name: reason}`` for the quantized layers left
        on the fake-quant forward (see :func:`int_ineligible`). Each quantized attention
        (``quant.vit.attn_matmul``) becomes an :class:`IntAttention` unless
        :func:`attention_ineligible` says why not.
    """
    fallbacks: dict[str, str] = {}
    memo: dict[int, object] = {}
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantLayer):
            continue
        reason = int_ineligible(module)
        if reason is not None:
            fallbacks[name] = reason
            continue
        # deepcopy returns memo entries as they are: the converted layer's float weight, codes
        # and observers are never copied.
        memo[id(module)] = (module_for or int_module_for)(module, act_kernel).to(module.weight.device)
    model = copy.deepcopy(qmodel, memo)
    # Attention (quant.vit.attn_matmul) is not a layer: one attention_ineligible rejects stays as it was.
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantAttention) and module.q_quant is not None and attention_ineligible(module) is None:
            model.set_submodule(name, IntAttention(module, act_kernel))
    return model.eval(), fallbacks


def attention_ineligible(attn: QuantAttention) -> str | None:
    """Why ``attn``'s two matmuls cannot run on integer codes exactly, or None if they can."""
    quants = {"q": attn.q_quant, "k": attn.k_quant, "v": attn.v_quant, "softmax": attn.softmax_quant}
    for what, quant in quants.items():
        if type(quant) is not ActQuantizer:  # noqa: E721 - Log2Quantizer's levels are not a uniform grid
            return f"{what} quantizer {type(quant).__name__} is not a uniform grid"
        if quant.observer is not None or quant.dynamic or quant.grid.bits > 8:
            return f"{what} quantizer is not a calibrated static grid of <= 8 bits"
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)) or attn.gate is not None:
        return "q/k norms, an output norm or a gate"
    if type(attn.softmax) is not nn.Softmax:  # noqa: E721 - intops' integer softmax computes other values
        return f"softmax {type(attn.softmax).__name__}"
    if attn.head_dim * 255 * 255 >= 2**24:
        return f"head_dim {attn.head_dim}: float32 scores of 8-bit codes would not be exact"
    return None


class _Codes(nn.Module):
    """Static per-tensor codes of one attention operand on its fake-quant grid, as :class:`IntGemm` quantizes.

    ``prescale`` is a multiply the fake path applies before quantizing (the attention scale on q),
    folded into the quantization scale: for a power of two ``2^e``, ``(x * 2^e) * fl(1/s)`` and
    ``x * fl(1/(s * 2^-e))`` round the same real number, so the codes are the same and one pass
    is saved (exact unless ``x * 2^e`` is subnormal, which the caller rules out through ``s``).
    """

    def __init__(self, quant: ActQuantizer, torch_kernel: bool, prescale: float = 1.0):
        super().__init__()
        off = _shift(quant.grid)
        s = quant.scale.float().reshape(())
        self.c = int(quant.zero_point) + off
        self.lo, self.hi = quant.grid.qmin + off, quant.grid.qmax + off
        self.torch_kernel = torch_kernel
        self.register_buffer("scale", s.clone())  # what one code step is worth
        s_in = s / prescale  # exact for a power-of-two prescale
        self.s_in = float(s_in)
        self.register_buffer("inv", 1.0 / s_in)  # fake_quantize's float32 reciprocal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """int8 codes ``v + c``."""
        if self.torch_kernel:
            q = _int8_view(torch.quantize_per_tensor(x, self.s_in, self.c, torch.qint8))
            return q.clamp_(self.lo, self.hi) if (self.lo, self.hi) != (-128, 127) else q
        t = x * self.inv
        t.round_()
        if self.c:
            t.add_(self.c)
        return t.clamp_(self.lo, self.hi).to(torch.int8)

    def float_codes(self, x: torch.Tensor, shifted: bool) -> torch.Tensor:
        """The same codes as float32, ``v + c`` (``shifted``) or ``v``: operands of the float-matmul route."""
        t = x * self.inv
        t.round_()
        if not shifted:
            return t.clamp_(self.lo - self.c, self.hi - self.c)
        if self.c:
            t.add_(self.c)
        return t.clamp_(self.lo, self.hi)

    def max_abs(self) -> int:
        """The largest ``|v|`` a code can stand for."""
        return max(abs(self.lo - self.c), abs(self.hi - self.c))


def _heads(x: torch.Tensor) -> list[torch.Tensor]:
    """The 2-D per-(batch, head) views of ``x [B, h, ...]`` (two ``unbind`` calls: the loops' Python cost counts)."""
    return [t for xb in x.unbind(0) for t in xb.unbind(0)]


class IntAttention(nn.Module):
    """:class:`~qsweep.quant.vit.QuantAttention` with both matmuls on integer codes (``quant.vit.attn_matmul``).

    The qkv Linear returns q, k and v as three contiguous blocks (:meth:`IntGemm.gemm`), each
    quantized in one pass to ``[B, N, h, d]`` codes (q's attention scale folded into its grid when
    that is exact, see :class:`_Codes`); the per-(batch, head) operands are strided views of those,
    which ``torch._int_mm`` reads as they are, so nothing is copied into a head-major layout.
    With ``int_mm`` each (batch, head) pair is one ``torch._int_mm`` per matmul, a few batch
    elements at a time; without it (the exported form: a loop over a dynamic batch does not
    export) a float32 ``matmul`` of the same codes, exact while every partial sum stays below
    2^24, so both routes give the same float scores and outputs (``p v`` takes the float route in
    both when the sequence is too long for that bound).

    Scores are ``(s_q s_k) * sum_d v_q k8`` with ``k8 = v_k + c_k`` the stored codes: the fake
    path's ``sum_d v_q v_k`` up to ``c_k sum_d v_q``, a term constant along the softmax axis, to
    which softmax is invariant; leaving it out saves two passes over the ``B h N^2`` scores.
    ``p v`` is exact, ``(s_p s_v) * sum_j v_p v_v``, scaled straight into the ``[B, N, h, d]``
    layout the proj Linear reads.
    """

    def __init__(self, attn: QuantAttention, act_kernel: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.qkv, self.proj = attn.qkv, attn.proj
        torch_kernel = act_kernel == "torch_quantize" or (act_kernel == "auto" and torch_quantize_matches())
        # Fold the attention scale into q's quantization when that is exact (see _Codes), else multiply.
        fold = math.frexp(attn.scale)[0] == 0.5 and float(attn.q_quant.scale) >= 2.0**-100
        self.q_prescale = None if fold else attn.scale
        self.q_codes = _Codes(attn.q_quant, torch_kernel, attn.scale if fold else 1.0)
        self.k_codes, self.v_codes, self.p_codes = (
            _Codes(m, torch_kernel) for m in (attn.k_quant, attn.v_quant, attn.softmax_quant))
        # Per-call constants as Python numbers: at batch 1 each extra tensor op is a visible share of the time.
        self.qk_scale = float(self.q_codes.scale * self.k_codes.scale)  # the float32 products, as exact floats
        self.pv_scale = float(self.p_codes.scale * self.v_codes.scale)
        self.pv_exact_len = (2**24 - 1) // (self.p_codes.max_abs() * self.v_codes.max_abs())
        # The float route elsewhere: CUDA's _int_mm needs padded shapes; the exported form sets False.
        self.int_mm = attn.q_quant.scale.device.type == "cpu"

    def _qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v as three contiguous ``[B * N, attn_dim]`` blocks."""
        if isinstance(self.qkv, IntLinear):
            return self.qkv(x, parts=3)
        return [t.contiguous() for t in self.qkv(x).reshape(-1, 3, self.attn_dim).unbind(1)]

    def _scores(self, qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        """``sum_d v_q k8`` as float32 ``[B, h, N, N]`` (exact) from int8 codes ``[B, N, h, d]``."""
        b, n, h, _ = qc.shape
        acc = qc.new_empty((b, h, n, n), dtype=torch.int32)
        for a, k, o in zip(_heads(qc.transpose(1, 2)), _heads(kc.permute(0, 2, 3, 1)), _heads(acc)):
            torch._int_mm(a, k, out=o)
        if self.q_codes.c:  # sum_d (q8 - c_q) k8: one column term (contiguous: a strided broadcast is 6x slower)
            col = kc.sum(-1, dtype=torch.int32).mul_(self.q_codes.c).transpose(1, 2).contiguous()
            acc.sub_(col.unsqueeze(2))
        return acc.view(torch.float32).copy_(acc)  # in place, exact: |acc| < 2^24

    def _pv(self, pc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """``sum_j v_p v_v`` as float32 ``[B, h, N, d]`` (exact) from codes ``pc [B, h, N, N]``, ``vc [B, N, h, d]``."""
        b, h, n, _ = pc.shape
        acc = pc.new_empty((b, h, n, vc.shape[-1]), dtype=torch.int32)
        for p, v, o in zip(_heads(pc), _heads(vc.transpose(1, 2)), _heads(acc)):
            torch._int_mm(p, v, out=o)
        cp, cv = self.p_codes.c, self.v_codes.c
        if cv:  # row sums of the p codes as one GEMV: .sum(dtype=int32) first copies the int8 to int32, 15x slower
            rows = torch._int_mm(pc.view(-1, n), pc.new_ones((n, 1)))
            acc.sub_(rows.view(b, h, n, 1).mul_(cv))
        if cp:
            acc.sub_((vc.sum(1, dtype=torch.int32) - n * cv).mul_(cp).unsqueeze(2))
        return acc.view(torch.float32).copy_(acc)

    def _softmax(self, scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        attn = scores.mul_(self.qk_scale)
        if attn_mask is not None or is_causal:
            attn = maybe_add_mask(attn, resolve_self_attn_mask(attn.shape[-1], attn, attn_mask, is_causal))
        return attn.softmax(-1)

    def _pv_float(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.p_codes.float_codes(p, False), self.v_codes.float_codes(v, False).transpose(1, 2))

    def _finish(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Scale ``out [b, h, N, d]`` into ``y [b, N, h, d]``, the layout proj reads, in one pass."""
        torch.mul(out.transpose(1, 2), self.pv_scale, out=y)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self._qkv(x)
        q, k, v = q.view(B, N, h, d), k.view(B, N, h, d), v.view(B, N, h, d)
        if self.q_prescale is not None:
            q = q.mul_(self.q_prescale)
        y = x.new_empty((B, N, h, d))
        if not self.int_mm:
            scores = torch.matmul(self.q_codes.float_codes(q, False).transpose(1, 2),
                                  self.k_codes.float_codes(k, True).permute(0, 2, 3, 1))
            self._finish(self._pv_float(self._softmax(scores, attn_mask, is_causal), v), y)
            return self.proj(y.view(B, N, self.attn_dim))
        qc, kc, vc = self.q_codes(q), self.k_codes(k), self.v_codes(v)
        # A few batch elements at a time, so that the passes over their B h N^2 scores (int32 GEMM output,
        # cast, scale, softmax, codes) run in cache: 7 % faster at batch 16 on DeiT-S than all at once.
        step = B if attn_mask is not None else max(1, _ATTN_CHUNK_BYTES // (4 * h * N * N))
        for i in range(0, B, step):
            sl = slice(i, i + step)
            p = self._softmax(self._scores(qc[sl], kc[sl]), attn_mask, is_causal)
            out = self._pv(self.p_codes(p), vc[sl]) if N <= self.pv_exact_len else self._pv_float(p, v[sl])
            self._finish(out, y[sl])
        return self.proj(y.view(B, N, self.attn_dim))


def output_error_bound(x_hat: torch.Tensor, w_hat: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None,
                       groups: int = 1) -> torch.Tensor:
    """Per-element bound on ``|y_int - y_fake|`` of one layer (float64; see the module doc).

    ``x_hat [M, K]`` and ``w_hat [N, K]`` are the fake-quantized input and dequantized weight.
    """
    u = 2.0**-24
    k = x_hat.shape[-1]
    mag = x_hat.double().abs() @ w_hat.double().abs().t()
    b = bias.double().abs() if bias is not None else 0.0
    return (k + groups + 6) * u * mag + 4 * u * (y.double().abs() + b)
