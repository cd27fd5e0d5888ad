"""Offline rotation of a pre-norm ViT's residual stream (``quant.rotate.residual``, as in QuaRot / SliceGPT).

``quant.rotate`` rotates a Linear's input online, ``x -> x R``, at inference. In a timm
``VisionTransformer`` most of those rotations can be folded into the weights instead, exactly in float:

1. Every LayerNorm's scale and shift go into the Linears that read it (``qkv``, ``fc1``, ``head``).
2. Every weight that writes the residual stream (the patch embedding and its class / position tokens,
   ``attn.proj``, ``mlp.fc2``, LayerScale folded into them) has its output centred, so the stream has zero
   mean everywhere and each LayerNorm equals an RMSNorm, which commutes with an orthogonal ``R``.
3. The stream is rotated: writers ``W -> R^T W``, readers ``W -> W R``.
4. Each head's values are rotated too (``v`` rows and ``proj``'s input columns, blocks within a head).

Only ``fc2``'s input (after the GELU, which no weight can absorb) stays rotated online. The rotation is
block-diagonal Hadamard, as ``quant.rotate``'s; nothing is stored, no tensor changes shape. Other models,
and recipes whose rewrites read the LayerNorms (``quant.vit.post_ln``, ``quant.intops``), keep every
rotation online.
"""

from __future__ import annotations

import torch
from torch import nn

from qsweep.quant.rotate import hadamard, rotation_block

# The classes whose forward the fold is checked against: a subclass may add paths it does not know.
_MODELS = ("VisionTransformer", "VisionTransformerDistilled")
_TOKENS = ("cls_token", "reg_token", "dist_token", "pos_embed")
_HEADS = ("head", "head_dist")


def _not_foldable(model: nn.Module, recipe) -> str | None:
    """Why ``model``'s residual stream cannot be rotated offline under ``recipe``, or None."""
    from timm.layers import LayerScale, Mlp
    from timm.models.vision_transformer import Attention, Block

    if type(model).__name__ not in _MODELS or not type(model).__module__.startswith("timm."):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    if recipe.vit.post_ln != "off" or recipe.intops != "off":
        return "quant.vit.post_ln and quant.intops rewrite the LayerNorms themselves"
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        return f"its patch embedding {type(model.patch_embed).__name__} has no Conv2d projection"
    before = (model.norm_pre, getattr(model.patch_embed, "norm", nn.Identity()))
    if not all(isinstance(m, nn.Identity) for m in before) or getattr(model, "attn_pool", None):
        return "a norm before the blocks or attention pooling"
    norms = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
        return "not exactly one final LayerNorm"
    for name in _HEADS:
        head = getattr(model, name, None)
        if head is not None and not isinstance(head, nn.Linear):
            return f"{name} is {type(head).__name__}, not a Linear: the output would stay rotated"
    for i, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
            return f"blocks.{i} is not a timm Block of Attention and Mlp"
        if not all(isinstance(n, nn.LayerNorm) for n in (block.norm1, block.norm2)):
            return f"blocks.{i}'s norms are not LayerNorms"
        extras = (attn.q_norm, attn.k_norm, attn.norm, mlp.norm)
        if not all(isinstance(m, nn.Identity) for m in extras) or attn.gate is not None:
            return f"blocks.{i} normalizes or gates inside attention or MLP"
        if not all(isinstance(m, (nn.Identity, LayerScale)) for m in (block.ls1, block.ls2)):
            return f"blocks.{i} scales its residual branches in an unknown way"
    return None


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension: a LayerNorm without affine on a zero-mean stream.

    Plain ops, not ``nn.RMSNorm``: ONNX's TorchScript exporter has no ``aten::rms_norm``.
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _centre_rows(weight: torch.Tensor) -> None:
    """Subtract each column's mean over the output rows: the layer's output then has zero mean."""
    weight.sub_(weight.mean(0, keepdim=True))


