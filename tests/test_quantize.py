"""`qsweep.quantize` on plain torch models: numerics, BN folding, batch forms, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qsweep
from qsweep.quant.modules import quant_layers
from qsweep.quant.fold import fold_batchnorm
from qsweep.quant.grid import Grid, fake_quantize, qparams
from qsweep.quant.quantizer import CalibrationError


class SmallCNN(nn.Module):
    """Not a timm model: conv-BN-ReLU twice, pooling, two linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(F.relu(self.fc(x.mean((2, 3)))))


class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, tokens, scale=1.0):
        return self.proj(tokens) * scale


def trained_bn(model):
    # Give BatchNorm non-trivial statistics so folding is actually tested.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return trained_bn(SmallCNN())


def batches(n=4, bs=8):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(bs, 3, 12, 12, generator=g) for _ in range(n)]


def test_fold_batchnorm_preserves_outputs(cnn):
    x = batches(1)[0]
    ref = cnn(x)
    folded = fold_batchnorm(cnn, lambda: cnn(x))
    assert folded == ["bn1", "bn2"]
    assert isinstance(cnn.bn1, nn.Identity) and cnn.conv1.bias is not None
    torch.testing.assert_close(cnn(x), ref, rtol=1e-4, atol=1e-5)


def test_folded_timm_norm_act_keeps_its_activation_and_no_batchnorm_tensor():
    import timm
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = trained_bn(timm.create_model("tf_efficientnet_lite0", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    folded = fold_batchnorm(model, lambda: model(x))
    assert len(folded) == 49 and not any(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert isinstance(model.blocks[1][0].bn1.act, nn.ReLU6)  # timm's names stay: bn1.act
    assert not [k for k in model.state_dict() if k.startswith("bn") or ".bn" in k]
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_quantize_non_timm_model_w8_is_close_and_w2_is_worse(cnn):
    x = batches(1, 32)[0]
    ref = cnn(x)
    err = {}
    for bits in (8, 4, 2):
        q = qsweep.quantize(cnn, {"weight": {"bits": bits}, "act": {"bits": 8}}, batches())
        assert set(quant_layers(q)) == {"conv1", "conv2", "fc", "head"}
        err[bits] = (q(x) - ref).pow(2).mean().item() / ref.pow(2).mean().item()
    assert err[8] < 1e-3 < err[2]
    assert err[8] < err[4] < err[2]
    # the caller's model is untouched (quantize works on a copy by default)
    assert isinstance(cnn.bn1, nn.BatchNorm2d)


def test_quantlinear_forward_matches_torch_fake_quant(cnn):
    q = qsweep.quantize(cnn, {"weight": {"bits": 4, "symmetric": False}, "act": {"bits": 8}}, batches())
    layer = q.fc
    w = cnn.fc.weight.detach()
    grid = Grid(4, False)
    scale, zp = qparams(w.amin(1), w.amax(1), grid)
    ref_w = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, grid.qmin, grid.qmax)
    assert torch.equal(layer.weight, ref_w)
    x = torch.randn(5, 32)
    a = layer.act
    ref_x = torch.fake_quantize_per_tensor_affine(x, a.scale, a.zero_point, a.grid.qmin, a.grid.qmax)
    assert torch.equal(layer(x), F.linear(ref_x, ref_w, layer.bias))


def test_per_group_matches_per_channel_on_regrouped_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    q = qsweep.quantize(model, {"weight": {"bits": 3, "granularity": "per_group", "group_size": 16},
                                "act": {"bits": None}}, [torch.randn(2, 64)])
    w = model[0].weight.detach().reshape(16 * 4, 16)
    grid = Grid(3, True)
    scale, zp = qparams(w.amin(1), w.amax(1), grid)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, grid.qmin, grid.qmax).reshape(16, 64)
    assert torch.equal(q[0].weight, ref)
    assert q[0].act is None


def test_group_size_must_divide_features():
    model = nn.Sequential(nn.Linear(48, 4))
    with pytest.raises(qsweep.config.ConfigError, match=r"group_size=32 does not divide the 48 input features of '0'"):
        qsweep.quantize(model, {"weight": {"granularity": "per_group", "group_size": 32}}, [torch.randn(1, 48)])


def test_per_token_dynamic_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    q = qsweep.quantize(model, {"weight": {"bits": 8}, "act": {"bits": 8, "granularity": "per_token"}},
                        [torch.randn(2, 5, 8)])
    x = torch.randn(3, 5, 8) * torch.arange(1, 6).reshape(1, 5, 1)
    grid = Grid(8, False)
    scale, zp = qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), grid)
    assert torch.equal(q(x), F.linear(fake_quantize(x, scale, zp, grid), q[0].weight, q[0].bias))


def test_calibration_batch_forms():
    torch.manual_seed(0)
    model = KwargsModel().eval()
    data = [torch.randn(4, 8) for _ in range(3)]
    as_tensor = qsweep.quantize(model, {}, data)
    as_tuple = qsweep.quantize(model, {}, [(t, 1.0) for t in data])
    as_dict = qsweep.quantize(model, {}, [{"tokens": t, "scale": 1.0} for t in data])
    x = torch.randn(2, 8)
    assert torch.equal(as_tensor(x), as_tuple(x)) and torch.equal(as_tensor(x), as_dict(x))


def test_weights_are_quantized_once(cnn, monkeypatch):
    import qsweep.quant.modules as modules

    calls = []
    real = modules.quantize_weight
    monkeypatch.setattr(modules, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = qsweep.quantize(cnn, {}, batches())
    n = len(calls)
    for x in batches(3):
        q(x)
    assert n == 4 and len(calls) == n


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_calibration_names_the_layer(cnn, bad):
    data = batches(3)
    data[1][0, 0, 0, 0] = bad
    with pytest.raises(CalibrationError, match=r"batch 1: calibration input of layer 'conv1'"):
        qsweep.quantize(cnn, {}, data)


def test_no_calibration_batches():
    with pytest.raises(CalibrationError, match="at least one"):
        qsweep.quantize(nn.Sequential(nn.Linear(2, 2)), {}, [])
