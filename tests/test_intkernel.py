"""Integer execution path (`qsweep.quant.intkernel`): exact int32 accumulators, outputs equal to the
fake-quant forward up to float rounding, fallbacks, and agreement on the digits ViT and DeiT-S.

Tolerances. Per layer, the integer accumulator must equal a float64 matmul of the fake-quant
codes exactly, and every output element must satisfy the rigorous bound of
:func:`intkernel.output_error_bound` (the fake path's float32 GEMM accumulation error plus a few
roundings); on the synthetic layers here also ``max |y_int - y_fake| <= 1e-5 * max |y_fake|``
(measured: ~4e-7). On a whole model the same per-layer checks run on real activations: each
integer layer is fed the exact input its fake-quant layer saw (:func:`check_int_layers`).
End to end, an ulp-sized difference occasionally moves an activation that sits on a rounding tie
of the next layer's grid by one code, and that step propagates, so logits differ by more than an
ulp by an amount that depends on the trained weights: it is printed, not bounded. A prediction
can change only where the fake-quant top-2 margin is that small; predictions must agree on at
least 99 % of the images.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qsweep
from qsweep.config import DataConfig, QuantConfig, TensorQuantConfig
from qsweep.data import calibration_batches, eval_loader
from qsweep.quant.modules import quant_layers
from qsweep.quant.grid import qparams
from qsweep.quant.intkernel import (
    IntAttention,
    IntConv2d,
    IntGemm,
    IntLinear,
    output_error_bound,
    to_int_backend,
    torch_quantize_matches,
)
from qsweep.quant.modules import QuantConv2d, QuantLayer, QuantLinear
from qsweep.quant.plan import LayerPlan
from qsweep.quant.vit import QuantAttention

REL_TOL = 1e-5
U = 2.0**-24  # float32 unit roundoff
AGREE = 0.99  # end to end: share of images whose int and fake-quant predictions must agree


def act_cfg(kind: str, bits: int = 8) -> TensorQuantConfig | None:
    return {
        "affine": TensorQuantConfig(bits=bits, symmetric=False, granularity="per_tensor"),
        "symmetric": TensorQuantConfig(bits=bits, symmetric=True, granularity="per_tensor"),
        "per_token": TensorQuantConfig(bits=bits, symmetric=False, granularity="per_token"),
        "per_token_sym": TensorQuantConfig(bits=bits, symmetric=True, granularity="per_token"),
        "float": None,
    }[kind]


def realistic_input(shape, seed: int) -> torch.Tensor:
    """Post-LayerNorm-like values with a few large outliers, plus a GELU-like skewed part."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.3 + 0.2
    x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)] *= 8.0
    return torch.where(torch.rand(shape, generator=g) < 0.3, F.gelu(x), x)


def calibrated(layer, x: torch.Tensor):
    if layer.act is not None and not layer.act.dynamic:
        layer.act.start_observing()
        layer(x)
        layer.act.freeze()
    return layer.eval()


def quant_linear(w_cfg, a_cfg, k=256, n=48, seed=0, x=None) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.3, 3.0, n)[:, None])  # per-channel spread
        lin.bias.normal_(0, 0.5)
    layer = QuantLinear(lin, LayerPlan("fc", w_cfg, a_cfg))
    return calibrated(layer, x if x is not None else realistic_input((3, 29, k), seed + 1))


def reference_codes(layer, x2: torch.Tensor) -> torch.Tensor:
    """The fake-quant forward's integers ``v`` (float64), recomputed from its own formula."""
    act = layer.act
    if act.dynamic:
        lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)
        scale, zp = qparams(lo, hi, act.grid)
    else:
        scale, zp = act.scale, act.zero_point
    return torch.clamp(torch.round(x2 * (1.0 / scale)), act.grid.qmin - zp, act.grid.qmax - zp).double()


