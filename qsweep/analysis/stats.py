"""Per-layer value statistics of a float model: weights, input and output activations.

For every quantizable module (``nn.Linear`` / ``nn.Conv2d``, in ``named_modules()`` order)
:func:`collect_stats` returns three :class:`TensorStats`:

* ``weight``: computed on the whole weight tensor, so every number is exact;
* ``input`` / ``output``: the module's first positional input and its output, streamed through
  forward hooks over the given batches. Count, min, max, mean and std are exact over every
  value seen. Percentiles, whiskers and the outlier fraction are computed on a bounded,
  seeded random subsample (at most ``max_samples`` values per layer and tensor kind) and are
  exact whenever everything seen fits in it (``TensorStats.exact``).

The subsample is kept (float32, CPU) for plotting; memory is bounded by
``layers * 3 * max_samples`` floats (plus as many keys for the activations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qsweep.quant.batches import call_model, device_of, to_device
from qsweep.quant.observers import Moments
from qsweep.quant.plan import QUANTIZABLE

PERCENTILES = (0.01, 1.0, 25.0, 50.0, 75.0, 99.0, 99.99)
WHISKER = 1.5  # box-plot fences at q1 - 1.5 IQR and q3 + 1.5 IQR
KINDS = ("weight", "input", "output")
DEFAULT_MAX_SAMPLES = 200_000


@dataclass
class TensorStats:
    """Summary of one tensor kind of one layer (see the module docstring for what is exact)."""

    count: int
    min: float
    max: float
    mean: float
    std: float
    percentiles: dict[float, float]  # PERCENTILES -> value
    whislo: float  # most extreme values inside the 1.5 IQR fences
    whishi: float
    outlier_frac: float  # fraction of values beyond the fences
    exact: bool  # percentiles/whiskers/outlier_frac computed on every value
    sample: Tensor = field(repr=False)  # float32 1-D, at most max_samples values

    @property
    def q1(self) -> float:
        return self.percentiles[25.0]

    @property
    def median(self) -> float:
        return self.percentiles[50.0]

    @property
    def q3(self) -> float:
        return self.percentiles[75.0]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def fences(self) -> tuple[float, float]:
        return self.q1 - WHISKER * self.iqr, self.q3 + WHISKER * self.iqr

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def absmax_over_iqr(self) -> float:
        """How far the extreme value lies from the bulk: inf for a constant bulk with outliers."""
        if self.iqr > 0:
            return self.absmax / self.iqr
        return math.inf if self.absmax > 0 else 0.0

    def row(self) -> dict[str, Any]:
        """Flat dict for tables (no sample)."""
        out: dict[str, Any] = {"count": self.count, "sampled": int(self.sample.numel()), "exact": self.exact,
                               "min": self.min, "max": self.max, "absmax": self.absmax,
                               "mean": self.mean, "std": self.std}
        out.update({f"p{p:g}": v for p, v in self.percentiles.items()})
        out.update({"iqr": self.iqr, "whislo": self.whislo, "whishi": self.whishi,
                    "outlier_frac": self.outlier_frac, "absmax_over_iqr": self.absmax_over_iqr})
        return out


@dataclass
class LayerStats:
    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    weight: TensorStats
    input: TensorStats
    output: TensorStats

    def get(self, kind: str) -> TensorStats:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; choose one of {list(KINDS)}")
        return getattr(self, kind)


def summarize(values: Tensor, *, count: int | None = None, vmin: float | None = None,
              vmax: float | None = None, mean: float | None = None, std: float | None = None,
              exact: bool = True) -> dict[str, Any]:
    """Percentiles, whiskers and outlier fraction of ``values``; exact streaming moments override."""
    x = values.detach().reshape(-1).double().cpu().numpy()
    if x.size == 0:
        raise ValueError("no values to summarize")
    ps = np.percentile(x, PERCENTILES)  # numpy's default 'linear' interpolation
    q1, q3 = float(ps[2]), float(ps[4])
    lo_fence, hi_fence = q1 - WHISKER * (q3 - q1), q3 + WHISKER * (q3 - q1)
    vmin = float(x.min()) if vmin is None else float(vmin)
    vmax = float(x.max()) if vmax is None else float(vmax)
    inside = x[(x >= lo_fence) & (x <= hi_fence)]
    whislo = float(inside.min()) if inside.size else q1
    whishi = float(inside.max()) if inside.size else q3
    # The exact extremes beat the subsample's when they lie inside the fences.
    if vmin >= lo_fence:
        whislo = vmin
    if vmax <= hi_fence:
        whishi = vmax
    return {
        "count": int(x.size if count is None else count),
        "min": vmin,
        "max": vmax,
        "mean": float(x.mean()) if mean is None else float(mean),
        "std": float(x.std()) if std is None else float(std),
        "percentiles": {p: float(v) for p, v in zip(PERCENTILES, ps)},
        "whislo": whislo,
        "whishi": whishi,
        "outlier_frac": float(np.mean((x < lo_fence) | (x > hi_fence))),
        "exact": exact,
    }


def weight_stats(weight: Tensor, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0) -> TensorStats:
    """Exact statistics of a whole weight tensor, plus a seeded subsample of it for plotting."""
    flat = weight.detach().reshape(-1).float().cpu()
    summary = summarize(flat, exact=True)
    if flat.numel() > max_samples:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=gen)[:max_samples].sort().values]
    return TensorStats(sample=flat.clone(), **summary)


class StreamSampler:
    """Exact count/min/max/mean/std of a stream of tensors plus a uniform bounded subsample.

    Each value kept gets a random key and the ``max_samples`` smallest keys survive (bottom-k
    sampling); a batch larger than ``max_samples`` is first thinned to ``max_samples`` random
    positions. All randomness comes from one seeded generator, so the sample is deterministic.
    """

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0):
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples!r}; need at least 1")
        self.max_samples = int(max_samples)
        self.gen = torch.Generator().manual_seed(seed)
        self.moments = Moments()
        self.vmin = math.inf
        self.vmax = -math.inf
        self.values = torch.empty(0)
        self.keys = torch.empty(0, dtype=torch.float64)
        self.dropped = False

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        if not x.is_floating_point():
            x = x.float()
        lo, hi = torch.aminmax(x)
        var, mean = torch.var_mean(x.float(), correction=0)
        self.vmin, self.vmax = min(self.vmin, float(lo)), max(self.vmax, float(hi))
        self.moments.add(n, float(mean), float(var) * n)

        if n > self.max_samples:
            idx = torch.randint(n, (self.max_samples,), generator=self.gen)
            x = x[idx.to(x.device)]
            self.dropped = True
        x = x.float().cpu()
        # float64 keys: ties (which could keep a few extra values) are practically impossible.
        keys = torch.rand(x.numel(), generator=self.gen, dtype=torch.float64)
        values = torch.cat([self.values, x])
        keys = torch.cat([self.keys, keys])
        if values.numel() > self.max_samples:
            # Selection + mask (no sort): keeps the bottom-k keys in stream order.
            threshold = torch.kthvalue(keys, self.max_samples).values
            keep = keys <= threshold
            values, keys = values[keep][: self.max_samples], keys[keep][: self.max_samples]
            self.dropped = True
        self.values, self.keys = values, keys

    def stats(self) -> TensorStats:
        m = self.moments
        if m.count == 0:
            raise ValueError("the stream saw no values")
        summary = summarize(self.values, count=m.count, vmin=self.vmin, vmax=self.vmax, mean=m.mean,
                            std=m.std, exact=not self.dropped)
        return TensorStats(sample=self.values.clone(), **summary)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``nn.Linear`` / ``nn.Conv2d`` modules by name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[Any], max_samples: int = DEFAULT_MAX_SAMPLES,
                  seed: int = 0, progress: bool = False) -> dict[str, LayerStats]:
    """Statistics of every quantizable layer's weight, input and output over ``batches``.

    The model is run in eval mode (its previous mode is restored) and otherwise left unchanged.
    Batches are tensors, tuples (positional) or dicts (keywords), as for calibration.
    Layers that no batch reaches are left out.
    """
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("the model has no nn.Linear or nn.Conv2d module")
    device = device_of(model)
    streams: dict[str, tuple[StreamSampler, StreamSampler]] = {}
    handles = []
    for i, (name, module) in enumerate(layers.items()):
        pair = (StreamSampler(max_samples, seed=seed + 2 * i), StreamSampler(max_samples, seed=seed + 2 * i + 1))
        streams[name] = pair

        def hook(mod, args, out, pair=pair):
            if args and isinstance(args[0], Tensor):
                pair[0].update(args[0])
            if isinstance(out, Tensor):
                pair[1].update(out)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="activation stats", disable=not progress, leave=False):
            call_model(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    out: dict[str, LayerStats] = {}
    for i, (name, module) in enumerate(layers.items()):
        inp, outp = streams[name]
        if inp.moments.count == 0 or outp.moments.count == 0:
            continue
        out[name] = LayerStats(
            name=name,
            module_type=type(module).__name__,
            weight_shape=tuple(module.weight.shape),
            weight=weight_stats(module.weight, max_samples, seed=seed + i),
            input=inp.stats(),
            output=outp.stats(),
        )
    return out


def outlier_layers(stats: dict[str, LayerStats], k: int = 6) -> list[str]:
    """The ``k`` layers whose weight or input activation has the largest absmax/IQR, in model order."""
    def score(s: LayerStats) -> float:
        return max(s.weight.absmax_over_iqr, s.input.absmax_over_iqr)

    chosen = set(sorted(stats, key=lambda n: score(stats[n]), reverse=True)[:k])
    return [n for n in stats if n in chosen]


def stats_rows(stats: dict[str, LayerStats]) -> list[dict[str, Any]]:
    """One flat row per (layer, kind), for ``stats.csv``."""
    rows = []
    for name, layer in stats.items():
        for kind in KINDS:
            row: dict[str, Any] = {"layer": name, "type": layer.module_type,
                                   "weight_shape": "x".join(map(str, layer.weight_shape)), "kind": kind}
            row.update(layer.get(kind).row())
            rows.append(row)
    return rows
