"""Trials per hour: qsweep's search (bound pruner, sampled study, no pruning) against a plain Optuna loop.

    .venv/bin/python experiments/bench/bench_search.py [--model digits|deit|both] [--trials T]
        [--plain-trials P] [--sampled-trials S] [--images N] [--calib-images C] [--no-gptq]

For each model, in one process, one fixed sequence of layouts (the search's warm start: every
width uniform, widest first; then seeded random per-layer widths) runs through these loops,
interleaved trial by trial so that they share the machine's load:

* ``search, bound pruner``: the search's own :class:`~qsweep.search.study.Worker` and
  ``run_trial`` with the experiment's settings (``digits_mixed_search`` / ``deit_mixed_search``:
  ``trial_images``, ``prune_steps``, ``pruner=bound``, its sampler); layouts come from the
  per-width caches of :class:`~qsweep.search.trials.LayoutModels` and run on integer kernels.
* ``search, tpe proposes, bound pruner``: the same worker, but only the uniform layouts are
  enqueued and the experiment's sampler proposes the other trials, as in a real study (which
  also enqueues sensitivity-guided greedy layouts; they are left out here): how much a study that
  closes in on the best still prunes.
* ``search, no pruning``: the same with ``pruner=none``: every trial sees all its trial images.
* ``plain Optuna loop``: what a user writes without the search: each trial calls the public
  ``qsweep.quantize(model, recipe + quant.layers overrides, calib)`` on the float model, measures
  the artifact size and evaluates the fake-quant model in process on *all* test images.

Both sides use the experiment's recipe (``conf/quant/w4a8`` and the experiment's overrides:
rotation, GPTQ, MSE weights, percentile activations) on the same calibration images, and score
with ``relative``. ``--calib-images`` and ``--no-gptq`` change the recipe for both sides.
DeiT-S has random weights (nothing can be downloaded here) on a synthetic task, see
:func:`deit`; its labels are the FP32 model's own predictions, so FP32 top-1 is 100 % and a
layout's top-1 is its agreement with FP32 (random labels would put every layout near 1 % and
leave the pruner nothing to decide).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from torch.utils.data import DataLoader, TensorDataset

import qsweep
from qsweep.config import CONF_DIR
from qsweep.evaluate import evaluate
from qsweep.export import artifact_size_mb, state_dict_size_mb
from qsweep.report import format_table
from qsweep.search.space import SearchSpace
from qsweep.search.study import Worker, layer_names_of, make_pruner, make_sampler, run_trial, score_function
from qsweep.search.trials import LayoutModels, TrialImages
from qsweep.tracking import NullRecorder

Layout = dict[str, dict[str, int]]


@dataclass
class Workload:
    """A model with its test images (labels included), calibration batches and class count."""

    model: torch.nn.Module
    dataset: TensorDataset
    calib: list[torch.Tensor]
    num_classes: int
    fp_top1: float
    fp_eval_s: float


def experiment(name: str) -> DictConfig:
    """``+experiment=NAME`` composed as ``python -m qsweep`` would, with the relative score."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", "tracking.enabled=false", "progress=false"])
    cfg.score.name = "relative"  # deit_mixed_search scores with lab4; see the module docstring for why not here
    return cfg


def timed_eval(model, dataset, batch: int, num_classes: int):
    """``evaluate`` over ``dataset`` as an ordinary run does, after one untimed batch (first-call costs)."""
    with torch.no_grad():
        model(dataset[:batch][0])
    return evaluate(model, DataLoader(dataset, batch_size=batch), num_classes)


def digits(cfg: DictConfig) -> Workload:
    """The embedded digits ViT on its real test set, calibrated as a run calibrates it."""
    from qsweep.data import build_data, calibration_batches, eval_loader
    from qsweep.models import load_digits_vit
    from qsweep.models.cache import cache_dir

    bundle = build_data(cfg.data)
    model = load_digits_vit(bundle, cache_dir(None), progress=False)
    test = list(eval_loader(bundle, cfg.data))  # held as tensors: both loops read the same in-memory images
    dataset = TensorDataset(torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]))
    fp = timed_eval(model, dataset, cfg.data.eval_batch_size, bundle.num_classes)
    return Workload(model, dataset, calibration_batches(bundle, cfg.quant.calib), bundle.num_classes, fp.top1,
                    fp.seconds)


