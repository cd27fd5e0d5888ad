"""ViT-aware quantization of timm vision transformers (``quant.vit``).

* ``attn_matmul``: every timm ``Attention`` becomes a :class:`QuantAttention` that fake-quantizes
  q, k, v (``attn_bits``) and the softmax output (``softmax_bits``, uniform or :class:`Log2Quantizer`),
  so both attention matmuls run on integer grids, not only the Linear layers.
* ``post_ln``: the pre-norm LayerNorm -> Linear pairs of timm ``Block`` s (``norm1 -> attn.qkv``,
  ``norm2 -> mlp.fc1``) are rewritten in float, before the weights are quantized, so that the
  LayerNorm output has similar ranges in every channel and one per-tensor quantizer fits it.
  ``reparam`` (RepQ-ViT, Li et al. 2023) moves a per-channel offset and scale of the LN output
  into the LN affine and the next Linear; ``smooth`` (SmoothQuant, Xiao et al. 2023) divides
  each channel by ``s_j = max|X_j|^a / max|W_j|^(1-a)`` and multiplies the next weights by it.
  Both are exact rewrites of the float model (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from omegaconf import OmegaConf
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block
from torch import nn

from qsweep.config import ConfigError, TensorQuantConfig
from qsweep.quant.quantizer import ActQuantizer

__all__ = ["Log2Quantizer", "QuantAttention", "act_config", "apply_vit", "channel_ranges", "pre_norm_pairs",
           "quantize_attention", "reparam_post_ln", "smooth_post_ln", "wrap_attention"]

# A channel narrower than this fraction of the mean width is widened to it: reparam divides by widths.
_MIN_WIDTH = 1e-3
# Floor of max|X_j| and max|W_j| in SmoothQuant's ratio (a dead channel would give 0 or inf).
_SMOOTH_FLOOR = 1e-5


def act_config(recipe: Any) -> TensorQuantConfig:
    """The recipe's activation spec as a plain dataclass (``quant.act``), static per-tensor."""
    act = recipe.act
    cfg = OmegaConf.to_object(act) if OmegaConf.is_config(act) else act
    if isinstance(cfg, dict):
        cfg = TensorQuantConfig(**cfg)
    return replace(cfg, granularity="per_tensor")


class Log2Quantizer(ActQuantizer):
    """Power-of-two levels for non-negative inputs (attention probabilities).

    Levels are ``scale * 2^-k`` for ``k = 0 .. 2^bits - 2`` plus an exact zero (``2^bits`` codes),
    with ``scale`` the calibrated maximum; ``k = round(-log2(x / scale))``. Softmax outputs crowd
    near 0, where this grid is dense, and a product with ``2^-k`` is a shift on integer hardware.
    """

    def __init__(self, bits: int, name: str = ""):
        super().__init__(TensorQuantConfig(bits=bits, symmetric=False, observer="minmax"), -1, name)
        self.max_exponent = 2**bits - 2

    def freeze(self) -> None:
        if self.observer is None:
            return
        super().freeze()
        # The uniform grid's scale covers [0, max] in 2^b - 1 steps; the log2 grid's top level is max.
        self.scale = self.scale * (self.grid.qmax - self.grid.qmin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None or self.dynamic:
            return super().forward(x)
        k = torch.round(-torch.log2(x.clamp_min(0) / self.scale)).clamp_min(0)  # x = 0: k = inf
        return torch.where(k > self.max_exponent, torch.zeros_like(x), torch.exp2(-k) * self.scale)

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, log2, per_tensor"


class QuantAttention(nn.Module):
    """timm ``Attention`` on its explicit (non-fused) path, with optional quantizers and softmax.

    With every quantizer ``None`` and the float softmax it computes exactly what timm's non-fused
    path does; ``qkv`` / ``proj`` are the original modules, so the quantization plan (and its
    module names) treats them as before.
    """

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self.softmax: nn.Module = nn.Softmax(dim=-1)  # qsweep.quant.intops may put an integer softmax here
        self.q_quant: ActQuantizer | None = None
        self.k_quant: ActQuantizer | None = None
        self.v_quant: ActQuantizer | None = None
        self.softmax_quant: ActQuantizer | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        if self.q_quant is not None:
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = q @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.softmax(attn)
        if self.softmax_quant is not None:
            attn = self.softmax_quant(attn)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def wrap_attention(model: nn.Module) -> dict[str, QuantAttention]:
    """Replace every timm ``Attention`` by a :class:`QuantAttention` (kept if already wrapped)."""
    found = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention):
            module = QuantAttention(module)
            model.set_submodule(name, module)
        if isinstance(module, QuantAttention):
            found[name] = module
    return found


def quantize_attention(attn: QuantAttention, recipe: Any, name: str) -> None:
    """Give ``attn`` static per-tensor quantizers for q, k, v and the softmax output (calibrated later)."""
    vit = recipe.vit
    qkv_cfg = replace(act_config(recipe), bits=int(vit.attn_bits))
    attn.q_quant = ActQuantizer(qkv_cfg, -1, f"{name}.q")
    attn.k_quant = ActQuantizer(qkv_cfg, -1, f"{name}.k")
    attn.v_quant = ActQuantizer(qkv_cfg, -1, f"{name}.v")
    bits = int(vit.softmax_bits)
    if vit.softmax_quantizer == "log2":
        attn.softmax_quant = Log2Quantizer(bits, f"{name}.softmax")
    else:
        # minmax whatever the recipe's observer: clipping the few large probabilities would hurt most.
        prob_cfg = TensorQuantConfig(bits=bits, symmetric=False, observer="minmax")
        attn.softmax_quant = ActQuantizer(prob_cfg, -1, f"{name}.softmax")


