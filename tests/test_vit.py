"""quant.vit: quantized attention (q, k, v, softmax; log2 grid), post-LN reparam / SmoothQuant, errors."""

import copy

import pytest
import timm
import torch
from timm.layers.attention import Attention
from torch import nn

import qsweep
from qsweep.config import ConfigError, QuantConfig, TensorQuantConfig, quant_recipe
from qsweep.data import calibration_batches, eval_loader
from qsweep.evaluate import evaluate
from qsweep.quant.calibrate import calibrate
from qsweep.quant.modules import quant_layers
from qsweep.quant.modules import QuantLinear
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.vit import Log2Quantizer, QuantAttention, apply_vit, channel_ranges, pre_norm_pairs, wrap_attention

W8A8 = {"weight": {"bits": 8, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False}}


@pytest.fixture(scope="module")
def calib(digits_bundle):
    return calibration_batches(digits_bundle, QuantConfig().calib)


@pytest.fixture(scope="module")
def test_images(digits_bundle):
    return torch.cat([x for x, _ in eval_loader(digits_bundle, qsweep.config.DataConfig())])


def runner(model, batches):
    def run(limit=None):
        with torch.no_grad():
            for b in batches[:limit]:
                model(**b) if isinstance(b, dict) else model(b)
    return run


def top1(model, bundle):
    return evaluate(model, eval_loader(bundle, qsweep.config.DataConfig()), bundle.num_classes).top1


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_wrapper_off_is_timm(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    x = torch.randn(3, 9, 32)
    mask = torch.rand(9, 9) > 0.3
    mask.fill_diagonal_(True)
    wrapped = QuantAttention(attn).eval()
    with torch.no_grad():
        fused = attn(x)
        attn.fused_attn = False
        for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
            assert torch.equal(wrapped(x, **kwargs), attn(x, **kwargs)), kwargs  # timm's explicit path, exactly
        torch.testing.assert_close(wrapped(x), fused, rtol=0, atol=1e-6)  # and SDPA up to float rounding


def test_wrapped_digits_vit_matches(digits_vit, test_images):
    model = copy.deepcopy(digits_vit)
    names = wrap_attention(model)
    assert sorted(names) == [f"blocks.{i}.attn" for i in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(model(test_images), digits_vit(test_images), rtol=0, atol=1e-5)


def test_everything_off_adds_nothing(digits_vit, calib):
    q = qsweep.quantize(digits_vit, W8A8, calib)
    assert not any(isinstance(m, QuantAttention) for m in q.modules())
    acts = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    assert acts == [layer.act for layer in quant_layers(q).values()]
    state = {k: v for k, v in digits_vit.state_dict().items() if "norm" in k}
    assert all(torch.equal(q.state_dict()[k], v) for k, v in state.items())  # no float rewrite


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_quantizer_levels_are_powers_of_two(bits):
    quant = Log2Quantizer(bits, "p")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4, 17, 17, generator=g) * 3).softmax(dim=-1)
    x[0, 0, 0] = 0.0
    quant.start_observing()
    quant(x)
    quant.freeze()
    assert quant.scale.item() == pytest.approx(x.max().item(), rel=1e-6)
    y = quant(x)
    assert (y >= 0).all() and (y[0, 0, 0] == 0).all()
    k = -torch.log2(y[y > 0] / quant.scale)
    assert torch.equal(k, k.round()), "outputs are exactly scale * 2^-k"
    assert k.min() >= 0 and k.max() <= 2**bits - 2
    assert len(torch.unique(y)) <= 2**bits
    # Nearest level in the log domain: within half an octave of the input, unless flushed to zero.
    kept = y > 0
    assert (torch.log2(y[kept] / x[kept]).abs() <= 0.5 + 1e-6).all()
    assert (x[~kept] <= quant.scale * 2.0 ** -(2**bits - 1.5) + 1e-12).all()


@pytest.mark.parametrize("softmax_quantizer", ["uniform", "log2"])
def test_attn_matmul_quantizes_qkv_and_softmax(digits_vit, calib, test_images, softmax_quantizer):
    recipe = dict(W8A8, vit={"attn_matmul": True, "attn_bits": 6, "softmax_bits": 4,
                             "softmax_quantizer": softmax_quantizer})
    q = qsweep.quantize(digits_vit, recipe, calib)
    attns = [m for m in q.modules() if isinstance(m, QuantAttention)]
    assert len(attns) == 4 and all(isinstance(a.qkv, QuantLinear) and isinstance(a.proj, QuantLinear) for a in attns)
    seen = {}

    def hook(name):
        return lambda mod, inp, out: seen.setdefault(name, out)

    a = attns[1]
    for name in ("q_quant", "k_quant", "v_quant", "softmax_quant"):
        quant = getattr(a, name)
        assert quant.observer is None and quant.scale.item() != 1.0  # calibrated by calibrate()
        getattr(a, name).register_forward_hook(hook(name))
    with torch.no_grad():
        q(test_images[:32])
    for name in ("q_quant", "k_quant", "v_quant"):
        assert len(torch.unique(seen[name])) <= 2**6
    probs = seen["softmax_quant"]
    assert len(torch.unique(probs)) <= 2**4
    if softmax_quantizer == "log2":
        k = -torch.log2(probs[probs > 0] / a.softmax_quant.scale)
        assert torch.equal(k, k.round())


