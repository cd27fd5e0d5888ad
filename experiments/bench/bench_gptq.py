"""GPTQ wall time on DeiT-S (random weights, 224 px random-normal calibration images).

    OMP_NUM_THREADS=2 .venv/bin/python experiments/bench/bench_gptq.py [--num-samples S] [--threads T]
        [--bits B] [--act-bits A] [--no-sequential]

Quantizes ``deit3_small_patch16_224`` (100 classes) W4A8 (per-channel symmetric weights, per-tensor
affine activations) with nearest rounding and with GPTQ over all 48 block Linears, the patch
embedding conv and the head, and prints the stages of :func:`qsweep.quantize` for each: weight
quantization, activation calibration, and GPTQ's Hessian collection and rounding. The last row is
the shipped ``conf/quant/w4a8`` recipe (MSE weight ranges, Hadamard rotation, GPTQ) as a user runs it.
"""

from __future__ import annotations

import argparse
import time

import torch

MODEL = "deit3_small_patch16_224"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--no-sequential", action="store_true", help="all Hessians from one nearest-rounded pass")
    args = p.parse_args()

    import timm

    import qsweep
    from qsweep.config import shipped_recipe
    from qsweep.quant.calibrate import QuantizeTimings

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=100).eval()
    images = torch.randn(args.num_samples, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batches = list(images.split(32))
    recipe = {"weight": {"bits": args.bits, "granularity": "per_channel"},
              "act": {"bits": args.act_bits, "symmetric": False}}
    gptq = {"enabled": True, "num_samples": args.num_samples, "sequential": not args.no_sequential}

    print(f"{MODEL}, W{args.bits}A{args.act_bits} per-channel, {args.num_samples} images, "
          f"{args.threads} threads, sequential={gptq['sequential']}")
    print(f"{'rounding':9} {'total s':>8} {'weights s':>9} {'calib s':>8} {'gptq s':>7} {'hessian s':>9} "
          f"{'round s':>8} {'layers':>6} {'skipped':>7} {'err reduction':>13}")
    shipped = shipped_recipe("w4a8")
    shipped.gptq.num_samples = args.num_samples
    for name, r in (("nearest", recipe), ("gptq", {**recipe, "gptq": gptq}), ("w4a8", shipped)):
        t = QuantizeTimings()
        start = time.perf_counter()
        qsweep.quantize(model, r, batches, timings=t)
        total = time.perf_counter() - start
        s = t.reconstruct.get("gptq")
        row = f"{name:9} {total:8.1f} {t.quantize_s:9.1f} {t.calibrate_s:8.1f} {t.reconstruct_s:7.1f}"
        if s is not None:
            row += (f" {s['hessian_s']:9.1f} {s['round_s']:8.1f} {len(s['layers']):6d} {len(s['skipped']):7d}"
                    f" {s['error_reduction']:13.3f}")
        print(row, flush=True)


if __name__ == "__main__":
    main()
