"""What the real-weights search benchmarks share (``bench_search_real.py``: Lite0, ``bench_search_minilm.py``).

A benchmark subclasses :class:`Bench` with its model, its two halves of evaluation inputs and how it
measures a layout; :func:`run` then gives every method the same number of layouts, chooses on the search
half, reports the chosen layouts on the test half, and writes ``results.json``, ``pareto.png`` and the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "experiments" / "realweights"))
import bench_real as real  # noqa: E402  write_json, check_readme, update_readme

from qsweep.config import SearchConfig, shipped_recipe  # noqa: E402
from qsweep.quant.calibrate import prepare  # noqa: E402
from qsweep.quant.knapsack import knapsack  # noqa: E402
from qsweep.quant.mixed import WidthPlanner  # noqa: E402
from qsweep.search.plots import pareto_front  # noqa: E402
from qsweep.search.space import SearchSpace  # noqa: E402
from qsweep.search.local_sampler import PARENT  # noqa: E402
from qsweep.search.study import layer_names_of, local_sampler, make_sampler  # noqa: E402
from qsweep.search.trials import LayoutModels  # noqa: E402
from qsweep.search.warm import cost_table, fisher_noise, knapsack_layout  # noqa: E402

# qsweep: the study with search.sampler=local; qsweep-tpe: the same study and warm start with TPE
# shipped: a reference ladder of another recipe (Bench.reference_ladder), where a bench has one
METHODS = ("shipped", "uniform", "random", "hawq", "mixed", "qsweep", "qsweep-tpe")


@dataclass(frozen=True)
class Metric:
    """One measured number of a layout: ``search_<key>`` / ``test_<key>`` in results.json, ``label`` in the table."""

    key: str
    label: str
    fmt: str  # of the stored value times ``scale``
    scale: float = 1.0

    def show(self, value: float) -> str:
        return self.fmt.format(value * self.scale)


class Bench:
    """The model's layouts (:class:`LayoutModels` of the shipped ``w4a8``, one weight width per layer) and their
    numbers on the two halves of the evaluation inputs, cached by layout.

    A subclass sets the class attributes and gives :meth:`measure` and :meth:`hawq_traces`; ``primary`` is what
    every method maximizes on the search half.
    """

    name: str  # in the plot's title
    primary: Metric
    secondary: Metric
    axis: str  # the plot's y label (the primary metric)
    fisher: str  # quant.mixed.fisher of the mixed method
    markers = (real.MARK_START, real.MARK_END)  # where --readme writes the table
    budget_widths: tuple[int, ...]  # the table's budgets: these uniform layouts' sizes

    def __init__(self, fp: nn.Module, calib: list[Any], widths: list[int], info: dict, overrides: dict | None = None):
        self.fp, self.calib, self.info = fp, calib, info
        self.recipe = OmegaConf.merge(shipped_recipe("w4a8"), overrides or {})  # overrides: e.g. quant.embeddings
        self.space = layout_space(fp, self.recipe, widths)
        start = time.perf_counter()
        self.models = LayoutModels(self.fp, self.recipe, self.calib, self.space)
        self.info["layout_models_s"] = round(time.perf_counter() - start, 1)
        self.seen: dict[str, dict] = {}
        self.tested: dict[str, dict] = {}

    def measure(self, layout: dict, half: str) -> dict[str, float]:
        """The layout's primary and secondary metrics on ``half`` ("search" | "test")."""
        raise NotImplementedError

    def hawq_traces(self) -> dict[str, float]:
        """HAWQ's ``Tr(H_l) / n_l`` per searched layer (``hawq.py``)."""
        raise NotImplementedError

    def key(self, layout: dict) -> str:
        return json.dumps(self.space.params(layout), sort_keys=True)

    def evaluate(self, method: str, layout: dict, note: str = "") -> dict:
        """The layout's size and search-half numbers (cached by layout), recorded under ``method``."""
        key = self.key(layout)
        if key not in self.seen:
            self.seen[key] = {"size_mb": round(self.models.estimate_mb(layout), 4), **{
                f"search_{k}": v for k, v in self.measure(layout, "search").items()}}
        row = {"method": method, "note": note, **self.seen[key],
               "avg_w_bits": round(self.avg_bits(layout), 3), "layout": {g: c["w"] for g, c in layout.items()}}
        p = self.primary
        print(f"{method:8s} {note:24s} {row['size_mb']:.3f} MB  avg {row['avg_w_bits']:.2f} bits  "
              f"search {p.label} {p.show(row[f'search_{p.key}'])}", flush=True)
        return row

    def test(self, row: dict) -> None:
        """Adds the test-half numbers to ``row`` (cached by layout; a reference row carries its own)."""
        if f"test_{self.primary.key}" in row:
            return
        layout = {g: {"w": w} for g, w in row["layout"].items()}
        key = self.key(layout)
        if key not in self.tested:
            self.tested[key] = {f"test_{k}": v for k, v in self.measure(layout, "test").items()}
        row.update(self.tested[key])

    def reference_ladder(self, widths: list[int]) -> list[dict]:
        """Uniform layouts of another recipe (method ``shipped``) whose sizes are then the table's budgets, measured
        on both halves; none by default (the budgets are this recipe's own uniform sizes)."""
        return []

    def avg_bits(self, layout: dict) -> float:
        counts = self.models.param_counts
        per_layer = self.space.per_layer(layout)
        return sum(per_layer[n]["w"] * counts[n] for n in per_layer) / sum(counts.values())


