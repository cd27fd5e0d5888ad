"""ViT-aware quantization of vision transformers (``quant.vit``).

* ``attn_matmul``: every attention fake-quantizes q, k, v (``attn_bits``) and the softmax output
  (``softmax_bits``, uniform or :class:`Log2Quantizer`), so both attention matmuls run on integer grids,
  not only the Linear layers. A timm ``Attention`` becomes a :class:`QuantAttention`; a Hugging Face
  ``transformers`` attention (ViT, DeiT, BERT, ...), found by structure as the module its model's attention
  function is called with, gets a :class:`qsweep.quant.hfattn.HFAttentionQuant` child. An attention whose
  matmuls and softmax no module exposes (``nn.MultiheadAttention``, as in torchvision's ViT) is named, with
  the reason, in the returned ``{name: reason}`` and a warning (:func:`attention_sites`).
* ``post_ln``: the pre-norm LayerNorm -> Linear pairs (timm ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``;
  HF ViT/DeiT ``layernorm_before -> q/k/v_proj``, ...) are found by structure on one calibration batch
  (a Linear whose input is the LayerNorm's output tensor) and rewritten in float, before the weights
  are quantized; a fold that would change the model (a post-norm residual also reads the LayerNorm
  output, as in BERT) is undone and reported. The rewrite gives the LayerNorm output similar
  ranges in every channel, so one per-tensor quantizer fits it.
  ``reparam`` (RepQ-ViT, Li et al. 2023) moves a per-channel offset and scale of the LN output
  into the LN affine and the next Linear; ``smooth`` (SmoothQuant, Xiao et al. 2023) divides
  each channel by ``s_j = max|X_j|^a / max|W_j|^(1-a)`` and multiplies the next weights by it.
  Both are exact rewrites of the float model (up to float rounding).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from omegaconf import OmegaConf
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from torch import nn

from qsweep.config import ConfigError, TensorQuantConfig
from qsweep.quant.quantizer import ActQuantizer

__all__ = ["Log2Quantizer", "QuantAttention", "act_config", "apply_vit", "attention_sites", "channel_ranges",
           "fold_checked", "log_skipped", "model_output", "pre_norm_pairs", "quantize_attention", "quantize_attentions",
           "relative_error", "reparam_divisor", "rewrite_post_ln", "smooth_divisor", "wrap_attention"]

log = logging.getLogger(__name__)

# A channel narrower than this fraction of the mean width is widened to it: reparam divides by widths.
_MIN_WIDTH = 1e-3
# Floor of max|X_j| and max|W_j| in SmoothQuant's ratio (a dead channel would give 0 or inf).
_SMOOTH_FLOOR = 1e-5
# A fold is kept when the model output on a calibration batch moves by at most this relative error:
# exact folds move it by float rounding (~1e-7 measured), a fold into a post-norm residual by O(1).
FOLD_RTOL = 1e-4
FUSED_MHA = ("nn.MultiheadAttention: q k^T, the softmax and p v run inside F.multi_head_attention_forward (the "
             "fused scaled_dot_product_attention when called with need_weights=False, as torchvision's ViT does); "
             "no module exposes q, k, v or the probabilities to quantize")


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

    def freeze(self, consumer: torch.Tensor | None = None) -> None:
        if self.observer is None:
            return
        super().freeze(consumer)
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


def attention_sites(model: nn.Module, run: Callable[..., Any] | None = None
                    ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The attentions whose matmuls and softmax qsweep reaches, and ``{name: why not}`` for the others.

    Each found attention is a module with ``q_quant``, ``k_quant``, ``v_quant``, ``softmax_quant`` (None until
    :func:`quantize_attention`) and a ``softmax`` submodule, installed here if needed: timm ``Attention``
    becomes a :class:`QuantAttention` (found without running); a Hugging Face ``transformers`` attention gets
    an :class:`~qsweep.quant.hfattn.HFAttentionQuant`, found by running one calibration batch (``run(1)``)
    through a registered attention function (:func:`qsweep.quant.hfattn.wrap_hf_attention`). Keys are the
    attention modules' names, in module order within each kind.
    """
    found: dict[str, nn.Module] = dict(wrap_attention(model))
    skipped: dict[str, str] = {}
    if sys.modules.get("transformers") is not None:  # no HF model exists before transformers is imported (optional)
        from qsweep.quant.hfattn import wrap_hf_attention

        hf_found, skipped = wrap_hf_attention(model, run)
        found.update(hf_found)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            skipped[name] = FUSED_MHA
    return found, skipped


def log_skipped(option: str, skipped: Mapping[str, str]) -> None:
    """One warning per attention layer ``option`` left alone."""
    for name, reason in skipped.items():
        log.warning("%s: left attention %s alone: %s", option, name, reason)


