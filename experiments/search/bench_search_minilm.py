"""Mixed precision without labels: does a search find MiniLM layouts a uniform recipe or a HAWQ knapsack does not?

    .venv/bin/python experiments/search/bench_search_minilm.py [--trials N] [--widths 3 4 5 6 8]
        [--budget-fraction F] [--sentences N] [--out DIR] [--readme PATH] [--threads T]

all-MiniLM-L6-v2 (``experiments/realweights``: the sentence embedding is the attention-mask mean of the
last hidden state, L2-normalised) on the prose sentences of Python's language reference: the 128
calibration sentences of the realweights benchmark, and the ``--sentences`` evaluation sentences after
them, taken alternately (by length) into two halves. Every layout is measured on the *search* half, and
each method's chosen layouts are reported on the *test* half, which no method saw. Quality is fidelity
to FP32, no labels: the mean cosine of the embeddings (qsweep's ``search.objective=cosine``), and the
nearest-neighbour agreement (the share of sentences whose nearest other sentence is FP32's). Layouts are
per layer (the 36 Linears), assembled by :class:`qsweep.search.trials.LayoutModels` from the shipped
``w4a8`` recipe (MSE ranges, GPTQ, Hadamard-rotated Linear inputs) quantized once per width and sized as
the artifact will be. The methods of ``bench_search_real.py``, each given ``--trials`` layouts:

* **uniform**: the ladder W8, W6, W5, W4, W3;
* **random**: layouts drawn uniformly, one width per layer;
* **HAWQ knapsack** (``hawq.py``): the Hessian trace of the squared error between the embedding and FP32's
  x the perturbation of each width, the exact knapsack at budgets spread between the W3 and W8 sizes;
* **mixed** (``quant.mixed`` with ``quant.mixed.fisher=gaussian``): the rounding error weighted by the
  diagonal Fisher information of the embedding as the mean of a unit Gaussian, the same knapsack;
* **qsweep study**: its TPE sampler and warm start (the ladder, then knapsack layouts of each layer's
  embedding SQNR quantized alone), cosine up and size down, driven in-process.

``--search-embeddings`` runs every method on the recipe with its embedding tables quantized (``quant.embeddings``:
the 47 MB of float word embeddings are most of the artifact), each table a searched layer like the Linears, and
adds the shipped recipe's uniform ladder with float tables (method ``shipped``), whose sizes are then the table's
budgets.

Writes ``results.json`` (every evaluated layout with its method, size, search- and test-half numbers) and
``pareto.png`` (test cosine vs MB, each method's front) under ``--out``, and prints a table (written between
``<!-- minilm:start -->`` and ``<!-- minilm:end -->`` with ``--readme``): per size budget (the uniform W6, W5,
W4 and W3 artifacts', and ``--budget-fraction`` of W8's if given), each method's best layout on the search
half and its test-half numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "experiments" / "realweights"))
import bench_real as real  # noqa: E402
import corpus  # noqa: E402
import hawq  # noqa: E402
import minilm  # noqa: E402
import searchbench  # noqa: E402

from qsweep.search.fidelity import QUALITIES  # noqa: E402
from qsweep.search.trials import LayoutModels  # noqa: E402

HAWQ_SENTENCES = 16  # as many inputs as the Lite0 bench's Hessian traces take


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [model(**b).float() for b in batches]


def fidelity(embs: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    """Mean embedding cosine with FP32 (the fidelity objective's) and nearest-neighbour agreement (a fraction)."""
    emb, target = torch.cat(embs), torch.cat(ref)
    return {"cosine": round(QUALITIES["cosine"].per_input(emb, target, None).mean().item(), 6),
            "nn_agreement": round((minilm.nearest(emb) == minilm.nearest(target)).float().mean().item(), 4)}


class Bench(searchbench.Bench):
    """MiniLM's embedder, and the two halves of the evaluation sentences with FP32's embeddings."""

    name = "MiniLM"
    primary = searchbench.Metric("cosine", "cosine", "{:.4f}")
    secondary = searchbench.Metric("nn_agreement", "NN agreement", "{:.1f} %", scale=100)
    axis = "mean embedding cosine with FP32"
    fisher = "gaussian"
    # The float word embeddings (47 MB) are most of the artifact: a fraction of W8's size would fit no
    # layout, so the table's budgets are the uniform ladder's sizes (issue 21's bars for MiniLM).
    budget_widths = (6, 5, 4, 3)
    markers = ("<!-- minilm:start -->", "<!-- minilm:end -->")

    def __init__(self, widths: list[int], threads: int, sentences: int, search_embeddings: bool = False):
        torch.set_num_threads(threads)
        encoder, tokenizer = minilm.load()
        sents = corpus.sentences()
        ev = real.eval_sentences(tokenizer, sents, sentences)
        self.batches = {"search": minilm.tokenize(tokenizer, ev[::2]), "test": minilm.tokenize(tokenizer, ev[1::2])}
        fp = minilm.Embedder(encoder).eval()
        self.ref = {h: embed(fp, b) for h, b in self.batches.items()}
        info = {"corpus_sentences": len(sents), "corpus_sha256_16": corpus.corpus_hash(sents),
                "calib_sentences": real.CALIB_SENTENCES, "search_sentences": len(ev[::2]),
                "test_sentences": len(ev[1::2]), "max_length": minilm.MAX_LENGTH}
        self.search_embeddings = info["search_embeddings"] = search_embeddings
        # Any width turns the tables on; every layout then sets each table's own.
        super().__init__(fp, minilm.tokenize(tokenizer, sents[:real.CALIB_SENTENCES]), widths, info,
                         {"embeddings": {"bits": max(widths) if search_embeddings else None}})

    def measure(self, layout: dict, half: str) -> dict:
        return fidelity(embed(self.models.apply(layout), self.batches[half]), self.ref[half])

    def reference_ladder(self, widths: list[int]) -> list[dict]:
        """With ``--search-embeddings``: the shipped recipe's uniform layouts, float embedding tables (method
        ``shipped``); their sizes are the table's budgets, as issue 21 states them."""
        if not self.search_embeddings:
            return []
        recipe = searchbench.shipped_recipe("w4a8")
        space = searchbench.layout_space(self.fp, recipe, widths)
        shipped = LayoutModels(self.fp, recipe, self.calib, space)
        rows = []
        for w in sorted(widths, reverse=True):
            layout = space.uniform(w)
            model = shipped.apply(layout)
            rows.append({"method": "shipped", "note": f"W{w}", "size_mb": round(shipped.estimate_mb(layout), 4),
                         "avg_w_bits": float(w), "layout": {g: c["w"] for g, c in layout.items()},
                         **{f"{h}_{k}": v for h in ("search", "test")
                            for k, v in fidelity(embed(model, self.batches[h]), self.ref[h]).items()}})
            print(f"shipped  W{w} (float tables)        {rows[-1]['size_mb']:.3f} MB  search cosine "
                  f"{rows[-1]['search_cosine']:.4f}", flush=True)
        return rows

    def hawq_traces(self) -> dict[str, float]:
        first = {k: v[:HAWQ_SENTENCES] for k, v in self.calib[0].items()}
        return hawq.embedding_hessian_traces(self.fp, [first], self.space.layers, iters=16)


def main() -> None:
    parser = searchbench.parser(__doc__, HERE / "minilm", budget_fraction=None)
    parser.add_argument("--sentences", type=int, default=512, help="evaluation sentences (both halves)")
    parser.add_argument("--search-embeddings", action="store_true",
                        help="quantize the embedding tables and search their widths like the layers'; the budgets "
                             "are then the shipped recipe's uniform sizes, float tables")
    args = parser.parse_args()
    searchbench.check_arguments(parser, args, Bench.markers)
    if args.sentences < 4:
        parser.error(f"--sentences {args.sentences}: each half needs at least 2 sentences for nearest neighbours")
    start = time.perf_counter()
    searchbench.run(Bench(args.widths, args.threads, args.sentences, args.search_embeddings), args, start)


if __name__ == "__main__":
    main()
