"""What a run shows a person: the per-layer table, average weight bits, the result table."""

from __future__ import annotations


from torch import nn

from qsweep.quant.modules import quant_layers
from qsweep.quant.plan import QUANTIZABLE

FLOAT_BITS = 32


def layer_table(qmodel: nn.Module) -> list[dict]:
    """One row per Linear/Conv2d: name, type, shape, bits, granularity, weight SQNR (dB), the input range
    ``auto`` chose and whether ``quant.smooth`` scales the input."""
    rows = []
    for name, layer in quant_layers(qmodel).items():
        w = layer.plan.weight
        rows.append({
            "name": name,
            "type": type(layer).__name__,
            "shape": "x".join(map(str, layer.weight.shape)),
            "params": layer.weight.numel(),
            "w_bits": layer.w_bits,
            "a_bits": layer.a_bits if layer.a_bits is not None else FLOAT_BITS,
            "w_granularity": w.granularity if w is not None else "float",
            "w_sqnr_db": round(layer.weight_sqnr_db, 3),
            "act_range": (layer.act.choice or layer.act.cfg.observer) if layer.act is not None else "",
            "smoothed": layer.input_divisor is not None,
        })
    for name, module in qmodel.named_modules():
        if isinstance(module, QUANTIZABLE):
            rows.append({"name": name, "type": type(module).__name__,
                         "shape": "x".join(map(str, module.weight.shape)), "params": module.weight.numel(),
                         "w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS, "w_granularity": "float",
                         "w_sqnr_db": float("inf"), "act_range": "", "smoothed": False})
    return rows


def average_weight_bits(rows: list[dict]) -> float:
    """Parameter-weighted mean weight width over all Linear/Conv2d layers (float counts as 32)."""
    total = sum(r["params"] for r in rows)
    return sum(r["w_bits"] * r["params"] for r in rows) / total if total else float("nan")


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
