"""Range estimators: tensors -> clipping ranges ``(lo, hi)`` that :func:`grid.qparams` turns into scales.

Weights are handled row-wise on a 2-D view (one range per row: one row for per-tensor, one per
output channel, one per group) by :func:`weight_range`. Activations stream through an
:class:`ActivationObserver`, which keeps cheap exact statistics plus a bounded random subsample
and applies the same row-wise estimators to that subsample once calibration ends.

Every estimator returns ranges inside the data's ``[min, max]`` with ``lo <= hi``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from qsweep.quant.grid import Grid, fake_quantize, qparams

# Clipping ratios searched by the MSE observer: alpha = i / MSE_GRID_POINTS, i = 1..MSE_GRID_POINTS.
MSE_GRID_POINTS = 100
# Upper bound on elements of one [ratios, rows, cols] block of the MSE search.
_MSE_BLOCK_ELEMENTS = 1 << 20
# Histogram resolution of the KL (entropy) observer, as in TensorRT's calibrator.
KL_BINS = 2048
# Fewer bins for fewer values: at least this many values per bin on average.
KL_MIN_PER_BIN = 16
# Upper bound on elements of one [rows, candidates, chunks] block of the KL search.
_KL_BLOCK_ELEMENTS = 1 << 22

# Activation subsampling draws runs of this many adjacent values (one 64-byte cache line).
_SAMPLE_RUN = 16

# The ranges ``auto`` chooses from, per layer: (observer, its setting).
AUTO_CANDIDATES = (("minmax", {}), ("percentile", {"p": 99.9}), ("percentile", {"p": 99.99}),
                   ("percentile", {"p": 99.999}), ("mse", {}), ("kl", {}))
# An explicit clipping observer whose output error exceeds min-max's by this factor is reported.
CLIP_WARN_RATIO = 2.0
# Token rows (last-dim vectors) kept per activation to score ranges by the consumer's output error.
TOKEN_ROWS = 1024


class Moments:
    """Running count, mean and M2 (sum of squared deviations) of a stream, merged batch by batch with
    Chan et al.'s pairwise formula in float64 (no cancellation, unlike sum(x^2) - n*mean^2)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, n: int, mean: float, m2: float) -> None:
        """Merge a batch of ``n`` values with mean ``mean`` and M2 ``m2``."""
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation of everything added."""
        return math.sqrt(max(self.m2, 0.0) / self.count)


def _check_observer(name: str) -> None:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {list(OBSERVERS)}")


def _clip(lo: Tensor, hi: Tensor, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """Intersect ``[lo, hi]`` with ``[mn, mx]``, keeping ``lo <= hi`` despite float rounding."""
    lo = torch.minimum(torch.maximum(lo, mn), mx)
    hi = torch.maximum(torch.minimum(hi, mx), lo)
    return lo, hi


def _row_quantile(x: Tensor, q: float) -> Tensor:
    """The ``q``-quantile (``q`` in [0, 1]) of each row with numpy's default "linear" interpolation.

    Uses ``kthvalue`` (selection, no full sort) because ``torch.quantile`` rejects large inputs.
    """
    n = x.shape[1]
    pos = (n - 1) * q
    below = min(int(math.floor(pos)), n - 1)
    frac = pos - below
    v0 = torch.kthvalue(x, below + 1, dim=1).values
    if frac == 0.0 or below + 1 >= n:
        return v0
    v1 = torch.kthvalue(x, below + 2, dim=1).values
    return v0 + frac * (v1 - v0)


def _percentile_range(x: Tensor, p: float, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    return _clip(_row_quantile(x, (100.0 - p) / 100.0), _row_quantile(x, p / 100.0), mn, mx)


def _iqr_range(x: Tensor, k: float, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    q1, q3 = _row_quantile(x, 0.25), _row_quantile(x, 0.75)
    spread = k * (q3 - q1)
    return _clip(q1 - spread, q3 + spread, mn, mx)


def _sigma_range(mean: Tensor, std: Tensor, n: float, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    return _clip(mean - n * std, mean + n * std, mn, mx)


def _mse_range(x: Tensor, grid: Grid, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the ``[a * mn, a * mx]`` minimizing the squared fake-quantization error of ``x``.

    Ratios are tried from 1 downwards and only a strictly smaller error replaces the incumbent,
    so ties keep the wider range. Several ratios are evaluated per tensor op (bounded memory):
    fewer, larger ops are faster, especially when threads compete for cores.
    """
    alphas = torch.arange(MSE_GRID_POINTS, 0, -1, device=x.device, dtype=torch.float32) / MSE_GRID_POINTS
    per_op = max(1, _MSE_BLOCK_ELEMENTS // x.numel())
    best_err = torch.full_like(mn, math.inf)
    best_alpha = torch.ones_like(mn)
    for a in alphas.split(per_op):
        a = a[:, None]  # [A, 1] against rows
        scale, zp = qparams(a * mn, a * mx, grid)
        err = (fake_quantize(x, scale[..., None], zp[..., None], grid) - x).square_().sum(dim=2)  # [A, rows]
        err, first = err.min(dim=0)  # first minimum: the largest ratio among ties
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, a[first, 0], best_alpha)
    return _clip(best_alpha * mn, best_alpha * mx, mn, mx)


