"""What quant.rotate costs at inference: DeiT-S (random weights) on integer kernels, W4A8 without it, with
every rotation online at each block size, and with the residual stream's rotations folded into the weights
(quant.rotate.residual: only fc2's input rotated online; "folded only": online=false, none at run time).

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

ROTATIONS = {f"rotate {block}": {"enabled": True, "block_size": block} for block in (32, 64, 128)}
ROTATIONS["folded 64"] = {"enabled": True, "residual": True}
ROTATIONS["folded only"] = {"enabled": True, "residual": True, "online": False}
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
    models = {"fp32": fp, "int": to_int_backend(qsweep.quantize(fp, W4A8, calib))[0]}
    for name, rotate in ROTATIONS.items():
        models[name] = to_int_backend(qsweep.quantize(fp, {**W4A8, "rotate": rotate}, calib))[0]
    x = torch.randn(16, 3, 224, 224)
    print(f"{'batch':>5} {'fp32 ms':>8} " + " ".join(f"{name:>10}" for name in models if name != "fp32")
          + "   (time / FP32, then / int; rotate N: W4A8 int with quant.rotate.block_size=N)")
    for batch, repeats in ((16, 3), (1, 10)):
        xb = x[:batch]
        times = {name: [] for name in models}
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for name, model in models.items():
                times[name].append(seconds(model, xb))
        med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
        print(f"{batch:5d} {med['fp32'] * 1e3:8.0f} "
              + " ".join(f"{med[name] / med['fp32']:9.3f}x" for name in models if name != "fp32"), flush=True)
        print(f"{'':5} {'/ int':>8} " + " ".join(f"{med[name] / med['int']:9.3f}x" for name in models
                                                 if name != "fp32"), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
