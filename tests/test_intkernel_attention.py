"""Integer attention (`quant.vit.attn_matmul` on the int backend): every layer within its float bound of
fake-quant on real activations (test_intkernel.check_int_layers), the exported route equal to the in-process
one, predictions agreeing with fake-quant on the digits test set."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

import qsweep
from qsweep.config import DataConfig, QuantConfig
from qsweep.data import calibration_batches, eval_loader
from qsweep.export import export_program, load_program
from qsweep.quant.intexport import int_artifact_layers
from qsweep.quant.intkernel import IntAttention, attention_ineligible, to_int_backend
from test_intkernel import AGREE, check_int_layers, end_to_end


def recipe(symmetric: bool, softmax: str = "uniform") -> dict:
    return {"weight": {"bits": 8, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": symmetric},
            "vit": {"attn_matmul": True, "softmax_quantizer": softmax}}


@pytest.mark.parametrize("dim, heads", [(64, 4), (48, 6)])  # head_dim 16: scale 2^-2 folded into q's grid; 8: not
@pytest.mark.parametrize("symmetric", [False, True])
def test_int_mm_route_equals_the_float_route(dim, heads, symmetric):
    """The per-head _int_mm route and the float-matmul route (the exported one) give the same outputs, including
    past the sequence length where p v's partial sums could exceed 2^24 (both then take the float route)."""
    torch.manual_seed(0)
    block = nn.Sequential(Block(dim, heads)).eval()
    for n in (33, 300):
        qmodel = qsweep.quantize(block, recipe(symmetric), [torch.randn(2, n, dim) for _ in range(2)])
        runner, fallbacks = to_int_backend(qmodel)
        attn = runner[0].attn
        assert fallbacks == {} and isinstance(attn, IntAttention) and (attn.q_prescale is None) == (dim == 64)
        x = torch.randn(3, n, dim)
        with torch.no_grad():
            ints = runner(x)
            attn.int_mm = False
            assert torch.equal(runner(x), ints)
        if n == 33:  # a long sequence's float p v is not exact: the bounds are for the integer route
            assert check_int_layers(qmodel, runner, x) == 5  # qkv, attention, proj, fc1, fc2


@pytest.mark.parametrize("symmetric", [False, True])
def test_digits_vit_int_attention(digits_vit, digits_bundle, tmp_path, symmetric):
    qmodel = qsweep.quantize(digits_vit, recipe(symmetric), calibration_batches(digits_bundle, QuantConfig().calib))
    runner, fallbacks = to_int_backend(qmodel)
    blocks = len(digits_vit.blocks)
    assert fallbacks == {} and sum(isinstance(m, IntAttention) for m in runner.modules()) == blocks
    exported_form, _ = int_artifact_layers(qmodel)
    batches = [x for x, _ in eval_loader(digits_bundle, DataConfig())]
    with torch.no_grad():
        for x in batches:
            assert torch.equal(exported_form(x), runner(x))
    assert check_int_layers(qmodel, runner, batches[0]) == 5 * blocks + 2  # + patch_embed, head
    same, total, max_diff = end_to_end(qmodel, runner, batches)
    print(f"\ndigits W8A8 + int attention (symmetric={symmetric}): {same}/{total} predictions identical, "
          f"max |logit diff| {max_diff:.3g}")
    assert same >= AGREE * total
    if not symmetric:
        loaded = load_program(export_program(qmodel, batches[0], tmp_path / "a.pt2", kernels="int"))
        with torch.no_grad():
            assert torch.equal(loaded(batches[1]), runner(batches[1]))


def test_log2_softmax_stays_on_fake_quant(digits_vit, calib):
    qmodel = qsweep.quantize(digits_vit, recipe(False, "log2"), calib)
    runner, fallbacks = to_int_backend(qmodel)
    assert fallbacks == {} and not any(isinstance(m, IntAttention) for m in runner.modules())
    assert "Log2Quantizer" in attention_ineligible(qmodel.blocks[0].attn)
