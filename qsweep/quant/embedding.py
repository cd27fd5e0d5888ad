"""Weight-only quantized ``nn.Embedding`` tables (``quant.embeddings``): one symmetric scale per row.

A lookup reads rows of the table, so a row (one token's vector) is the natural unit of a scale, and
there is no input to quantize. The quantized table keeps the float module's lookup arguments, so with
16-bit-exact codes it returns what the float table did; the artifact stores it bit-packed like a layer's
weight (:class:`~qsweep.quant.packed.PackedWeight`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsweep.config import ConfigError, TensorQuantConfig
from qsweep.quant.plan import matches
from qsweep.quant.quantizer import QuantizedWeight, quantize_weight, sqnr_db

log = logging.getLogger(__name__)


def unreproducible_embedding(module: nn.Embedding) -> str | None:
    """Why a quantized table could not stand in for ``module`` (None: it can)."""
    cls = type(module)
    if cls.forward is not nn.Embedding.forward:
        return f"{cls.__module__}.{cls.__qualname__} overrides forward, which qsweep cannot run on a quantized table"
    if module.max_norm is not None:
        return "max_norm renormalizes the looked-up rows of the table in place"
    return None


class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is on a per-row integer grid (``qweight``), looked up as the float one."""

    def __init__(self, table: nn.Embedding, spec: TensorQuantConfig, name: str):
        super().__init__()
        self.layer_name, self.shape = name, tuple(table.weight.shape)
        self.padding_idx, self.norm_type = table.padding_idx, table.norm_type
        self.scale_grad_by_freq, self.sparse = table.scale_grad_by_freq, table.sparse
        self.qweight: QuantizedWeight | None = quantize_weight(table.weight, spec, name)
        weight = self.qweight.dequantize()
        self.weight_sqnr_db = sqnr_db(table.weight, weight)
        self.register_buffer("weight", weight, persistent=False)  # the artifact holds the packed codes instead
        self.packed: nn.Module | None = None

    @property
    def w_bits(self) -> int:
        return self.qweight.grid.bits if self.qweight is not None else self.packed.bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.packed() if self.packed is not None else self.weight
        return F.embedding(ids, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, w_bits={self.w_bits}, shape={self.shape}"


def quantize_embeddings(model: nn.Module, cfg: Any) -> dict[str, int]:
    """Swap every ``nn.Embedding`` of ``model`` not in ``cfg.skip`` for a :class:`QuantEmbedding` at ``cfg.bits``
    (``quant.embeddings``; nothing when its bits are null); returns ``{name: bits}`` of the swapped tables."""
    if cfg.bits is None:
        return {}
    tables = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if not tables:
        log.warning("quant.embeddings.bits=%s: the model has no nn.Embedding, nothing to quantize", cfg.bits)
    for pattern in cfg.skip or ():
        if not any(matches(n, pattern) for n in tables):
            raise ConfigError(f"quant.embeddings.skip pattern {pattern!r} matches no nn.Embedding; "
                             f"the model's embeddings: {sorted(tables)}")
    spec = TensorQuantConfig(bits=int(cfg.bits), symmetric=True, granularity="per_channel",
                             observer=cfg.observer, scale_dtype=cfg.scale_dtype)
    swapped = {}
    for name, table in tables.items():
        why = unreproducible_embedding(table)
        if why is not None:
            log.warning("left %s in float: %s", name, why)
        elif not any(matches(name, p) for p in cfg.skip or ()):
            model.set_submodule(name, QuantEmbedding(table, spec, name))
            swapped[name] = int(cfg.bits)
    return swapped


def quant_embeddings(model: nn.Module) -> dict[str, QuantEmbedding]:
    """The quantized embedding tables of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
