"""The end of a study: its front and the commands to run each member, the top layouts quantized as their
runs quantize them, the best layout (under the size budget) as an experiment overlay and an exported run.

A trial measures a layout cheaply: weights and activation ranges come from caches calibrated with every
searched layer at the widest width, on the trial images only. A run of the layout calibrates its own
activations on its own (narrower) weights and rounds with the Hessians they give, on the whole test set,
so its numbers differ a little. The top layouts are therefore quantized again here exactly as their runs
do (same recipe, calibration, rounding, backend and test set): the numbers reported for them are the
ones their runs reproduce, with the trial's estimate beside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from qsweep.app import run
from qsweep.evaluate import evaluate
from qsweep.export import artifact_bytes
from qsweep.files import write_text
from qsweep.quant.intkernel import to_int_backend
from qsweep.quant.pipeline import quantize
from qsweep.report import format_table
from qsweep.search.fidelity import Quality, describe, mean_quality, reference_outputs
from qsweep.search.plots import plot_history, plot_layout_heatmap, plot_pareto
from qsweep.search.space import SearchSpace
from qsweep.search.study import Worker, best_experiment_yaml, counts, eval_backend, trial_rows, write_trials_csv
from qsweep.tracking import NullRecorder, Recorder


def print_study_run(parent: Recorder | NullRecorder) -> None:
    if parent.run_id is not None:
        print(f"mlflow: study run {parent.run_id} at {parent.uri}; runs table {parent.runs_url()}", flush=True)


def ranking(s: DictConfig, quality: Quality, budget: int | None, rows: list[dict]) -> Callable[[dict], tuple]:
    """Best first: by score (``objective=score``; pareto without a budget), else by quality; then smaller."""
    by_score = s.objective == "score" or (s.objective == "pareto" and budget is None
                                          and all(r["score"] is not None for r in rows))
    if by_score:
        return lambda r: (-r["score"], r["size_mb"])
    return lambda r: (quality.key(r["quality"]), r["size_mb"])


def summarize(cfg: DictConfig, study: optuna.Study, worker: Worker, job, out: Path, name: str) -> dict[str, Any]:
    """Tables and plots of the study; once it is complete, the top layouts as their runs measure them and the best run."""
    s, space, quality, parent = cfg.search, worker.space, worker.quality, worker.parent
    rows = trial_rows(study, space, quality)
    complete = [r for r in rows if r["state"] == "complete"]
    n = counts(study)
    result: dict[str, Any] = {"study": name, "complete": n[TrialState.COMPLETE], "pruned": n[TrialState.PRUNED],
                              "failed": n[TrialState.FAIL], "output_dir": str(out)}
    front = worker.front.update(study) if worker.front is not None else []
    result["pareto"] = [{k: v for k, v in e.items() if k not in ("w_bits", "a_bits")} for e in front]
    if not complete:
        write_text(out / "search.json", json.dumps(result, indent=2))
        print_study_run(parent)
        return result
    rank = ranking(s, quality, worker.budget_bytes, complete)
    ranked = sorted(complete, key=rank)
    files = _study_figures(cfg, rows, complete, ranked, space, quality, out, name)
    print_front(front, quality, _front_commands(cfg, front, rows, space, name, out), worker.budget_bytes)
    finals = sorted(_as_run(cfg, ranked[: max(1, s.top_k)], space, job, worker) if s.top_k else ranked[:1], key=rank)
    best = finals[0]
    _print_finals(finals, quality, s.top_k, len(job.loader.dataset), worker.images.images, worker.budget_bytes)
    layers = best_layers(cfg, space, best)
    files.append(_write_best_experiment(cfg, best, layers, quality, job, out, name))
    result.update(best_trial=best["trial"], best_score=best["score"], best_top1=best["top1"],
                  best_size_mb=best["size_mb"], best_yaml=str(_best_yaml_path(cfg, out, name)),
                  top=[{k: r.get(k) for k in _TOP_KEYS} for r in finals])
    result[f"best_{quality.name}"], result["budget_bytes"] = best["quality"], worker.budget_bytes
    _log_study(parent, best, quality, n, job, files)
    if cfg.export.enabled:
        result["best_run"] = _best_run(cfg, layers, name, out, parent)
    parent.close_parent()
    write_text(out / "search.json", json.dumps(result, indent=2, default=str))
    print_study_run(parent)
    return result


_TOP_KEYS = ("trial", "score", "top1", "quality", "size_mb", "trial_score", "trial_top1", "trial_quality",
             "trial_size_mb")


def best_layers(cfg: DictConfig, space: SearchSpace, row: dict) -> dict[str, Any]:
    """``quant.layers`` of a run of ``row``'s layout: the recipe's rules, then the layout's."""
    return {**OmegaConf.to_container(cfg.quant.layers), **space.overrides(space.layout_of(row["params"]))}


