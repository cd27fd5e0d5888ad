"""Hugging Face ``transformers`` attention for ``quant.vit.attn_matmul`` and ``quant.intops``, found by structure.

An HF attention module (ViT, DeiT, BERT, ... in transformers 5) computes q, k and v with its own Linears
and hands them to ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``:
the two attention matmuls and the softmax live in that function, not in a module. :func:`wrap_hf_attention`
registers a ``"qsweep"`` attention function (with the eager mask builder), switches the model to it, runs one
calibration batch recording every module the function is called with, and gives each such module a
:class:`HFAttentionQuant` child ``qsweep_attn``; the function then delegates to it. Its quantizers and its
softmax are modules, so they are in the state dict, calibrated by :func:`qsweep.quant.calibrate.calibrate`
and traced by ``torch.export``. With no quantizer and the float softmax it computes exactly what eager
attention computes. A module the function is never called with keeps the model's own eager attention.

Import this module only where ``transformers`` is installed (:mod:`qsweep.quant.vit` does so lazily).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["ATTR", "IMPLEMENTATION", "EagerSoftmax", "HFAttentionQuant", "hf_models", "qsweep_attention", "register",
           "use_qsweep_attention", "wrap_hf_attention"]

IMPLEMENTATION = "qsweep"  # the config._attn_implementation qsweep switches HF models to
ATTR = "qsweep_attn"  # the child of each HF attention module holding its quantizers and softmax
# Attention-function keywords changing the math that HFAttentionQuant does not implement.
UNSUPPORTED = ("softcap", "s_aux", "sinks")

# Active recorders by id, each id(module) -> (module, unsupported keywords): see _reached. Every call goes
# to all of them; each keeps the modules of its own model (nested or concurrent discoveries stay apart).
_recorders: dict[int, dict[int, tuple[nn.Module, list[str]]]] = {}


class EagerSoftmax(nn.Module):
    """Eager attention's softmax: over the last dim in float32, returned in the scores' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)


