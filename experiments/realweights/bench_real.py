"""Quantization quality on real weights and real text: all-MiniLM-L6-v2 on Python's language reference.

    .venv/bin/python experiments/realweights/bench_real.py [--only TEXT ...] [--eval-sentences N]
        [--threads T] [--out PATH] [--readme PATH] [--list]

Each row quantizes the sentence encoder with one recipe through ``qsweep.quantize`` (or the naive
reference, or torchao's pt2e flow) on 128 calibration sentences and compares it with FP32 on a
disjoint evaluation set: mean cosine of the sentence embeddings, nearest-neighbour agreement,
and the SQNR of every Linear's output. Prints a table and writes ``results.json`` (one object per
row) and ``environment.json`` next to it. With ``--only``, the rows run are merged into the
existing results (replacing rows of the same label).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
import minilm  # noqa: E402
import naive  # noqa: E402
import peers  # noqa: E402

import qsweep  # noqa: E402
from qsweep.config import OBSERVERS, ConfigError, QuantConfig, quant_recipe, shipped_recipe  # noqa: E402
from qsweep.export import artifact_size_mb  # noqa: E402

CALIB_SENTENCES = 128
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Row:
    """One line of the table.

    ``recipe``: a ``conf/quant`` name (loaded as shipped) or a recipe dict, for qsweep rows;
    ``kind`` "naive" and "pt2e" rows use ``w_bits`` / ``a_bits`` instead.
    """

    label: str
    recipe: str | dict | None = None
    kind: str = "qsweep"  # qsweep | naive | pt2e
    w_bits: int | None = None
    a_bits: int | None = None
    adaround: dict | None = None
    lsq: dict | None = None


def recipe(w: int, a: int | None, group: int | None = None, w_obs: str = "minmax", a_obs: str = "minmax",
           per_token: bool = False, **more) -> dict:
    """Per-channel (or per-group) symmetric weights, per-tensor affine (or per-token) activations."""
    weight = {"bits": w, "symmetric": True, "observer": w_obs,
              "granularity": "per_group" if group else "per_channel", **({"group_size": group} if group else {})}
    act = {"bits": a, "symmetric": False, "observer": a_obs,
           "granularity": "per_token" if per_token else "per_tensor"}
    return {"weight": weight, "act": act, **more}


def width_label(w: int, a: int | None, group: int | None = None) -> str:
    return f"W{w}A{a if a else 'f'}" + (f" g{group}" if group else "")


WIDTHS = [(8, 8, None), (6, 6, None), (4, 8, None), (4, 8, 64), (3, 8, 64), (4, 4, None)]
SHIPPED = ["w8a8", "w4a8", "w4a4", "w3a8", "w2a8"]
# AdaRound per layer with its defaults (qsweep.config.AdaRoundConfig: 300 steps of 512 token rows).
ADAROUND = {"mode": "layer"}
ROTATE = {"enabled": True}  # the default block size


def with_embeddings(name: str, bits: int) -> dict:
    """The shipped recipe ``name`` with its embedding tables quantized too (``quant.embeddings``)."""
    return {**OmegaConf.to_container(shipped_recipe(name), resolve=True), "embeddings": {"bits": bits}}


def weight_observers() -> list[str]:
    """The observers qsweep accepts for weights (some, such as ``auto``, only rate activations)."""
    accepted = []
    for obs in OBSERVERS:
        try:
            quant_recipe(recipe(4, 8, w_obs=obs))
        except ConfigError:
            continue
        accepted.append(obs)
    return accepted


def rows() -> list[Row]:
    """Every row of the table, in order. Observers come from ``qsweep.config.OBSERVERS``, so a
    new observer gets its rows without an edit here; minmax is the "minmax W8A8/W4A8" row."""
    out = [Row(f"naive {width_label(w, 8)}", kind="naive", w_bits=w, a_bits=8) for w in (8, 4)]
    out += [Row(f"conf/quant {name}", name) for name in SHIPPED]
    out += [Row(f"conf/quant {name} + quant.embeddings.bits=8", with_embeddings(name, 8)) for name in ("w8a8", "w4a8")]
    out += [Row(f"minmax {width_label(w, a, g)}", recipe(w, a, g)) for w, a, g in WIDTHS]
    out += [Row(f"per-token {width_label(w, a, g)}", recipe(w, a, g, per_token=True)) for w, a, g in WIDTHS]
    out += [Row(f"act={obs} W8A8", recipe(8, 8, a_obs=obs)) for obs in OBSERVERS if obs != "minmax"]
    out += [Row(f"weight={obs} W4A8", recipe(4, 8, w_obs=obs)) for obs in weight_observers() if obs != "minmax"]
    out += [Row(f"gptq {width_label(w, 8, g)}", recipe(w, 8, g, gptq={"enabled": True}))
            for w, g in ((4, None), (4, 64), (3, 64))]
    out.append(Row("adaround(layer) W4A8", recipe(4, 8), adaround=ADAROUND))
    out += [Row(f"quant.smooth {width_label(w, a)}", recipe(w, a, smooth={"enabled": True}))
            for w, a in ((8, 8), (4, 8), (4, 4))]
    out += [Row(f"smooth+gptq {width_label(w, 8, g)}", recipe(w, 8, g, smooth={"enabled": True},
                                                               gptq={"enabled": True}))
            for w, g in ((4, 64), (3, 64))]
    out += [Row(f"rotate {width_label(w, a)}", recipe(w, a, rotate=ROTATE)) for w, a in ((8, 8), (4, 8), (4, 4))]
    out += [Row(f"rotate+mse+gptq {width_label(w, a, g)}", recipe(w, a, g, w_obs="mse", rotate=ROTATE,
                                                                  gptq={"enabled": True}))
            for w, a, g in ((4, 8, None), (4, 8, 64), (3, 8, 64), (4, 4, None))]
    out += [Row(f"post_ln={mode} {width_label(w, a)}", recipe(w, a, vit={"post_ln": mode}))
            for mode in ("smooth", "reparam") for w, a in ((8, 8), (4, 4))]
    out += [Row(f"torchao pt2e {width_label(w, 8)}", kind="pt2e", w_bits=w, a_bits=8) for w in (8, 4)]
    return out


def unavailable(row: Row) -> str | None:
    """Why a row cannot run in this environment (a feature or package missing), else None."""
    if row.kind == "pt2e":
        return peers.available()
    if not isinstance(row.recipe, dict):
        return None
    # A recipe section another qsweep version does not have yet (quant.gptq, quant.smooth).
    missing = [k for k in row.recipe if not hasattr(QuantConfig(), k)]
    return f"skipped: this qsweep has no quant.{missing[0]} yet" if missing else None


def load_recipe(row: Row):
    if isinstance(row.recipe, str):
        return shipped_recipe(row.recipe)
    return row.recipe


def widths(row: Row, load=load_recipe) -> tuple[int | None, int | None]:
    """The row's weight and activation widths; ``load`` gives a qsweep row's recipe (each benchmark has its own)."""
    if row.kind != "qsweep":
        return row.w_bits, row.a_bits
    try:
        cfg = quant_recipe(load(row))
    except Exception:  # an invalid recipe is reported when the row runs
        return None, None
    return cfg.weight.bits, cfg.act.bits


@dataclass
class Setup:
    fp: torch.nn.Module
    names: list[str]
    calib: list[dict[str, torch.Tensor]]
    eval: list[dict[str, torch.Tensor]]
    ref: minilm.Reference


def build(row: Row, s: Setup) -> tuple[minilm.Runner, float | None]:
    """Quantizes the FP32 model as ``row`` says; returns its runner and, for qsweep rows, the exact size in MB
    of the artifact ``python -m qsweep`` exports (``export.kernels=int``)."""
    if row.kind == "naive":
        return minilm.module_runner(naive.quantize(s.fp, s.calib, row.w_bits, row.a_bits), s.names), None
    if row.kind == "pt2e":
        return peers.runner(peers.quantize(s.fp, s.calib, row.w_bits)), None
    qmodel = qsweep.quantize(s.fp, load_recipe(row), s.calib, adaround=row.adaround, lsq=row.lsq)
    return minilm.module_runner(qmodel, s.names), artifact_size_mb(qmodel, "int")


class _ListHandler(logging.Handler):
    """Appends each WARNING-or-worse record to a list (adding it also keeps it out of stderr)."""

    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Warnings and qsweep's logged warnings raised inside, distinct, into the yielded list.

    qsweep warns per layer (an observer that clips, a LayerNorm left alone): dozens of lines a
    row, kept with the row in results.json rather than in the log.
    """
    messages: list[str] = []
    logger = logging.getLogger("qsweep")
    handler = _ListHandler(messages)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
        messages[:] = list(dict.fromkeys([f"{w.category.__name__}: {w.message}" for w in caught] + messages))


