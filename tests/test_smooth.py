"""quant.smooth: per-channel input scaling searched per layer; exact in float, exported and run on int kernels as is."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qsweep
from qsweep.config import ConfigError, quant_recipe
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.modules import quant_layers
from qsweep.quant.plan import resolve_plan
from qsweep.quant.smooth import input_divisors, smooth_linears
from outlier_mlp import OutlierMLP, assert_exported_and_int_match, make_batches, output_error


@pytest.fixture
def model():
    torch.manual_seed(0)
    return OutlierMLP().eval()


W8A8 = {"weight": {"bits": 8}, "act": {"bits": 8}}


def test_the_rewrite_is_exact_in_float(model):
    batches = make_batches()
    smoothed = copy.deepcopy(model)
    recipe = quant_recipe({**W8A8, "smooth": {"enabled": True, "alpha": 0.8}})
    alphas = smooth_linears(smoothed, resolve_plan(smoothed, recipe), recipe,
                            lambda: [smoothed(x) for x in batches])
    assert alphas == {"fc1": 0.8, "fc2": 0.8}
    x = batches[0]
    with torch.no_grad():
        h = smoothed.norm(x)
        out = smoothed.fc1(h / smoothed.fc1.input_divisor)
        torch.testing.assert_close(out, model.fc1(model.norm(x)), rtol=1e-5, atol=1e-5)


def test_searched_smoothing_lowers_the_output_error_at_w8a8(model):
    batches = make_batches()
    plain = qsweep.quantize(model, W8A8, batches)
    timings = QuantizeTimings()
    smooth = qsweep.quantize(model, {**W8A8, "smooth": {"enabled": True, "max_tokens": 4096}}, batches,
                             timings=timings)
    assert set(timings.smooth) == {"fc1", "fc2"}
    assert timings.smooth["fc1"] != "off"  # the outlier channels make scaling worth it
    assert quant_layers(smooth)["fc1"].input_divisor is not None
    assert output_error(smooth, model, batches) < 0.5 * output_error(plain, model, batches)


def test_off_is_a_candidate_so_a_layer_never_scores_worse_on_its_tokens():
    # No outliers and 8-bit everything: whatever the search picks scores at most "off" on the sample.
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(16, 16)).eval()
    batches = [torch.randn(4, 16) for _ in range(3)]
    timings = QuantizeTimings()
    q = qsweep.quantize(lin, {**W8A8, "act": {"bits": 8, "observer": "minmax"},
                              "smooth": {"enabled": True, "max_tokens": 100}}, batches, timings=timings)
    plain = qsweep.quantize(lin, W8A8, batches)
    assert output_error(q, lin, batches) <= output_error(plain, lin, batches) * (1 + 1e-6)


def test_export_and_int_kernels_reproduce_the_fake_quant_model(model, tmp_path):
    batches = make_batches()
    q = qsweep.quantize(model, {**W8A8, "smooth": {"enabled": True}}, batches)
    assert_exported_and_int_match(q, batches[1], tmp_path / "m.pt2")


def test_given_scales_are_reused_instead_of_searched(model):
    batches = make_batches()
    first = qsweep.quantize(model, {**W8A8, "smooth": {"enabled": True}}, batches)
    timings = QuantizeTimings()
    second = qsweep.quantize(model, {"weight": {"bits": 4}, "act": {"bits": 8}, "smooth": {"enabled": True}},
                             batches[:1], timings=timings, smoothing=input_divisors(first))
    assert set(timings.smooth.values()) == {"given"}
    for name, layer in quant_layers(second).items():
        reference = quant_layers(first)[name].input_divisor
        if reference is None:
            assert layer.input_divisor is None
        else:
            torch.testing.assert_close(layer.input_divisor, reference)


def test_smoothing_only_touches_planned_linears(model):
    q = qsweep.quantize(model, {**W8A8, "skip": ["fc2"], "smooth": {"enabled": True}}, make_batches())
    assert isinstance(q.fc2, nn.Linear) and not hasattr(q.fc2, "input_divisor")


@pytest.mark.parametrize("key, value", [("alpha", 1.5), ("grid", 0), ("max_tokens", 0)])
def test_bad_settings_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"quant.smooth.{key}"):
        quant_recipe({"smooth": {"enabled": True, key: value}})
