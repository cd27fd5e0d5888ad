"""Range estimators against hand / numpy computations, and the streaming activation observer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qsweep.config import OBSERVERS, WEIGHT_OBSERVERS, TensorQuantConfig
from qsweep.quant.grid import Grid, fake_quantize, qparams
from qsweep.quant.observers import (AUTO_CANDIDATES, CLIP_WARN_RATIO, KL_BINS, KL_MIN_PER_BIN, MSE_GRID_POINTS,
                                   ActivationObserver, range_error, weight_range)

W4 = Grid(4, symmetric=True)
A8 = Grid(8, symmetric=False)


def cfg(observer: str, **kw) -> TensorQuantConfig:
    return TensorQuantConfig(observer=observer, **kw)


def heavy_tailed(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x / torch.rand(shape, generator=g).clamp_min(0.02).sqrt()  # Student-t-like tails


def fq_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> torch.Tensor:
    scale, zp = qparams(lo, hi, grid)
    return (fake_quantize(x, scale[:, None], zp[:, None], grid) - x).square().sum(dim=1)


# ---------------------------------------------------------------- weight_range


@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
def test_minmax_per_row(observer):
    x = torch.randn(5, 37)
    lo, hi = weight_range(x, cfg(observer), W4)
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))


def test_percentile_matches_numpy_linear():
    x = torch.arange(101, dtype=torch.float32)[None]  # percentile q of 0..100 is exactly q
    lo, hi = weight_range(x, cfg("percentile", p=99.0), W4)
    assert lo.item() == pytest.approx(1.0) and hi.item() == pytest.approx(99.0)

    x = torch.arange(10, dtype=torch.float32)[None]  # interpolated: (n - 1) * q = 0.9 and 8.1
    lo, hi = weight_range(x, cfg("percentile", p=90.0), W4)
    assert lo.item() == pytest.approx(0.9) and hi.item() == pytest.approx(8.1)

    x = torch.randn(7, 333, generator=torch.Generator().manual_seed(1))
    lo, hi = weight_range(x, cfg("percentile", p=97.3), W4)
    ref = np.percentile(x.double().numpy(), [2.7, 97.3], axis=1, method="linear")
    np.testing.assert_allclose(lo.numpy(), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi.numpy(), ref[1], rtol=1e-5, atol=1e-6)


def test_percentile_100_is_minmax():
    x = torch.randn(3, 50)
    lo, hi = weight_range(x, cfg("percentile", p=100.0), W4)
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))


def test_sigma_matches_numpy_and_is_clipped_to_minmax():
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(2)) * 3 + 1
    xn = x.double().numpy()
    mean, std = xn.mean(1), xn.std(1)  # population std (ddof=0)
    lo, hi = weight_range(x, cfg("sigma", n=2.0), W4)
    np.testing.assert_allclose(lo.numpy(), mean - 2 * std, rtol=1e-5)
    np.testing.assert_allclose(hi.numpy(), mean + 2 * std, rtol=1e-5)
    lo, hi = weight_range(x, cfg("sigma", n=100.0), W4)  # mean +- 100 std lies outside the data
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))


def test_iqr_matches_numpy_and_is_clipped_to_minmax():
    x = heavy_tailed((6, 400), seed=3)
    q1, q3 = np.percentile(x.double().numpy(), [25, 75], axis=1)
    lo, hi = weight_range(x, cfg("iqr", k=1.5), W4)
    np.testing.assert_allclose(lo.numpy(), np.maximum(q1 - 1.5 * (q3 - q1), x.amin(1).numpy()), rtol=1e-5)
    np.testing.assert_allclose(hi.numpy(), np.minimum(q3 + 1.5 * (q3 - q1), x.amax(1).numpy()), rtol=1e-5)
    assert (hi < x.amax(1)).all()  # the heavy tails are clipped
    lo, hi = weight_range(x, cfg("iqr", k=0.0), W4)
    np.testing.assert_allclose(lo.numpy(), q1, rtol=1e-5)
    np.testing.assert_allclose(hi.numpy(), q3, rtol=1e-5)


@pytest.mark.parametrize("grid", [W4, A8, Grid(2, False)], ids=str)
@pytest.mark.parametrize("observer", WEIGHT_OBSERVERS)
def test_every_estimator_stays_within_minmax(observer, grid):
    x = heavy_tailed((24, 256), seed=4) + 0.5
    lo, hi = weight_range(x, cfg(observer), grid)
    assert lo.shape == hi.shape == (24,) and lo.dtype == hi.dtype == torch.float32
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert (x.amin(1) <= lo).all() and (lo <= hi).all() and (hi <= x.amax(1)).all()


@pytest.mark.parametrize("observer", WEIGHT_OBSERVERS)
def test_constant_and_zero_rows_give_finite_ranges(observer):
    x = torch.zeros(4, 64)
    x[1] = 0.1
    x[2] = -3.0
    x[3, 5] = 2.0  # one nonzero value among zeros
    for grid in (W4, A8):
        lo, hi = weight_range(x, cfg(observer), grid)
        assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()
        assert lo[0] == hi[0] == 0
        assert (x.amin(1) <= lo).all() and (hi <= x.amax(1)).all()
        scale, _ = qparams(lo, hi, grid)
        assert torch.isfinite(scale).all() and (scale > 0).all()


def test_accepts_omegaconf_config():
    conf = OmegaConf.structured(TensorQuantConfig(observer="percentile", p=99.0))
    x = torch.randn(3, 100)
    lo, hi = weight_range(x, conf, W4)
    ref = weight_range(x, cfg("percentile", p=99.0), W4)
    assert torch.equal(lo, ref[0]) and torch.equal(hi, ref[1])


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown observer"):
        weight_range(torch.randn(2, 3), cfg("median"), W4)
    with pytest.raises(ValueError, match="2-D"):
        weight_range(torch.randn(2, 3, 4), cfg("minmax"), W4)
    with pytest.raises(ValueError, match="NaN"):
        weight_range(torch.tensor([[1.0, float("nan")]]), cfg("minmax"), W4)


def test_mse_clips_outliers_and_minimizes_error_over_the_alpha_grid():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 512, generator=g)
    x[:, :3] = torch.tensor([25.0, -30.0, 40.0])  # a few huge outliers per row
    mn, mx = x.amin(1), x.amax(1)
    lo, hi = weight_range(x, cfg("mse"), W4)
    assert (hi - lo < mx - mn).all()
    err = fq_error(x, lo, hi, W4)
    assert (err <= fq_error(x, mn, mx, W4)).all()
    for i in range(1, MSE_GRID_POINTS + 1):
        a = i / MSE_GRID_POINTS
        assert (err <= fq_error(x, a * mn, a * mx, W4)).all()


def test_mse_affine_grid_beats_minmax():
    x = heavy_tailed((8, 300), seed=6).abs()  # one-sided data, typical of post-ReLU rows
    lo, hi = weight_range(x, cfg("mse"), A8)
    assert (fq_error(x, lo, hi, A8) <= fq_error(x, x.amin(1), x.amax(1), A8)).all()


def _kl_reference(a: np.ndarray, n_q: int, n_bins: int) -> np.ndarray:
    """KL(P || Q) of every candidate bin count i in [n_q, n_bins], computed directly."""
    a = np.abs(a.astype(np.float32))
    bins = np.minimum((a * (np.float32(n_bins) / a.max())).astype(np.int64), n_bins - 1)
    hist = np.bincount(bins, minlength=n_bins).astype(np.float64)
    kl = np.full(n_bins + 1, np.inf)
    for i in range(n_q, n_bins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        edges = (np.arange(n_q + 1) * i) // n_q
        for s, e in zip(edges[:-1], edges[1:]):
            nz = p[s:e] > 0
            q[s:e][nz] = hist[s:e].sum() / max(nz.sum(), 1)
        p, q = p / p.sum(), q / max(q.sum(), 1e-300)
        m = p > 0
        if (q[m] > 0).all():
            kl[i] = float((p[m] * np.log(p[m] / q[m])).sum())
    return kl


@pytest.mark.parametrize("grid", [Grid(4, True), Grid(3, False)], ids=str)
def test_kl_clips_heavy_tails_at_the_minimum_divergence(grid):
    x = heavy_tailed((3, 4000), seed=7)
    lo, hi = weight_range(x, cfg("kl"), grid)
    absmax = x.abs().amax(1)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    threshold = torch.maximum(-lo, hi)
    assert (threshold < absmax).all()
    n_q = grid.levels // 2 if grid.symmetric else grid.levels
    n_bins = min(KL_BINS, x.shape[1] // KL_MIN_PER_BIN)
    for row in range(3):
        kl = _kl_reference(x[row].numpy(), n_q, n_bins)
        chosen = round(float(threshold[row] / absmax[row]) * n_bins)
        assert kl[chosen] <= kl.min() + 1e-9


def test_kl_on_short_weight_rows_does_not_collapse_the_range():
    # 64 values a row at 4 bits: on a 2048-bin histogram a threshold at one lone value had zero
    # divergence and clipped the whole row (a chance-level digits model).
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    lo, hi = weight_range(w, cfg("kl"), W4)
    assert (torch.maximum(-lo, hi) >= 0.5 * w.abs().amax(1)).all()
    err_kl = fq_error(w, lo, hi, W4)
    err_minmax = fq_error(w, w.amin(1), w.amax(1), W4)
    assert err_kl.sum() <= 1.5 * err_minmax.sum()


def test_kl_without_enough_bins_keeps_minmax():
    x = torch.randn(2, 100)
    lo, hi = weight_range(x, cfg("kl"), Grid(16, False))  # 65536 levels > KL_BINS
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))


# ---------------------------------------------------------------- ActivationObserver


def batches(n: int, shape=(4, 50, 32), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + i for i in range(n)]


def observe(observer: str, data, max_samples: int = 1 << 20, **kw) -> tuple[float, float]:
    obs = ActivationObserver(cfg(observer, **kw), A8, max_samples=max_samples)
    for x in data:
        obs.update(x)
    lo, hi = obs.range()
    assert lo.dim() == hi.dim() == 0 and lo.dtype == hi.dtype == torch.float32
    return lo.item(), hi.item()


def test_activation_minmax_is_global():
    data = batches(4)
    lo, hi = observe("minmax", data)
    allx = torch.cat([x.reshape(-1) for x in data])
    assert lo == allx.min().item() and hi == allx.max().item()


def test_activation_moving_average_follows_ema():
    data = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 4.0])]
    m = 0.9
    ema_lo = m * (m * -1.0 + (1 - m) * -3.0) + (1 - m) * 0.5
    ema_hi = m * (m * 2.0 + (1 - m) * 1.0) + (1 - m) * 4.0
    lo, hi = observe("moving_average", data, momentum=m)
    assert lo == pytest.approx(ema_lo, rel=1e-6) and hi == pytest.approx(ema_hi, rel=1e-6)


def test_activation_sigma_is_exact_over_all_batches():
    data = batches(5, seed=1)
    allx = torch.cat([x.reshape(-1) for x in data]).double()
    mean, std = allx.mean().item(), allx.std(correction=0).item()
    lo, hi = observe("sigma", data, n=1.5)
    assert lo == pytest.approx(mean - 1.5 * std, rel=1e-5) and hi == pytest.approx(mean + 1.5 * std, rel=1e-5)


def test_activation_sigma_is_stable_with_a_large_offset():
    data = [torch.randn(10_000, generator=torch.Generator().manual_seed(i)) + 1e4 for i in range(3)]
    allx = torch.cat(data).double()
    lo, hi = observe("sigma", data, n=1.0)
    assert hi - lo == pytest.approx(2 * allx.std(correction=0).item(), rel=1e-3)


def test_activation_percentile_on_a_large_stream_is_close_to_exact():
    data = [heavy_tailed((64, 4096), seed=10 + i) for i in range(16)]  # 4M values, 1/16 kept
    allx = torch.cat([x.reshape(-1) for x in data]).double().numpy()
    lo, hi = observe("percentile", data, p=99.9, max_samples=1 << 18)
    ref_lo, ref_hi = np.percentile(allx, [0.1, 99.9])
    assert lo == pytest.approx(ref_lo, rel=0.05) and hi == pytest.approx(ref_hi, rel=0.05)


def test_activation_subsample_weighs_all_batches_equally():
    # Batch k holds only the value k; with equal weights q1 = 2 and q3 = 7 (see the iqr k=0 range).
    data = [torch.full((25_000,), float(k)) for k in range(10)]
    obs = ActivationObserver(cfg("iqr", k=0.0), A8, max_samples=20_000)
    for x in data:
        obs.update(x)
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (2.0, 7.0)
    assert obs._stored <= 20_000


@pytest.mark.parametrize("observer", ["percentile", "iqr", "mse", "kl", "auto"])
def test_activation_sampled_estimators_stay_within_minmax_and_are_deterministic(observer):
    data = [heavy_tailed((8, 3000), seed=20 + i) for i in range(6)]
    # 16384 values: enough for KL's histogram at 8 bits (KL_MIN_PER_BIN values a bin, 256 levels).
    a = observe(observer, data, max_samples=1 << 14)
    assert a == observe(observer, data, max_samples=1 << 14)
    mn = min(x.min().item() for x in data)
    mx = max(x.max().item() for x in data)
    assert mn <= a[0] <= a[1] <= mx
    assert a[1] - a[0] < mx - mn  # heavy tails get clipped


def test_activation_mse_and_kl_search_the_true_range():
    # A lone outlier the subsample almost surely misses still bounds the candidate ranges.
    data = [torch.randn(100_000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    data[2][123] = 50.0
    for observer in ("mse", "kl"):
        lo, hi = observe(observer, data, max_samples=1024)
        assert hi <= 50.0 and lo >= min(x.min().item() for x in data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("observer", ["minmax", "sigma", "percentile"])
def test_activation_non_finite_batch_raises(observer, bad):
    obs = ActivationObserver(cfg(observer), A8)
    obs.update(torch.randn(10))
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN" if bad != bad else "Inf"):
        obs.update(x)


def test_activation_range_before_update_raises():
    obs = ActivationObserver(cfg("minmax"), A8)
    with pytest.raises(RuntimeError, match="observer saw no data"):
        obs.range()
    obs.update(torch.empty(0))  # empty batches are ignored
    with pytest.raises(RuntimeError, match="observer saw no data"):
        obs.range()


def test_activation_zero_stream_gives_finite_ranges():
    for observer in OBSERVERS:
        lo, hi = observe(observer, [torch.zeros(3, 7)] * 3)
        assert lo == hi == 0.0


# ---------------------------------------------------------------- auto and the clipping check


def outlier_tokens(n_batches=3, seed=0) -> list[torch.Tensor]:
    """Tokens [batch, seq, 16] whose channel 3 is 40x larger than the rest: a transformer's outlier channel."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(4, 32, 16, generator=g)
        x[..., 3] *= 40.0
        out.append(x)
    return out


