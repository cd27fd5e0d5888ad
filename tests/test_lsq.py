"""LSQ on the digits ViT: never worse than its start, learns from a bad init, exports, errors."""

import pytest
import torch
import torch.nn.functional as F

import qsweep
from qsweep.export import export_artifact
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.modules import quant_layers
from qsweep.quant.lsq import apply_lsq
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.reconstruct import ReconstructionError

W3A8 = {"weight": {"bits": 3, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False}}
FAST = {"iters": 30, "num_samples": 64, "batch_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


def calib_loss(q, fp, batches):
    with torch.no_grad():
        x = torch.cat(batches)
        return F.mse_loss(q(x), fp(x)).item()


def act_state(q):
    return [(m.scale.clone(), m.zero_point.clone()) for m in q.modules() if isinstance(m, ActQuantizer)]


def test_good_init_never_gets_worse_and_loss_is_the_models(digits_vit, calib):
    q = qsweep.quantize(digits_vit, W3A8, calib)
    start = calib_loss(q, digits_vit, calib)
    stats = apply_lsq(q, digits_vit, calib, {"mode": "both", **FAST})
    assert stats["loss_before"] == pytest.approx(start, rel=1e-5)
    assert stats["loss_after"] <= stats["loss_before"]
    assert calib_loss(q, digits_vit, calib) == pytest.approx(stats["loss_after"], rel=1e-5)
    assert stats["acts"] == len(quant_layers(q)) and stats["weights"] == len(quant_layers(q))


def test_bad_init_is_repaired(digits_vit, calib):
    q = qsweep.quantize(digits_vit, {**W3A8, "weight": {"bits": 8}}, calib)  # activation error dominates
    for m in q.modules():
        if isinstance(m, ActQuantizer):
            m.scale.mul_(4.0)  # 4x too coarse: 6-bit resolution on an 8-bit grid
    stats = apply_lsq(q, digits_vit, calib, {"mode": "act", **FAST, "lr": 5e-2})
    assert stats["best_iter"] > 0 and stats["loss_after"] < 0.5 * stats["loss_before"], stats
    assert calib_loss(q, digits_vit, calib) == pytest.approx(stats["loss_after"], rel=1e-5)


def test_diverging_run_restores_the_start(digits_vit, calib):
    q = qsweep.quantize(digits_vit, W3A8, calib)
    acts, codes = act_state(q), {n: m.qweight.codes.clone() for n, m in quant_layers(q).items()}
    stats = apply_lsq(q, digits_vit, calib, {"mode": "both", **FAST, "lr": 10.0})  # every step overshoots
    assert stats["best_iter"] == 0 and stats["loss_after"] == stats["loss_before"]
    for (s0, z0), (s1, z1) in zip(acts, act_state(q)):
        assert torch.equal(s0, s1) and torch.equal(z0, z1)
    assert all(torch.equal(codes[n], m.qweight.codes) for n, m in quant_layers(q).items())


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_learned_scales_are_exportable(digits_vit, calib, scale_dtype):
    recipe = {**W3A8, "weight": {**W3A8["weight"], "symmetric": False, "scale_dtype": scale_dtype}}
    timings = QuantizeTimings()
    q = qsweep.quantize(digits_vit, recipe, calib, lsq={"mode": "weight", **FAST, "lr": 1e-2}, timings=timings)
    assert timings.reconstruct["lsq"]["best_iter"] > 0  # the scales did change
    dtype = getattr(torch, scale_dtype)
    for layer in quant_layers(q).values():
        qw = layer.qweight
        assert torch.equal(qw.scale, qw.scale.to(dtype).float())
        assert qw.codes.min() >= qw.grid.qmin and qw.codes.max() <= qw.grid.qmax
        assert qw.zero_point.dtype == torch.int32
    x = calib[0][:4]
    program = export_artifact(q, x)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), q(x), rtol=0, atol=0)


def test_errors(digits_vit, calib):
    q = qsweep.quantize(digits_vit, W3A8, calib)
    for empty in ([], [torch.empty(0, 1, 16, 16)]):
        with pytest.raises(ReconstructionError, match="no samples"):
            apply_lsq(q, digits_vit, empty, {"mode": "act"})
    weights_only = {"weight": {"bits": 4}, "act": {"bits": None}}
    with pytest.raises(ReconstructionError, match="lsq.mode='act'.*no static activation quantizer"):
        apply_lsq(qsweep.quantize(digits_vit, weights_only, calib), digits_vit, calib, {"mode": "act"})
    per_token = {"weight": {"bits": 4}, "act": {"bits": 8, "granularity": "per_token"}}
    q = qsweep.quantize(digits_vit, per_token, calib)
    stats = apply_lsq(q, digits_vit, calib, {"mode": "both", **FAST, "iters": 3})
    assert stats["acts"] == 0 and stats["weights"] == len(quant_layers(q))  # per-token acts are skipped
