"""Mixed precision on real weights: does a search find what a uniform recipe or a sensitivity knapsack does not?

    .venv/bin/python experiments/search/bench_search_real.py [--trials N] [--widths 3 4 5 6 8]
        [--budget-fraction 0.6] [--out DIR] [--readme PATH] [--threads T]

EfficientNet-Lite0 (ImageNet weights) on the real-photo benchmark of ``experiments/realvision``, FP32's
predictions as labels. The evaluation photographs are split in two: trials are measured on the *search*
half, and every method's chosen layouts are reported on the *test* half, which no method saw. Every
layout is assembled by :class:`qsweep.search.trials.LayoutModels` from the shipped ``w4a8`` recipe (MSE
ranges, GPTQ, bias correction) quantized once per width, and sized as its artifact will be. Methods,
each given the same number of evaluated layouts (``--trials``; the ladder has one per width):

* **uniform**: every layer at one width (the ladder W8, W6, W5, W4, W3);
* **random**: layouts drawn uniformly, one width per layer;
* **HAWQ knapsack** (``hawq.py``): Hessian-trace x perturbation sensitivity per layer and width, the
  exact multiple-choice knapsack at ``--trials`` budgets spread between the W3 and W8 sizes;
* **mixed** (``quant.mixed``, what ``quant=cnn_w4a8`` runs): per layer and width the rounding error weighted
  by the diagonal Fisher information (labels drawn from the model's own softmax on the calibration views),
  the exact knapsack at the same budgets as HAWQ;
* **qsweep study**: qsweep's own search (its space, TPE sampler and warm start: the uniform ladder and
  sensitivity-guided greedy layouts), multi-objective (agreement up, size down), driven in-process.

Prints and writes ``results.json`` (every evaluated layout with its method, size, search- and test-half
agreement and KL), ``pareto.png`` (test agreement vs MB, each method's front) and a table: per size
budget (the uniform W4 and W5 artifacts' and ``--budget-fraction`` of the W8 artifact), each method's
best layout on the search half and its test-half agreement.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import optuna
import torch
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "experiments" / "realvision"))
sys.path.insert(0, str(ROOT / "experiments" / "realweights"))
import bench_real as real  # noqa: E402  write_json, update_readme
import bench_vision as vision  # noqa: E402
import hawq  # noqa: E402

from qsweep.analysis.sensitivity import compute_sensitivity  # noqa: E402
from qsweep.config import SearchConfig, shipped_recipe  # noqa: E402
from qsweep.quant.fold import fold_batchnorm  # noqa: E402
from qsweep.quant.mixed import WidthPlanner  # noqa: E402
from qsweep.quant.knapsack import knapsack  # noqa: E402
from qsweep.search.plots import pareto_front  # noqa: E402
from qsweep.search.space import SearchSpace  # noqa: E402
from qsweep.search.study import layer_names_of, make_sampler  # noqa: E402
from qsweep.search.trials import LayoutModels  # noqa: E402
from qsweep.search.warm import knapsack_layout, layer_noise  # noqa: E402

METHODS = ("uniform", "random", "hawq", "mixed", "qsweep")
SENSITIVITY_VIEWS = 128  # as the command line's warm start (qsweep.search.warm.SENSITIVITY_IMAGES)


class Bench:
    """The model, the cached layouts, and the two halves of the evaluation views with FP32's logits."""

    def __init__(self, widths: list[int], threads: int, eval_views: int | None):
        torch.set_num_threads(threads)
        setup, self.info = vision.prepare(eval_views)
        self.fp, self.calib = setup.fp, setup.calib
        owners = sorted(set(setup.views.photos), key=setup.views.photos.index)
        search_photos = set(owners[::2])
        idx = {half: [i for i, p in enumerate(setup.views.photos) if (p in search_photos) == (half == "search")]
               for half in ("search", "test")}
        self.inputs = {h: setup.views.inputs[i] for h, i in idx.items()}
        self.ref = {h: setup.ref[i] for h, i in idx.items()}
        self.info.update(search_views=len(idx["search"]), test_views=len(idx["test"]),
                         search_photos=sorted(search_photos))
        self.recipe = shipped_recipe("w4a8")
        cfg = OmegaConf.create({"quant": self.recipe})
        search = OmegaConf.merge(OmegaConf.structured(SearchConfig), {"w_bits": widths, "group_by": "layer"})
        self.space = SearchSpace.build(layer_names_of(self.fp, cfg), search)
        start = time.perf_counter()
        self.models = LayoutModels(self.fp, self.recipe, self.calib, self.space)
        self.info["layout_models_s"] = round(time.perf_counter() - start, 1)
        self.seen: dict[str, dict] = {}
        self.tested: dict[str, dict] = {}

    @torch.no_grad()
    def measure(self, layout: dict, half: str) -> dict:
        model = self.models.apply(layout)
        out = torch.cat([model(b) for b in self.inputs[half].split(vision.EVAL_BATCH)]).float()
        res = vision.compare(out, self.ref[half])
        return {"agreement": res["top1_agreement"], "kl": res["kl"]}

    def evaluate(self, method: str, layout: dict, note: str = "") -> dict:
        """The layout's size and search-half numbers (cached by layout), recorded under ``method``."""
        key = json.dumps(self.space.params(layout), sort_keys=True)
        if key not in self.seen:
            self.seen[key] = {"size_mb": round(self.models.estimate_mb(layout), 4), **{
                f"search_{k}": v for k, v in self.measure(layout, "search").items()}}
        row = {"method": method, "note": note, **self.seen[key],
               "avg_w_bits": round(self.avg_bits(layout), 3), "layout": {g: c["w"] for g, c in layout.items()}}
        print(f"{method:8s} {note:24s} {row['size_mb']:.3f} MB  avg {row['avg_w_bits']:.2f} bits  "
              f"search agreement {row['search_agreement']:.1f} %", flush=True)
        return row

    def test(self, row: dict) -> None:
        """Adds the test-half numbers to ``row`` (cached by layout)."""
        layout = {g: {"w": w} for g, w in row["layout"].items()}
        key = json.dumps(self.space.params(layout), sort_keys=True)
        if key not in self.tested:
            self.tested[key] = {f"test_{k}": v for k, v in self.measure(layout, "test").items()}
        row.update(self.tested[key])

    def avg_bits(self, layout: dict) -> float:
        counts = self.models.param_counts
        per_layer = self.space.per_layer(layout)
        return sum(per_layer[n]["w"] * counts[n] for n in per_layer) / sum(counts.values())