def layout_space(fp: nn.Module, recipe: DictConfig, widths: list[int]) -> SearchSpace:
    """One group per layer (and per embedding table ``recipe`` quantizes), weight widths ``widths``."""
    search = OmegaConf.merge(OmegaConf.structured(SearchConfig), {"w_bits": widths, "group_by": "layer"})
    return SearchSpace.build(layer_names_of(fp, OmegaConf.create({"quant": recipe})), search, model=fp)


def uniform(b: Bench, widths: list[int]) -> list[dict]:
    return [b.evaluate("uniform", b.space.uniform(w), f"W{w}") for w in sorted(widths, reverse=True)]


def random_search(b: Bench, trials: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [b.evaluate("random", {g: {"w": rng.choice(b.space.w_choices)} for g in b.space.groups}, f"#{i}")
            for i in range(trials)]


def prepared_floats(b: Bench) -> dict[str, torch.Tensor]:
    """Each searched layer's float weight as the recipe rounds it: BatchNorm folded, and a Linear's input
    rotated (quant.rotate), which the quantized codes are in."""
    floats: dict[str, torch.Tensor] = {}
    prepare(copy.deepcopy(b.fp), b.recipe, b.calib, float_weights=floats)
    return {n: floats[n].detach() for n in b.space.layers}


def hawq_knapsack(b: Bench, budgets: list[float]) -> tuple[list[dict], float]:
    """One knapsack layout per budget; returns the rows and the seconds the sensitivities took."""
    start = time.perf_counter()
    traces = b.hawq_traces()  # Tr(H) is the same in the rotated basis: rotations are orthogonal
    floats = prepared_floats(b)
    widest = max(b.space.w_choices)
    fixed = b.models.estimate_mb(b.space.uniform(widest)) * 1e6 - sum(
        b.models.packed_bytes[(n, widest)] for n in b.space.layers)
    options = {name: {bits: (b.models.packed_bytes[(name, bits)],
                             traces[name] * float((b.models.weights[(name, bits)].dequantize() - w).pow(2).sum()))
                      for bits in b.space.w_choices}
               for name, w in floats.items()}
    seconds = time.perf_counter() - start
    rows = []
    for budget in budgets:
        pick = knapsack(options, int(budget * 1e6 - fixed))
        if pick is not None:
            rows.append(b.evaluate("hawq", {n: {"w": w} for n, w in pick.items()}, f"budget {budget:.3f} MB"))
    return rows, seconds


def mixed_knapsack(b: Bench, budgets: list[float]) -> tuple[list[dict], float]:
    """qsweep's ``quant.mixed`` choice (Fisher-weighted rounding error, exact knapsack on the artifact's bytes)
    at each budget, assembled from the same codes as every other method; returns the rows and the seconds
    its measurement took."""
    start = time.perf_counter()
    recipe = OmegaConf.merge(b.recipe, {"mixed": {"enabled": True, "widths": b.space.w_choices, "kernels": "fake",
                                                  "fisher": b.fisher}})
    planner = WidthPlanner(b.fp, recipe, b.calib)
    seconds = time.perf_counter() - start
    rows = []
    for budget in budgets:
        if budget * 1e6 >= planner.uniform[min(b.space.w_choices)]:
            pick = planner.choose(int(budget * 1e6))["widths"]
            rows.append(b.evaluate("mixed", {n: {"w": w} for n, w in pick.items()}, f"budget {budget:.3f} MB"))
    return rows, seconds


@dataclass
class WarmStart:
    """What a qsweep study starts from: the uniform ladder, then at each budget the knapsack layout of
    ``quant.mixed``'s per-layer cost (``search.warm_cost=fisher``: ``qsweep.search.warm``), and that cost."""

    seeds: list[dict]
    cost: dict[str, dict[int, float]]  # per (weight param, width): what search.sampler=local prefers moves by
    seconds: float  # the Fisher information's


def warm_start(b: Bench, budgets: list[float]) -> WarmStart:
    start = time.perf_counter()
    cfg = OmegaConf.create({"quant": OmegaConf.merge(b.recipe, {"mixed": {"fisher": b.fisher}})})
    noise = fisher_noise(cfg, b.space, SimpleNamespace(model=b.fp, calib=b.calib))
    seconds = time.perf_counter() - start
    seeds = [b.space.uniform(w) for w in sorted(b.space.w_choices, reverse=True)]
    seeds += [layout for budget in budgets
              if (layout := knapsack_layout(b.space, b.models, noise, int(budget * 1e6))) is not None]
    return WarmStart(seeds, cost_table(b.space, noise), seconds)


def qsweep_study(b: Bench, trials: int, warm: WarmStart, sampler: str) -> list[dict]:
    """qsweep's search from ``warm`` with ``search.sampler=<sampler>`` (seed 0), maximizing the search-half primary
    metric and minimizing size; a local sampler's rows name the trial each is a neighbour of."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = OmegaConf.create({"sampler": sampler, "seed": 0})
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=(
        local_sampler(s, b.space, b.models, None, warm.cost) if sampler == "local" else make_sampler(s)))
    for layout in warm.seeds:
        study.enqueue_trial(b.space.params(layout))
    method, rows = "qsweep" if sampler == "local" else f"qsweep-{sampler}", []

    def objective(trial: optuna.Trial):
        layout = b.space.suggest(trial)
        parent = study._storage.get_trial_system_attrs(trial._trial_id).get(PARENT)
        note = f"trial {trial.number}" + (f" <- {parent}" if parent is not None else "")
        rows.append(b.evaluate(method, layout, note))
        return rows[-1][f"search_{b.primary.key}"], rows[-1]["size_mb"]

    study.optimize(objective, n_trials=trials)
    return rows


def fronts(rows: list[dict], half: str, metric: Metric) -> dict[str, list[dict]]:
    out = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and f"{half}_{metric.key}" in r]
        keep = pareto_front([(r[f"{half}_{metric.key}"], r["size_mb"]) for r in mine])
        out[method] = sorted((mine[i] for i in keep), key=lambda r: r["size_mb"])
    return out


def best_under(rows: list[dict], method: str, budget: float, metric: Metric) -> dict | None:
    fits = [r for r in rows if r["method"] == method and r["size_mb"] <= budget]
    return max(fits, key=lambda r: (r[f"search_{metric.key}"], -r["size_mb"]), default=None)


def table(rows: list[dict], budgets: dict[str, float], b: Bench) -> str:
    p, s = b.primary, b.secondary
    lines = [f"| budget | method | layouts tried | size MB | avg W bits | {p.label}, search half | "
             f"{p.label}, test half | {s.label}, test half |", "|---|---|---|---|---|---|---|---|"]
    for label, budget in budgets.items():
        for method in METHODS:
            tried = sum(r["method"] == method for r in rows)
            if method == "shipped" and not tried:
                continue
            r = best_under(rows, method, budget, p)
            if r is None:
                lines.append(f"| {label} | {method} | {tried} | none fits | | | | |")
                continue
            lines.append(f"| {label} | {method} | {tried} | {r['size_mb']:.3f} | {r['avg_w_bits']:.2f} | "
                         f"{p.show(r[f'search_{p.key}'])} | {p.show(r[f'test_{p.key}'])} | "
                         f"{s.show(r[f'test_{s.key}'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, b: Bench) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = b.primary.key
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"shipped": "D-", "uniform": "s-", "random": ".", "hawq": "^--", "mixed": "v-", "qsweep": "o-", "qsweep-tpe": "x:"}
    for method, front in fronts(rows, "test", b.primary).items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ax.plot([r["size_mb"] for r in mine], [r[f"search_{key}"] for r in mine], styles[method][0], alpha=0.2)
        ax.plot([r["size_mb"] for r in front], [r[f"test_{key}"] for r in front], styles[method], label=method)
    ax.set_xlabel("artifact MB")
    ax.set_ylabel(b.axis)
    ax.set_title(f"{b.name} layouts: faint = every layout (search half), line = front (test half)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser(doc: str, out: Path, budget_fraction: float | None,
           widths: list[int] | None = None) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds how many evaluation inputs it keeps."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--trials", type=int, default=40, help="layouts per method (random, HAWQ budgets, study)")
    p.add_argument("--widths", type=int, nargs="+", default=widths or [3, 4, 5, 6, 8])
    p.add_argument("--budget-fraction", type=float, default=budget_fraction, help="of the uniform W8 artifact"
                   + ("" if budget_fraction else " (default: no such budget, the uniform layouts' sizes only)"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--readme", type=Path, help="write the table into this file between the markers")
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, markers: tuple[str, str]) -> None:
    """Stops before any work on options the run would fail on at its end."""
    if args.trials < 1:
        p.error(f"--trials {args.trials}: give at least 1 layout per method")
    if args.budget_fraction is not None and args.budget_fraction <= 0:
        p.error(f"--budget-fraction {args.budget_fraction}: give a fraction of the W8 artifact above 0")
    if args.readme:
        real.check_readme(args.readme, markers)


def run(b: Bench, args: argparse.Namespace, start: float) -> None:
    """Every method on ``b`` with ``args.trials`` layouts each, then the results, plot and table."""
    rows = uniform(b, args.widths)
    size = {r["note"]: r["size_mb"] for r in rows}
    lo, hi = size[f"W{min(args.widths)}"], size[f"W{max(args.widths)}"]
    reference = b.reference_ladder(args.widths)
    ladder, name = ({r["note"]: r["size_mb"] for r in reference}, "shipped") if reference else (size, "uniform")
    rows += reference
    fraction = args.budget_fraction
    budgets = {f"{fraction:g} x W8 ({fraction * hi:.3f} MB)": fraction * hi} if fraction else {}
    budgets.update({f"{name} W{w} ({ladder[f'W{w}']:.3f} MB)": ladder[f"W{w}"] for w in b.budget_widths
                    if f"W{w}" in ladder})
    n = max(2, args.trials - len(budgets))  # the named budgets count toward the knapsack's layouts
    spread = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    rows += random_search(b, args.trials)
    hawq_rows, b.info["hawq_sensitivity_s"] = hawq_knapsack(b, sorted(set(spread) | set(budgets.values())))
    rows += hawq_rows
    mixed_rows, b.info["mixed_sensitivity_s"] = mixed_knapsack(b, sorted(set(spread) | set(budgets.values())))
    rows += mixed_rows
    # The study's warm start covers every table budget and, as search.greedy does, each inner ladder width's size.
    inner = sorted(args.widths)[1:-1]
    warm = warm_start(b, sorted(set(budgets.values()) | {size[f"W{w}"] for w in inner}))
    b.info["warm_sensitivity_s"] = round(warm.seconds, 1)
    for sampler in ("local", "tpe"):
        start_study = time.perf_counter()
        rows += qsweep_study(b, args.trials, warm, sampler)
        b.info[f"study_{sampler}_s"] = round(time.perf_counter() - start_study, 1)
    # On the half no method saw: each method's front on the search half and its pick under each budget.
    picked = [r for front in fronts(rows, "search", b.primary).values() for r in front]
    picked += [best_under(rows, m, budget, b.primary) for m in METHODS for budget in budgets.values()]
    for r in picked:
        if r is not None:
            b.test(r)
    b.info["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    real.write_json(args.out / "results.json", {"info": b.info, "rows": rows})
    plot(rows, args.out / "pareto.png", b)
    text = table(rows, budgets, b)
    print(text)
    if args.readme:
        real.update_readme(args.readme, text, b.markers)