def test_calibrate_freezes_every_act_quantizer():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.extra = ActQuantizer(TensorQuantConfig(bits=8, symmetric=True), -1, "extra")

        def forward(self, x):
            return self.extra(self.fc(x))

    model = Extra()
    x = torch.randn(16, 4)
    n = calibrate(model, [x])
    assert n == 1 and model.extra.observer is None
    torch.testing.assert_close(model.extra.scale, model.fc(x).abs().max() / 127.5)


@pytest.mark.parametrize("mode", ["reparam", "smooth"])
def test_post_ln_keeps_float_output_and_flattens_channels(digits_vit, calib, test_images, mode):
    model = copy.deepcopy(digits_vit)
    pairs = pre_norm_pairs(model, runner(model, calib))
    assert [n for n, _, _ in pairs] == [f"blocks.{i}.norm{j}" for i in range(4) for j in (1, 2)]
    before = channel_ranges([norm for _, norm, _ in pairs], runner(model, calib))
    apply_vit(model, quant_recipe({"vit": {"post_ln": mode, "smooth_alpha": 0.5}}), runner(model, calib))
    with torch.no_grad():
        diff = (model(test_images) - digits_vit(test_images)).abs().max().item()
    assert diff < 2e-5  # measured ~2e-6 on logits of magnitude ~5
    after = channel_ranges([norm for _, norm, _ in pairs], runner(model, calib))

    def spread(lo, hi):  # largest over smallest channel extent: what one per-tensor grid must cover
        return ((hi - lo).max() / (hi - lo).min()).item()

    for (lo0, hi0), (lo1, hi1), (_, _, readers) in zip(before, after, pairs):
        if mode == "reparam":  # every channel centred on the mean width
            assert spread(lo1, hi1) == pytest.approx(1.0, abs=1e-3) and spread(lo0, hi0) > 1.0 + 1e-3
        else:
            # alpha = 0.5: s_j = sqrt(max|X_j| / max|W_j|) leaves channel j's activation and its readers' weight
            # column the same absmax, sqrt(max|X_j| max|W_j|). (Whether that narrows the activations' spread
            # depends on the trained weights.)
            w_max = torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in readers]).amax(dim=0)
            torch.testing.assert_close(torch.maximum(-lo1, hi1), w_max, rtol=1e-4, atol=0)


def test_post_ln_off_is_a_no_op(digits_vit, calib):
    model = copy.deepcopy(digits_vit)
    apply_vit(model, quant_recipe({}), runner(model, calib))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), digits_vit.state_dict().values()))
    assert type(model.blocks[0].attn) is type(digits_vit.blocks[0].attn)


@pytest.mark.parametrize("post_ln", ["reparam", "smooth"])
def test_post_ln_digits_accuracy(digits_vit, digits_bundle, calib, post_ln):
    fp = top1(digits_vit, digits_bundle)
    recipe = {"weight": {"bits": 4, "granularity": "per_channel"}, "act": {"bits": 4, "symmetric": False},
              "vit": {"post_ln": post_ln}}
    assert top1(qsweep.quantize(digits_vit, recipe, calib), digits_bundle) >= fp - 3.0


def test_errors_on_a_resnet():
    model = timm.create_model("resnet18", num_classes=10).eval()
    batches = [torch.randn(2, 3, 32, 32)]
    with pytest.raises(ConfigError, match=r"quant.vit.attn_matmul=True .*ResNet"):
        qsweep.quantize(model, {"vit": {"attn_matmul": True}}, batches)
    with pytest.raises(ConfigError, match=r"quant.vit.post_ln='smooth' .*ResNet"):
        qsweep.quantize(model, {"vit": {"post_ln": "smooth"}}, batches)


def test_smooth_alpha_one_equalizes_absmax(digits_vit, calib):
    model = copy.deepcopy(digits_vit)
    apply_vit(model, quant_recipe({"vit": {"post_ln": "smooth", "smooth_alpha": 1.0}}), runner(model, calib))
    norms = [norm for _, norm, _ in pre_norm_pairs(model, runner(model, calib))]
    for lo, hi in channel_ranges(norms, runner(model, calib)):
        # alpha = 1: s_j = max|X_j|, so every LN output channel peaks at exactly 1.
        torch.testing.assert_close(torch.maximum(-lo, hi), torch.ones_like(lo), rtol=1e-5, atol=0)
