"""A swapped layer is the float layer: with quantization off, a model whose Linear / Conv2d modules are
qsweep's quantized stand-ins computes exactly what the float model did, through fake-quant, the integer
backend and the exported artifact, on real architectures (random weights: the ops are what is tested)."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import ScaledStdConv2d, StdConv2d, StdConv2dSame
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

import qsweep
from qsweep.config import quant_recipe, shipped_recipe
from qsweep.export import artifact_bytes, export_artifact
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.fold import fold_weight_standardization
from qsweep.quant.intkernel import to_int_backend
from qsweep.quant.modules import quant_layers, quant_module_for
from qsweep.quant.plan import LayerPlan, resolve_plan


class ScaledLinear(nn.Linear):
    """A user layer with its own forward: qsweep cannot know what it does with its weight."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight.tanh(), self.bias)


class StandardizedNet(nn.Module):
    """Weight-standardized convs as BiT (StdConv2d, TF-same StdConv2dSame) and NFNets (ScaledStdConv2d) use them,
    a reflect-padded conv, a TF-same depthwise conv, and a user Linear subclass."""

    def __init__(self):
        super().__init__()
        self.stem = StdConv2dSame(3, 8, 3, stride=2)
        self.std = StdConv2d(8, 8, 3)
        self.scaled = ScaledStdConv2d(8, 16, 3, stride=2, gamma=1.7)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.dw = Conv2dSame(16, 16, 5, stride=2, groups=16)
        self.head = ScaledLinear(16, 10)

    def forward(self, x):
        x = F.relu(self.std(F.relu(self.stem(x))))
        x = self.dw(F.relu(self.reflect(F.relu(self.scaled(x)))))
        return self.head(x.mean((2, 3)))


def _timm(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


ARCHITECTURES = {
    "tf_efficientnet_lite0": (_timm("tf_efficientnet_lite0"), 97),  # odd size: TF-same pads differ per side
    "efficientnet_b0": (_timm("efficientnet_b0"), 64),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), 64),
    "convnext_atto": (_timm("convnext_atto"), 64),
    "regnetx_002": (_timm("regnetx_002"), 64),
    "resnet18": (_timm("resnet18"), 64),
    "deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224", img_size=64), 64),
    "torchvision_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 64),
    "standardized_convs": (StandardizedNet, 33),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def swap_unquantized(model: nn.Module) -> dict[str, LayerPlan]:
    """Every layer the recipe would quantize, swapped for its quantized stand-in with quantization off."""
    fold_weight_standardization(model)
    plans = resolve_plan(model, quant_recipe({}))
    for name in plans:
        model.set_submodule(name, quant_module_for(model.get_submodule(name), LayerPlan(name, None, None)))
    return plans


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_swapped_model_computes_the_float_model(arch, one_thread):
    model, x = build(arch)
    with torch.no_grad():
        expected = model(x)
    swapped = swap_unquantized(model)
    assert swapped and len(quant_layers(model)) == len(swapped)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        int_model, fallbacks = to_int_backend(model)
        assert set(fallbacks) == set(swapped)  # nothing quantized: every layer stays on its float op
        assert torch.equal(int_model(x), expected)
        program = export_artifact(model, x).module()
        # The exported program runs the same aten ops; the batch dimension is dynamic, so allow kernel choice.
        torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_subclass_stays_float_and_says_why(caplog):
    model, x = build("standardized_convs")
    with caplog.at_level(logging.WARNING):
        plans = swap_unquantized(model)
    assert "head" not in plans and isinstance(model.head, ScaledLinear)
    assert "left head in float" in caplog.text and "ScaledLinear overrides forward" in caplog.text
    assert {"stem", "std", "scaled", "reflect", "dw"} <= set(plans)


