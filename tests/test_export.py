"""The artifact: torch.export program with packed weights, dynamic batch, honest size, same outputs."""

import pytest
import torch
from torch import nn

import qsweep
from qsweep.export import artifact_form, export_program, load_program, state_dict_size_mb


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("weight_cfg", [
    {"symmetric": True, "granularity": "per_channel"},
    {"symmetric": False, "granularity": "per_group", "group_size": 32},
    {"symmetric": False, "granularity": "per_tensor"},
])
def test_artifact_form_is_bit_identical(bits, weight_cfg):
    model = mlp()
    q = qsweep.quantize(model, {"weight": {"bits": bits, **weight_cfg}}, [torch.randn(16, 64)])
    x = torch.randn(7, 64)
    assert torch.equal(artifact_form(q)(x), q(x))


def test_export_roundtrip_dynamic_batch_and_size(tmp_path):
    model = mlp()
    q = qsweep.quantize(model, {"weight": {"bits": 4}, "skip": ["4"]}, [torch.randn(16, 64)])
    path = export_program(q, torch.randn(3, 64), tmp_path / "m.pt2")
    loaded = load_program(path)
    for batch in (1, 5, 33):
        x = torch.randn(batch, 64)
        assert torch.equal(loaded(x), q(x))
    # 4-bit packed codes: half a byte per quantized weight; fp32 scales, biases, float head.
    quantized = 64 * 256 + 256 * 64
    expected = quantized / 2 + 4 * (256 + 64) + 4 * (256 + 64) + 4 * (64 * 10 + 10) + 2 * 8  # + act qparams
    state = loaded.state_dict()
    assert sum(t.numel() * t.element_size() for t in state.values()) == expected
    size = state_dict_size_mb(loaded) * 1e6
    assert expected < size <= expected + 512 * len(state)  # + torch.save's per-record bookkeeping
    assert state_dict_size_mb(model) * 1e6 > 6 * expected
    program = torch.export.load(str(path))
    assert not program.constants, "weights must be state-dict buffers, counted by the grader"