def gemm_rows(int_layer: IntGemm, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the ``[M, K]`` matrix the layer multiplies (conv: one row per output pixel)."""
    if isinstance(int_layer, IntLinear):
        return x.reshape(-1, int_layer.in_features)
    (kh, kw), (sh, sw) = int_layer.kernel_size, int_layer.stride
    if (kh, kw) == (1, 1):
        x = x[:, :, ::sh, ::sw]
    b, ch, h, w = x.shape
    x = x[:, :, : h - h % kh, : w - w % kw]
    ho, wo = x.shape[2] // kh, x.shape[3] // kw
    return x.reshape(b, ch, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(b * ho * wo, ch * kh * kw)


def out_rows(int_layer: IntGemm, y: torch.Tensor) -> torch.Tensor:
    if isinstance(int_layer, IntLinear):
        return y.reshape(-1, int_layer.out_features)
    return y.permute(0, 2, 3, 1).reshape(-1, int_layer.out_features)


def check_layer(layer, int_layer: IntGemm, x: torch.Tensor, synthetic: bool = True) -> float:
    """Exact activation codes, float output within its rigorous bound; returns max |diff| / max |y|.

    ``synthetic`` (the made-up layers here) also checks the exact int32 accumulators and the measured
    ``max |diff| / max |y| <= REL_TOL``; on a model's activations (:func:`check_int_layers`) only what holds
    for any weights is asserted, and one int GEMM per layer instead of two keeps DeiT-S affordable."""
    with torch.no_grad():
        y_fake = layer(x)
        y_int = int_layer(x)
        x_hat = gemm_rows(int_layer, layer.act(x))
    assert y_int.shape == y_fake.shape and y_int.dtype == torch.float32
    y_fake, y_int = out_rows(int_layer, y_fake), out_rows(int_layer, y_int)

    k, n = int_layer.in_features, int_layer.out_features
    x2 = gemm_rows(int_layer, x).contiguous()
    q, _, c_rows = int_layer.quantize_input(x2)
    v = reference_codes(layer, x2)
    c = c_rows.double() if c_rows is not None else int_layer.a_c
    assert torch.equal(q.double() - c, v), "activation codes differ from the fake-quant grid"
    qw = layer.qweight
    u = (qw.codes.double() - qw.zero_point.double()).reshape(n, k)
    glen = int_layer.group_len
    for g in range(int_layer.groups if synthetic else 0):
        sl = slice(g * glen, (g + 1) * glen)
        acc = int_layer.accumulate(q, g, c_rows)
        assert acc.dtype == torch.int32
        assert torch.equal(acc.double(), v[:, sl] @ u[:, sl].t()), f"int32 accumulator of group {g} is not exact"

    bound = output_error_bound(x_hat, layer.weight.reshape(n, k), y_fake, layer.bias, int_layer.groups)
    diff = (y_int.double() - y_fake.double()).abs()
    assert (diff <= bound).all(), f"float difference {diff.max():.3g} above its bound"
    rel = ((y_int - y_fake).abs().max() / y_fake.abs().max()).item()
    assert not synthetic or rel <= REL_TOL, rel
    return rel


def check_attention(attn: QuantAttention, x: torch.Tensor) -> None:
    """:class:`IntAttention`'s arithmetic between qkv and proj against ``attn``'s, on the same q, k, v.

    Built on ``attn``, the IntAttention shares its fake-quant qkv and proj Linears (checked on their own by
    :func:`check_layer`): both quantize the same q, k, v to the same codes and differ only in the float
    rounding of the scores and the softmax. That moves p by ~1e-6 relative, which moves a probability code
    only where p sits that close to a rounding tie of the softmax grid: codes must be at most one step off,
    and rare (measured: ~1e-5 of them; a wrong scale or zero point moves most). The output
    ``y = s_p s_v sum_j v_p v_v`` (the proj input) must then differ by exactly those steps,
    ``s_p sum_j |dv_p| |v_hat_j|``, plus the fake path's float32 matmul rounding over the N keys
    (:func:`output_error_bound`'s form with K = N).
    """
    core = IntAttention(attn)
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(key):
        return lambda _m, _args, out: seen.setdefault(key, []).append(out.clone())

    hooks = [attn.softmax_quant.register_forward_hook(keep("p")), attn.v_quant.register_forward_hook(keep("v")),
             core.p_codes.register_forward_hook(keep("p_codes")),
             attn.proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("y", []).append(args[0].clone()))]
    try:
        with torch.no_grad():
            attn(x)
            core(x)
    finally:
        for h in hooks:
            h.remove()
    b, n, _ = x.shape
    assert n <= core.pv_exact_len, "p v on integer codes only up to pv_exact_len keys"
    s_p = attn.softmax_quant.scale.double()
    p_hat, v_hat = seen["p"][0].double(), seen["v"][0].double().abs()  # [B, h, N, N], [B, h, N, d]
    steps = (torch.cat(seen["p_codes"]).double() - core.p_codes.c - torch.round(p_hat / s_p)).abs()
    assert steps.max() <= 1 and steps.mean() <= 1e-2, (steps.max().item(), steps.mean().item())
    y_fake, y_int = (y.double().view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2) for y in seen["y"])
    bound = s_p * (steps @ v_hat) + (n + 7) * U * (p_hat.abs() @ v_hat) + 4 * U * y_fake.abs()
    diff = (y_int - y_fake).abs()
    assert (diff <= bound).all(), f"attention output {(diff - bound).max():.3g} above its bound"


def layer_inputs(qmodel: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every quantized layer and attention during ``qmodel(x)`` (cloned: an inplace op may follow)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0].clone()))
             for name, m in qmodel.named_modules() if isinstance(m, (QuantLayer, QuantAttention))]
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_int_layers(qmodel: nn.Module, int_model: nn.Module, x: torch.Tensor, prefixes: tuple[str, ...] = ("",)
                     ) -> int:
    """Each integer layer of ``int_model`` (whose name starts with one of ``prefixes``), fed the exact input its
    fake-quant layer saw in ``qmodel(x)``, computes that layer within its float bound (:func:`check_layer`,
    :func:`check_attention`); returns how many were checked. Bounds from the grid and the float arithmetic
    only, so they hold for any weights."""
    checked = 0
    for name, x_in in layer_inputs(qmodel, x).items():
        if not name.startswith(prefixes):
            continue
        fake, ints = qmodel.get_submodule(name), int_model.get_submodule(name)
        if isinstance(ints, IntGemm):
            check_layer(fake, ints, x_in, synthetic=False)
        elif isinstance(ints, IntAttention):
            check_attention(fake, x_in)
            if isinstance(ints.qkv, IntLinear):  # IntAttention reads q, k, v as column blocks of the qkv GEMM
                with torch.no_grad():
                    assert torch.equal(torch.cat(ints.qkv(x_in, parts=3), 1), ints.qkv(x_in).flatten(0, -2))
        else:
            continue  # left on the fake-quant forward
        checked += 1
    return checked


@pytest.mark.parametrize("act", ["affine", "symmetric", "per_token"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("w_symmetric", [True, False])
def test_linear_schemes_exact(w_symmetric, granularity, act):
    """Weight bits 2..8 for each scheme: exact int32 accumulators, outputs within float rounding."""
    for bits in range(2, 9):
        w_cfg = TensorQuantConfig(bits=bits, symmetric=w_symmetric, granularity=granularity, group_size=64)
        layer = quant_linear(w_cfg, act_cfg(act), seed=bits)
        int_layer = IntLinear(layer)
        assert int_layer.groups == (4 if granularity == "per_group" else 1)
        if act == "symmetric":
            assert int_layer.col_corr is None  # zero point 0: no activation correction at all
        # Weight codes are centred (symmetric: as they are): a zero-point term only where zp is off-centre.
        off_centre = layer.qweight.zero_point - layer.qweight.grid.qmin - 2 ** (bits - 1)
        assert (int_layer.w_offset is not None) == bool((off_centre != 0).any())
        check_layer(layer, int_layer, realistic_input((2, 37, 256), 100 + bits))


@pytest.mark.parametrize("act", ["affine", "symmetric", "per_token", "per_token_sym"])
@pytest.mark.parametrize("a_bits", [4, 6, 8])
def test_activation_kernels_identical(act, a_bits):
    """The fused torch.quantize_per_* kernel and the float round/clamp give the same codes and outputs."""
    w_cfg = TensorQuantConfig(bits=4, symmetric=False, granularity="per_group", group_size=32)
    layer = quant_linear(w_cfg, act_cfg(act, a_bits), k=128, n=24)
    x = realistic_input((5, 128), 7)  # M = 5 < 16: no minimum on CPU
    outs = {}
    for kernel in ("float", "torch_quantize") if torch_quantize_matches() else ("float",):
        int_layer = IntLinear(layer, act_kernel=kernel)
        assert int_layer.act_kernel == kernel
        check_layer(layer, int_layer, x)
        outs[kernel] = (int_layer.quantize_input(x)[0], int_layer(x))
    if len(outs) == 2:
        assert torch.equal(outs["float"][0], outs["torch_quantize"][0])
        assert torch.equal(outs["float"][1], outs["torch_quantize"][1])


def test_torch_quantize_checked():
    """On this torch build the fused kernel is bit-identical to round-half-even + zero point."""
    if not hasattr(torch, "quantize_per_tensor"):
        pytest.skip("torch.quantize_per_tensor is gone: the float activation kernel is used")
    assert torch_quantize_matches()


@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
@pytest.mark.parametrize("case", ["patch", "patch_crop", "pointwise", "pointwise_stride", "pointwise_token"])
def test_gemm_convs(case, granularity):
    in_ch, k, stride, act = {
        "patch": (3, 4, 4, "affine"), "patch_crop": (3, 4, 4, "symmetric"), "pointwise": (32, 1, 1, "affine"),
        "pointwise_stride": (32, 1, 2, "affine"), "pointwise_token": (32, 1, 1, "per_token"),
    }[case]
    size = (18, 17) if case == "patch_crop" else (16, 12)
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, 40, k, stride=stride)
    w_cfg = TensorQuantConfig(bits=4, symmetric=True, granularity=granularity, group_size=16)
    x = realistic_input((2, in_ch) + size, 3)
    layer = calibrated(QuantConv2d(conv, LayerPlan("conv", w_cfg, act_cfg(act))), x)
    assert to_int_backend(nn.Sequential(layer))[1] == {}
    int_layer = IntConv2d(layer)
    check_layer(layer, int_layer, x)


def test_unsupported_conv_reasons():
    w_cfg = TensorQuantConfig(bits=8, symmetric=True, granularity="per_channel")
    cases = {
        "padded": (nn.Conv2d(3, 8, 3, padding=1), "affine", "padded"),
        "overlap": (nn.Conv2d(3, 8, 3, stride=1), "affine", "overlapping"),
        "grouped": (nn.Conv2d(8, 8, 1, groups=2), "affine", "grouped"),
        "token_patch": (nn.Conv2d(3, 8, 4, stride=4), "per_token", "per-token"),
    }
    for name, (conv, act, word) in cases.items():
        x = realistic_input((1, conv.in_channels, 8, 8), 0)
        layer = calibrated(QuantConv2d(conv, LayerPlan(name, w_cfg, act_cfg(act))), x)
        _, fallbacks = to_int_backend(nn.ModuleDict({name: layer}))
        assert word in fallbacks[name], fallbacks


class MixedNet(nn.Module):
    """A padded 3x3 stem (falls back), a patch conv, a 1x1 conv, then token-wise linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.patch = nn.Conv2d(16, 32, 4, stride=4)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.gelu(self.pw(self.patch(x))).flatten(2).transpose(1, 2)
        x = F.gelu(self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x))))))
        return self.head(x.mean(1))


