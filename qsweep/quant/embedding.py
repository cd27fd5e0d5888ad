"""Weight-only quantized ``nn.Embedding`` tables (``quant.embeddings``): one symmetric scale per row.

A lookup reads rows of the table, so a row (one token's vector) is the natural unit of a scale, and
there is no input to quantize. The quantized table keeps the float module's lookup arguments, so with
16-bit-exact codes it returns what the float table did; the artifact stores it bit-packed like a layer's
weight (:class:`~qsweep.quant.packed.PackedWeight`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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

    act = None  # a lookup has no input to quantize (read where quantized layers and tables are treated alike)

    def __init__(self, table: nn.Embedding, spec: TensorQuantConfig, name: str):
        super().__init__()
        self.layer_name, self.shape, self.spec = name, tuple(table.weight.shape), spec
        self.padding_idx, self.norm_type = table.padding_idx, table.norm_type
        self.scale_grad_by_freq, self.sparse = table.scale_grad_by_freq, table.sparse
        self.register_buffer("weight", None, persistent=False)  # the artifact holds the packed codes instead
        self.set_qweight(quantize_weight(table.weight, spec, name))
        self.weight_sqnr_db = sqnr_db(table.weight, self.weight)
        self.packed: nn.Module | None = None

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        """Look up from ``qweight``'s table (another width's codes of the same float table)."""
        self.qweight = qweight
        self.weight = qweight.dequantize()

    @property
    def w_bits(self) -> int:
        return self.qweight.grid.bits if self.qweight is not None else self.packed.bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.packed() if self.packed is not None else self.weight
        return F.embedding(ids, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, w_bits={self.w_bits}, shape={self.shape}"


def embedding_widths(model: nn.Module, cfg: Any, layers: Mapping[str, Any] | None = None) -> dict[str, int | None]:
    """``{name: bits}`` of the ``nn.Embedding`` tables ``quant.embeddings`` quantizes (None: kept float), in model
    order: with its bits set, every table it can reproduce and does not skip, at ``cfg.bits`` unless a glob of
    ``layers`` (``quant.layers``, in order) matching it sets ``w_bits``. Empty when ``cfg.bits`` is null."""
    if cfg.bits is None:
        return {}
    widths: dict[str, int | None] = {}
    for name, table in model.named_modules():
        if (not isinstance(table, nn.Embedding) or unreproducible_embedding(table) is not None
                or any(matches(name, p) for p in cfg.skip or ())):
            continue
        widths[name] = int(cfg.bits)
        for pattern, override in (layers or {}).items():
            if "w_bits" in override and matches(name, pattern):
                widths[name] = override["w_bits"]
    return widths


def embedding_spec(cfg: Any, bits: int) -> TensorQuantConfig:
    """The per-row grid of a table at ``bits`` under ``quant.embeddings`` ``cfg``."""
    return TensorQuantConfig(bits=int(bits), symmetric=True, granularity="per_channel",
                             observer=cfg.observer, scale_dtype=cfg.scale_dtype)


def quantize_embeddings(model: nn.Module, cfg: Any, layers: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Swap the tables of :func:`embedding_widths` for :class:`QuantEmbedding` at their widths (``quant.embeddings``;
    nothing when its bits are null); returns ``{name: bits}`` of the swapped tables."""
    if cfg.bits is None:
        return {}
    tables = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if not tables:
        log.warning("quant.embeddings.bits=%s: the model has no nn.Embedding, nothing to quantize", cfg.bits)
    for pattern in cfg.skip or ():
        if not any(matches(n, pattern) for n in tables):
            raise ConfigError(f"quant.embeddings.skip pattern {pattern!r} matches no nn.Embedding; "
                             f"the model's embeddings: {sorted(tables)}")
    for name, table in tables.items():
        if (why := unreproducible_embedding(table)) is not None:
            log.warning("left %s in float: %s", name, why)
    swapped = {}
    for name, bits in embedding_widths(model, cfg, layers).items():
        if bits is not None:
            model.set_submodule(name, QuantEmbedding(tables[name], embedding_spec(cfg, bits), name))
            swapped[name] = int(bits)
    return swapped


def quant_embeddings(model: nn.Module) -> dict[str, QuantEmbedding]:
    """The quantized embedding tables of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
