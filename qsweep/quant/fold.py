"""Float rewrites that change no output: BatchNorm into the convolution that feeds it, weight
standardization into the convolution's weight."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers.conv2d_same import Conv2dSame
from torch import nn


class FoldedNormAct(nn.Module):
    """What timm's ``BatchNormAct2d`` computes once its statistics live in the conv before it: its
    dropout and activation. Keeping the BatchNorm with identity statistics instead would cost four
    tensors per layer in every artifact (11 % of EfficientNet-Lite0's 4-bit file)."""

    def __init__(self, bn: BatchNormAct2d):
        super().__init__()
        self.drop, self.act = bn.drop, bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_bn_pairs(model: nn.Module, run: Callable[[], Any]) -> list[tuple[str, str]]:
    """(conv, bn) names where a BatchNorm2d's input is exactly a Conv2d's output.

    Found by following tensors through one forward pass with hooks, so it works on models
    that torch.fx cannot trace and needs no knowledge of their module layout.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def keep(mod, inp, out, name=name):
                produced[id(out)] = (name, out)  # the tensor is held so its id is not reused
            handles.append(module.register_forward_hook(keep))
        elif isinstance(module, nn.BatchNorm2d):
            def match(mod, inp, name=name):
                hit = produced.get(id(inp[0]))
                if hit is not None and hit[1] is inp[0]:
                    pairs.append((hit[0], name))
            handles.append(module.register_forward_pre_hook(match))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(pairs))


@torch.no_grad()
def fold_batchnorm(model: nn.Module, run: Callable[[], Any]) -> list[str]:
    """Fold every eval-mode BatchNorm2d fed directly by a Conv2d into that conv; returns the BN names.

    A plain BatchNorm2d becomes ``nn.Identity``, timm's ``BatchNormAct2d`` its dropout and activation
    (:class:`FoldedNormAct`); any other subclass, whose forward is unknown, gets identity statistics.
    """
    folded = []
    for conv_name, bn_name in _conv_bn_pairs(model, run):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.training or not bn.track_running_stats or bn.num_features != conv.out_channels:
            continue
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = beta + (bias - bn.running_mean) * factor
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            conv.bias.copy_(new_bias)
        if type(bn) is nn.BatchNorm2d:
            model.set_submodule(bn_name, nn.Identity())
        elif type(bn) is BatchNormAct2d:
            model.set_submodule(bn_name, FoldedNormAct(bn))
        else:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            if bn.affine:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
        folded.append(bn_name)
    return folded


STANDARDIZED_CONVS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


@torch.no_grad()
def fold_weight_standardization(model: nn.Module) -> list[str]:
    """Replace timm's weight-standardized convolutions (BiT, NFNet) by plain ones holding the
    standardized weight their forward computes (the same op on the same tensor, so the same
    bits); returns their names. Their weights are then what gets quantized."""
    folded = []
    for name, conv in list(model.named_modules()):
        if not name or type(conv) not in STANDARDIZED_CONVS:
            continue
        gain = (conv.gain * conv.scale).view(-1) if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)) else None
        weight = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, weight=gain,
                              training=True, momentum=0.0, eps=conv.eps).reshape_as(conv.weight)
        geometry = dict(stride=conv.stride, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        if getattr(conv, "same_pad", False):
            plain = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, **geometry)
        else:
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, **geometry)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if conv.bias is not None:
            plain.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, plain.to(conv.weight.device).train(conv.training))
        folded.append(name)
    return folded