def observed(observer: str, data, **kw) -> ActivationObserver:
    obs = ActivationObserver(cfg(observer, **kw), A8, token_rows=4096)
    for x in data:
        obs.update(x)
    return obs


def test_auto_picks_the_candidate_with_the_lowest_output_error():
    data = outlier_tokens()
    rows = torch.cat([x.reshape(-1, 16) for x in data])
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    weight[:, 3] *= 5.0  # the outlier channel also matters to the output
    obs = observed("auto", data)
    lo, hi = obs.range(consumer=weight)
    best = range_error(rows, lo, hi, A8, weight)
    for name, setting in AUTO_CANDIDATES:
        other = observed(name, data, **setting).range()
        assert best <= range_error(rows, *other, A8, weight) * (1 + 1e-6), name
    assert obs.choice is not None


def test_auto_without_a_consumer_scores_the_activation_itself():
    data = [heavy_tailed((8, 3000), seed=30 + i) for i in range(3)]
    obs = observed("auto", data)
    lo, hi = obs.range()
    values = torch.cat(obs._samples)
    mm = range_error(values, torch.tensor(min(float(x.min()) for x in data)),
                     torch.tensor(max(float(x.max()) for x in data)), A8, None)
    assert range_error(values, lo, hi, A8, None) <= mm


