"""The integer grid against torch's own fake-quantize ops and hand-computed values."""

import pytest
import torch

from qsweep.quant.grid import Grid, dequantize, fake_quantize, pack, qparams, quantize, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(32, 197, 64) * 2.5
    grid = Grid(bits, symmetric)
    scale, zp = qparams(x.min(), x.max(), grid)
    ours = fake_quantize(x, scale, zp, grid)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, grid.qmin, grid.qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_torch(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    grid = Grid(bits, symmetric)
    scale, zp = qparams(w.amin(1), w.amax(1), grid)
    ours = fake_quantize(w, scale[:, None], zp[:, None], grid)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, grid.qmin, grid.qmax)
    assert torch.equal(ours, ref)


def test_hand_computed_grid():
    grid = Grid(4, symmetric=True)
    assert (grid.qmin, grid.qmax) == (-8, 7)
    scale, zp = qparams(torch.tensor(-1.875), torch.tensor(1.0), grid)
    assert scale.item() == 0.25 and zp.item() == 0  # absmax / ((qmax - qmin) / 2) = 1.875 / 7.5
    x = torch.tensor([-3.0, -0.125, 0.0, 0.125, 0.375, 1.875])
    # x / 0.25 = -12, -0.5, 0, 0.5, 1.5, 7.5 -> round half to even, clamp to [-8, 7]
    assert quantize(x, scale, zp, grid).tolist() == [-8, -0, 0, 0, 2, 7]
    affine = Grid(2, symmetric=False)
    scale, zp = qparams(torch.tensor(0.5), torch.tensor(3.0), affine)  # range widened to [0, 3]
    assert scale.item() == pytest.approx(1.0) and zp.item() == 0
    assert dequantize(quantize(torch.tensor([2.6, 9.0]), scale, zp, affine), scale, zp).tolist() == [3.0, 3.0]


def test_zero_is_exact_and_constant_range_is_safe():
    for grid in (Grid(8, False), Grid(3, True)):
        scale, zp = qparams(torch.tensor(0.3), torch.tensor(2.0), grid)
        assert fake_quantize(torch.tensor(0.0), scale, zp, grid).item() == 0.0
        scale, zp = qparams(torch.tensor(0.0), torch.tensor(0.0), grid)
        assert torch.isfinite(fake_quantize(torch.zeros(3), scale, zp, grid)).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 1000, 4099])
def test_pack_roundtrip_and_size(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (numel if bits == 8 else -(-numel // 8) * bits)
    assert torch.equal(unpack(packed, bits, numel).long(), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="4 bits"):
        pack(torch.tensor([16]), 4)
