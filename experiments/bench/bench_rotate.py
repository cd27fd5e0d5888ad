"""What quant.rotate costs at inference: DeiT-S (random weights) on integer kernels, W4A8 with and without it.

    .venv/bin/python experiments/bench/bench_rotate.py

Paired medians in one process, 1 torch thread, ratios against the FP32 eager model.
"""

import os
import statistics
import time

import timm
import torch

import qsweep
from qsweep.quant.intkernel import to_int_backend

W4A8 = {"weight": {"bits": 4, "granularity": "per_channel"}, "act": {"bits": 8}}


def seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = timm.create_model("deit3_small_patch16_224", num_classes=100).eval()
    calib = [torch.randn(8, 3, 224, 224)]
    plain, _ = to_int_backend(qsweep.quantize(fp, W4A8, calib))
    rotated, _ = to_int_backend(qsweep.quantize(fp, {**W4A8, "rotate": {"enabled": True}}, calib))
    x = torch.randn(16, 3, 224, 224)
    for batch, repeats in ((16, 3), (1, 10)):
        xb = x[:batch]
        times = {name: [] for name in ("fp32", "int", "int+rotate")}
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for name, model in (("fp32", fp), ("int", plain), ("int+rotate", rotated)):
                times[name].append(seconds(model, xb))
        med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
        print(f"batch {batch:2d}: fp32 {med['fp32'] * 1e3:.0f} ms | int W4A8 {med['int'] / med['fp32']:.3f}x | "
              f"int W4A8 + rotate {med['int+rotate'] / med['fp32']:.3f}x | rotate / plain "
              f"{med['int+rotate'] / med['int']:.3f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
