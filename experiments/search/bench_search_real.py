"""Mixed precision on real weights: does a search find what a uniform recipe or a sensitivity knapsack does not?

    .venv/bin/python experiments/search/bench_search_real.py [--trials N] [--widths 2 3 4 5 6 8]
        [--budget-fraction 0.6] [--out DIR] [--readme PATH] [--threads T]

EfficientNet-Lite0 (ImageNet weights) on the real-photo benchmark of ``experiments/realvision``, FP32's
predictions as labels. The evaluation photographs are split in two: trials are measured on the *search*
half, and every method's chosen layouts are reported on the *test* half, which no method saw. Every
layout is assembled by :class:`qsweep.search.trials.LayoutModels` from the shipped ``w4a8`` recipe (MSE
ranges, GPTQ, bias correction) quantized once per width, and sized as its artifact will be. Methods,
each given the same number of evaluated layouts (``--trials``; the ladder has one per width):

* **uniform**: every layer at one width (the ladder W8, W6, W5, W4, W3, W2);
* **random**: layouts drawn uniformly, one width per layer;
* **HAWQ knapsack** (``hawq.py``): Hessian-trace x perturbation sensitivity per layer and width, the
  exact multiple-choice knapsack at ``--trials`` budgets spread between the W3 and W8 sizes;
* **mixed** (``quant.mixed``, what ``quant=cnn_w4a8`` runs): per layer and width the rounding error weighted
  by the diagonal Fisher information (labels drawn from the model's own softmax on the calibration views),
  the exact knapsack at the same budgets as HAWQ;
* **qsweep study**: qsweep's own search (its space, ``search.sampler=local`` and warm start: the uniform ladder,
  then the knapsack layouts of ``quant.mixed``'s cost at every table budget and every inner ladder width's size),
  multi-objective (agreement up, size down), driven in-process; **qsweep-tpe**: the same with TPE.

Prints and writes ``results.json`` (every evaluated layout with its method, size, search- and test-half
agreement and KL), ``pareto.png`` (test agreement vs MB, each method's front) and a table: per size
budget (the uniform W6, W5, W4 and W3 artifacts' and ``--budget-fraction`` of the W8 artifact), each method's
best layout on the search half and its test-half agreement. Widths default to 2..8: at uniform W3's size
only uniform W3 fits widths 3..8.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "experiments" / "realvision"))
import bench_vision as vision  # noqa: E402
import hawq  # noqa: E402
import searchbench  # noqa: E402

from qsweep.quant.fold import fold_batchnorm  # noqa: E402


class Bench(searchbench.Bench):
    """Lite0, and the two halves of the evaluation views (split by photograph) with FP32's logits."""

    name = "Lite0"
    primary = searchbench.Metric("agreement", "agreement", "{:.1f} %")
    secondary = searchbench.Metric("kl", "KL", "{:.4f}")
    axis = "top-1 agreement with FP32 (%)"
    fisher = "categorical"
    budget_widths = (6, 5, 4, 3)

    def __init__(self, widths: list[int], threads: int, eval_views: int | None):
        torch.set_num_threads(threads)
        setup, info = vision.prepare(eval_views)
        owners = sorted(set(setup.views.photos), key=setup.views.photos.index)
        search_photos = set(owners[::2])
        idx = {half: [i for i, p in enumerate(setup.views.photos) if (p in search_photos) == (half == "search")]
               for half in ("search", "test")}
        self.inputs = {h: setup.views.inputs[i] for h, i in idx.items()}
        self.ref = {h: setup.ref[i] for h, i in idx.items()}
        info.update(search_views=len(idx["search"]), test_views=len(idx["test"]), search_photos=sorted(search_photos))
        super().__init__(setup.fp, setup.calib, widths, info)

    @torch.no_grad()
    def measure(self, layout: dict, half: str) -> dict:
        model = self.models.apply(layout)
        out = torch.cat([model(b) for b in self.inputs[half].split(vision.EVAL_BATCH)]).float()
        res = vision.compare(out, self.ref[half])
        return {"agreement": res["top1_agreement"], "kl": res["kl"]}

    def hawq_traces(self) -> dict[str, float]:
        folded = vision.lite0.load()
        fold_batchnorm(folded, lambda: folded(self.calib[0][:2]))
        return hawq.hessian_traces(folded, [self.calib[0][:16]], self.space.layers, iters=16)


def main() -> None:
    parser = searchbench.parser(__doc__, HERE / "real", budget_fraction=0.6, widths=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--eval-views", type=int, help="evaluation views kept (both halves; default all)")
    args = parser.parse_args()
    searchbench.check_arguments(parser, args, Bench.markers)
    start = time.perf_counter()
    searchbench.run(Bench(args.widths, args.threads, args.eval_views), args, start)


if __name__ == "__main__":
    main()
