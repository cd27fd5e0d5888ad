"""GPTQ: nearest rounding when nothing correlates, lower output error when inputs do, convs, export,
config errors, dict batches with mixed layouts, search caches."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.layers.conv2d_same import Conv2dSame, conv2d_same
from torch import nn

import qsweep
from qsweep.config import ConfigError, RootConfig
from qsweep.export import export_program, load_program
from qsweep.quant import gptq
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.modules import quant_layers
from qsweep.search.space import SearchSpace
from qsweep.search.trials import LayoutModels

pytestmark = pytest.mark.usefixtures("one_thread")

GPTQ = {"enabled": True}


def correlated(n: int, cols: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs near a ``rank``-dimensional subspace: strongly correlated columns."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
            + 0.05 * torch.randn(n, cols, generator=gen))


def quantize_both(model, recipe, batches, **gptq_cfg):
    """(nearest-rounded model, GPTQ model, GPTQ stats) for the same recipe."""
    timings = QuantizeTimings()
    nearest = qsweep.quantize(model, recipe, batches)
    rounded = qsweep.quantize(model, {**recipe, "gptq": {**GPTQ, **gptq_cfg}}, batches, timings=timings)
    return nearest, rounded, timings.reconstruct["gptq"]


def test_uncorrelated_inputs_give_the_nearest_codes():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():  # scales 1.875 / 7.5 = 0.25 and 0.9375 / 7.5 = 0.125, exact in binary
        layer.weight.copy_(torch.tensor([[1.875, 0.55, -0.35, 0.1], [-0.9375, 0.3, 0.18, -0.0625]]))
    # Each row feeds one input: the columns are orthogonal, H is exactly diagonal.
    x = torch.diag(torch.tensor([3.0, 1.0, 0.5, 2.0])).repeat(8, 1)
    recipe = {"weight": {"bits": 4, "granularity": "per_channel"}, "act": {"bits": None}}
    _, rounded, stats = quantize_both(nn.Sequential(layer), recipe, [x], damp=1e-6)
    # w / s = [7.5, 2.2, -1.4, 0.4] and [-7.5, 2.4, 1.44, -0.5]; half to even, clamped to [-8, 7]
    expected = torch.tensor([[7, 2, -1, 0], [-8, 2, 1, 0]], dtype=torch.int16)
    assert torch.equal(rounded[0].qweight.codes.reshape(2, 4), expected)
    assert stats["layers"]["0"]["kept"] == "gptq"


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("weight, act_order", [
    ({"granularity": "per_channel"}, True),
    ({"granularity": "per_channel", "symmetric": False}, True),
    ({"granularity": "per_group", "group_size": 16}, True),
    ({"granularity": "per_group", "group_size": 16}, False),
    ({"granularity": "per_tensor"}, True),
])
def test_correlated_inputs_lower_the_output_error(bits, weight, act_order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = correlated(512, 64)
    recipe = {"weight": {"bits": bits, **weight}, "act": {"bits": None}}
    nearest, rounded, stats = quantize_both(model, recipe, [x], act_order=act_order)
    with torch.no_grad():
        ref = model(x)
        err_nearest = (nearest(x) - ref).norm().item()
        err_gptq = (rounded(x) - ref).norm().item()
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)
    q, n = rounded[0].qweight, nearest[0].qweight
    assert q.codes.dtype == torch.int16 and q.codes.shape == n.codes.shape
    assert q.grid.qmin <= int(q.codes.min()) and int(q.codes.max()) <= q.grid.qmax
    assert torch.equal(q.scale, n.scale) and torch.equal(q.zero_point, n.zero_point)
    assert not torch.equal(q.codes, n.codes)
    assert stats["layers"]["0"]["kept"] == "gptq" and stats["error_reduction"] > 0.2
    torch.testing.assert_close(rounded[0].weight, q.dequantize())  # the forward uses the new codes


def test_convs_are_rounded_depthwise_and_tf_same_padded_ones_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          Conv2dSame(8, 8, 3, stride=2, groups=4), nn.Conv2d(8, 4, 1)).eval()
    x = F.interpolate(torch.randn(16, 3, 4, 4), size=17, mode="bilinear")  # smooth images: correlated patches
    recipe = {"weight": {"bits": 3}, "act": {"bits": None}}
    nearest, rounded, stats = quantize_both(model, recipe, [x], sequential=False)
    assert set(stats["layers"]) == {"0", "2", "3", "4"} and not stats["skipped"]
    # The Hessian's error measure is each conv's own output error: patches unfold in the weight's order,
    # padded as the conv pads them, one Hessian per group (inputs: the nearest-rounded model's, one pass).
    with torch.no_grad():
        inputs = {"0": x, "2": F.relu(nearest[0](x))}
        inputs["3"] = nearest[2](inputs["2"])
    for name, conv in (("0", model[0]), ("2", model[2]), ("3", model[3])):
        i = int(name)
        d = conv.weight - nearest[i].qweight.dequantize()
        with torch.no_grad():
            out = conv._conv_forward(inputs[name], d, None) if i < 3 else conv2d_same(
                inputs[name], d, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        rows = out.shape[0] * out.shape[2] * out.shape[3]
        expected = 2.0 / rows * out.pow(2).sum().item()
        assert stats["layers"][name]["error_before"] == pytest.approx(expected, rel=1e-4), name
        assert stats["layers"][name]["error_after"] < stats["layers"][name]["error_before"], name
    with torch.no_grad():
        ref = model[0](x)
        assert (rounded[0](x) - ref).norm() < (nearest[0](x) - ref).norm()


def test_the_hessian_sees_smoothed_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = correlated(256, 64) * torch.linspace(0.1, 10.0, 64)  # channels of very different ranges
    recipe = {"weight": {"bits": 4}, "act": {"bits": None}, "smooth": {"enabled": True, "alpha": 0.5}}
    nearest, rounded, stats = quantize_both(model, recipe, [x], num_samples=256)
    s = nearest[0].input_divisor
    assert s is not None
    out = (x / s) @ (model[0].weight * s - nearest[0].qweight.dequantize()).T
    assert stats["layers"]["0"]["error_before"] == pytest.approx(2.0 / 256 * out.pow(2).sum().item(), rel=1e-4)
    assert stats["layers"]["0"]["error_after"] < stats["layers"]["0"]["error_before"]


def test_exported_program_matches_the_gptq_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    recipe = {"weight": {"bits": 3, "granularity": "per_group", "group_size": 32, "symmetric": False},
              "act": {"bits": 8}, "gptq": GPTQ}
    q = qsweep.quantize(model, recipe, [correlated(64, 64), correlated(64, 64, seed=1)])
    path = export_program(q, torch.randn(3, 64), tmp_path / "m.pt2")
    loaded = load_program(path)
    x = correlated(33, 64, seed=2)
    assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("gptq_cfg, key", [
    ({"damp": 0.0}, "quant.gptq.damp"),
    ({"damp": 1.5}, "quant.gptq.damp"),
    ({"block_size": 0}, "quant.gptq.block_size"),
    ({"num_samples": 0}, "quant.gptq.num_samples"),
])
def test_bad_gptq_values_are_refused(gptq_cfg, key):
    with pytest.raises(ConfigError, match=key):
        qsweep.quantize(nn.Sequential(nn.Linear(4, 4)), {"gptq": {**GPTQ, **gptq_cfg}}, [torch.randn(2, 4)])


@pytest.mark.parametrize("other", [{"adaround": {"mode": "layer", "iters": 2}},
                                   {"lsq": {"mode": "weight", "iters": 2}}])
def test_a_re_rounding_method_chosen_for_the_run_replaces_the_recipes_gptq(other):
    key = f"{next(iter(other))}.mode"
    timings = QuantizeTimings()
    qsweep.quantize(nn.Sequential(nn.Linear(4, 4)), {"gptq": GPTQ}, [torch.randn(2, 4)], timings=timings, **other)
    assert key in timings.reconstruct["gptq"]["skipped"]
    assert "adaround" in timings.reconstruct or "lsq" in timings.reconstruct


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)))) * mask[..., None]


class Unit(TinyBlock):
    """The same block under a name that block discovery does not know."""


class TinyEncoder(nn.Module):
    """Takes keyword arguments, like a Hugging Face encoder; its blocks take the mask too."""

    def __init__(self, vocab: int = 40, dim: int = 32, known_blocks: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        with torch.no_grad():  # low-rank embeddings: correlated features
            self.embed.weight.copy_(torch.randn(vocab, 4) @ torch.randn(4, dim) + 0.1 * torch.randn(vocab, dim))
        self.container = "blocks" if known_blocks else "stack"
        self.add_module(self.container, nn.ModuleList([(TinyBlock if known_blocks else Unit)(dim) for _ in range(2)]))
        self.head = nn.Linear(dim, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.get_submodule(self.container):
            x = block(x, attention_mask)
        return self.head(x)


def token_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(40, (8, 12), generator=gen),
             "attention_mask": (torch.rand(8, 12, generator=gen) > 0.2).float()} for _ in range(n)]


def test_dict_batches_and_per_layer_widths():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    layers = {"blocks.0.*": {"w_bits": 3},
              "blocks.1.fc2": {"w_bits": 6, "w_granularity": "per_group", "group_size": 16},
              "head": {"w_bits": 8, "w_granularity": "per_tensor"}}
    recipe = {"weight": {"bits": 4}, "act": {"bits": 8}, "layers": layers}
    calib = token_batches(3, seed=0)
    nearest, rounded, stats = quantize_both(model, recipe, calib, num_samples=16)
    widths = {n: m.w_bits for n, m in quant_layers(rounded).items()}
    assert widths == {"blocks.0.fc1": 3, "blocks.0.fc2": 3, "blocks.1.fc1": 4, "blocks.1.fc2": 6, "head": 8}
    assert list(stats["layers"]) == list(widths) and not stats["skipped"]
    assert all(s["rows"] == 16 * 12 for s in stats["layers"].values())  # num_samples cut the batches
    for name, layer in quant_layers(rounded).items():
        q = layer.qweight
        assert q.grid.qmin <= int(q.codes.min()) and int(q.codes.max()) <= q.grid.qmax
        assert torch.equal(q.scale, nearest.get_submodule(name).qweight.scale)
    held_out = token_batches(2, seed=1)
    with torch.no_grad():
        errors = [sum((m(**b) - model(**b)).pow(2).sum().item() for b in held_out) for m in (nearest, rounded)]
    assert errors[1] < errors[0]


@pytest.mark.parametrize("known_blocks", [True, False])  # groups: blocks, or every layer alone
def test_replayed_outputs_give_the_codes_of_recomputed_ones(monkeypatch, known_blocks):
    torch.manual_seed(0)
    model = TinyEncoder(known_blocks=known_blocks).eval()
    recipe = {"weight": {"bits": 3}, "act": {"bits": 8}, "gptq": GPTQ}
    calib = token_batches(2, seed=0)
    replayed = qsweep.quantize(model, recipe, calib)
    monkeypatch.setattr(gptq.Collector, "finish", lambda self, name, module: None)  # every pass runs all
    recomputed = qsweep.quantize(model, recipe, calib)
    for (name, a), b in zip(quant_layers(replayed).items(), quant_layers(recomputed).values()):
        assert torch.equal(a.qweight.codes, b.qweight.codes), name


def test_search_caches_hold_gptq_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    calib = [correlated(64, 64), correlated(64, 64, seed=1)]
    recipe = qsweep.config.quant_recipe({"weight": {"bits": 4}, "act": {"bits": 8}, "gptq": GPTQ})
    space = SearchSpace.build(["0", "2"], OmegaConf.merge(OmegaConf.structured(RootConfig).search,
                                                          {"w_bits": [3, 4]}))
    models = LayoutModels(model, recipe, calib, space)
    for bits in (3, 4):
        layers = {"*": {"w_bits": bits}}
        fresh = qsweep.quantize(model, {**OmegaConf.to_container(recipe), "layers": layers}, calib)
        nearest = qsweep.quantize(model, {**OmegaConf.to_container(recipe), "layers": layers, "gptq": {}}, calib)
        for name in ("0", "2"):
            assert torch.equal(models.weights[(name, bits)].codes, fresh.get_submodule(name).qweight.codes)
        assert not torch.equal(models.weights[("0", bits)].codes, nearest[0].qweight.codes)


def test_a_layer_with_fewer_input_rows_than_columns_keeps_nearest_rounding():
    """A classifier sees one row per image: with fewer images than features its Hessian is rank-deficient
    and GPTQ would fit the calibration set; it keeps its nearest codes and says why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    few, enough = correlated(40, 48, seed=1), correlated(400, 48, seed=1)
    recipe = {"weight": {"bits": 3}, "act": {"bits": None}}
    nearest, rounded, stats = quantize_both(model, recipe, [few])
    assert "40 calibration input rows for 48 weight columns" in stats["skipped"]["0"]
    assert torch.equal(rounded[0].qweight.codes, nearest[0].qweight.codes)
    _, _, stats = quantize_both(model, recipe, [enough], num_samples=400)
    assert "0" in stats["layers"] and not stats["skipped"]