class HFAttentionQuant(nn.Module):
    """The math of HF's ``eager_attention_forward`` with optional quantizers and a replaceable softmax.

    Same places as :class:`qsweep.quant.vit.QuantAttention`: q is scaled then quantized, k and v are
    quantized, the softmax output is quantized. ``softmax`` may become an integer softmax
    (:class:`qsweep.quant.intops.IntSoftmax`), which gets the masked-out positions as a boolean ``mask``.
    """

    def __init__(self):
        super().__init__()
        self.softmax: nn.Module = EagerSoftmax()
        self.q_quant: nn.Module | None = None
        self.k_quant: nn.Module | None = None
        self.v_quant: nn.Module | None = None
        self.softmax_quant: nn.Module | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if key.shape[1] != query.shape[1]:  # grouped-query attention: each k/v head serves several q heads
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        if self.q_quant is not None:
            query, key, value = self.q_quant(query * scaling), self.k_quant(key), self.v_quant(value)
            scores = torch.matmul(query, key.transpose(2, 3))
        else:
            scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            if attention_mask.dim() == 4:
                attention_mask = attention_mask[:, :, :, : key.shape[-2]]
            scores = scores + attention_mask
        probs = self._softmax(scores, attention_mask)
        if self.softmax_quant is not None:
            probs = self.softmax_quant(probs)
        probs = F.dropout(probs, p=dropout, training=self.training)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    def _softmax(self, scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or not getattr(self.softmax, "accepts_mask", False):
            return self.softmax(scores)
        # Eager masks add -inf or the dtype's minimum: those scores must not set an integer softmax's input range.
        return self.softmax(scores, mask=attention_mask <= torch.finfo(attention_mask.dtype).min / 2)


def _fallback(module: nn.Module) -> Callable[..., Any]:
    """The model's own eager attention function (its ``modeling_*.py``), else transformers' SDPA one."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if callable(own) else ALL_ATTENTION_FUNCTIONS["sdpa"]


def qsweep_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"qsweep"`` attention function: the module's :class:`HFAttentionQuant`, else its model's eager one."""
    quant = module._modules.get(ATTR)
    for seen in list(_recorders.values()):
        seen.setdefault(id(module), (module, [k for k in UNSUPPORTED if kwargs.get(k) is not None]))
    if quant is None:
        return _fallback(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    return quant(query, key, value, attention_mask, scaling, dropout)


def register() -> None:
    """Register :func:`qsweep_attention` and the eager mask builder as ``"qsweep"`` (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, qsweep_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # unregistered, transformers builds no mask


# Registered on import too: unpickling a quantized model imports this module before it runs.
register()


def hf_models(model: nn.Module) -> list[PreTrainedModel]:
    """The transformers models in ``model`` (itself included), outermost first."""
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def use_qsweep_attention(model: nn.Module) -> list[PreTrainedModel]:
    """Switch every transformers model in ``model`` to the ``"qsweep"`` attention function; returns them."""
    register()
    models = hf_models(model)
    for hf in models:
        if hf.config._attn_implementation == IMPLEMENTATION:
            continue
        if hasattr(hf, "set_attn_implementation"):
            try:
                hf.set_attn_implementation(IMPLEMENTATION)
            except (ValueError, ImportError):
                pass  # refused by this version's checks: set it on the config below
        if hf.config._attn_implementation != IMPLEMENTATION:
            hf.config._attn_implementation = IMPLEMENTATION  # the setter also sets the sub-configs
    return models


@torch.no_grad()
def _reached(run: Callable[..., Any]) -> list[tuple[nn.Module, list[str]]]:
    """``(module, unsupported keywords)`` for each module the attention function is called with on ``run(1)``."""
    seen: dict[int, tuple[nn.Module, list[str]]] = {}
    _recorders[id(seen)] = seen
    try:
        run(1)
    finally:
        del _recorders[id(seen)]
    return list(seen.values())


def _unreached(model: nn.Module, done: list[str], ran: bool) -> dict[str, str]:
    """transformers ``*Attention`` modules with no found or skipped module above, below or at them."""
    why = ("the 'qsweep' attention function was not called with it on a calibration batch: it computes "
           "attention in its own code, not through transformers' AttentionInterface, or the batch does not "
           "reach it" if ran else "no calibration batch was run to find the attention function's callers")
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if not (cls.__name__.endswith("Attention") and cls.__module__.startswith("transformers.")):
            continue
        if any(name == d or name.startswith(f"{d}.") or d.startswith(f"{name}.") for d in [*done, *out]):
            continue
        out[name] = f"{cls.__name__}: {why}"
    return out


def wrap_hf_attention(model: nn.Module, run: Callable[..., Any] | None
                      ) -> tuple[dict[str, HFAttentionQuant], dict[str, str]]:
    """Give every transformers attention of ``model`` that ``run(1)`` reaches an :class:`HFAttentionQuant`.

    Returns ``({attention module name: its HFAttentionQuant}, {attention module name: why it was left alone})``,
    in module order; modules wrapped before are kept (and found without a run).
    """
    if not use_qsweep_attention(model):
        return {}, {}
    names = {id(m): n for n, m in model.named_modules()}
    skipped: dict[str, str] = {}
    for module, unsupported in (_reached(run) if run is not None else []):
        name = names.get(id(module))
        if name is None:
            continue
        if unsupported:
            skipped[name] = (f"{type(module).__name__} calls attention with {', '.join(unsupported)}, which qsweep's "
                             "quantized attention does not implement: it keeps its model's eager attention")
        elif ATTR not in module._modules:
            module.add_module(ATTR, HFAttentionQuant())
    found = {n: m._modules[ATTR] for n, m in model.named_modules()
             if isinstance(m._modules.get(ATTR), HFAttentionQuant)}
    skipped.update(_unreached(model, [*found, *skipped], run is not None))
    order = {n: i for i, n in enumerate(names.values())}
    return found, dict(sorted(skipped.items(), key=lambda item: order[item[0]]))