def quantize_attention(attn: nn.Module, recipe: Any, name: str) -> None:
    """Give ``attn`` (:class:`QuantAttention` or ``HFAttentionQuant``) static per-tensor quantizers for q, k, v
    and the softmax output (calibrated later)."""
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


Pair = tuple[str, nn.LayerNorm, list[nn.Linear]]


def _first_arg(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("input")


@torch.no_grad()
def pre_norm_pairs(model: nn.Module, run: Callable[..., Any]) -> list[Pair]:
    """``(norm name, norm, Linear layers reading its output)``, found by running one batch (``run(1)``).

    A Linear reads a LayerNorm when its input is that LayerNorm's output tensor itself (identity, not
    value): timm ``Block`` s, HF ViT/DeiT, torchvision ViT MLPs, but also post-norm BERT layers, where
    the output feeds the residual too. Folding is only exact in the first case: see :func:`fold_checked`.
    Norms and readers come in module order.
    """
    order = {id(m): i for i, m in enumerate(model.modules())}
    norms = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    outputs: dict[int, tuple[int, torch.Tensor]] = {}  # id(output) -> (id(norm), output kept alive)
    readers: dict[int, dict[int, nn.Linear]] = {}

    def on_norm(norm: nn.Module, _args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (id(norm), out)

    def on_linear(lin: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_arg(args, kwargs)
        hit = outputs.get(id(x))
        if hit is not None and hit[1] is x:
            readers.setdefault(hit[0], {})[id(lin)] = lin

    handles = [m.register_forward_hook(on_norm) for _, m in norms.values()]
    handles += [m.register_forward_pre_hook(on_linear, with_kwargs=True)
                for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        run(1)
    finally:
        for h in handles:
            h.remove()
    pairs = [(*norms[key], sorted(lins.values(), key=lambda m: order[id(m)])) for key, lins in readers.items()]
    return sorted(pairs, key=lambda pair: order[id(pair[1])])


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


def _affine(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if norm.bias is None:
        norm.bias = nn.Parameter(torch.zeros_like(norm.weight), requires_grad=False)
    return norm.weight, norm.bias


@torch.no_grad()
def _fold(norm: nn.LayerNorm, readers: list[nn.Linear], div: torch.Tensor, offset: torch.Tensor | None = None) -> None:
    """LN output ``y -> (y - offset) / div`` per channel; each reader's ``W y + b`` is kept unchanged."""
    weight, bias = _affine(norm)
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


def reparam_divisor(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT-style reparameterization: center each LN output channel and give it the mean width.

    Channel ``c`` spans ``[lo_c, hi_c]``; after ``y -> (y - (lo_c + hi_c) / 2) / r_c`` with
    ``r_c = (hi_c - lo_c) / mean(hi - lo)`` every channel spans the same interval, so a per-tensor
    grid fits all of them (symmetric or affine alike). Returns ``(r, offset)``.
    """
    width = hi - lo
    width = width.clamp_min(_MIN_WIDTH * width.mean().clamp_min(torch.finfo(torch.float32).eps))
    return width / width.mean(), (lo + hi) / 2


def smooth_divisor(readers: list[nn.Linear], lo: torch.Tensor, hi: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: LN output channel ``j`` divided by ``s_j``, the readers' input column ``j`` multiplied."""
    x_max = torch.maximum(-lo, hi).clamp_min(_SMOOTH_FLOOR)
    w_max = torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in readers]).amax(dim=0)
    w_max = w_max.float().clamp_min(_SMOOTH_FLOOR)
    return x_max.pow(alpha) / w_max.pow(1.0 - alpha)


def _snapshot(modules: list[nn.Module]) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]]:
    return [(m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for m in modules]


@torch.no_grad()
def _restore(snapshot: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]]) -> None:
    for module, weight, bias in snapshot:
        module.weight.copy_(weight)
        if bias is None:
            module.bias = None  # the fold created it
        else:
            module.bias.copy_(bias)


def _leaves(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple/list, dict or HF ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return [out.detach()] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _leaves(item)]
    return []


@torch.no_grad()
def model_output(model: nn.Module, run: Callable[..., Any]) -> list[torch.Tensor]:
    """The float tensors ``model`` returns on the first batch (``run(1)``), seen by a forward hook."""
    seen: list[Any] = []
    handle = model.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        run(1)
    finally:
        handle.remove()
    if not seen:
        raise ConfigError("quant.vit.post_ln: the calibration run never called the model")
    return _leaves(seen[0])


def relative_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest ``|out - ref| / |ref|`` (Frobenius norms) over the output tensors."""
    errors = [((o.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item() for o, r in zip(out, ref)]
    return max(errors, default=0.0)


def _cannot_fold(norm: nn.LayerNorm, lo: torch.Tensor) -> str | None:
    if norm.weight is None:
        return "elementwise_affine=False: no LayerNorm affine to fold into"
    if norm.weight.numel() != lo.numel():
        return f"normalizes {tuple(norm.normalized_shape)}, not only the {lo.numel()} output channels"
    return None


def fold_checked(model: nn.Module, run: Callable[..., Any], pairs: list[Pair],
                 ranges: list[tuple[torch.Tensor, torch.Tensor]],
                 divisor: Callable[[list[nn.Linear], torch.Tensor, torch.Tensor], tuple]) -> dict[str, str]:
    """Fold each pair (``divisor(readers, lo, hi) -> (div, offset or None)``), keeping only exact folds.

    After each fold the model's output on the first batch must stay within ``FOLD_RTOL`` of the output
    before it; otherwise the fold is undone: the LayerNorm output has other readers (a post-norm
    residual), which the fold would change. Returns ``{norm name: why it was skipped}``.
    """
    skipped: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    ref = model_output(model, run)
    for (name, norm, readers), (lo, hi) in zip(pairs, ranges):
        reason = _cannot_fold(norm, lo)
        if reason is not None:
            skipped[name] = reason
            continue
        snapshot = _snapshot([norm, *readers])
        _fold(norm, readers, *divisor(readers, lo, hi))
        out = model_output(model, run)
        error = relative_error(out, ref)
        if error > FOLD_RTOL:
            _restore(snapshot)
            skipped[name] = (f"folding into {[names[id(r)] for r in readers]} "
                             f"changes the model output (relative error {error:.2g} > {FOLD_RTOL:g}): its output "
                             "has other readers, e.g. the residual stream of a post-norm block")
        else:
            ref = out
    return skipped


def apply_vit(model: nn.Module, recipe: Any, run: Callable[..., Any]) -> dict[str, str]:
    """Apply ``recipe.vit`` to a float model: ``post_ln`` rewrite (statistics from ``run``), then attention.

    ``run(limit=None)`` feeds the first ``limit`` calibration batches (all with None) to the model. Call
    before the weights are quantized. Everything off: the model is not touched. Returns what it left
    alone, ``{name: reason}`` (also logged): the LayerNorms ``post_ln`` did not fold
    (:func:`rewrite_post_ln`) and the attention layers ``attn_matmul`` cannot reach (:func:`quantize_attentions`).
    """
    return {**rewrite_post_ln(model, recipe, run), **quantize_attentions(model, recipe, run)}


def rewrite_post_ln(model: nn.Module, recipe: Any, run: Callable[..., Any]) -> dict[str, str]:
    """``recipe.vit.post_ln``: the LayerNorms left alone, ``{name: reason}`` (also logged)."""
    vit = recipe.vit
    return _post_ln(model, vit, run) if vit.post_ln != "off" else {}


def quantize_attentions(model: nn.Module, recipe: Any, run: Callable[..., Any] | None) -> dict[str, str]:
    """``recipe.vit.attn_matmul``: quantizers on every attention :func:`attention_sites` finds.

    Returns the attention layers left alone, ``{name: reason}`` (also logged); raises ConfigError when
    there is no attention it can quantize.
    """
    if not recipe.vit.attn_matmul:
        return {}
    found, skipped = attention_sites(model, run)
    if not found:
        why = ("; ".join(f"{name}: {reason}" for name, reason in skipped.items()) if skipped else
               "it has no timm Attention (timm.layers.Attention) nor Hugging Face transformers attention")
        raise ConfigError(f"quant.vit.attn_matmul=True found no attention it can quantize in {type(model).__name__}: "
                          f"{why}. Use quant.vit.attn_matmul=false")
    for name, attn in found.items():
        quantize_attention(attn, recipe, name)
    log_skipped("quant.vit.attn_matmul", skipped)
    return skipped


def _post_ln(model: nn.Module, vit: Any, run: Callable[..., Any]) -> dict[str, str]:
    pairs = pre_norm_pairs(model, run)
    if not pairs:
        raise ConfigError(f"quant.vit.post_ln={vit.post_ln!r} needs LayerNorms whose output feeds Linear layers "
                          f"(pre-norm transformer blocks: LayerNorm -> qkv / fc1); {type(model).__name__} has "
                          "none. Use quant.vit.post_ln=off")
    ranges = channel_ranges([norm for _, norm, _ in pairs], run)
    if vit.post_ln == "reparam":
        skipped = fold_checked(model, run, pairs, ranges, lambda _readers, lo, hi: reparam_divisor(lo, hi))
    else:
        alpha = float(vit.smooth_alpha)
        skipped = fold_checked(model, run, pairs, ranges,
                               lambda readers, lo, hi: (smooth_divisor(readers, lo, hi, alpha), None))
    for name, reason in skipped.items():
        log.warning("quant.vit.post_ln=%s: left %s alone: %s", vit.post_ln, name, reason)
    if len(skipped) == len(pairs):
        log.warning("quant.vit.post_ln=%s changed nothing in %s: no LayerNorm -> Linear pair folds exactly",
                    vit.post_ln, type(model).__name__)
    return skipped
