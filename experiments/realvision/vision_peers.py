"""Peers on an image classifier: torchao's pt2e flow (X86InductorQuantizer) and NNCF's ``nncf.quantize``.

pt2e: ``torch.export`` (dynamic batch) -> ``prepare_pt2e`` -> calibrate -> ``convert_pt2e``; the
converted reference program computes in float around explicit quantize / dequantize ops. The
quantizer config is experiments/realweights/peers.py's (x86 default; for W4 the weight range
narrowed to [-8, 7] on int8 storage). NNCF: ``nncf.quantize`` with its defaults (performance
preset: 8-bit symmetric per-channel weights, 8-bit per-tensor activations, fast bias correction)
on a copy of the model, calibrated one image per sample.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "realweights"))
import peers  # noqa: E402  experiments/realweights/peers.py: available(), _config(w_bits)

# NNCF compiles a small C++ extension on first use (about 2 minutes on 2 cores): no 60 s limit.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
NNCF_INSTALL = "pip install -e '.[peers]'"


def nncf_available() -> str | None:
    """None when NNCF imports, else why not."""
    try:
        import nncf  # noqa: F401
    except Exception as exc:  # ImportError, or a version clash raised at import
        return f"nncf not available ({type(exc).__name__}: {exc}): {NNCF_INSTALL}"
    return None


def pt2e(model: nn.Module, calib: list[torch.Tensor], w_bits: int) -> nn.Module:
    """torchao pt2e with the x86 inductor quantizer, calibrated on ``calib`` batches."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = (calib[0][:4],)
    graph = torch.export.export(copy.deepcopy(model).eval(), example,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    prepared = prepare_pt2e(graph, x86.X86InductorQuantizer().set_global(peers._config(w_bits)))
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    return convert_pt2e(prepared)


def nncf_quantize(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """``nncf.quantize`` defaults on a copy of ``model``; every calibration image is one sample."""
    import nncf

    images = [x[None] for batch in calib for x in batch]
    return nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset(images), subset_size=len(images))
