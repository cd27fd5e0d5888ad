"""Our int8 Linear against oneDNN's fused one (what inductor lowers pt2e to), per DeiT-S shape, 1 thread.

    .venv/bin/python experiments/bench/bench_onednn.py        # ~1 min

For each distinct Linear shape of DeiT-S at batch 16 and batch 1 (random weights, W8A8, per-tensor
affine activations), milliseconds per call, best of 5 x 20 calls:

* ``fp32``: ``F.linear``;
* ``_int_mm``: the int8 GEMM alone on the layer's codes;
* ``quantize``: :meth:`~qsweep.quant.intkernel.IntGemm.quantize_input`, the input's int8 codes;
* ``qsweep``: :meth:`~qsweep.quant.intkernel.IntGemm.gemm`, what the integer backend runs (quantize the
  input, ``_int_mm``, exact zero-point correction, cast, scale and bias);
* ``onednn``: ``torch.ops.onednn.qlinear_pointwise`` on the same codes and scales with a weight packed
  once by ``onednn::qlinear_prepack`` (quantization of the input excluded), float32 output, bias fused;
* ``prepack``: ``onednn::qlinear_prepack`` of the weight: what an exported program would pay in every
  forward, since the packed weight is an opaque mkldnn tensor that no file stores (and the op takes
  no other weight: a plain int8 one crashes the process).

Prints the per-shape table and the prepack cost summed over the model's Linears.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int import cpu_description

import qsweep
from qsweep.quant.intkernel import IntLinear, to_int_backend


def ms(fn: Callable[[], object], calls: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = timm.create_model("deit3_small_patch16_224", num_classes=100).eval()
    recipe = {"weight": {"bits": 8, "symmetric": True, "granularity": "per_channel"},
              "act": {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"}}
    int_model, _ = to_int_backend(qsweep.quantize(fp, recipe, [torch.randn(8, 3, 224, 224)]))
    layers: dict[tuple[int, int], IntLinear] = {}
    counts: Counter[tuple[int, int]] = Counter()  # the 48 block Linears by shape (the 100-class head left out)
    for m in int_model.modules():
        if isinstance(m, IntLinear) and m.groups == 1 and m.out_features > 100:
            layers.setdefault((m.in_features, m.out_features), m)
            counts[m.in_features, m.out_features] += 1

    print(f"torch {torch.__version__}, 1 thread on {cpu_description()}; ms per call, best of 5 x 20")
    print(f"{'M x K x N':>18} {'fp32':>8} {'_int_mm':>8} {'quantize':>8} {'qsweep':>8} {'onednn':>8} {'prepack':>8}")
    prepack_total = 0.0
    for rows in (16 * 197, 197):
        for (k, n), layer in layers.items():
            x = torch.randn(rows, k) * 2
            w_float = torch.randn(n, k)
            q, _, _ = layer.quantize_input(x)
            w8 = layer.weight_t.t().contiguous()  # [N, K], as prepack takes it
            w_scale = layer.scale[0] / layer.a_scale
            zeros = torch.zeros(n, dtype=torch.long)
            u8 = (q.to(torch.int16) + 128).to(torch.uint8)  # the same codes on oneDNN's unsigned grid
            zp = layer.a_c + 128
            packed = torch.ops.onednn.qlinear_prepack(w8, [rows, k])

            def onednn() -> torch.Tensor:
                return torch.ops.onednn.qlinear_pointwise(u8, layer.a_scale, zp, packed, w_scale, zeros, layer.bias,
                                                          1.0, 0, torch.float32, "none", [None], "")

            ours = layer.gemm(x)
            torch.testing.assert_close(onednn(), ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
            row = [ms(lambda: F.linear(x, w_float, layer.bias)), ms(lambda: torch._int_mm(q, layer.weight_t)),
                   ms(lambda: layer.quantize_input(x)), ms(lambda: layer.gemm(x)), ms(onednn),
                   ms(lambda: torch.ops.onednn.qlinear_prepack(w8, None), calls=5)]
            if rows == 197:
                prepack_total += row[-1] * counts[(k, n)]
            print(f"{f'{rows} x {k} x {n}':>18}" + "".join(f"{v:>9.3f}" for v in row))
    print(f"prepacking every Linear of the model once: {prepack_total:.1f} ms")


if __name__ == "__main__":
    main()
