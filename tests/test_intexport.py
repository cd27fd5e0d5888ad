"""The integer-kernel artifact (`export.kernels=int`): packed codes, same size as the fake-quant artifact,
``torch._int_mm`` in the exported graph, outputs ``torch.equal`` to the in-process int backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qsweep
from qsweep.config import DataConfig, QuantConfig
from qsweep.data import calibration_batches, eval_loader
from qsweep.export import artifact_form, export_program, load_program, state_dict_size_mb
from qsweep.quant.intexport import PackedIntConv2d, PackedIntLinear, int_artifact_layers, pack_planes, unpack_planes
from qsweep.quant.intkernel import to_int_backend
from qsweep.quant.modules import QuantLinear


@pytest.mark.parametrize("bits", range(1, 9))
def test_planes_round_trip_at_the_packed_size(bits):
    for k in (5, 13, 64):
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (k, 7), dtype=torch.int8)
        planes = pack_planes(codes, bits)
        assert planes.dtype == torch.int8 and torch.equal(unpack_planes(planes, bits, k), codes)
    assert planes.numel() == 64 * bits // 8 * 7  # exactly b bits per code when K allows
    with pytest.raises(ValueError, match="signed"):
        pack_planes(torch.full((8, 1), 2 ** (bits - 1)), bits)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("weight", [
    {"symmetric": True, "granularity": "per_channel"},
    {"symmetric": False, "granularity": "per_group", "group_size": 32},
    {"symmetric": False, "granularity": "per_tensor", "scale_dtype": "float16"},
])
@pytest.mark.parametrize("act", [{"symmetric": False}, {"symmetric": True}, {"granularity": "per_token"}])
def test_packed_layers_equal_the_int_backend(weight, act):
    model = mlp()
    for bits in (2, 3, 4, 8):
        q = qsweep.quantize(model, {"weight": {"bits": bits, **weight}, "act": {"bits": 8, **act}},
                            [torch.randn(16, 64)])
        packed, fallbacks = int_artifact_layers(q)
        assert fallbacks == {} and all(isinstance(m, PackedIntLinear) for m in packed if not isinstance(m, nn.GELU))
        x = torch.randn(7, 64)
        with torch.no_grad():
            assert torch.equal(packed(x), to_int_backend(q)[0](x)), bits


def test_exported_int_artifact(tmp_path):
    """Dynamic batch, outputs equal to the in-process int backend, int8 GEMMs in the graph, a fallback
    layer on the fake-quant forward, no size growth over the fake-quant artifact, passes the checker."""
    q = qsweep.quantize(mlp(), {"weight": {"bits": 4}, "act": {"bits": 8, "symmetric": False},
                                "layers": {"2": {"a_bits": 16}}}, [torch.randn(16, 64)])
    runner, fallbacks = to_int_backend(q)
    assert set(fallbacks) == {"2"}
    form = artifact_form(q, "int")
    assert isinstance(form[0], PackedIntLinear) and isinstance(form[2], QuantLinear) and form[2].packed is not None
    path = export_program(q, torch.randn(3, 64), tmp_path / "int.pt2", kernels="int")
    loaded = load_program(path)  # inspect_artifact accepts it
    program = torch.export.load(str(path))
    assert "aten._int_mm" in str(program.graph) and not program.constants
    with torch.no_grad():
        for batch in (1, 5, 33):
            x = torch.randn(batch, 64)
            assert torch.equal(loaded(x), runner(x))
    fake = load_program(export_program(q, torch.randn(3, 64), tmp_path / "fake.pt2"))
    assert state_dict_size_mb(loaded) <= state_dict_size_mb(fake)
    with pytest.raises(ValueError, match="kernels='float'"):
        artifact_form(q, "float")


@pytest.mark.parametrize("w_bits", [4, 8])
def test_digits_vit_int_artifact_reproduces_the_int_backend(digits_vit, digits_bundle, tmp_path, w_bits):
    recipe = {"weight": {"bits": w_bits, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False}}
    qmodel = qsweep.quantize(digits_vit, recipe, calibration_batches(digits_bundle, QuantConfig().calib))
    runner, fallbacks = to_int_backend(qmodel)
    batches = [x for x, _ in eval_loader(digits_bundle, DataConfig())]
    loaded = load_program(export_program(qmodel, batches[0], tmp_path / "int.pt2", kernels="int"))
    assert fallbacks == {} and any(isinstance(m, PackedIntConv2d) for m in artifact_form(qmodel, "int").modules())
    with torch.no_grad():
        for x in batches:
            assert torch.equal(loaded(x), runner(x))