def pre_norm_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, list[nn.Linear]]]:
    """``(norm name, norm, Linear layers reading its output)`` for the pre-norms of timm ``Block`` s."""
    pairs = []
    for name, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        attn, mlp = block.attn, block.mlp
        if isinstance(block.norm1, nn.LayerNorm) and isinstance(attn, (Attention, QuantAttention)):
            readers = [attn.qkv] + ([attn.gate] if getattr(attn, "gate", None) is not None else [])
            if all(isinstance(r, nn.Linear) for r in readers):
                pairs.append((f"{name}.norm1", block.norm1, readers))
        if isinstance(block.norm2, nn.LayerNorm) and isinstance(getattr(mlp, "fc1", None), nn.Linear):
            pairs.append((f"{name}.norm2", block.norm2, [mlp.fc1]))
    return pairs


@torch.no_grad()
def channel_ranges(modules: list[nn.Module], run: Callable[[], Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (last dim) min and max of each module's output over the batches ``run`` feeds."""
    ranges: list[list[torch.Tensor | None]] = [[None, None] for _ in modules]

    def hook(slot: list, out: torch.Tensor) -> None:
        lo, hi = torch.aminmax(out.detach().reshape(-1, out.shape[-1]).float(), dim=0)
        slot[0] = lo if slot[0] is None else torch.minimum(slot[0], lo)
        slot[1] = hi if slot[1] is None else torch.maximum(slot[1], hi)

    handles = [m.register_forward_hook(lambda _m, _i, out, slot=slot: hook(slot, out))
               for m, slot in zip(modules, ranges)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for (lo, _), module in zip(ranges, modules):
        if lo is None:
            raise ConfigError(f"quant.vit.post_ln: no calibration batch reached {type(module).__name__}")
    return [(lo, hi) for lo, hi in ranges]


def _affine(norm: nn.LayerNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if norm.weight is None:
        raise ConfigError(f"quant.vit.post_ln needs an affine LayerNorm to fold into; {name} has "
                          "elementwise_affine=False")
    if norm.bias is None:
        norm.bias = nn.Parameter(torch.zeros_like(norm.weight), requires_grad=False)
    return norm.weight, norm.bias


@torch.no_grad()
def _fold(norm: nn.LayerNorm, name: str, readers: list[nn.Linear], div: torch.Tensor,
          offset: torch.Tensor | None = None) -> None:
    """LN output ``y -> (y - offset) / div`` per channel; each reader's ``W y + b`` is kept unchanged."""
    weight, bias = _affine(norm, name)
    weight.copy_(weight / div)
    bias.copy_((bias if offset is None else bias - offset) / div)
    for lin in readers:
        if offset is not None:
            shift = lin.weight.double() @ offset.double()
            if lin.bias is None:
                lin.bias = nn.Parameter(shift.to(lin.weight.dtype), requires_grad=False)
            else:
                lin.bias.copy_(lin.bias.double() + shift)
        lin.weight.mul_(div)


def reparam_post_ln(pairs: list[tuple[str, nn.LayerNorm, list[nn.Linear]]],
                    ranges: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """RepQ-ViT-style reparameterization: center each LN output channel and give it the mean width.

    Channel ``c`` spans ``[lo_c, hi_c]``; after ``y -> (y - (lo_c + hi_c) / 2) / r_c`` with
    ``r_c = (hi_c - lo_c) / mean(hi - lo)`` every channel spans the same interval, so a per-tensor
    grid fits all of them (symmetric or affine alike).
    """
    for (name, norm, readers), (lo, hi) in zip(pairs, ranges):
        width = hi - lo
        width = width.clamp_min(_MIN_WIDTH * width.mean().clamp_min(torch.finfo(torch.float32).eps))
        _fold(norm, name, readers, width / width.mean(), offset=(lo + hi) / 2)


def smooth_post_ln(pairs: list[tuple[str, nn.LayerNorm, list[nn.Linear]]],
                   ranges: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """SmoothQuant: LN output channel ``j`` divided by ``s_j``, the readers' input column ``j`` multiplied."""
    for (name, norm, readers), (lo, hi) in zip(pairs, ranges):
        x_max = torch.maximum(-lo, hi).clamp_min(_SMOOTH_FLOOR)
        w_max = torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in readers]).amax(dim=0)
        w_max = w_max.float().clamp_min(_SMOOTH_FLOOR)
        s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
        _fold(norm, name, readers, s)


def apply_vit(model: nn.Module, recipe: Any, run: Callable[[], Any]) -> None:
    """Apply ``recipe.vit`` to a float model: ``post_ln`` rewrite (statistics from ``run``), then attention.

    Call before the weights are quantized. Everything off: the model is not touched.
    """
    vit = recipe.vit
    if vit.post_ln != "off":
        pairs = pre_norm_pairs(model)
        if not pairs:
            raise ConfigError(f"quant.vit.post_ln={vit.post_ln!r} needs timm ViT Blocks whose LayerNorm feeds a "
                              f"Linear (norm1 -> attn.qkv, norm2 -> mlp.fc1); {type(model).__name__} has none. "
                              "Use quant.vit.post_ln=off")
        ranges = channel_ranges([norm for _, norm, _ in pairs], run)
        if vit.post_ln == "reparam":
            reparam_post_ln(pairs, ranges)
        else:
            smooth_post_ln(pairs, ranges, float(vit.smooth_alpha))
    if vit.attn_matmul:
        if not any(isinstance(m, (Attention, QuantAttention)) for m in model.modules()):
            raise ConfigError(f"quant.vit.attn_matmul=True needs timm Attention modules (timm.layers.Attention); "
                              f"{type(model).__name__} has none. Use quant.vit.attn_matmul=false")
        for name, attn in wrap_attention(model).items():
            quantize_attention(attn, recipe, name)