@torch.no_grad()
def deit(cfg: DictConfig, n_images: int, calib_images: int) -> Workload:
    """DeiT-S with random weights, on a synthetic 100-class task its FP32 predictions define.

    timm starts DeiT-III's LayerScale at 1e-6, which leaves every block idle, so the random model
    predicts one class for any input; with LayerScale at 1 and the head a nearest-template
    classifier over 100 random images, images near a template get diverse, confident
    predictions, and the quantized model's agreement with them behaves like a trained model's
    top-1 (W8 ~100 %, W4 ~98 %, W3 ~94 % on a first check).
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model(cfg.model.name, num_classes=100).eval()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(100, 3, 224, 224, generator=g)
    feats = model.forward_head(model.forward_features(templates), pre_logits=True)
    feats -= feats.mean(0)
    model.head.weight.copy_(feats / feats.norm(dim=1, keepdim=True))
    model.head.bias.zero_()

    def draw(n: int) -> torch.Tensor:
        return templates[torch.randint(0, 100, (n,), generator=g)] + torch.randn(n, 3, 224, 224, generator=g)

    images = draw(n_images)
    batch = cfg.data.eval_batch_size
    model(images[:batch])  # untimed: first-call costs
    start = time.perf_counter()  # the labelling pass is one FP32 evaluation of the images
    labels = torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, n_images, batch)])
    fp_eval_s = time.perf_counter() - start
    c = cfg.quant.calib.batch_size
    calib = [draw(min(c, calib_images - i)) for i in range(0, calib_images, c)]
    return Workload(model, TensorDataset(images, labels), calib, 100, 100.0, fp_eval_s)


def layout_sequence(space: SearchSpace, n: int, seed: int) -> list[Layout]:
    """The warm start's uniform layouts (widest first), then seeded random per-layer widths: ``n`` in all."""
    widths = sorted(space.w_choices, reverse=True)
    layouts = [space.uniform(w) for w in widths]
    rng = random.Random(seed)
    while len(layouts) < n:
        layouts.append({g: {"w": rng.choice(widths)} for g in space.groups})
    return layouts[:n]


@dataclass
class Arm:
    """One loop over the layouts: ``step(i)`` runs trial ``i``; its study knows which were pruned."""

    name: str
    images: int  # images a trial evaluates when it is not pruned
    step: Callable[[int], None]
    study: optuna.Study
    limit: int  # trials this loop runs (the plain loop may run fewer)
    seconds: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)  # seconds of a trial's parts, where recorded

    def run(self, i: int) -> None:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the worker prints a line per trial
            self.step(i)
        self.seconds.append(time.perf_counter() - start)
        last = self.study.get_trials(deepcopy=False)[-1]
        if last.state == TrialState.FAIL:  # run_trial records a failure and goes on; a bench must not
            raise RuntimeError(f"{self.name}: trial {last.number} failed: {last.user_attrs.get('error')}")

    def row(self) -> tuple[str, str]:
        trials = self.study.get_trials(deepcopy=False)
        n = len(trials)
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        seen = sum(t.user_attrs["seen"] for t in pruned) + self.images * (n - len(pruned))  # the worker's record
        per_hour = 3600 * n / sum(self.seconds)
        return (self.name, f"{n:>3} trials {per_hour:>7.0f}/h  pruned {len(pruned) / n:>4.0%}  images/trial "
                           f"{seen / n:>5.0f} of {self.images:<4} median {statistics.median(self.seconds):6.2f} s  "
                           f"best score {self.study.best_value:g}")


def search_arm(name: str, cfg: DictConfig, space: SearchSpace, models: LayoutModels, images: TrialImages,
               score_of, layouts: list[Layout], sampled: int = 0) -> Arm:
    """The search's worker and trial loop, as ``qsweep.search.run`` sets them up, over ``layouts``;
    with ``sampled``, only the uniform layouts are enqueued and the study's sampler proposes the
    rest of ``sampled`` trials, as in a real study."""
    study = optuna.create_study(directions=["maximize"], sampler=make_sampler(cfg.search),
                                pruner=make_pruner(cfg.search, score_of))
    for layout in layouts[:len(space.w_choices)] if sampled else layouts:
        study.enqueue_trial(space.params(layout))
    worker = Worker(cfg, space, models, images, score_of, "int", torch.device("cpu"), NullRecorder(), {})

    def step(i: int) -> None:
        # The arms share the cached models: start from this loop's previous layout, so each
        # trial swaps in as many weight codes as it would in a real study.
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        models.apply(space.layout_of(trials[-1].params) if trials else space.uniform(max(space.w_choices)))
        run_trial(study, worker, study.ask(), heartbeat=False)

    return Arm(name, images.images, step, study, sampled or len(layouts))


