"""ExecuTorch .pte export, where the optional executorch package is installed (`make test-executorch`)."""

import pytest
import torch
from torch import nn

import qsweep
from qsweep.errors import QsweepError
from qsweep.export import export_pte


def quantized_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)).eval()
    return qsweep.quantize(model, {"weight": {"bits": 8}, "act": {"bits": 8}}, [torch.randn(16, 64)])


def test_pte_runs_like_the_quantized_model(tmp_path):
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    q = quantized_mlp()
    path = export_pte(q, torch.randn(2, 64), tmp_path / "m.pte", max_batch=8)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    for batch in (1, 8):
        x = torch.randn(batch, 64)
        # Portable kernels sum in another order than ATen's: equal up to float rounding.
        torch.testing.assert_close(method.execute([x])[0], q(x), rtol=1e-5, atol=1e-6)


def test_missing_executorch_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    with pytest.raises(QsweepError, match=r"pip install -e '.\[executorch\]'"):
        export_pte(quantized_mlp(), torch.randn(2, 64), tmp_path / "m.pte")