def _write(weight: torch.Tensor, bias: torch.Tensor | None, block: int) -> None:
    """A layer writing the stream: output centred and rotated (``W -> R^T C W``, ``b -> C b R``)."""
    flat = weight.view(weight.shape[0], -1)
    _centre_rows(flat)
    flat.copy_(hadamard(flat.t(), block).t())
    if bias is not None:
        bias.copy_(hadamard(bias - bias.mean(), block))


def _fold_norm(norm: nn.LayerNorm, readers: list[nn.Linear], block: int) -> nn.Module:
    """The LayerNorm's affine moved into ``readers`` (each then reads the rotated stream); the RMSNorm replacing it."""
    for lin in readers:
        if norm.bias is not None:
            shift = lin.weight.double() @ norm.bias.double()
            if lin.bias is None:
                lin.bias = nn.Parameter(shift.to(lin.weight.dtype), requires_grad=False)
            else:
                lin.bias.copy_(lin.bias.double() + shift)
        if norm.weight is not None:
            lin.weight.mul_(norm.weight)
        lin.weight.copy_(hadamard(lin.weight, block))
    return RMSNorm(norm.eps)


def _layer_scale(ls: nn.Module, writer: nn.Linear) -> None:
    """LayerScale's per-channel gain folded into the Linear before it."""
    if not isinstance(ls, nn.Identity):
        writer.weight.mul_(ls.gamma[:, None])
        if writer.bias is not None:
            writer.bias.mul_(ls.gamma)


@torch.no_grad()
def rotate_residual(model: nn.Module, recipe, block_size: int) -> tuple[dict[str, int], str | None]:
    """Rotate ``model``'s residual stream and heads' values offline, in place, exactly in float.

    Returns ``({Linear name: block of the rotation its input now has}, None)``, or ``({}, reason)`` where
    the model is left alone. Run before the weights are quantized, like :func:`~qsweep.quant.rotate.rotate_linears`.
    """
    reason = _not_foldable(model, recipe)
    block = None if reason else rotation_block(model.embed_dim, block_size)
    if reason is None and block is None:
        reason = f"the stream's width {model.embed_dim} is odd"
    if reason is not None:
        return {}, reason
    rotated: dict[str, int] = {}
    _write(model.patch_embed.proj.weight, model.patch_embed.proj.bias, block)
    for name in _TOKENS:
        token = getattr(model, name, None)
        if token is not None:
            token.copy_(hadamard(token - token.mean(-1, keepdim=True), block))
    for i, blk in enumerate(model.blocks):
        attn, mlp = blk.attn, blk.mlp
        for ls, writer in ((blk.ls1, attn.proj), (blk.ls2, mlp.fc2)):
            _layer_scale(ls, writer)
            _write(writer.weight, writer.bias, block)
        blk.ls1, blk.ls2 = nn.Identity(), nn.Identity()
        blk.norm1 = _fold_norm(blk.norm1, [attn.qkv], block)
        blk.norm2 = _fold_norm(blk.norm2, [mlp.fc1], block)
        rotated[f"blocks.{i}.attn.qkv"] = rotated[f"blocks.{i}.mlp.fc1"] = block
        head_block = rotation_block(attn.head_dim, block_size)
        if head_block is not None:  # blocks inside a head: attention mixes tokens, never channels of a head
            v = attn.qkv.weight[2 * attn.attn_dim:]
            v.copy_(hadamard(v.t(), head_block).t())
            if attn.qkv.bias is not None:
                attn.qkv.bias[2 * attn.attn_dim:] = hadamard(attn.qkv.bias[2 * attn.attn_dim:], head_block)
            attn.proj.weight.copy_(hadamard(attn.proj.weight, head_block))
            rotated[f"blocks.{i}.attn.proj"] = head_block
    heads = [(name, getattr(model, name)) for name in _HEADS if getattr(model, name, None) is not None]
    final = "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"
    setattr(model, final, _fold_norm(getattr(model, final), [head for _, head in heads], block))
    rotated.update({name: block for name, _ in heads})
    return rotated, None
