"""Figures of the analysis; each function writes one PNG and returns its path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qsweep.analysis.stats import KINDS, LayerStats, TensorStats
from qsweep.files import atomic_write
from qsweep.pyplot import pyplot

DPI = 130
MAX_FLIERS = 1500  # points drawn per box (the exact min and max are always among them)
KIND_LABEL = {"weight": "weights", "input": "input activations", "output": "output activations"}


def _width(n: int) -> float:
    return min(40.0, max(8.0, 0.3 * n + 2.0))


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight"))
    pyplot().close(fig)
    return path


def _label_layers(ax, names: Sequence[str]) -> None:
    n = len(names)
    ax.set_xticks(range(1, n + 1))
    ax.set_xticklabels(names, rotation=90, fontsize=7 if n <= 30 else 6)
    ax.set_xlim(0.4, n + 0.6)
    ax.grid(axis="y", alpha=0.3)


def _fliers(t: TensorStats, seed: int) -> np.ndarray:
    """Sample values beyond the fences, thinned to MAX_FLIERS, plus the exact extremes."""
    lo, hi = t.fences
    x = t.sample.numpy()
    out = x[(x < lo) | (x > hi)]
    if out.size > MAX_FLIERS:
        out = np.random.default_rng(seed).choice(out, MAX_FLIERS, replace=False)
    extremes = [v for v in (t.min, t.max) if v < lo or v > hi]
    return np.concatenate([out, np.asarray(extremes, dtype=out.dtype)])


def _box(t: TensorStats, label: str, fliers: bool, seed: int) -> dict:
    box = {"label": label, "med": t.median, "q1": t.q1, "q3": t.q3, "whislo": t.whislo, "whishi": t.whishi,
           "mean": t.mean}
    box["fliers"] = _fliers(t, seed) if fliers else np.empty(0)
    return box


def plot_boxes(stats: dict[str, LayerStats], kind: str, path: str | Path, fliers: bool,
               title: str | None = None) -> Path:
    """Per-layer box plot of ``kind`` (weight / input / output), layers in model order.

    Boxes are the quartiles, whiskers the most extreme values within 1.5 IQR; with ``fliers``
    the values beyond (a subsample, always including the true min and max) are drawn as dots.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {list(KINDS)}")
    names = list(stats)
    boxes = [_box(stats[n].get(kind), n, fliers, seed=i) for i, n in enumerate(names)]
    fig, ax = pyplot().subplots(figsize=(_width(len(names)), 5.5))
    ax.bxp(boxes, showfliers=fliers, showmeans=False, patch_artist=True,
           boxprops={"facecolor": "#9ecae1", "linewidth": 0.8}, medianprops={"color": "#d62728"},
           whiskerprops={"linewidth": 0.8}, capprops={"linewidth": 0.8},
           flierprops={"marker": ".", "markersize": 2, "alpha": 0.35, "markeredgecolor": "none",
                       "markerfacecolor": "#333333", "rasterized": True})
    _label_layers(ax, names)
    ax.set_ylabel("value")
    ax.set_xlabel("layer (model order)")
    ax.set_title(title or f"{KIND_LABEL[kind].capitalize()} per layer, {'with' if fliers else 'without'} fliers")
    return _save(fig, path)


def plot_histograms(stats: dict[str, LayerStats], layers: Sequence[str], path: str | Path, bins: int = 100,
                    kinds: Sequence[str] = KINDS) -> Path:
    """One row per layer, one column per kind: histograms of the (sub)sampled values, log counts."""
    missing = [n for n in layers if n not in stats]
    if missing:
        raise KeyError(f"no statistics for layers {missing}; known: {list(stats)[:10]}...")
    if not layers:
        raise ValueError("no layers to plot")
    fig, axes = pyplot().subplots(len(layers), len(kinds), figsize=(4.2 * len(kinds), 2.4 * len(layers)),
                             squeeze=False)
    for r, name in enumerate(layers):
        for c, kind in enumerate(kinds):
            t = stats[name].get(kind)
            ax = axes[r, c]
            ax.hist(t.sample.numpy(), bins=bins, color=("#1f77b4", "#2ca02c", "#ff7f0e")[c % 3], log=True,
                    histtype="stepfilled")  # one polygon, not `bins` rectangles
            lo, hi = t.fences
            for v in (lo, hi):
                if t.min <= v <= t.max:
                    ax.axvline(v, color="k", linestyle=":", linewidth=0.8)
            ax.set_title(f"{name} {kind}\nmin {t.min:.3g} max {t.max:.3g} absmax/IQR {t.absmax_over_iqr:.3g}",
                         fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("Value histograms (log count; dotted: 1.5 IQR fences)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_sensitivity(rows: Sequence[dict], path: str | Path, fp_top1: float | None = None) -> Path:
    """Bars per layer: top-1 drop (pp) and output SQNR (dB) with only that layer quantized."""
    if not rows:
        raise ValueError("no sensitivity rows to plot")
    names = [r["name"] for r in rows]
    drops = np.array([r["drop"] for r in rows], dtype=float)
    sqnr = np.array([r["output_sqnr_db"] for r in rows], dtype=float)
    finite = sqnr[np.isfinite(sqnr)]
    cap = (finite.max() + 10.0) if finite.size else 100.0
    inf_mask = ~np.isfinite(sqnr)
    sqnr_drawn = np.where(inf_mask, cap, sqnr)
    x = np.arange(1, len(rows) + 1)
    fig, (ax1, ax2) = pyplot().subplots(2, 1, sharex=True, figsize=(_width(len(rows)), 7))
    ax1.bar(x, drops, color=np.where(drops > 0, "#d62728", "#2ca02c"))
    ax1.axhline(0, color="k", linewidth=0.6)
    ax1.set_ylabel("top-1 drop (pp)")
    ax1.grid(axis="y", alpha=0.3)
    bits = f"w{rows[0]['w_bits']}a{rows[0]['a_bits'] if rows[0]['a_bits'] is not None else 'fp'}"
    ref = f", FP top-1 {fp_top1:.2f}%" if fp_top1 is not None and math.isfinite(fp_top1) else ""
    ax1.set_title(f"Per-layer sensitivity: only one layer quantized at {bits}{ref}")
    ax2.bar(x, sqnr_drawn, color=np.where(inf_mask, "#bbbbbb", "#1f77b4"))
    for xi in x[inf_mask]:
        ax2.text(xi, cap, "inf", ha="center", va="bottom", fontsize=6)
    ax2.set_ylabel("output logits SQNR (dB)")
    ax2.set_xlabel("layer (model order)")
    _label_layers(ax2, names)
    return _save(fig, path)


def is_png(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


__all__ = ["is_png", "plot_boxes", "plot_histograms", "plot_sensitivity"]