def test_a_destructive_clip_is_measured_against_minmax():
    # Percentile clipping cuts the outlier channel that the consumer weighs: many times min-max's error.
    data = outlier_tokens()
    weight = torch.zeros(4, 16)
    weight[:, 3] = 1.0
    obs = observed("percentile", data, p=99.0)
    obs.range(consumer=weight)
    assert obs.error_vs_minmax > CLIP_WARN_RATIO
    assert observed("minmax", data).error_vs_minmax is None


class _Heads(torch.nn.Module):
    """Five Linears reading the same outlier tokens, each weighing the outlier channel (more in later heads)."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 4, bias=False) for _ in range(5))
        with torch.no_grad():
            for i, head in enumerate(self.heads):
                head.weight.zero_()
                head.weight[:, 3] = 1.0
                head.weight[:, 0] = 0.5 * i  # a second channel: the heads' clipping costs differ

    def forward(self, x):
        return sum(head(x) for head in self.heads)


def test_destructive_clips_are_one_warning_with_their_count_and_the_worst_layers():
    import warnings

    import qsweep
    from qsweep.quant.quantizer import ActQuantizer, ClippingWarning

    recipe = {"weight": {"bits": 8}, "act": {"bits": 8, "observer": "percentile", "p": 99.0}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning emitted, none merged by the once-per-location rule
        q = qsweep.quantize(_Heads(), recipe, outlier_tokens())
    clips = [w for w in caught if issubclass(w.category, ClippingWarning)]
    assert len(clips) == 1, [str(w.message) for w in clips]
    ratios = {a.layer_name: a.clip_ratio for a in q.modules() if isinstance(a, ActQuantizer)}
    assert len(ratios) == 5 and all(r > CLIP_WARN_RATIO for r in ratios.values())
    worst = sorted(ratios, key=ratios.get, reverse=True)[:3]
    message = str(clips[0].message)
    assert message.startswith("quant.act.observer=percentile clips values that matter in 5 of 5 quantized inputs")
    assert message.index(repr(worst[0])) < message.index(repr(worst[1])) < message.index(repr(worst[2]))
    assert message.endswith("and 2 more; observer=auto chooses per layer")
    # min-max clips nothing: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qsweep.quantize(_Heads(), {**recipe, "act": {"bits": 8}}, outlier_tokens())
    assert not [w for w in caught if issubclass(w.category, ClippingWarning)]
