"""qsweep.analysis: statistics, per-layer sensitivity (and its cache), plots."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qsweep
import qsweep.analysis.sensitivity as sens
import qsweep.data
import qsweep.quant.modules
from qsweep.analysis import analyze, collect_stats, sensitivity_key
from qsweep.analysis.plots import is_png, plot_boxes
from qsweep.analysis.stats import PERCENTILES, StreamSampler, outlier_layers
from qsweep.analysis.threads import torch_threads
from qsweep.config import DataConfig, QuantConfig

PNG_NAMES = ("weight_box", "weight_box_fliers", "input_box", "input_box_fliers", "output_box",
             "output_box_fliers", "histograms", "sensitivity_plot")


# ----------------------------------------------------------------------------- statistics


def _hand_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5)
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 100.0]]))
        model[2].bias.zero_()
    return model


def test_stats_exact_on_hand_made_model():
    model = _hand_model()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen)]
    stats = collect_stats(model, batches, max_samples=10_000)
    assert list(stats) == ["0", "2"]

    w = model[0].weight.detach().double().numpy().ravel()
    ws = stats["0"].weight
    assert ws.exact and ws.count == 12
    assert (ws.min, ws.max) == (-5.5, 5.5)
    assert [ws.percentiles[p] for p in PERCENTILES] == pytest.approx(np.percentile(w, PERCENTILES), abs=1e-12)
    assert stats["2"].weight.max == 100.0 and stats["2"].weight.absmax == 100.0
    # 100 is the only value beyond the 1.5 IQR fences of layer 2's six weights.
    assert stats["2"].weight.outlier_frac == pytest.approx(1 / 6)

    x = torch.cat(batches)
    with torch.no_grad():
        out0 = model[0](x)
        out2 = model[2](torch.relu(out0))
    expected = {("0", "input"): x, ("0", "output"): out0, ("2", "input"): torch.relu(out0), ("2", "output"): out2}
    for (name, kind), ref in expected.items():
        t = stats[name].get(kind)
        assert t.exact and t.count == ref.numel()
        assert torch.equal(t.sample.sort().values, ref.reshape(-1).sort().values)
        assert (t.min, t.max) == (ref.min().item(), ref.max().item())
        ref64 = ref.double().numpy().ravel()
        assert [t.percentiles[p] for p in PERCENTILES] == pytest.approx(np.percentile(ref64, PERCENTILES), rel=1e-6)
        assert t.mean == pytest.approx(ref64.mean(), rel=1e-5, abs=1e-6)
        assert t.std == pytest.approx(ref64.std(), rel=1e-5)
    assert model.training  # mode restored, hooks removed
    assert not any(m._forward_hooks for m in model.modules())


def test_subsampling_is_bounded_and_deterministic():
    model = nn.Sequential(nn.Linear(64, 64))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(100, 64, generator=gen) * 3 for _ in range(3)]
    a = collect_stats(model, batches, max_samples=1000)["0"]
    b = collect_stats(model, batches, max_samples=1000)["0"]
    x = torch.cat(batches)
    for t in (a.input, a.output, a.weight):
        assert t.sample.numel() == 1000
    assert not a.input.exact and a.input.count == x.numel()
    assert (a.input.min, a.input.max) == (x.min().item(), x.max().item())  # extremes stay exact
    assert a.input.percentiles[50.0] == pytest.approx(x.median().item(), abs=0.3)
    assert a.input.percentiles[99.0] == pytest.approx(np.percentile(x.numpy(), 99), rel=0.15)
    # The weight (4096 values) is subsampled for plotting, but its statistics stay exact.
    w = model[0].weight.detach().double().numpy().ravel()
    assert a.weight.exact and a.weight.percentiles[1.0] == pytest.approx(np.percentile(w, 1.0))
    assert torch.equal(a.input.sample, b.input.sample) and torch.equal(a.output.sample, b.output.sample)

    # A single batch larger than the bound is thinned too.
    s = StreamSampler(max_samples=500, seed=0)
    s.update(torch.arange(100_000, dtype=torch.float32))
    st = s.stats()
    assert st.sample.numel() == 500 and (st.min, st.max) == (0.0, 99_999.0) and st.count == 100_000


# ----------------------------------------------------------------------------- sensitivity


@pytest.fixture(scope="module")
def digits(digits_bundle, digits_vit):
    loader = qsweep.data.eval_loader(digits_bundle, DataConfig())
    calib = qsweep.data.calibration_batches(digits_bundle, QuantConfig().calib)
    probe = next(iter(loader))[0][:32]
    return digits_vit, calib, loader, probe


@pytest.fixture(scope="module")
def digits_w2_w8(digits):
    model, calib, loader, _ = digits
    w2 = sens.compute_sensitivity(model, QuantConfig(), calib, loader, 10, w_bits=2, a_bits=8, progress=False,
                                 num_threads=1)
    w8 = sens.compute_sensitivity(model, QuantConfig(), calib, loader, 10, w_bits=8, a_bits=8, progress=False,
                                 num_threads=1)
    return w2, w8


class _KeywordInput(nn.Module):
    """:func:`_hand_model` taking its input by keyword, as a tokenized text batch is given."""

    def __init__(self):
        super().__init__()
        self.net = _hand_model()

    def forward(self, features):
        return self.net(features)


def test_sensitivity_of_a_model_that_takes_keyword_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4)
    model = _KeywordInput()
    labels = [model(xb).argmax(1) for xb in x]
    by_keyword = sens.compute_sensitivity(model, QuantConfig(), [{"features": xb} for xb in x],
                                          [({"features": xb}, y) for xb, y in zip(x, labels)], 2, progress=False)
    positional = sens.compute_sensitivity(model.net, QuantConfig(), list(x), list(zip(x, labels)), 2, progress=False)
    assert [{**r, "name": r["name"][len("net."):]} for r in by_keyword["rows"]] == positional["rows"]


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_sensitivity_rows_low_bits_hurt(digits, digits_w2_w8):
    model = digits[0]
    w2, w8 = digits_w2_w8
    rows = w2["rows"]
    assert [r["name"] for r in rows] == _linear_names(model)
    assert set(rows[0]) == {"name", "params", "w_bits", "a_bits", "top1", "drop", "output_sqnr_db", "weight_sqnr_db"}
    assert all(r["w_bits"] == 2 and r["a_bits"] == 8 for r in rows)
    assert rows[0]["params"] == model.get_submodule(rows[0]["name"]).weight.numel()
    # Some layer at 2 bits costs more than any at 8 (how much depends on the trained weights: 1.8-4.2 points).
    assert max(r["drop"] for r in rows) > max(r["drop"] for r in w8["rows"])
    assert all(math.isfinite(r["output_sqnr_db"]) for r in rows)
    for r in rows:
        assert r["top1"] == pytest.approx(w2["fp_top1"] - r["drop"])
    for r2, r8 in zip(rows, w8["rows"]):
        assert r8["output_sqnr_db"] > r2["output_sqnr_db"] + 15, r2["name"]
    assert max(r["drop"] for r in w8["rows"]) < 1.0


def test_single_layer_swap_equals_quantize_with_others_skipped(digits):
    model, calib, _, probe = digits
    swapper = sens.LayerSwapper(model, QuantConfig(), calib, w_bits=2, a_bits=8)
    names = _linear_names(model)
    with torch_threads(1):
        _compare_with_quantize(model, calib, probe, swapper, names)
    with torch.no_grad():
        assert torch.equal(swapper.base(probe), model(probe))  # every layer swapped back


def _compare_with_quantize(model, calib, probe, swapper, names):
    for name in ("patch_embed.proj", "blocks.2.mlp.fc1"):
        recipe = sens.single_layer_recipe(QuantConfig(), 2, 8)
        recipe.skip = [n for n in names if n != name]
        reference = qsweep.quantize(model, recipe, calib)
        assert list(qsweep.quant.quant_layers(reference)) == [name]
        with torch.no_grad(), swapper.quantized_only(name) as swapped:
            assert torch.allclose(swapped(probe), reference(probe), atol=1e-5, rtol=1e-5)


def test_sensitivity_cache_and_model_untouched(digits, tmp_path, monkeypatch):
    model, calib, loader, probe = digits
    with torch.no_grad():
        before = model(probe)
    state = copy.deepcopy(model.state_dict())
    key = sensitivity_key(model, "digits-fp", QuantConfig(), 2, 8)
    calls = []
    real = sens.compute_sensitivity
    monkeypatch.setattr(sens, "compute_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = sens.sensitivity(model, QuantConfig(), calib, loader, 10, tmp_path, key, w_bits=2, a_bits=8,
                            progress=False, num_threads=1)
    assert len(calls) == 1
    doc = json.loads((tmp_path / "sensitivity" / f"{key}.json").read_text())
    assert doc["rows"] == rows and doc["key"] == key and doc["w_bits"] == 2
    with torch.no_grad():
        assert torch.equal(model(probe), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, qsweep.quant.modules.QuantLayer) for m in model.modules())

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(sens, "compute_sensitivity", boom)
    again = sens.sensitivity(model, QuantConfig(), calib, loader, 10, tmp_path, key, w_bits=2, a_bits=8)
    assert again == rows


def test_sensitivity_key_tracks_inputs(digits):
    model = digits[0]
    base = sensitivity_key(model, "d", QuantConfig(), 4, 8)
    assert base == sensitivity_key(model, "d", {}, 4, 8)  # same recipe after defaults
    variants = {
        sensitivity_key(model, "e", QuantConfig(), 4, 8),
        sensitivity_key(model, "d", QuantConfig(), 2, 8),
        sensitivity_key(model, "d", QuantConfig(), 4, None),
        sensitivity_key(model, "d", {"weight": {"granularity": "per_tensor"}}, 4, 8),
        sensitivity_key(model, "d", QuantConfig(), 4, 8, extra={"sqnr_images": 64}),
    }
    assert base not in variants and len(variants) == 5
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    assert sensitivity_key(other, "d", QuantConfig(), 4, 8) != base


# ----------------------------------------------------------------------------- plots / analyze


def _check_outputs(out, n_layers):
    for name in PNG_NAMES:
        path = out[name]
        assert path.exists() and is_png(path) and path.stat().st_size > 10_000, name
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size[0] > 600 and img.size[1] > 400
    with open(out["stats_csv"]) as f:
        stats_rows = list(csv.DictReader(f))
    assert len(stats_rows) == 3 * n_layers
    with open(out["sensitivity_csv"]) as f:
        sens_rows = list(csv.DictReader(f))
    assert len(sens_rows) == n_layers
    return stats_rows, sens_rows


def test_analyze_digits_vit(digits, digits_bundle, tmp_path):
    model, calib, loader, probe = digits
    with torch.no_grad():
        before = model(probe)
    out = analyze(model, calib, loader, 10, tmp_path / "out", QuantConfig(), tmp_path / "cache",
                  digits_bundle.fingerprint, progress=False, max_samples=50_000, num_threads=1)
    assert set(out) == set(PNG_NAMES) | {"stats_csv", "sensitivity_csv"}
    stats_rows, _ = _check_outputs(out, len(_linear_names(model)))
    assert [r["layer"] for r in stats_rows[::3]] == _linear_names(model)
    assert {r["kind"] for r in stats_rows} == {"weight", "input", "output"}
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1
    with torch.no_grad():
        assert torch.equal(model(probe), before)


def test_analyze_cnn_with_batchnorm(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    model.bn1.running_var.fill_(4.0)  # folding halves conv1's weights
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    loader = DataLoader(data, batch_size=8)
    state = copy.deepcopy(model.state_dict())
    out = analyze(model, calib, loader, 10, tmp_path / "out", QuantConfig(), tmp_path / "cache", "random",
                  layers_for_histograms=["conv1", "layer4.1.conv2", "fc"], progress=False, num_threads=1)
    names = _linear_names(model)
    stats_rows, sens_rows = _check_outputs(out, len(names))
    assert [r["name"] for r in sens_rows] == names
    # Statistics describe the BN-folded weights the quantizer sees; the model keeps its BN.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    conv1 = next(r for r in stats_rows if r["layer"] == "conv1" and r["kind"] == "weight")
    assert float(conv1["max"]) == pytest.approx(model.conv1.weight.max().item() / math.sqrt(4.0 + model.bn1.eps))


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_box_plot_many_layers_and_outlier_choice(tmp_path):
    # ~50 layers as in DeiT-S: the figure must still render with readable labels.
    layers = [nn.Linear(16, 16) for _ in range(50)]
    with torch.no_grad():
        layers[7].weight[0, 0] = 40.0  # one huge outlier weight
    model = nn.Sequential(*layers)
    stats = collect_stats(model, [torch.randn(4, 16)], max_samples=5000)
    assert "7" in outlier_layers(stats, k=6)
    path = plot_boxes(stats, "weight", tmp_path / "w.png", fliers=True)
    with Image.open(path) as img:
        assert img.size[0] > 1500