def _study_figures(cfg: DictConfig, rows: list[dict], complete: list[dict], ranked: list[dict],
                   space: SearchSpace, quality: Quality, out: Path, name: str) -> list[Path]:
    """``trials.csv``, the Pareto plot, the layout heat map and the history."""
    files = [write_trials_csv(rows, space, out / "trials.csv", quality)]
    points = [(r["quality"], r["size_mb"]) for r in complete]
    files.append(plot_pareto(points, [f"#{r['trial']}" for r in complete], out / "pareto.png",
                             f"study {name}: {quality.unit} vs size", ylabel=quality.unit, maximize=quality.maximize))
    top = ranked[:30]
    value = "score" if cfg.search.objective == "score" else "quality"
    files.append(plot_layout_heatmap(space.layers, [r["layout"] for r in top],
                                     [f"#{r['trial']} {r[value]:.4g}" for r in top], out / "layout_heatmap.png",
                                     f"study {name}: weight widths of the best {len(top)} trials"))
    history = [r for r in rows if r[value] is not None or r["state"] == "pruned"]
    files.append(plot_history([r["trial"] for r in history],
                              [r[value] if r[value] is not None else float("nan") for r in history],
                              [r["state"] == "pruned" for r in history], out / "history.png",
                              f"{cfg.score.name} score" if value == "score" else quality.unit,
                              maximize=value == "score" or quality.maximize))
    return files


def _config_dir(cfg: DictConfig, out: Path) -> Path:
    return Path(cfg.search.best_dir) if cfg.search.best_dir else out / "conf"


def _best_yaml_path(cfg: DictConfig, out: Path, name: str) -> Path:
    return _config_dir(cfg, out) / "experiment" / "best" / f"{name}_best.yaml"


def _command(cfg: DictConfig, out: Path, overlay: str) -> str:
    return f"python -m qsweep --config-dir {_config_dir(cfg, out).resolve()} +experiment=best/{overlay}"


def _front_commands(cfg: DictConfig, front: list[dict], rows: list[dict], space: SearchSpace, name: str,
                    out: Path) -> list[str]:
    """Each front member as an experiment overlay beside the best one; the commands that run them."""
    params = {r["trial"]: r["params"] for r in rows}
    commands = []
    for e in front:
        overlay = f"{name}_trial{e['trial']}"
        command = _command(cfg, out, overlay)
        header = [f"Pareto front member of study {name!r}: trial {e['trial']}, {e['size_mb']:.6f} MB (the trial's "
                  "estimate of its quality: its run quantizes it afresh).", f"Reproduce: {command}"]
        layers = best_layers(cfg, space, {"params": params[e["trial"]]})
        write_text(_config_dir(cfg, out) / "experiment" / "best" / f"{overlay}.yaml",
                   best_experiment_yaml(cfg, layers, overlay, header))
        commands.append(command)
    return commands


def print_front(front: list[dict], quality: Quality, commands: list[str], budget: int | None) -> None:
    under = f" under {budget / 1e6:.6f} MB" if budget is not None else ""
    table = [(f"trial {e['trial']}", f"{quality.format(e[quality.name])}, {e['size_mb']:.6f} MB, layout {e['layout']}"
              + (f", score {e['score']:g}" if e.get("score") is not None else "") + f"\n    {command}")
             for e, command in zip(front, commands)]
    print(f"Pareto front ({quality.unit} on the trial images vs exact size{under}; pareto.json, pareto.csv)\n"
          + format_table(table), flush=True)