def plain_arm(work: Workload, recipe: DictConfig, names: list[str], widths: list[int], batch: int,
              kernels: str, score_of, layouts: list[Layout], count: int) -> Arm:
    """A user's Optuna loop: quantize from the float model, measure size, evaluate all images (fake-quant)."""
    base = OmegaConf.to_container(recipe, resolve=True)
    loader = DataLoader(work.dataset, batch_size=batch)

    parts: dict[str, list[float]] = {"quantize": [], "size": [], "evaluation": []}

    def objective(trial: optuna.Trial) -> float:
        layers = {n: {"w_bits": trial.suggest_categorical(f"w:{n}", widths)} for n in names}
        t0 = time.perf_counter()
        qmodel = qsweep.quantize(work.model, {**base, "layers": {**base.get("layers", {}), **layers}}, work.calib)
        t1 = time.perf_counter()
        size = artifact_size_mb(qmodel, kernels)
        t2 = time.perf_counter()
        top1 = evaluate(qmodel, loader, work.num_classes).top1
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            parts[key].append(seconds)
        return score_of(size, top1)

    study = optuna.create_study(direction="maximize")
    for layout in layouts[:count]:
        study.enqueue_trial({f"w:{n}": c["w"] for n, c in layout.items()})  # group_by=layer: group = layer
    return Arm("plain Optuna loop", len(work.dataset), lambda i: study.optimize(objective, 1), study, count,
               parts=parts)


def trial_parts(models: LayoutModels, space: SearchSpace, layouts: list[Layout], images: TrialImages) -> str:
    """Median seconds of a trial's fixed parts (swap layout, size, int conversion) and of its evaluation."""
    parts: dict[str, list[float]] = {"swap": [], "size": [], "int conversion": [], "evaluation": []}
    for a, b in zip(layouts[-4:-1], layouts[-3:]):
        models.apply(a)
        t0 = time.perf_counter()
        models.apply(b)
        t1 = time.perf_counter()
        models.size_mb()
        t2 = time.perf_counter()
        runner, _ = models.runner("int")
        t3 = time.perf_counter()
        with torch.no_grad():
            for x, _ in images.batches:
                runner(x)
        t4 = time.perf_counter()
        for key, s in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(s)
    return ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in parts.items())