def test_fallbacks_and_mixed_layouts():
    torch.manual_seed(0)
    model = MixedNet().eval()
    images = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    recipe = {
        "weight": {"bits": 8, "granularity": "per_channel"},
        "act": {"bits": 8, "symmetric": False},
        "layers": {
            "fc1": {"a_bits": 16},
            "fc2": {"a_bits": None},
            "fc3": {"w_bits": 3, "w_granularity": "per_group", "group_size": 16},
            "head": {"w_bits": 4},
            "pw": {"a_bits": 6},
        },
    }
    qmodel = qsweep.quantize(model, recipe, images[:2])
    int_model, fallbacks = to_int_backend(qmodel)
    assert set(fallbacks) == {"stem", "fc1", "fc2"}, fallbacks
    assert "padded" in fallbacks["stem"]
    assert "16 > 8" in fallbacks["fc1"]
    assert "float activations" in fallbacks["fc2"]
    for name in ("patch", "pw"):
        assert isinstance(int_model.get_submodule(name), IntConv2d)
    for name in ("fc3", "head"):
        assert isinstance(int_model.get_submodule(name), IntLinear)
    assert isinstance(int_model.get_submodule("stem"), QuantConv2d)
    assert int_model.get_submodule("fc3").groups == 4
    # The source model is untouched; the int layers hold no float weight.
    assert all(not isinstance(m, IntGemm) for m in qmodel.modules())
    for m in int_model.modules():
        if isinstance(m, IntGemm):
            assert "weight" not in m.state_dict() and m.weight.numel() == 0 and m.weight_t.dtype == torch.int8
            float_numel = sum(t.numel() for t in m.buffers() if t.is_floating_point())
            assert float_numel <= (m.groups + 1) * m.out_features + 1  # scales, bias, 1 / s_a
    for x in images:
        assert check_int_layers(qmodel, int_model, x) == 4  # patch, pw, fc3, head
    same, total, _ = end_to_end(qmodel, int_model, images)
    assert same >= AGREE * total