def _as_run(cfg: DictConfig, rows: list[dict[str, Any]], space: SearchSpace, job, worker: Worker) -> list[dict]:
    """The rows' layouts quantized, evaluated and sized exactly as their runs do, on the whole test set.

    Each row keeps the trial's own numbers as ``trial_*``.
    """
    backend, quality = eval_backend(cfg), worker.quality
    reference = None if quality.needs_labels else reference_outputs(job.model, job.loader, job.device)
    out = []
    for r in rows:
        recipe = {**OmegaConf.to_container(cfg.quant, resolve=True), "layers": best_layers(cfg, space, r)}
        qmodel = quantize(job.model, recipe, job.calib, adaround=cfg.adaround, lsq=cfg.lsq)
        runner = to_int_backend(qmodel)[0] if backend == "int" else qmodel
        result = evaluate(runner, job.loader, job.bundle.num_classes, job.device, cfg.progress,
                          desc=f"trial {r['trial']}, as its run")
        q = result.top1 if quality.needs_labels else mean_quality(runner, job.loader, quality, reference, job.device)
        size_mb = artifact_bytes(qmodel, cfg.export.kernels) / 1e6
        out.append({**r, **{f"trial_{k}": r[k] for k in ("score", "top1", "quality", "size_mb")},
                    "top1": result.top1, "quality": q, "size_mb": size_mb,
                    "score": worker.score_of(size_mb, result.top1)})
    return out


def _print_finals(finals: list[dict], quality: Quality, top_k: int, images: int, trial_images: int,
                  budget: int | None) -> None:
    def numbers(r: dict, prefix: str) -> str:
        return describe(quality, r[f"{prefix}score"], r[f"{prefix}quality"], r[f"{prefix}top1"])

    if top_k:
        print(f"top layouts as their runs quantize them, on the whole test set ({images} images); in brackets the "
              f"trial's estimate ({trial_images} trial images, activations calibrated once at the widest widths)\n"
              + format_table([(f"trial {r['trial']}", f"{numbers(r, '')}, {r['size_mb']:.6f} MB "
                                                      f"({numbers(r, 'trial_')})") for r in finals]), flush=True)
    best = finals[0]
    under = f" under the size budget ({budget / 1e6:.6f} MB)" if budget is not None else ""
    estimate = "" if top_k else (f" (the trial's estimate on {trial_images} trial images: with search.top_k=0 no "
                                 "layout is quantized as its run does, which calibrates on its own widths)")
    print(f"best layout{under}: trial {best['trial']}, {numbers(best, '')}, {best['size_mb']:.6f} MB{estimate}",
          flush=True)


def _write_best_experiment(cfg: DictConfig, best: dict, layers: dict, quality: Quality, job, out: Path,
                           name: str) -> Path:
    """The best layout as an experiment overlay in a user config dir (never the installed package)."""
    best_name = f"{name}_best"
    command = _command(cfg, out, best_name)
    header = [f"Best layout of study {name!r}: trial {best['trial']}, "
              f"{describe(quality, best['score'], best['quality'], best['top1'])} on {job.fp.images} test images, "
              f"{best['size_mb']:.6f} MB.", f"Reproduce: {command}"]
    text = best_experiment_yaml(cfg, layers, best_name, header)
    yaml_path = write_text(_best_yaml_path(cfg, out, name), text)
    print(f"best layout written to {yaml_path}; run it with\n  {command}", flush=True)
    return write_text(out / f"{best_name}.yaml", text)


def _log_study(parent: Recorder | NullRecorder, best: dict, quality: Quality, n: dict, job,
               files: list[Path]) -> None:
    parent.log_metrics({"best_score": best["score"], "best_top1": best["top1"], f"best_{quality.name}": best["quality"],
                        "best_size_mb": best["size_mb"], "best_trial": best["trial"],
                        "trials_complete": n[TrialState.COMPLETE], "trials_pruned": n[TrialState.PRUNED],
                        "trials_failed": n[TrialState.FAIL], "fp_top1": job.fp.top1, "fp32_size_mb": job.fp_size_mb})
    parent.set_tags({"best_layout": json.dumps(best["layout"])[:5000]})
    for path in files:
        parent.log_artifact(path)


def _best_run(cfg: DictConfig, layers: dict, name: str, out: Path, parent: Recorder | NullRecorder) -> dict[str, Any]:
    """The best layout as an ordinary exported run, nested under the study's run."""
    best_cfg = OmegaConf.merge(cfg, OmegaConf.create({
        "mode": "run", "name": f"{name}_best", "quant": {"name": f"{name}_best"},
        "tracking": {"run_name": f"study:{name}:best"},
    }))
    best_cfg.quant.layers = layers
    return run(best_cfg, out / "best", parent_run_id=parent.run_id)
