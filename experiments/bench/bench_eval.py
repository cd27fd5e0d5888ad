"""Evaluation and calibration cost of fake-quant models relative to FP32, measured in one process.

    .venv/bin/python experiments/bench/bench_eval.py [--batches N] [--repeats R]

Prints, per model: FP32 eval time, fake-quant W8A8 / W4A8 eval time and their ratios to FP32,
calibration time relative to one FP32 pass over the same images, and each phase's peak RSS
(sampled from /proc while the phase runs). DeiT-S uses random weights (speed does not depend
on them); the digits ViT is the embedded model (trained on first use).
"""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager

import torch

import qsweep
from qsweep.config import DataConfig, ModelConfig, QuantConfig
from qsweep.data import build_data, calibration_batches
from qsweep.models import build_model
from qsweep.models.cache import cache_dir
from qsweep.quant.calibrate import QuantizeTimings


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_rss(out: dict):
    """Sample RSS every 5 ms while the block runs; ``out['peak']`` holds the maximum."""
    out["peak"] = rss_mb()
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            out["peak"] = max(out["peak"], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out["peak"] = max(out["peak"], rss_mb())


@torch.no_grad()
def timed_pass(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds for one pass over ``batches``, and the peak RSS."""
    model(batches[0])  # warm-up: allocator, lazy init
    best, mem = float("inf"), {}
    with peak_rss(mem):
        for _ in range(repeats):
            start = time.perf_counter()
            for x in batches:
                model(x)
            best = min(best, time.perf_counter() - start)
    return best, mem["peak"]


def recipe(w_bits: int) -> dict:
    return {"weight": {"bits": w_bits, "granularity": "per_channel"}, "act": {"bits": 8, "observer": "minmax"}}


def bench_model(label: str, model: torch.nn.Module, batches: list[torch.Tensor], repeats: int) -> list[tuple]:
    model.eval()
    fp_s, fp_mem = timed_pass(model, batches, repeats)
    rows = [(label, "FP32 eval", fp_s, 1.0, fp_mem)]
    for name, w_bits in (("W8A8", 8), ("W4A8", 4)):
        timings = QuantizeTimings()
        cal_mem: dict = {}
        with peak_rss(cal_mem):
            qmodel = qsweep.quantize(model, recipe(w_bits), batches, timings=timings)
        q_s, q_mem = timed_pass(qmodel, batches, repeats)
        rows.append((label, f"fake-quant {name} eval", q_s, q_s / fp_s, q_mem))
        rows.append((label, f"{name} calibration", timings.calibrate_s, timings.calibrate_s / fp_s, cal_mem["peak"]))
        rows.append((label, f"{name} weight quantization", timings.quantize_s, timings.quantize_s / fp_s, cal_mem["peak"]))
        del qmodel
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 images per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes timed; the best is reported")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = []
    digits = build_data(DataConfig())
    vit = build_model(ModelConfig(), digits, cache_dir(None), progress=True)[0]
    calib = QuantConfig().calib
    calib.num_images, calib.batch_size = 16 * args.batches, 16
    rows += bench_model("digits_vit (bs 16)", vit, calibration_batches(digits, calib), args.repeats)

    deit = build_model(ModelConfig(name="deit3_small_patch16_224", weights="random"),
                       _imagenet_like(100), cache_dir(None), progress=False)[0]
    images = [torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(args.batches)]
    rows += bench_model("deit3_small random (bs 16)", deit, images, args.repeats)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.batches} batches x 16 images, "
          f"best of {args.repeats}\n")
    header = f"{'model':<28} {'phase':<26} {'seconds':>9} {'x FP32 eval':>12} {'peak RSS MB':>12}"
    print(header + "\n" + "-" * len(header))
    for model, phase, seconds, ratio, mem in rows:
        print(f"{model:<28} {phase:<26} {seconds:>9.3f} {ratio:>12.2f} {mem:>12.0f}")


def _imagenet_like(num_classes: int):
    """A stand-in bundle carrying only what the model factory reads (classes and input shape)."""
    from qsweep.data.bundle import DataBundle

    empty = torch.utils.data.TensorDataset(torch.empty(0, 3, 224, 224), torch.empty(0, dtype=torch.long))
    return DataBundle("synthetic", empty, empty, torch.empty(0, dtype=torch.long), num_classes,
                      (3, 224, 224), "synthetic-224")


if __name__ == "__main__":
    main()