def _kl_range(x: Tensor, grid: Grid, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """TensorRT-style entropy calibration of a threshold ``T`` on ``|x|``, per row.

    For each candidate ``T`` (the upper edge of histogram bin ``i - 1``, ``i >= n_q``) the
    reference ``P`` is the first ``i`` bins of the ``|x|`` histogram with the clipped mass added
    to the last one; ``Q`` merges those ``i`` bins into ``n_q`` near-equal chunks and spreads each
    chunk's (unclipped) mass evenly over its bins where ``P`` is nonzero. ``KL(P || Q)`` is then a
    closed form of per-chunk sums, so every candidate is scored from prefix sums of the histogram
    in O(n_q) instead of O(bins). Candidates where ``Q`` is 0 but ``P`` is not score infinity (no
    smoothing); ``i = bins`` never clips, so some candidate is always finite.
    """
    n_q = grid.levels // 2 if grid.symmetric else grid.levels
    # A sparse histogram makes KL degenerate: a threshold at one lone value keeps P and Q equal and
    # clips everything else (a 64-wide weight row at 4 bits gave a chance-level model). So at least
    # KL_MIN_PER_BIN values per bin on average; with fewer bins than levels nothing is clipped.
    n_bins = min(KL_BINS, x.shape[1] // KL_MIN_PER_BIN)
    if n_q >= n_bins:
        return mn, mx
    rows = x.shape[0]
    absmax = torch.maximum(-mn, mx)
    inv_width = torch.where(absmax > 0, n_bins / absmax, torch.zeros_like(absmax))
    bins = (x.abs() * inv_width[:, None]).long().clamp_(max=n_bins - 1)
    bins += torch.arange(rows, device=x.device)[:, None] * n_bins
    hist = torch.bincount(bins.reshape(-1), minlength=rows * n_bins).reshape(rows, n_bins).double()

    def prefix(v: Tensor) -> Tensor:
        return torch.nn.functional.pad(v.cumsum(dim=1), (1, 0))

    cum_mass, cum_nonzero = prefix(hist), prefix((hist > 0).double())
    cum_plogp = prefix(torch.xlogy(hist, hist))
    total = cum_mass[:, -1:]
    # The [rows, candidates, chunks] work is memory bound; counts below 2^24 are exact in float32.
    work = torch.float32 if float(total.max()) <= 2**24 else torch.float64
    cum_mass_w, cum_nonzero_w = cum_mass.to(work), cum_nonzero.to(work)
    cand = torch.arange(n_q, n_bins + 1, device=x.device)
    edges = (torch.arange(n_q + 1, device=x.device)[None, :] * cand[:, None]) // n_q  # [C, n_q + 1]
    flat_edges = edges.reshape(-1)
    last_bin = hist[:, cand - 1]
    plogp_head = cum_plogp[:, cand - 1]  # sum of P log P over bins before the last kept one

    best = torch.empty(rows, dtype=torch.long, device=x.device)
    block = max(1, _KL_BLOCK_ELEMENTS // (cand.numel() * (n_q + 1)))
    for r in range(0, rows, block):
        sl = slice(r, r + block)
        # Prefix sums at chunk boundaries, [R, C, n_q + 1] (index_select is far faster than [:, edges]).
        at = cum_mass_w[sl].index_select(1, flat_edges).view(-1, *edges.shape)
        nz_at = cum_nonzero_w[sl].index_select(1, flat_edges).view(-1, *edges.shape)
        kept = cum_mass[sl][:, cand]  # mass below the threshold, float64
        clipped = total[sl] - kept
        # Chunks before the last: P is the histogram itself. An empty chunk has mass 0 too.
        mass = at[:, :, 1:-1] - at[:, :, :-2]
        nonzero = (nz_at[:, :, 1:-1] - nz_at[:, :, :-2]).clamp_min_(1)
        cross = torch.xlogy(mass, mass / nonzero).sum(dim=2).double()
        # The last chunk also receives the clipped mass in P (not in Q), and so a nonzero bin.
        mass_last = kept - cum_mass[sl].gather(1, edges[:, -2].expand(kept.shape[0], -1))
        nz_last = (nz_at[:, :, -1] - nz_at[:, :, -2]).double()
        nz_last += ((last_bin[sl] == 0) & (clipped > 0)).double()
        cross += torch.xlogy(mass_last + clipped, mass_last / nz_last.clamp_min(1))
        cross -= total[sl] * kept.clamp_min(1).log()
        plogp = plogp_head[sl] + torch.xlogy(last_bin[sl] + clipped, last_bin[sl] + clipped)
        kl = (plogp - cross) / total[sl] - total[sl].log()
        best[sl] = kl.argmin(dim=1)
    threshold = cand[best].float() * (absmax / n_bins)
    return _clip(-threshold, threshold, mn, mx)


def _minmax_rows(x: Tensor, cfg: Any, grid: Grid, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    return mn, mx


def _sigma_rows(x: Tensor, cfg: Any, grid: Grid, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x, dim=1, correction=0)
    return _sigma_range(mean, var.sqrt(), float(cfg.n), mn, mx)


# Observer name -> the range of each row of x [rows, cols] within the rows' [mn, mx], given the observer's
# settings (cfg.p, .n, .k) and the target grid: a weight's rows, or the subsample an ActivationObserver
# keeps. A new observer is one such function and one entry. ``moving_average`` has no batches to average
# over for weights and equals min-max; activations keep streaming statistics for it, min-max and sigma.
ROW_RANGES: dict[str, Callable[[Tensor, Any, Grid, Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "minmax": _minmax_rows,
    "moving_average": _minmax_rows,
    "percentile": lambda x, cfg, grid, mn, mx: _percentile_range(x, float(cfg.p), mn, mx),
    "mse": lambda x, cfg, grid, mn, mx: _mse_range(x, grid, mn, mx),
    "kl": lambda x, cfg, grid, mn, mx: _kl_range(x, grid, mn, mx),
    "sigma": _sigma_rows,
    "iqr": lambda x, cfg, grid, mn, mx: _iqr_range(x, float(cfg.k), mn, mx),
}
# Every observer qsweep.config accepts: auto picks, per activation, the best of AUTO_CANDIDATES.
OBSERVERS = (*ROW_RANGES, "auto")


@torch.no_grad()
def weight_range(x2d: Tensor, cfg: Any, grid: Grid) -> tuple[Tensor, Tensor]:
    """Clipping range of each row of a 2-D weight view.

    Args:
        x2d: ``[rows, cols]``; one range is estimated per row.
        cfg: Object with ``observer, momentum, p, n, k`` (``TensorQuantConfig`` or a DictConfig).
            ``moving_average`` has no batches to average over for weights and equals ``minmax``.
        grid: Target grid; used by ``mse`` (exact fake-quantization error) and ``kl`` (bin count).

    Returns:
        ``lo[rows], hi[rows]`` float32, with ``row min <= lo <= hi <= row max``.

    Raises:
        ValueError: unknown observer, a non 2-D/empty input, or NaN/Inf values.
    """
    _check_observer(cfg.observer)
    if cfg.observer == "auto":
        raise ValueError("observer 'auto' scores activation ranges through the weight they feed; not for weights")
    if x2d.dim() != 2 or x2d.numel() == 0:
        raise ValueError(f"weight_range expects a non-empty 2-D tensor, got shape {tuple(x2d.shape)}")
    x = x2d.detach().float()
    mn, mx = torch.aminmax(x, dim=1)
    _raise_if_not_finite(mn, mx, "weight")
    return ROW_RANGES[cfg.observer](x, cfg, grid, mn, mx)


def _raise_if_not_finite(mn: Tensor, mx: Tensor, what: str) -> None:
    if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
        kind = "NaN" if bool(torch.isnan(mn).any() | torch.isnan(mx).any()) else "Inf"
        raise ValueError(f"{what} contains {kind} values")


class TokenSample:
    """A uniform random sample of at most ``max_rows`` rows (tokens) from every batch seen."""

    def __init__(self, max_rows: int, generator: torch.Generator):
        self.max_rows, self.gen = max_rows, generator
        self.keys = torch.empty(0)
        self.rows: Tensor | None = None

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        # Keep the rows with the smallest random keys so far: every row seen is equally likely kept.
        keys = torch.cat([self.keys, torch.rand(rows.shape[0], generator=self.gen)])
        rows = rows.detach().float().cpu()
        rows = rows if self.rows is None else torch.cat([self.rows, rows])
        if keys.numel() > self.max_rows:
            keys, keep = keys.topk(self.max_rows, largest=False)
            rows = rows[keep]
        self.keys, self.rows = keys, rows


def range_error(x: Tensor, lo: Tensor, hi: Tensor, grid: Grid, consumer: Tensor | None) -> float:
    """Squared error that the range ``[lo, hi]`` causes: in ``consumer``'s output (``x @ consumer.T``), or in ``x``."""
    scale, zero_point = qparams(lo, hi, grid)
    noise = fake_quantize(x.clone(), scale, zero_point, grid) - x
    if consumer is not None:
        noise = noise @ consumer.t().to(noise)
    return float(noise.square().sum())


class ActivationObserver:
    """Streaming per-tensor range of an activation over calibration batches.

    Always keeps the exact running min/max. ``moving_average`` additionally keeps an EMA of the
    per-batch min and max; ``sigma`` keeps an exact running mean/variance (population, i.e. over
    all elements seen); ``percentile``, ``iqr``, ``mse`` and ``kl`` keep a random subsample of
    at most ``max_samples`` values, every element seen about equally likely whatever its batch,
    and run the row-wise estimator on it (as one row) in :meth:`range`, bounded by the exact
    min/max. ``mse`` and ``kl`` search over the exact
    ``[min, max]`` (not the subsample's), scoring candidates on the subsample.

    Args:
        cfg: Object with ``observer, momentum, p, n, k``.
        grid: Target grid (used by ``mse`` and ``kl``).
        max_samples: Bound on the stored subsample.
        seed: Seed of the subsampling; the result is deterministic given the batches and seed.
    """

    def __init__(self, cfg: Any, grid: Grid, max_samples: int = 1 << 20, seed: int = 0, token_rows: int = 0):
        _check_observer(cfg.observer)
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.cfg = cfg
        self.grid = grid
        self.max_samples = int(max_samples)
        self._gen = torch.Generator().manual_seed(seed)
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._ema_min: Tensor | None = None
        self._ema_max: Tensor | None = None
        self._moments = Moments()  # sigma: over all elements seen
        # Every element seen is kept with probability ~1 / _stride; the stride doubles (and the
        # stored values are thinned by half) whenever the store would exceed max_samples.
        self._stride = 1
        self._samples: list[Tensor] = []
        self._stored = 0
        self._tokens = TokenSample(token_rows, self._gen) if token_rows and cfg.observer != "minmax" else None
        self.choice: str | None = None  # auto: the range chosen
        self.error_vs_minmax: float | None = None  # output (or input) error relative to min-max's

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold one calibration batch (any shape) into the statistics. Empty batches are ignored.

        Raises:
            ValueError: the batch contains NaN or Inf.
        """
        if x.numel() == 0:
            return
        x = x.detach()
        bmin, bmax = torch.aminmax(x)
        bmin, bmax = bmin.float(), bmax.float()
        _raise_if_not_finite(bmin, bmax, "activation batch")
        if self._min is None:
            self._min, self._max = bmin, bmax
            self._ema_min, self._ema_max = bmin, bmax
        else:
            self._min, self._max = torch.minimum(self._min, bmin), torch.maximum(self._max, bmax)
            m = float(self.cfg.momentum)
            self._ema_min = m * self._ema_min + (1.0 - m) * bmin
            self._ema_max = m * self._ema_max + (1.0 - m) * bmax
        add, _ = self._STREAMED.get(self.cfg.observer, (ActivationObserver._update_sample, None))
        if add is not None:
            add(self, x, bmin, bmax)
        if self._tokens is not None:
            self._tokens.update(x.reshape(-1, x.shape[-1]))

    def _update_moments(self, x: Tensor, bmin: Tensor, bmax: Tensor) -> None:
        # Float32 pairwise sums of values centred on the batch's mid-range: ~8x cheaper than
        # var_mean or float64 sums, and centring avoids the cancellation in sum(x^2) - n*mean^2.
        center = (bmin + bmax) / 2
        d = x.float() - center
        n_b = x.numel()
        s, ss = float(d.sum()), float(d.square().sum())
        self._moments.add(n_b, float(center) + s / n_b, max(ss - s * s / n_b, 0.0))

    def _update_sample(self, x: Tensor, bmin: Tensor, bmax: Tensor) -> None:
        flat = x.reshape(-1)
        n = flat.numel()
        while self._stored + n // self._stride > self.max_samples:
            self._stride *= 2
            self._thin()
        if self._stride == 1:
            self._samples.append(flat.to(torch.float32, copy=True))
            self._stored += n
            return
        # Draw random aligned runs of _SAMPLE_RUN values (with replacement), n / stride values in
        # expectation: single-value random gathers cost ~20x an aminmax of the batch, and random
        # (not strided) positions cannot alias with a channel layout. A ragged tail is skipped.
        runs = flat[: n - n % _SAMPLE_RUN].view(-1, _SAMPLE_RUN)
        expected = runs.shape[0] / self._stride
        take = int(expected) + int(torch.rand((), generator=self._gen).item() < expected % 1)
        take = min(take, (self.max_samples - self._stored) // _SAMPLE_RUN)
        if take == 0:
            return
        idx = torch.randint(runs.shape[0], (take,), generator=self._gen).to(flat.device)
        self._samples.append(runs[idx].reshape(-1).float())
        self._stored += take * _SAMPLE_RUN

    def _thin(self) -> None:
        """Keep each stored value independently with probability 1/2."""
        if not self._stored:
            return
        stored = torch.cat(self._samples)
        keep = torch.rand(stored.numel(), generator=self._gen) < 0.5
        self._samples = [stored[keep.to(stored.device)]]
        self._stored = self._samples[0].numel()

    @torch.no_grad()
    def range(self, consumer: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Calibrated range as scalar float32 tensors ``lo <= hi`` within the exact min/max seen.

        Args:
            consumer: the 2-D weight ``[out, features]`` that multiplies this activation (a Linear's),
                if any. ``auto`` scores candidate ranges by the error they cause in its output
                (else in the activation itself); the other clipping observers are scored the same
                way against min-max, in :attr:`error_vs_minmax`, so that a destructive clip shows.

        Raises:
            RuntimeError: no batch was observed.
        """
        if self._min is None:
            raise RuntimeError("observer saw no data")
        if self.cfg.observer == "auto":
            return self._auto(consumer)
        lo, hi = self._range_of(self.cfg)
        if self.cfg.observer != "minmax":
            score = self._scorer(consumer)
            if score is not None:
                base = score(self._min, self._max)
                self.error_vs_minmax = score(lo, hi) / base if base > 0 else 1.0
        return lo, hi

    def _range_of(self, cfg: Any) -> tuple[Tensor, Tensor]:
        _, range_of = self._STREAMED.get(cfg.observer, (None, ActivationObserver._sampled))
        return range_of(self, cfg)

    def _sampled(self, cfg: Any) -> tuple[Tensor, Tensor]:
        mn, mx = self._min, self._max
        if not self._stored:
            # Only with a tiny max_samples or tiny batches: no run was drawn.
            return mn, mx
        sample = torch.cat(self._samples)[None, :]
        lo, hi = ROW_RANGES[cfg.observer](sample, cfg, self.grid, mn.reshape(1), mx.reshape(1))
        return lo[0], hi[0]

    def _minmax(self, cfg: Any) -> tuple[Tensor, Tensor]:
        return self._min, self._max

    def _moving_average(self, cfg: Any) -> tuple[Tensor, Tensor]:
        return _clip(self._ema_min, self._ema_max, self._min, self._max)

    def _sigma(self, cfg: Any) -> tuple[Tensor, Tensor]:
        m = self._moments
        mean, std = (torch.tensor(v, dtype=torch.float32, device=self._min.device) for v in (m.mean, m.std))
        return _sigma_range(mean, std, float(cfg.n), self._min, self._max)

    # Observers on streaming statistics: name -> (what a batch adds besides the min/max and their EMA,
    # kept for all; the range). The others keep a subsample and run their ROW_RANGES entry on it.
    _STREAMED = {"minmax": (None, _minmax), "moving_average": (None, _moving_average),
                 "sigma": (_update_moments, _sigma)}

    def _scorer(self, consumer: Tensor | None):
        """``(lo, hi) -> error`` on the token rows (through ``consumer`` when it fits), else on the values."""
        rows = self._tokens.rows if self._tokens is not None else None
        if rows is not None and consumer is not None and consumer.shape[-1] == rows.shape[-1]:
            return lambda lo, hi: range_error(rows, lo.cpu(), hi.cpu(), self.grid, consumer.detach().float().cpu())
        if self._stored:
            values = torch.cat(self._samples)
            return lambda lo, hi: range_error(values, lo.to(values.device), hi.to(values.device), self.grid, None)
        return None

    def _auto(self, consumer: Tensor | None) -> tuple[Tensor, Tensor]:
        """The candidate range with the lowest error; ties keep the earlier (wider) one, min-max first."""
        score = self._scorer(consumer)
        best = None
        for observer, setting in AUTO_CANDIDATES:
            lo, hi = self._range_of(SimpleNamespace(**{**_settings(self.cfg), "observer": observer, **setting}))
            if score is None:
                best = (0.0, lo, hi, observer)
                break
            err = score(lo, hi)
            if best is None or err < best[0]:
                best = (err, lo, hi, observer + "".join(f"({v})" for v in setting.values()))
        self.choice = best[3]
        return best[1], best[2]


def _settings(cfg: Any) -> dict[str, Any]:
    return {key: getattr(cfg, key) for key in ("momentum", "p", "n", "k")}