def test_weight_standardization_is_folded_into_the_quantized_weight():
    """The codes are the standardized weight's: a StdConv2d quantized at 8 bits stays close to the float model."""
    model, x = build("standardized_convs")
    qmodel = qsweep.quantize(model, {"act": {"bits": 16}, "weight": {"bits": 8, "granularity": "per_channel"}},
                             [x])
    assert type(qmodel.std).__name__ == "QuantConv2d" and qmodel.std.qweight is not None
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
        assert qmodel.std.weight.reshape(8, -1).mean(1).abs().max() < 0.05  # standardized: zero mean per row
    assert ((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv3_small_100", "standardized_convs"])
def test_w8a8_int_layers_compute_the_fake_quant_layers(arch, one_thread):
    """Quantized at W8A8, TF-same convs included: each integer layer, given the input its fake-quant layer
    saw, computes that layer's output up to float rounding of its epilogue (a whole network differs more:
    one such ulp can move a later activation across a rounding boundary), and the exported artifact is
    the integer backend exactly."""
    model, x = build(arch)
    batches = [torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    qmodel = qsweep.quantize(model, {"weight": {"bits": 8, "granularity": "per_channel"}}, batches)
    layers = quant_layers(qmodel)
    assert arch == "mobilenetv3_small_100" or any(m.same_padding for m in layers.values() if hasattr(m, "same_padding"))
    int_model, fallbacks = to_int_backend(qmodel)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].clone(), output.clone())  # an inplace activation may follow
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        qmodel(x)
        for h in hooks:
            h.remove()
        on_int = [n for n in layers if n not in fallbacks]
        assert on_int or arch == "standardized_convs"  # its convs are all padded (not GEMMs)
        for name in on_int:
            inp, out = seen[name]
            torch.testing.assert_close(int_model.get_submodule(name)(inp), out, rtol=1e-5, atol=1e-5 * out.abs().max())
        program = export_artifact(qmodel, x, kernels="int").module()
        assert torch.equal(program(x), int_model(x))


def test_cnn_w8a8_keeps_the_stem_and_the_costliest_layers_float(one_thread):
    """cnn_w8a8: the stem skipped, a few more layers float by the Fisher knapsack within 0.1 % more bytes, each
    activation range chosen per layer."""
    model, _ = build("mobilenetv3_small_100")
    batches = [torch.randn(4, 3, 33, 33, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    timings = QuantizeTimings()
    qmodel = qsweep.quantize(model, shipped_recipe("cnn_w8a8"), batches, timings=timings)
    layers, chosen = quant_layers(qmodel), timings.mixed
    assert "conv_stem" not in layers and "conv_stem" not in chosen["widths"]
    floats = {n for n, b in chosen["widths"].items() if b is None}
    assert floats and not floats & set(layers) and {m.w_bits for m in layers.values()} == {8}
    assert all(m.act.choice for m in layers.values())
    assert artifact_bytes(qmodel, "int") == chosen["bytes"] <= 1.001 * chosen["uniform_bytes"][8]


def test_cnn_w4a8_on_a_depthwise_separable_net(one_thread):
    """cnn_w4a8: widths mixed under 0.6x the 8-bit artifact, GPTQ on the layers of 5 bits or fewer, nearest
    rounding above. (Its quality is argued on real weights: experiments/realvision.)"""
    model, _ = build("mobilenetv3_small_100")
    _, *batches = (torch.randn(8, 3, 33, 33, generator=torch.Generator().manual_seed(s)) for s in range(3))
    timings = QuantizeTimings()
    recipe = shipped_recipe("cnn_w4a8")
    recipe.gptq.sequential = False  # one pass for every Hessian: the sequential order is test_gptq's
    qmodel = qsweep.quantize(model, recipe, batches, timings=timings)
    bits = {n: m.w_bits for n, m in quant_layers(qmodel).items()}
    assert bits == timings.mixed["widths"] and len(set(bits.values())) > 1
    assert artifact_bytes(qmodel, "int") == timings.mixed["bytes"] <= 0.6 * timings.mixed["uniform_bytes"][8]
    gptq = timings.reconstruct["gptq"]
    assert all("quant.gptq.max_bits=5" in gptq["skipped"][n] for n, b in bits.items() if b > 5)
    assert all(n in gptq["layers"] or n in gptq["skipped"] for n in bits)
