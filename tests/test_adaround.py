"""AdaRound on the digits ViT and on a real layer: rounding bounds, held-out error, block mode, errors."""

import copy

import pytest
import timm
import torch
from torch import nn

import qsweep
from qsweep.config import CalibConfig, ConfigError, DataConfig
from qsweep.data import calibration_batches, eval_loader
from qsweep.evaluate import evaluate, model_fingerprint
from qsweep.quant.adaround import apply_adaround
from qsweep.quant.calibrate import QuantizeTimings, prepare
from qsweep.quant.modules import quant_layers
from qsweep.quant.grid import quantize
from qsweep.quant.reconstruct import ReconstructionError, find_blocks

W3 = {"weight": {"bits": 3, "granularity": "per_channel"}, "act": {"bits": 8}}
FAST = {"iters": 40, "num_samples": 32, "batch_size": 16, "rows_per_iter": 128}


pytestmark = pytest.mark.usefixtures("one_thread")


def nearest_codes(layer, w):
    q = layer.qweight
    return quantize(w.detach().float().reshape(q.codes.shape), q.scale, q.zero_point, q.grid)


def test_codes_move_at_most_one_step_from_nearest(digits_vit, calib):
    q = qsweep.quantize(digits_vit, W3, calib)
    before = {n: (m.qweight.scale.clone(), m.qweight.zero_point.clone()) for n, m in quant_layers(q).items()}
    stats = apply_adaround(q, digits_vit, calib, {"mode": "layer", **FAST})
    assert set(stats) == set(before)
    moved = 0
    for name, layer in quant_layers(q).items():
        w = digits_vit.get_submodule(name).weight
        diff = (layer.qweight.codes.float() - nearest_codes(layer, w)).abs()
        assert diff.max() <= 1, name
        if stats[name]["kept"] == "nearest":  # learned rounding scored worse on the samples (it may, per layer)
            assert diff.max() == 0 and stats[name]["loss_after"] > stats[name]["loss_before"], name
        moved += int(diff.sum())
        assert torch.equal(layer.qweight.scale, before[name][0])
        assert torch.equal(layer.qweight.zero_point, before[name][1])
        assert layer.qweight.codes.dtype == torch.int16
        torch.testing.assert_close(layer.weight, layer.qweight.dequantize())  # the forward uses the new codes
    assert moved > 0  # it did learn something other than nearest rounding


def fc1_data(model, bundle, n):
    """Real inputs of ``blocks.1.mlp.fc1`` ([images, tokens, 64]) on ``n`` training images."""
    images = calibration_batches(bundle, CalibConfig(num_images=n, batch_size=n))[0]
    seen = []
    handle = model.blocks[1].mlp.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_lowers_held_out_error_of_a_real_layer(digits_vit, digits_bundle, bits):
    x = fc1_data(digits_vit, digits_bundle, 192)
    layer = nn.Sequential(copy.deepcopy(digits_vit.blocks[1].mlp.fc1))
    train, held_out = [x[:32], x[32:64]], x[64:]
    recipe = {"weight": {"bits": bits, "granularity": "per_channel"}, "act": {"bits": None}}
    nearest = qsweep.quantize(layer, recipe, train)
    learned = apply_and_return(layer, recipe, train)
    with torch.no_grad():
        ref = layer(held_out)
        err_nearest = (nearest(held_out) - ref).pow(2).mean().item()
        err_learned = (learned(held_out) - ref).pow(2).mean().item()
    assert err_learned < 0.8 * err_nearest, (err_learned, err_nearest)


def apply_and_return(layer, recipe, train):
    q = qsweep.quantize(layer, recipe, train)
    apply_adaround(q, layer, train, {"mode": "layer", "iters": 300, "num_samples": 64, "batch_size": 32})
    return q


def test_block_mode_reduces_block_error(digits_vit, calib):
    q = qsweep.quantize(digits_vit, W3, calib)
    assert list(find_blocks(q)) == [f"blocks.{i}" for i in range(4)]
    stats = apply_adaround(q, digits_vit, calib, {"mode": "block", **FAST, "act_quant": True})
    assert list(stats) == ["patch_embed.proj", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert stats["blocks.0"]["layers"] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                                           "blocks.0.mlp.fc2"]
    for name in ("blocks.0", "blocks.1", "blocks.2", "blocks.3"):
        assert stats[name]["kept"] == "adaround"
        assert stats[name]["loss_after"] < stats[name]["loss_before"], name


def test_find_blocks_resnet():
    model = timm.create_model("resnet18", num_classes=10).eval()
    prepare(model, {"weight": {"bits": 4}}, [torch.randn(1, 3, 32, 32)])
    blocks = find_blocks(model)
    assert list(blocks) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_quantize_end_to_end_keeps_accuracy(digits_vit, digits_bundle, calib):
    loader = eval_loader(digits_bundle, DataConfig(max_eval_images=300))
    nearest = evaluate(qsweep.quantize(digits_vit, W3, calib), loader, 10).top1
    fingerprint = model_fingerprint(digits_vit)
    timings = QuantizeTimings()
    q = qsweep.quantize(digits_vit, W3, calib, adaround={"mode": "layer", **FAST}, timings=timings)
    acc = evaluate(q, loader, 10).top1
    # W3 nearest rounding already sits near the FP ceiling on digits: the two trade a few of the 300 images
    # (AdaRound one image behind on some trained models), so 2 points (6 images) of slack.
    assert acc >= 90.0 and acc >= nearest - 2.0, (acc, nearest)
    assert timings.reconstruct_s > 0 and set(timings.reconstruct) == {"adaround"}
    assert model_fingerprint(digits_vit) == fingerprint  # the FP model is untouched


def test_post_ln_rewritten_weights(digits_vit, calib):
    recipe = {**W3, "vit": {"post_ln": "smooth", "attn_matmul": True}}
    with pytest.raises(ReconstructionError, match="does not come from the FP model"):
        apply_adaround(qsweep.quantize(digits_vit, recipe, calib), digits_vit, calib, {"mode": "layer", **FAST})
    q = qsweep.quantize(digits_vit, recipe, calib, adaround={"mode": "block", **FAST, "iters": 10})
    with torch.no_grad():
        assert torch.isfinite(q(calib[0])).all()


def test_errors_float_weights_and_no_samples(digits_vit, calib):
    float_weights = {"weight": {"bits": 4}, "act": {"bits": 8}, "layers": {"*": {"w_bits": None}}}
    q = qsweep.quantize(digits_vit, float_weights, calib)
    with pytest.raises(ReconstructionError, match=r"adaround.mode='layer'.*nothing to round"):
        apply_adaround(q, digits_vit, calib, {"mode": "layer"})
    q = qsweep.quantize(digits_vit, W3, calib)
    for empty in ([], [torch.empty(0, 1, 16, 16)]):
        with pytest.raises(ReconstructionError, match="no samples"):
            apply_adaround(q, digits_vit, empty, {"mode": "layer"})
    with pytest.raises(ConfigError, match="adaround.mode"):
        qsweep.quantize(digits_vit, W3, calib, adaround={"mode": "blocks"})
