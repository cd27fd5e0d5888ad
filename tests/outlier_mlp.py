"""A small model with a transformer's outlier channels, for the smoothing and rotation tests."""

import torch
from torch import nn


class OutlierMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with a few huge input channels (a transformer's outliers)."""

    def __init__(self, width=32, hidden=64):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        with torch.no_grad():
            self.norm.weight[:3] = torch.tensor([30.0, -25.0, 20.0])

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def make_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, 32, generator=g) for _ in range(n)]


def output_error(q, fp, batches):
    with torch.no_grad():
        return sum(float((q(x) - fp(x)).square().sum()) for x in batches)


def assert_exported_and_int_match(q, x, path):
    """The exported program reproduces ``q`` exactly, and ``fc1`` on integer kernels sees the same input codes
    (smoothing divisor, then rotation) as fake-quant; only the float epilogue rounds differently.
    Returns the integer-kernel model."""
    from qsweep.export import export_program, load_program
    from qsweep.quant.intkernel import to_int_backend
    from qsweep.quant.rotate import hadamard

    with torch.no_grad():
        expected = q(x)
        assert torch.equal(load_program(export_program(q, x, path))(x), expected)
        int_model, fallbacks = to_int_backend(q)
        assert not fallbacks
        h = q.norm(x)
        fake_codes = torch.round(q.fc1.act(q.fc1.scale_input(h)) / q.fc1.act.scale).reshape(-1, 32)
        int_fc1 = int_model.fc1
        x_in = h / int_fc1.input_divisor
        if int_fc1.input_rotation is not None:
            x_in = hadamard(x_in, int_fc1.input_rotation)
        codes = int_fc1.quantize_input(x_in.reshape(-1, 32))[0].double() - int_fc1.a_c
        assert torch.equal(codes + int(q.fc1.act.zero_point), fake_codes + int(q.fc1.act.zero_point))
        torch.testing.assert_close(int_model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    return int_model