def test_conversion_is_a_copy_without_float_weights():
    w_cfg = TensorQuantConfig(bits=8, symmetric=True, granularity="per_channel")
    layer = quant_linear(w_cfg, act_cfg("affine"), k=512, n=256)
    holder = nn.Sequential(layer)
    int_model, _ = to_int_backend(holder)
    assert holder[0] is layer and isinstance(int_model[0], IntLinear)
    int_bytes = sum(t.numel() * t.element_size() for t in int_model.buffers())
    assert int_bytes < 0.3 * layer.weight.numel() * 4  # ~1 byte per weight + per-channel constants


def test_uncalibrated_layer_falls_back():
    w_cfg = TensorQuantConfig(bits=8, symmetric=True, granularity="per_channel")
    layer = QuantLinear(nn.Linear(16, 8), LayerPlan("fc", w_cfg, act_cfg("affine")))
    layer.act.start_observing()
    assert "not calibrated" in to_int_backend(nn.Sequential(layer))[1]["0"]


def end_to_end(qmodel, int_model, batches) -> tuple[int, int, float]:
    """Images whose int and fake-quant predictions agree, images, max |logit difference| (printed only)."""
    same = total = 0
    max_diff = 0.0
    with torch.no_grad():
        for x in batches:
            fake, ints = qmodel(x), int_model(x)
            same += int((fake.argmax(1) == ints.argmax(1)).sum())
            total += len(x)
            max_diff = max(max_diff, (fake - ints).abs().max().item())
    return same, total, max_diff


