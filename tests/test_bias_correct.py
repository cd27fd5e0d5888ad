"""quant.bias_correction: a quantized layer's bias absorbs the mean shift of its outputs, computed on the
calibration samples (each layer's own weight rounding, or the float model's output means), and the
corrected bias reaches the integer backend and the exported artifact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qsweep
from qsweep.config import ConfigError
from qsweep.export import export_artifact
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.fold import fold_batchnorm
from qsweep.quant.intkernel import to_int_backend
from qsweep.quant.modules import quant_layers


class DepthwiseNet(nn.Module):
    """Stem conv, a 3x3 depthwise conv (9 weights per output) and a pointwise conv, BN after each."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        return self.bn2(self.pw(F.relu6(self.bn1(self.dw(x)))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.uniform_(0.5, 2.0)
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))  # positive, as photos are


def _recipe(correct: bool, match_float=(), w_bits=3, a_bits=None) -> dict:
    return {"weight": {"bits": w_bits, "observer": "minmax"}, "act": {"bits": a_bits}, "rotate": {"enabled": False},
            "gptq": {"enabled": False},
            "bias_correction": {"enabled": correct, "match_float": list(match_float), "num_samples": 64}}


def _outputs(model: nn.Module, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def _folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    folded = _model()
    folded.load_state_dict(model.state_dict())
    fold_batchnorm(folded, lambda: folded(x[:2]))
    return folded


def test_each_layer_absorbs_the_mean_shift_of_its_own_weight_rounding():
    """With float activations, a layer's output mean over the calibration samples, given the inputs it
    gets in the quantized model, is what its float weights give on them: exactly for the first layer,
    and for the others up to the product of their rounding with the corrections before them (layers
    between matched ones are measured in one pass)."""
    fp, calib = _model(), _images(64, 1)
    timings = QuantizeTimings()
    q = qsweep.quantize(fp, _recipe(True), [calib[:32], calib[32:]], timings=timings)
    shifts = timings.reconstruct["bias_correction"]["max_shift"]
    folded = _folded(fp, calib)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n, m in quant_layers(q).items()]
    with torch.no_grad():
        q(calib)
        for h in hooks:
            h.remove()
        for name, layer in quant_layers(q).items():
            x = inputs[name]
            want = F.conv2d(x, folded.get_submodule(name).weight, folded.get_submodule(name).bias,
                            padding=layer.padding, groups=layer.groups).mean((0, 2, 3))
            residual = (layer(x).mean((0, 2, 3)) - want).abs().max().item()
            assert residual <= (1e-5 if name == "stem" else 0.2 * shifts[name]), name


def test_matched_layers_have_the_float_models_output_means_on_the_calibration_samples():
    fp, calib = _model(), _images(64, 2)
    q = qsweep.quantize(fp, _recipe(True, ["@depthwise"], a_bits=4), [calib])
    folded = _folded(fp, calib)
    got, want = _outputs(q, calib, ["dw"])["dw"], _outputs(folded, calib, ["dw"])["dw"]
    torch.testing.assert_close(got.mean((0, 2, 3)), want.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, want, atol=1e-3)  # the layer is quantized: only its means were matched


def test_correction_removes_the_mean_shift_on_held_out_images():
    """The shift it removes is the weights' (systematic), not the calibration images': on other images
    of the same kind the final outputs' mean error per channel shrinks."""
    fp, calib, held_out = _model(), _images(64, 3), _images(256, 4)
    with torch.no_grad():
        ref = fp(held_out)
        errors = {}
        for correct in (False, True):
            q = qsweep.quantize(fp, _recipe(correct, ["@depthwise"], a_bits=8), [calib])
            errors[correct] = (q(held_out) - ref).mean((0, 2, 3)).abs().mean().item()
    assert errors[True] < 0.5 * errors[False]


def test_corrected_biases_reach_the_int_backend_and_the_artifact():
    fp, calib = _model(), _images(32, 5)
    timings = QuantizeTimings()
    q = qsweep.quantize(fp, _recipe(True, ["@depthwise"], w_bits=4, a_bits=8), [calib], timings=timings)
    report = timings.reconstruct["bias_correction"]
    assert report["layers"] == 3 and report["matched_float"] == ["dw"]
    assert all(v > 0 for v in report["max_shift"].values())
    x = _images(4, 6)
    with torch.no_grad():
        fake = q(x)
        int_model, _ = to_int_backend(q)
        torch.testing.assert_close(int_model(x), fake, atol=0.05, rtol=0.0)
        program = export_artifact(q, x[:2])
        torch.testing.assert_close(program.module()(x), fake, atol=1e-4, rtol=1e-4)


def test_a_layer_without_bias_gets_one():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False)).eval()
    calib = torch.rand(64, 16, generator=torch.Generator().manual_seed(7))
    q = qsweep.quantize(fp, _recipe(True), [calib])
    for layer in quant_layers(q).values():
        assert layer.bias is not None and layer.bias.abs().max() > 0


@pytest.mark.parametrize("override, match", [
    ({"match_float": ["@middle"]}, "quant.bias_correction.match_float entry"),
    ({"layers": ["@middle"]}, "quant.bias_correction.layers entry"),
    ({"layers": ["nope.*"]}, "quant.bias_correction.layers"),
    ({"match_float": ["nope.*"]}, "quant.bias_correction.match_float"),
    ({"num_samples": 0}, "quant.bias_correction.num_samples"),
])
def test_bad_settings_are_clear_errors(override, match):
    recipe = _recipe(True)
    recipe["bias_correction"].update(override)
    with pytest.raises(ConfigError, match=match):
        qsweep.quantize(_model(), recipe, [_images(4, 8)])


def test_only_the_selected_layers_are_corrected():
    fp, calib = _model(), _images(32, 9)
    recipe = _recipe(True, ["@depthwise"])
    recipe["bias_correction"]["layers"] = ["pw", "@depthwise"]
    plain = quant_layers(qsweep.quantize(fp, _recipe(False), [calib]))
    timings = QuantizeTimings()
    corrected = quant_layers(qsweep.quantize(fp, recipe, [calib], timings=timings))
    assert set(timings.reconstruct["bias_correction"]["max_shift"]) == {"dw", "pw"}
    torch.testing.assert_close(corrected["stem"].bias, plain["stem"].bias, atol=0, rtol=0)
    assert not torch.allclose(corrected["pw"].bias, plain["pw"].bias)


def test_a_search_layout_carries_the_biases_corrected_for_its_widths():
    from omegaconf import OmegaConf

    from qsweep.config import RootConfig, quant_recipe
    from qsweep.search.space import SearchSpace
    from qsweep.search.trials import LayoutModels

    fp, calib = _model(), _images(32, 10)
    recipe = quant_recipe(_recipe(True, ["@depthwise"], a_bits=8))
    space = SearchSpace.build(["stem", "dw", "pw"], OmegaConf.merge(OmegaConf.structured(RootConfig).search,
                                                                     {"w_bits": [3, 6]}))
    models = LayoutModels(fp, recipe, [calib], space)
    for bits in (3, 6):
        uniform = quant_layers(qsweep.quantize(fp, {**OmegaConf.to_container(recipe), "layers": {"*": {"w_bits": bits}}},
                                               [calib]))
        layers = quant_layers(models.apply({g: {"w": bits} for g in space.groups}))
        for name in ("stem", "dw", "pw"):
            torch.testing.assert_close(layers[name].bias, uniform[name].bias, atol=0, rtol=0)