def uniform(b: Bench, widths: list[int]) -> list[dict]:
    return [b.evaluate("uniform", b.space.uniform(w), f"W{w}") for w in sorted(widths, reverse=True)]


def random_search(b: Bench, trials: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [b.evaluate("random", {g: {"w": rng.choice(b.space.w_choices)} for g in b.space.groups}, f"#{i}")
            for i in range(trials)]


def hawq_knapsack(b: Bench, budgets: list[float]) -> tuple[list[dict], float]:
    """One knapsack layout per budget; returns the rows and the seconds the sensitivities took."""
    start = time.perf_counter()
    folded = vision.lite0.load()
    fold_batchnorm(folded, lambda: folded(b.calib[0][:2]))
    traces = hawq.hessian_traces(folded, [b.calib[0][:16]], b.space.layers, iters=16)
    fixed = b.models.estimate_mb(b.space.uniform(max(b.space.w_choices))) * 1e6 - sum(
        b.models.packed_bytes[(n, max(b.space.w_choices))] for n in b.space.layers)
    options = {}
    for name in b.space.layers:
        w = folded.get_submodule(name).weight.detach()
        options[name] = {bits: (b.models.packed_bytes[(name, bits)],
                                traces[name] * float((b.models.weights[(name, bits)].dequantize() - w).pow(2).sum()))
                         for bits in b.space.w_choices}
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
    recipe = OmegaConf.merge(b.recipe, {"mixed": {"enabled": True, "widths": b.space.w_choices, "kernels": "fake"}})
    planner = WidthPlanner(b.fp, recipe, b.calib)
    seconds = time.perf_counter() - start
    rows = []
    for budget in budgets:
        if budget * 1e6 >= planner.uniform[min(b.space.w_choices)]:
            pick = planner.choose(int(budget * 1e6))["widths"]
            rows.append(b.evaluate("mixed", {n: {"w": w} for n, w in pick.items()}, f"budget {budget:.3f} MB"))
    return rows, seconds


def qsweep_study(b: Bench, trials: int, budgets: list[float]) -> list[dict]:
    """qsweep's search: its sampler and warm start (uniform ladder, the knapsack layouts of its per-layer
    sensitivity at the budgets: ``qsweep.search.warm``), maximizing search-half agreement and minimizing size."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    x, y = b.inputs["search"][:SENSITIVITY_VIEWS], b.ref["search"][:SENSITIVITY_VIEWS].argmax(1)
    loader = list(zip(x.split(vision.EVAL_BATCH), y.split(vision.EVAL_BATCH)))
    doc = compute_sensitivity(b.fp, b.recipe, b.calib, loader, b.ref["search"].shape[1], w_bits=4, a_bits=8,
                              progress=False)
    noise = layer_noise(doc["rows"], 4)
    seeds = [b.space.uniform(w) for w in sorted(b.space.w_choices, reverse=True)]
    seeds += [layout for budget in budgets
              if (layout := knapsack_layout(b.space, b.models, noise, int(budget * 1e6))) is not None]
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(OmegaConf.create({"sampler": "tpe", "seed": 0})))
    for layout in seeds:
        study.enqueue_trial(b.space.params(layout))
    rows = []

    def objective(trial: optuna.Trial):
        row = b.evaluate("qsweep", b.space.suggest(trial), f"trial {trial.number}")
        rows.append(row)
        return row["search_agreement"], row["size_mb"]

    study.optimize(objective, n_trials=trials)
    return rows


def fronts(rows: list[dict], half: str) -> dict[str, list[dict]]:
    out = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and f"{half}_agreement" in r]
        keep = pareto_front([(r[f"{half}_agreement"], r["size_mb"]) for r in mine])
        out[method] = sorted((mine[i] for i in keep), key=lambda r: r["size_mb"])
    return out


def best_under(rows: list[dict], method: str, budget: float) -> dict | None:
    fits = [r for r in rows if r["method"] == method and r["size_mb"] <= budget]
    return max(fits, key=lambda r: (r["search_agreement"], -r["size_mb"]), default=None)


def table(rows: list[dict], budgets: dict[str, float]) -> str:
    lines = ["| budget | method | layouts tried | size MB | avg W bits | agreement, search half | "
             "agreement, test half | KL, test half |", "|---|---|---|---|---|---|---|---|"]
    for label, budget in budgets.items():
        for method in METHODS:
            tried = sum(r["method"] == method for r in rows)
            r = best_under(rows, method, budget)
            if r is None:
                lines.append(f"| {label} | {method} | {tried} | none fits | | | | |")
                continue
            lines.append(f"| {label} | {method} | {tried} | {r['size_mb']:.3f} | {r['avg_w_bits']:.2f} | "
                         f"{r['search_agreement']:.1f} % | {r['test_agreement']:.1f} % | {r['test_kl']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"uniform": "s-", "random": ".", "hawq": "^--", "mixed": "v-", "qsweep": "o-"}
    for method, front in fronts(rows, "test").items():
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["size_mb"] for r in mine], [r["search_agreement"] for r in mine], styles[method][0], alpha=0.2)
        ax.plot([r["size_mb"] for r in front], [r["test_agreement"] for r in front], styles[method], label=method)
    ax.set_xlabel("artifact MB")
    ax.set_ylabel("top-1 agreement with FP32 (%)")
    ax.set_title("Lite0 layouts: faint = every layout (search half), line = front (test half)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="layouts per method (random, HAWQ budgets, study)")
    parser.add_argument("--widths", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    parser.add_argument("--budget-fraction", type=float, default=0.6, help="of the uniform W8 artifact")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-views", type=int, help="evaluation views kept (both halves; default all)")
    parser.add_argument("--out", type=Path, default=HERE / "real")
    parser.add_argument("--readme", type=Path, help="write the table into this file between the markers")
    args = parser.parse_args()
    start = time.perf_counter()
    b = Bench(args.widths, args.threads, args.eval_views)
    rows = uniform(b, args.widths)
    size = {r["note"]: r["size_mb"] for r in rows}
    lo, hi = size[f"W{min(args.widths)}"], size[f"W{max(args.widths)}"]
    budgets = {f"{args.budget_fraction:g} x W8 ({args.budget_fraction * hi:.3f} MB)": args.budget_fraction * hi,
               **{f"uniform W{w} ({size[f'W{w}']:.3f} MB)": size[f"W{w}"] for w in (5, 4) if f"W{w}" in size}}
    n = max(2, args.trials - len(budgets))  # the named budgets count toward the knapsack's layouts
    spread = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    rows += random_search(b, args.trials)
    hawq_rows, b.info["hawq_sensitivity_s"] = hawq_knapsack(b, sorted(set(spread) | set(budgets.values())))
    rows += hawq_rows
    mixed_rows, b.info["mixed_sensitivity_s"] = mixed_knapsack(b, sorted(set(spread) | set(budgets.values())))
    rows += mixed_rows
    rows += qsweep_study(b, args.trials, sorted(budgets.values()))
    # On the half no method saw: each method's front on the search half and its pick under each budget.
    picked = [r for front in fronts(rows, "search").values() for r in front]
    picked += [best_under(rows, m, budget) for m in METHODS for budget in budgets.values()]
    for r in picked:
        if r is not None:
            b.test(r)
    b.info["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    real.write_json(args.out / "results.json", {"info": b.info, "rows": rows})
    plot(rows, args.out / "pareto.png")
    text = table(rows, budgets)
    print(text)
    if args.readme:
        real.update_readme(args.readme, text)


if __name__ == "__main__":
    main()