@pytest.mark.parametrize("w_bits", [8, 4])
def test_digits_vit_predictions_identical(digits_vit, digits_bundle, w_bits):
    cfg = QuantConfig()
    recipe = {"weight": {"bits": w_bits, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False}}
    qmodel = qsweep.quantize(digits_vit, recipe, calibration_batches(digits_bundle, cfg.calib))
    int_model, fallbacks = to_int_backend(qmodel)
    assert fallbacks == {}
    assert sum(isinstance(m, IntGemm) for m in int_model.modules()) == len(quant_layers(qmodel))
    batches = [x for x, _ in eval_loader(digits_bundle, DataConfig())]
    assert check_int_layers(qmodel, int_model, batches[0]) == len(quant_layers(qmodel))
    same, total, diff = end_to_end(qmodel, int_model, batches)
    print(f"\ndigits W{w_bits}A8: {same}/{total} predictions identical, max |logit diff| {diff:.3g}")
    assert same >= AGREE * total


def test_deit_small_w8a8():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit3_small_patch16_224", num_classes=100).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    recipe = {"weight": {"bits": 8, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False}}
    qmodel = qsweep.quantize(model, recipe, [images])
    int_model, fallbacks = to_int_backend(qmodel)
    assert fallbacks == {}
    assert isinstance(int_model.patch_embed.proj, IntConv2d)
    # Every GEMM shape of DeiT-S once (its int GEMMs take ~0.1 s each here): the first and last blocks.
    assert check_int_layers(qmodel, int_model, images, ("patch_embed.", "blocks.0.", "blocks.11.", "head")) == 10
    same, total, diff = end_to_end(qmodel, int_model, [images])
    print(f"\nDeiT-S W8A8: {same}/{total} predictions identical, max |logit diff| {diff:.3g}")
    assert same >= AGREE * total