def evaluation_ops(runner: torch.nn.Module, images: TrialImages, top: int = 5) -> str:
    """Where one batch's integer-kernel forward spends its time: the ``top`` ops by own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner(images.batches[0][0])
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    return ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / total:.0%}" for e in ops[:top])


def bench(name: str, cfg: DictConfig, work: Workload, trials: int, plain_trials: int, sampled_trials: int
          ) -> list[tuple[str, str]]:
    s = cfg.search
    batch = cfg.data.eval_batch_size
    names = layer_names_of(work.model, cfg)
    space = SearchSpace.build(names, s)
    score_of = score_function(cfg, state_dict_size_mb(work.model), work.fp_top1)
    layouts = layout_sequence(space, trials, seed=0)

    start = time.perf_counter()
    models = LayoutModels(work.model, cfg.quant, work.calib, space, cfg.adaround, cfg.lsq, kernels=cfg.export.kernels)
    images = TrialImages.from_dataset(work.dataset, s.trial_images, batch, seed=s.seed or 0, steps=s.prune_steps)
    setup_s = time.perf_counter() - start

    models.apply(space.uniform(max(space.w_choices)))
    runner, _ = models.runner("int")
    plain_int = timed_eval(runner, work.dataset, batch, work.num_classes)

    no_prune = OmegaConf.merge(cfg, {"search": {"pruner": "none"}})
    arms = [search_arm("search, bound pruner", cfg, space, models, images, score_of, layouts),
            search_arm(f"search, {s.sampler} proposes, bound pruner", cfg, space, models, images, score_of, layouts,
                       sampled_trials),
            search_arm("search, no pruning", no_prune, space, models, images, score_of, layouts),
            plain_arm(work, cfg.quant, space.layers, list(space.w_choices), batch, cfg.export.kernels, score_of,
                      layouts, plain_trials)]
    rounds = max(arm.limit for arm in arms)
    for i in range(rounds):
        for arm in arms:
            if i < arm.limit:
                arm.run(i)
        print(f"{name}: trial {i + 1}/{rounds} done", file=sys.stderr, flush=True)

    gptq = "on" if cfg.quant.gptq.enabled else "off"
    return [
        (f"{name}", f"{len(work.dataset)} test images (batch {batch}), {space.describe()}"),
        (f"{name}: recipe (both sides)", f"{cfg.quant.name} + {cfg.name}: GPTQ {gptq}, rotate "
                                         f"{'on' if cfg.quant.rotate.enabled else 'off'}, "
                                         f"{sum(len(b) for b in work.calib)} calibration images; score relative"),
        (f"{name}: search setup once", f"{setup_s:.1f} s (calibration once, {len(space.w_choices)} weight widths)"),
        (f"{name}: FP32 eval, all images", f"{work.fp_eval_s:.2f} s"),
        (f"{name}: int eval, widest layout", f"{plain_int.seconds:.2f} s (top-1 {plain_int.top1:.1f} %)"),
        *((f"{name}: {label}", value) for label, value in (arm.row() for arm in arms)),
        (f"{name}: one search trial's parts", trial_parts(models, space, layouts, images)),
        (f"{name}: one plain trial's parts", ", ".join(f"{k} {statistics.median(v):.2f} s"
                                                       for k, v in arms[-1].parts.items())),
        (f"{name}: evaluation by op (int)", evaluation_ops(models.runner("int")[0], images)),
        (f"{name}: search settings", f"prune_steps {s.prune_steps} over {len(images.batches)} batches, sampler "
                                     f"{s.sampler}; plain loop: the first {plain_trials} of the same layouts; "
                                     f"{s.sampler} proposes {sampled_trials} trials"),
    ]


def experiment_for(name: str, args: argparse.Namespace) -> DictConfig:
    """The experiment's config with this command's changes to the recipe (both sides get them)."""
    cfg = experiment(name)
    if args.calib_images is not None:
        cfg.quant.calib.num_images = args.calib_images
    if args.no_gptq:
        cfg.quant.gptq.enabled = False
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["digits", "deit", "both"], default="both")
    parser.add_argument("--images", type=int, default=500, help="DeiT-S test images (the lab's mini set: 500)")
    parser.add_argument("--trials", type=int, default=20, help="trials of each search loop")
    parser.add_argument("--sampled-trials", type=int, default=None,
                        help="trials of the loop whose sampler proposes the layouts (default: --trials)")
    parser.add_argument("--plain-trials", type=int, default=None,
                        help="trials of the plain loop (default: --trials for digits, 3 for DeiT-S)")
    parser.add_argument("--calib-images", type=int, default=None,
                        help="calibration images (default: the recipe's quant.calib.num_images, 256)")
    parser.add_argument("--no-gptq", action="store_true",
                        help="turn the recipe's GPTQ off on both sides (a DeiT-S quantize with GPTQ takes minutes)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(2)
    load_start = os.getloadavg()
    rows = []
    if args.model in ("digits", "both"):
        cfg = experiment_for("digits_mixed_search", args)
        rows += bench("digits ViT", cfg, digits(cfg), args.trials, args.plain_trials or args.trials,
                      args.sampled_trials or args.trials)
    if args.model in ("deit", "both"):
        cfg = experiment_for("deit_mixed_search", args)
        rows += bench("DeiT-S", cfg, deit(cfg, args.images, cfg.quant.calib.num_images), args.trials,
                      args.plain_trials or 3, args.sampled_trials or args.trials)
    load = "load average (1/5/15 min): start {:.2f} {:.2f} {:.2f}, end {:.2f} {:.2f} {:.2f}".format(
        *load_start, *os.getloadavg())
    print(format_table(rows) + "\n  " + load)


if __name__ == "__main__":
    main()
