"""AdaRound wall time and peak RSS on DeiT-S (random weights, 224 px random-normal calibration images).

    .venv/bin/python experiments/bench/bench_adaround.py [--modes layer block] [--blocks N | --full]
        [--num-samples S] [--layer-iters I] [--layer-rows R] [--block-iters I] [--block-rows R] [--threads T]

Each mode runs in a fresh subprocess (so its peak RSS is its own) that quantizes DeiT-S W4A8
(per-channel symmetric weights, per-tensor affine activations) and times ``apply_adaround`` alone.
``--blocks N`` rounds the weights of the first N of the 12 transformer blocks only (every other
layer keeps float weights, so AdaRound skips it) and extrapolates the time to all 12 blocks
linearly; ``--full`` rounds all 48 block Linears plus the patch embedding and the head.
The loss columns are AdaRound's own per-unit reconstruction losses on the calibration samples:
nearest rounding vs learned, as the geometric mean of after/before over units.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import peak_rss

MODEL = "deit3_small_patch16_224"
DEPTH = 12


def child(args: argparse.Namespace) -> None:
    import timm

    import qsweep
    from qsweep.quant.adaround import apply_adaround

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=100).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.num_samples, 3, 224, 224, generator=gen)
    batches = list(images.split(32))
    blocks = DEPTH if args.full else args.blocks
    float_layers = {f"blocks.{i}": {"w_bits": None} for i in range(blocks, DEPTH)}
    if not args.full:
        float_layers.update({"patch_embed.proj": {"w_bits": None}, "head": {"w_bits": None}})
    recipe = {"weight": {"bits": 4, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False},
              "layers": float_layers}
    q = qsweep.quantize(model, recipe, batches)
    if args.mode == "layer":
        cfg = {"mode": "layer", "iters": args.layer_iters, "rows_per_iter": args.layer_rows}
    else:
        cfg = {"mode": "block", "iters": args.block_iters, "rows_per_iter": args.block_rows}
    cfg.update(num_samples=args.num_samples, batch_size=32)
    out: dict = {}
    with peak_rss(out):
        start = time.perf_counter()
        stats = apply_adaround(q, model, batches, cfg)
        seconds = time.perf_counter() - start
    ratios = [s["loss_after"] / s["loss_before"] for s in stats.values() if s["loss_before"] > 0]
    print(json.dumps({
        "mode": args.mode, "blocks": blocks, "units": len(stats), "seconds": seconds, "peak_mb": out["peak"],
        "optimize_s": sum(s["seconds"] for s in stats.values()), "iters": cfg["iters"],
        "rows_per_iter": cfg["rows_per_iter"], "loss_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
        "kept_nearest": sum(s["kept"] == "nearest" for s in stats.values()),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["layer", "block"], choices=["layer", "block"])
    p.add_argument("--blocks", type=int, default=2, help="time the first N blocks and extrapolate to 12")
    p.add_argument("--full", action="store_true", help="all 12 blocks, the patch embedding and the head")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--layer-iters", type=int, default=300)
    p.add_argument("--layer-rows", type=int, default=512, help="layer mode: tokens per iteration")
    p.add_argument("--block-iters", type=int, default=200)
    p.add_argument("--block-rows", type=int, default=394, help="block mode: tokens per iteration (2 images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", help=argparse.SUPPRESS)  # set in the per-mode subprocess
    args = p.parse_args()
    if args.mode:
        child(args)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, {MODEL} random weights, W4A8, "
          f"{args.num_samples} calibration images")
    header = (f"{'mode':<6} {'blocks':>6} {'units':>5} {'iters':>5} {'rows/it':>7} {'seconds':>8} "
              f"{'est. 12 blocks s':>16} {'peak RSS MB':>11} {'loss after/before':>17} {'kept nearest':>12}")
    print(header)
    print("-" * len(header))
    for mode in args.modes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        est = r["seconds"] * DEPTH / r["blocks"]
        print(f"{mode:<6} {r['blocks']:>6} {r['units']:>5} {r['iters']:>5} {r['rows_per_iter']:>7} "
              f"{r['seconds']:>8.1f} {est:>16.1f} {r['peak_mb']:>11.0f} {r['loss_ratio']:>17.3f} "
              f"{r['kept_nearest']:>12}")


if __name__ == "__main__":
    main()
