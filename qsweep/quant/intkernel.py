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
* weight codes ``w`` become ``w8 = w + off_w`` (same rule), and ``u = w - zp_w = w8 - d`` with
  ``d = zp_w + off_w``;
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
import warnings

import torch
from torch import nn

from qsweep.quant.grid import Grid, qparams
from qsweep.quant.modules import QuantConv2d, QuantLayer, QuantLinear

# Largest reduction length with exact int32 accumulation: |sum v u| <= K * 255 * 255 < 2^31.
MAX_K = 32768

ACT_KERNELS = ("auto", "torch_quantize", "float")

__all__ = ["IntConv2d", "IntGemm", "IntLinear", "int_ineligible", "output_error_bound", "to_int_backend",
           "torch_quantize_matches"]

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
        padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        if padding not in ((0, 0), "valid"):
            return f"padded conv (padding={layer.padding}) is not a GEMM"
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

        off_w = _shift(qw.grid)
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
        use_torch = act_kernel == "torch_quantize" or (act_kernel == "auto" and torch_quantize_matches())
        if act_kernel == "torch_quantize" and not torch_quantize_matches():
            raise RuntimeError("torch.quantize_per_tensor does not reproduce the fake-quant grid here")
        self.act_kernel = "torch_quantize" if use_torch else "float"

    # -- pieces (public so tests can check the integer part on its own) ------------------------

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """int8 codes ``a8 = v + c`` of ``x2 [M, K]``; for per-token also ``(s_a [M, 1], c [M, 1])``."""
        if not self.dynamic:
            if self.act_kernel == "torch_quantize":
                q = _int8_view(torch.quantize_per_tensor(x2, self.a_scale, self.a_c, torch.qint8))
                return (q.clamp_(self.q_lo, self.q_hi) if self.narrow else q), None, None
            t = x2 * self.a_inv
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
        return self._acc(q, g, c_rows, as_float=False)

    def _acc(self, q: torch.Tensor, g: int, c_rows: torch.Tensor | None, as_float: bool) -> torch.Tensor:
        if self.groups == 1:
            qg, wg = q, self.weight_t
        else:
            sl = slice(g * self.group_len, (g + 1) * self.group_len)
            qg, wg = q[:, sl], self.weight_t[sl]
        acc = _int_mm(qg, wg)
        if self.w_offset is not None:
            acc.addr_(qg.sum(1, dtype=torch.int32), self.w_offset[g], alpha=-1)
        if c_rows is not None:
            acc.addr_(c_rows.view(-1), self.col_term[g], alpha=-1)
        elif self.col_corr is not None:
            acc.sub_(self.col_corr[g])
        if not as_float:
            return acc
        # Convert in place (same bytes, same positions): the exact integer, rounded once to float32.
        # (torch.sub(acc, corr, out=float_view) would fuse the two passes but takes a slow casting path.)
        return acc.view(torch.float32).copy_(acc)

    def dequant(self, q: torch.Tensor, s_a: torch.Tensor | None = None, c_rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Float output ``[M, N]`` from int8 codes ``q [M, K]`` (``s_a``, ``c_rows``: per-token qparams)."""
        out = self._acc(q, 0, c_rows, as_float=True)
        if self.groups == 1 and s_a is None:  # the common case: one fused pass after the cast
            if self.bias is None:
                return out.mul_(self.scale[0])
            return torch.addcmul(self.bias, out, self.scale[0], out=out)
        out.mul_(self.scale[0])
        for g in range(1, self.groups):
            out.addcmul_(self._acc(q, g, c_rows, as_float=True), self.scale[g])
        if s_a is not None:
            return out.mul_(s_a) if self.bias is None else torch.addcmul(self.bias, out, s_a, out=out)
        return out if self.bias is None else out.add_(self.bias)

    def gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """Float output ``[M, N]`` for float input ``[M, K]``."""
        return self.dequant(*self.quantize_input(x2))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.input_divisor is not None:
            x = x / self.input_divisor  # quant.smooth, as QuantLayer.scale_input
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
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
            q, _, _ = self.quantize_input(x if x.is_contiguous() else x.contiguous())
            patches = q.view(b, ch, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(b * ho * wo, ch * kh * kw)
            out = self.dequant(patches)
        return out.view(b, ho, wo, self.out_features).permute(0, 3, 1, 2)


def int_module_for(layer: QuantLayer, act_kernel: str = "auto") -> IntGemm:
    if isinstance(layer, QuantConv2d):
        return IntConv2d(layer, act_kernel)
    return IntLinear(layer, act_kernel)


def to_int_backend(qmodel: nn.Module, act_kernel: str = "auto") -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``qmodel`` whose eligible quantized layers run on integer kernels.

    Args:
        qmodel: a calibrated model from :func:`qsweep.quantize` (left unchanged).
        act_kernel: how inputs are quantized: ``torch_quantize`` (fused, one pass), ``float``
            (round/clamp/cast) or ``auto`` (the fused one when it is bit-identical here).

    Returns:
        ``(model, fallbacks)``: the model in eval mode, where each eligible ``QuantLayer`` is an
        :class:`IntLinear` / :class:`IntConv2d` holding only int8 weight codes and per-channel
        constants (no float weight), and ``{layer_name: reason}`` for the quantized layers left
        on the fake-quant forward (see :func:`int_ineligible`).
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
        memo[id(module)] = int_module_for(module, act_kernel).to(module.weight.device)
    model = copy.deepcopy(qmodel, memo)
    return model.eval(), fallbacks


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