def run_row(row: Row, s: Setup) -> dict:
    """The row's results.json object; a row that cannot run or fails carries its ``error``."""
    w_bits, a_bits = widths(row)
    rec = {"recipe": row.recipe if isinstance(row.recipe, str) else row.label, "label": row.label,
           "kind": row.kind, "w_bits": w_bits, "a_bits": a_bits, "cosine": None, "nn_agreement": None,
           "sqnr_mean_db": None, "sqnr_min_db": None, "sqnr_min_layer": None, "seconds": None,
           "eval_seconds": None, "error": unavailable(row), "warnings": [], "adaround": row.adaround,
           "lsq": row.lsq, "sqnr_db": None, "size_mb": None}
    if rec["error"]:
        return rec
    try:
        start = time.perf_counter()
        with collected_warnings() as rec["warnings"]:
            runner, size_mb = build(row, s)
        rec["seconds"] = round(time.perf_counter() - start, 2)
        rec["size_mb"] = None if size_mb is None else round(size_mb, 3)
        start = time.perf_counter()
        comp = minilm.compare(runner, s.eval, s.ref)
        rec["eval_seconds"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # one failing recipe must not sink the table; the error is its result
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    worst = min(comp.sqnr_db, key=comp.sqnr_db.get)
    rec.update(cosine=round(comp.cosine, 6), nn_agreement=round(comp.nn_agreement, 4),
               sqnr_mean_db=round(sum(comp.sqnr_db.values()) / len(comp.sqnr_db), 2),
               sqnr_min_db=round(comp.sqnr_db[worst], 2), sqnr_min_layer=worst,
               sqnr_db={n: round(v, 2) for n, v in comp.sqnr_db.items()})
    return rec


def short_layer(name: str | None) -> str:
    return (name or "").replace("encoder.layer.", "L").replace("attention.", "attn.")


def table(results: list[dict]) -> str:
    """The results as a markdown table ("warnings": distinct warnings while quantizing, in results.json)."""
    lines = ["| row | W | A | size MB | cosine | NN agree | SQNR mean dB | SQNR worst dB (layer) | quantize s | warnings |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        size = f"{r['size_mb']:.3f}" if r.get("size_mb") is not None else "-"
        bits = f"| {r['label']} | {r['w_bits'] or '-'} | {r['a_bits'] or 'f'} | {size} |"
        if r["error"]:
            lines.append(f"{bits} n/a: {r['error'][:140]} | | | | | |")
            continue
        lines.append(f"{bits} {r['cosine']:.4f} | {100 * r['nn_agreement']:.1f} % | {r['sqnr_mean_db']:.1f} | "
                     f"{r['sqnr_min_db']:.1f} ({short_layer(r['sqnr_min_layer'])}) | {r['seconds']:.1f} | "
                     f"{len(r['warnings']) or ''} |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def merge(old_path: Path, new: list[dict], order: list[str]) -> list[dict]:
    """``new`` over the rows already in ``old_path``, by label, in table order."""
    by_label = {r["label"]: r for r in json.loads(old_path.read_text())} if old_path.exists() else {}
    by_label.update({r["label"]: r for r in new})
    return [by_label[label] for label in order if label in by_label]


def check_readme(path: Path, markers: tuple[str, str] = (MARK_START, MARK_END)) -> str:
    """``path``'s text; stops naming what is missing unless it holds both ``markers``, in order."""
    doc = path.read_text() if path.is_file() else ""
    start, end = markers
    if start not in doc or end not in doc.split(start, 1)[1]:
        raise SystemExit(f"--readme {path}: needs the lines {start} and {end} (in this order), to write "
                         "the table between")
    return doc


def update_readme(path: Path, text: str, markers: tuple[str, str] = (MARK_START, MARK_END)) -> None:
    """Replaces what lies between ``markers`` in ``path`` with ``text``."""
    start, end = markers
    head, rest = check_readme(path, markers).split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    os.replace(tmp, path)


def environment(threads: int, sents: list[str], n_eval: int, load: tuple) -> dict:
    import transformers

    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torchao": torchao_version, "qsweep": qsweep.__version__,
            "git_commit": commit or None, "threads": threads, "cpus": os.cpu_count(),
            "corpus": "pydoc_data.topics (Python's language reference), prose sentences",
            "corpus_sentences": len(sents), "corpus_sha256_16": corpus.corpus_hash(sents),
            "calib_sentences": CALIB_SENTENCES, "eval_sentences": n_eval,
            "max_length": minilm.MAX_LENGTH, "batch_size": minilm.BATCH_SIZE,
            "load_average_start": load[0], "load_average_end": load[1]}


def eval_sentences(tokenizer, sents: list[str], n_eval: int) -> list[str]:
    """The ``n_eval`` sentences after the calibration ones, shortest first: batches pad to their longest,
    so sorting by length halves the compute."""
    if len(sents) < CALIB_SENTENCES + n_eval:
        raise SystemExit(f"the corpus has {len(sents)} sentences: at most {len(sents) - CALIB_SENTENCES} "
                         f"can be evaluated beside {CALIB_SENTENCES} calibration sentences")
    return sorted(sents[CALIB_SENTENCES:CALIB_SENTENCES + n_eval], key=lambda t: len(tokenizer(t)["input_ids"]))


def prepare(n_eval: int) -> tuple[Setup, list[str]]:
    fp, tokenizer = minilm.load()
    sents = corpus.sentences()
    names = minilm.linear_names(fp)
    batches = minilm.tokenize(tokenizer, eval_sentences(tokenizer, sents, n_eval))
    ref = minilm.reference(minilm.module_runner(fp, names), batches)
    return Setup(fp, names, minilm.tokenize(tokenizer, sents[:CALIB_SENTENCES]), batches, ref), sents


def add_common_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every real-weights benchmark takes (this one and experiments/realvision's)."""
    parser.add_argument("--only", action="append", default=None, metavar="TEXT",
                        help="run only rows whose label contains TEXT (repeatable); merged into --out")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--readme", type=Path, default=None, help="write the table into this file between "
                        f"{MARK_START} and {MARK_END}")
    parser.add_argument("--list", action="store_true", help="print the row labels and exit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, HERE / "results.json")
    parser.add_argument("--eval-sentences", type=int, default=512)
    args = parser.parse_args()
    all_rows = rows()
    if args.list:
        print("\n".join(r.label for r in all_rows))
        return
    selected = [r for r in all_rows if not args.only or any(t in r.label for t in args.only)]
    if not selected:
        raise SystemExit(f"no row label contains any of {args.only}; see --list")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    wall = time.perf_counter()
    load_start = os.getloadavg()
    setup, sents = prepare(args.eval_sentences)
    print(f"{len(sents)} sentences ({corpus.corpus_hash(sents)}), {CALIB_SENTENCES} calibration, "
          f"{args.eval_sentences} evaluation; {len(setup.names)} Linears; FP32 reference in "
          f"{time.perf_counter() - wall:.0f} s", flush=True)
    results = []
    for i, row in enumerate(selected, 1):
        start = time.perf_counter()
        rec = run_row(row, setup)
        results.append(rec)
        status = (f"n/a: {rec['error']}" if rec["error"] else
                  f"cos {rec['cosine']:.4f}  nn {rec['nn_agreement']:.3f}  sqnr {rec['sqnr_mean_db']:.1f} dB"
                  + (f"  ({len(rec['warnings'])} warnings, in results)" if rec["warnings"] else ""))
        print(f"[{i}/{len(selected)}] {row.label:<28} {time.perf_counter() - start:6.1f} s  {status}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    ran = [r["label"] for r in results]
    if args.only:
        results = merge(args.out, results, [r.label for r in all_rows])
    write_json(args.out, results)
    env = environment(args.threads, sents, args.eval_sentences, (load_start, os.getloadavg()))
    env["rows_run"] = ran if args.only else "all"
    env["wall_seconds"] = round(time.perf_counter() - wall, 1)
    write_json(args.out.with_name("environment.json"), env)
    text = table(results)
    print(f"\n{text}\n\nwall {env['wall_seconds']:.0f} s; wrote {args.out}")
    if args.readme:
        update_readme(args.readme, text)


if __name__ == "__main__":
    main()
