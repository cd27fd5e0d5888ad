"""Model analysis: value statistics, distribution plots and per-layer quantization sensitivity.

:func:`analyze` is the entry point. The parts:

* :mod:`qsweep.analysis.stats`: :func:`collect_stats` (weights, input/output activations);
* :mod:`qsweep.analysis.plots`: box plots, histograms, the sensitivity chart;
* :mod:`qsweep.analysis.sensitivity`: ``sensitivity.sensitivity`` (cached per-layer table),
  :func:`sensitivity_key`;
* :mod:`qsweep.analysis.tables`: CSV output.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qsweep.analysis import plots, sensitivity, stats, tables
from qsweep.analysis.sensitivity import (
    DEFAULT_SQNR_IMAGES,
    compute_sensitivity,
    fp_top1_of,
    sensitivity_key,
)
from qsweep.analysis.stats import (
    DEFAULT_MAX_SAMPLES,
    LayerStats,
    TensorStats,
    collect_stats,
    outlier_layers,
)
from qsweep.analysis.threads import torch_threads
from qsweep.config import quant_recipe
from qsweep.quant.batches import call_model, device_of, to_device
from qsweep.quant.fold import fold_batchnorm


def analyze(model: nn.Module, calib_batches: Iterable[Any], loader: Iterable, num_classes: int,
            out_dir: str | Path, recipe: Any, cache_dir: str | Path | None, data_fingerprint: str,
            layers_for_histograms: Sequence[str] | None = None, progress: bool = True, *, w_bits: int = 4,
            a_bits: int | None = 8, max_samples: int = DEFAULT_MAX_SAMPLES, n_histograms: int = 6,
            sqnr_images: int = DEFAULT_SQNR_IMAGES, num_threads: int | None = None) -> dict[str, Path]:
    """Write every analysis figure and table into ``out_dir``; returns name -> path.

    Statistics are taken on the model as the quantizer sees it (BN folded if the recipe folds)
    over ``calib_batches``; sensitivity quantizes one layer at a time at ``w_bits``/``a_bits``
    and is cached in ``cache_dir`` (see :mod:`qsweep.analysis.sensitivity`). ``model`` is not
    modified. Histograms show ``layers_for_histograms``, by default the ``n_histograms`` layers
    with the largest absmax/IQR in their weight or input activation. ``num_threads`` sets
    torch's intra-op threads for the duration (None: unchanged; 1 is fastest for tiny models).

    Names returned: ``weight_box``, ``weight_box_fliers``, ``input_box``, ``input_box_fliers``,
    ``output_box``, ``output_box_fliers``, ``histograms``, ``sensitivity_plot`` (PNGs),
    ``stats_csv``, ``sensitivity_csv``.
    """
    with torch_threads(num_threads):
        return _analyze(model, calib_batches, loader, num_classes, Path(out_dir), quant_recipe(recipe), cache_dir,
                        data_fingerprint, layers_for_histograms, progress, w_bits, a_bits, max_samples,
                        n_histograms, sqnr_images)


def _analyze(model, calib_batches, loader, num_classes, out_dir, cfg, cache_dir, data_fingerprint,
             layers_for_histograms, progress, w_bits, a_bits, max_samples, n_histograms, sqnr_images):
    batches = list(calib_batches)
    if not batches:
        raise ValueError("analyze needs at least one calibration batch")
    out_dir.mkdir(parents=True, exist_ok=True)

    work = copy.deepcopy(model).eval()
    folded_bn: list[str] = []
    if cfg.fold_bn:
        device = device_of(work)
        folded_bn = fold_batchnorm(work, lambda: call_model(work, to_device(batches[0], device)))
    layer_stats = collect_stats(work, batches, max_samples=max_samples, seed=int(cfg.calib.seed), progress=progress)
    work = None  # free the copy before sensitivity makes its own

    key = sensitivity_key(model, data_fingerprint, cfg, w_bits, a_bits, extra={"sqnr_images": sqnr_images})
    rows = sensitivity.sensitivity(model, cfg, batches, loader, num_classes, cache_dir, key, w_bits=w_bits,
                                   a_bits=a_bits, sqnr_images=sqnr_images, progress=progress)

    folded = " (BN folded)" if folded_bn else ""
    out: dict[str, Path] = {}
    for kind in stats.KINDS:
        for fliers in (False, True):
            name = f"{kind}_box" + ("_fliers" if fliers else "")
            label = plots.KIND_LABEL[kind].capitalize()
            title = f"{label} per layer{folded}, {'with' if fliers else 'without'} fliers"
            out[name] = plots.plot_boxes(layer_stats, kind, out_dir / f"{name}.png", fliers=fliers, title=title)
    chosen = list(layers_for_histograms) if layers_for_histograms else outlier_layers(layer_stats, n_histograms)
    out["histograms"] = plots.plot_histograms(layer_stats, chosen, out_dir / "histograms.png")
    out["sensitivity_plot"] = plots.plot_sensitivity(rows, out_dir / "sensitivity.png", fp_top1=fp_top1_of(rows))
    out["stats_csv"] = tables.write_csv(stats.stats_rows(layer_stats), out_dir / "stats.csv")
    out["sensitivity_csv"] = tables.write_csv(rows, out_dir / "sensitivity.csv")
    return out


__all__ = [
    "LayerStats",
    "TensorStats",
    "analyze",
    "collect_stats",
    "compute_sensitivity",
    "outlier_layers",
    "plots",
    "sensitivity",
    "sensitivity_key",
    "stats",
    "tables",
]
