"""What a search trial costs: one trial's time against one plain evaluation of the same images.

    .venv/bin/python experiments/bench/bench_search.py [--model digits|deit] [--images N] [--trials T]

For each model, in one process: the plain evaluations of the trial images (FP32 eager, and the
quantized model at the widest layout on the integer path, as an ordinary run evaluates it), then
``T`` trials of an in-memory study driven by the search's own worker (random layouts over
{3,4,5,6,8} bits, no pruning, so every trial evaluates every image). A trial is: assemble the
layout from the caches, measure the artifact size, convert to integer kernels, evaluate in
steps, report. Also printed: the one-time setup (calibration once, each weight width once) and
trials per hour. DeiT-S uses random weights and random 224 px images, which cost what the lab's
500 CIFAR-100 images cost (no dataset or checkpoint can be downloaded here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from qsweep.config import RootConfig, quant_recipe
from qsweep.evaluate import evaluate
from qsweep.quant.plan import resolve_plan
from qsweep.report import format_table
from qsweep.search.space import SearchSpace
from qsweep.search.study import Worker
from qsweep.search.trials import LayoutModels, TrialImages


def digits():
    from qsweep.config import DataConfig
    from qsweep.data import build_data
    from qsweep.models import load_digits_vit
    from qsweep.models.cache import cache_dir

    bundle = build_data(DataConfig())
    model = load_digits_vit(bundle, cache_dir(None), progress=False)
    images = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    labels = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    calib = [torch.stack([bundle.train[i][0] for i in range(j, j + 64)]) for j in range(0, 256, 64)]
    return model, TensorDataset(images, labels), calib, 10


def deit(n_images: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit3_small_patch16_224", num_classes=100).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, 3, 224, 224, generator=g)
    labels = torch.randint(0, 100, (n_images,), generator=g)
    calib = [torch.randn(32, 3, 224, 224, generator=g) for _ in range(2)]
    return model, TensorDataset(images, labels), calib, 100


def bench(name: str, model, dataset, calib, num_classes: int, trials: int, batch: int) -> list[tuple[str, str]]:
    cfg = OmegaConf.structured(RootConfig)
    cfg.search.w_bits = [3, 4, 5, 6, 8]
    cfg.search.pruner = "none"
    cfg.search.prune_steps = 4
    recipe = quant_recipe({"weight": {"bits": 8, "granularity": "per_channel"}, "act": {"bits": 8}})
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    fp = evaluate(model, loader, num_classes)

    start = time.perf_counter()
    names = [n for n, plan in resolve_plan(model, recipe).items() if plan.weight is not None]
    space = SearchSpace.build(names, cfg.search)
    models = LayoutModels(model, recipe, calib, space)
    images = TrialImages.from_dataset(dataset, None, batch, seed=0)
    setup_s = time.perf_counter() - start

    models.apply(space.uniform(8))
    runner, _ = models.runner("int")
    plain = evaluate(runner, loader, num_classes)

    worker = Worker(cfg, space, models, images, lambda size, top1: top1, "int", torch.device("cpu"), None, {})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    durations = []
    for _ in range(trials):
        t0 = time.perf_counter()
        study.optimize(worker.objective, n_trials=1)
        durations.append(time.perf_counter() - t0)
    trial_s = statistics.median(durations)
    return [
        (f"{name}: images", f"{len(dataset)} (batch {batch}), {len(space.layers)} searched layers"),
        (f"{name}: setup once", f"{setup_s:.1f} s (calibration once, {len(space.w_choices)} weight widths)"),
        (f"{name}: FP32 eval", f"{fp.seconds:.2f} s"),
        (f"{name}: plain quantized eval (int)", f"{plain.seconds:.2f} s"),
        (f"{name}: one trial (median of {trials})", f"{trial_s:.2f} s = {trial_s / plain.seconds:.2f}x plain "
                                                    f"quantized eval, {trial_s / fp.seconds:.2f}x FP32 eval"),
        (f"{name}: trials per hour", f"{3600 / trial_s:.0f} (no pruning; every trial sees every image)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["digits", "deit", "both"], default="both")
    parser.add_argument("--images", type=int, default=500, help="DeiT-S trial images (the lab's mini set: 500)")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    if args.model in ("digits", "both"):
        rows += bench("digits ViT", *digits(), trials=args.trials, batch=256)
    if args.model in ("deit", "both"):
        rows += bench("DeiT-S", *deit(args.images), trials=args.trials, batch=50)
    print(format_table(rows))


if __name__ == "__main__":
    main()
