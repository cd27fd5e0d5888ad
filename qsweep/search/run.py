"""``mode=search``: one worker of a study, from config to the best layout's run."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from torch.utils.data import DataLoader, Subset

from qsweep.analysis.sensitivity import sensitivity, sensitivity_key
from qsweep.app import run
from qsweep.job import prepare_job, run_tags
from qsweep.errors import interruption_taken
from qsweep.evaluate import evaluate
from qsweep.models.cache import cache_dir as resolve_cache_dir
from qsweep.files import write_text
from qsweep.report import format_table
from qsweep.search.greedy import greedy_layout, layer_noise
from qsweep.search.plots import pareto_front, plot_history, plot_layout_heatmap, plot_pareto
from qsweep.search.space import FLOAT, SearchSpace
from qsweep.search.storage import has_heartbeat, open_storage, redact, resolve
from qsweep.search.study import (
    Worker, best_experiment_yaml, close_stale_runs, counts, layer_names_of, open_study, print_front,
    score_function, stop_parent, trial_rows, wait_for_attr, work, write_trials_csv,
)
from qsweep.search.trials import LayoutModels, TrialImages
from qsweep.run_params import run_params
from qsweep.tracking import NullRecorder, Recorder

# Images for the greedy seed's per-layer SQNR: enough for a stable ranking, cheap for DeiT-S.
SENSITIVITY_IMAGES = 128


def run_search(cfg: DictConfig, output_dir: Path, project_dir: Path, sweep: str | None = None,
               overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run this worker's share of the study ``search.study_name`` and, once it is complete, its summary.

    Storage and space are checked before any trial: an unreachable storage or a study of the
    same name with another search space is an error. Returns the result also written to
    ``search.json``.
    """
    s = cfg.search
    name = s.study_name or cfg.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial prints one line of its own
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(s.storage, project_dir, s.heartbeat_s, s.retries)
    job = prepare_job(cfg, NullRecorder())
    space = SearchSpace.build(layer_names_of(job.model, cfg), s)
    score_of = score_function(cfg, job.fp_size_mb, job.fp.top1)
    fingerprint = space.fingerprint({
        "objective": s.objective, "score": OmegaConf.to_container(cfg.score), "data": job.bundle.fingerprint,
        "model": job.fp_key, "recipe": OmegaConf.to_container(cfg.quant), "trial_images": s.trial_images,
        "adaround": OmegaConf.to_container(cfg.adaround), "lsq": OmegaConf.to_container(cfg.lsq),
    })
    study, created = open_study(name, storage, s, fingerprint, score_of)
    print(f"study {name!r} at {redact(resolve(s.storage, project_dir))}: {space.describe()}; "
          f"{counts(study)[TrialState.COMPLETE]} complete trials so far", flush=True)

    parent = _parent_recorder(cfg, study, created, name, project_dir, sweep, overrides)
    if parent.run_id is not None:
        print(f"mlflow: study run {parent.run_id} at {parent.uri}; runs table {parent.runs_url()}", flush=True)
    try:
        models = LayoutModels(job.model, cfg.quant, job.calib, space, cfg.adaround, cfg.lsq, progress=cfg.progress,
                          kernels=cfg.export.kernels)
        images = TrialImages.from_dataset(job.loader.dataset, s.trial_images, cfg.data.eval_batch_size,
                                          seed=s.seed or 0, steps=s.prune_steps)
        if created:
            _warm_start(cfg, study, space, models, job)
        backend = "fake" if cfg.eval.backend == "fake" else "int"
        tags = {**run_tags(cfg), "qsweep.study": name, "weights": job.weights}
        worker = Worker(cfg, space, models, images, score_of, backend, job.device, parent, tags)
        work(study, worker, has_heartbeat(storage))
        return _summarize(cfg, study, space, models, job, score_of, parent, output_dir, name)
    except BaseException as exc:  # Ctrl-C, SIGTERM, an error: the study's run is not left RUNNING
        interruption_taken()
        stop_parent(study, parent, exc)
        raise
    finally:
        close_stale_runs(study, parent)


def _parent_recorder(cfg: DictConfig, study: optuna.Study, created: bool, name: str, project_dir: Path,
                     sweep: str | None, overrides: Sequence[str]) -> Recorder | NullRecorder:
    """The study's MLflow run: made by the worker that created the study, joined (by its id) by the others."""
    if not cfg.tracking.enabled:
        return NullRecorder()
    rec = Recorder.for_project(cfg.tracking.uri, cfg.tracking.experiment, project_dir)
    run_id = None if created else wait_for_attr(study, "mlflow_parent_run_id", timeout_s=60)
    if run_id is not None:
        rec.attach(run_id)
        rec.client.update_run(run_id, status="RUNNING")
        rec.set_tags(rec.owner_tags())  # this live process owns it now: no later run reaps it as a dead one's
        return rec
    sweep_parent = rec.sweep_parent(sweep, cfg.name) if sweep else None
    rec.start(f"study:{name}", {**run_tags(cfg), "qsweep.kind": "study", "qsweep.study": name},
              parent_run_id=sweep_parent)
    rec.log_params(run_params(cfg, overrides))
    study.set_user_attr("mlflow_parent_run_id", rec.run_id)
    return rec


def _warm_start(cfg: DictConfig, study: optuna.Study, space: SearchSpace, models: LayoutModels, job) -> None:
    """Uniform layouts, then sensitivity-guided greedy layouts, ahead of the sampler."""
    s = cfg.search
    widths = sorted(w for w in space.w_choices if w != FLOAT)
    seeds = [space.uniform(w) for w in (s.warm_start if s.warm_start is not None else widths[::-1])]
    if s.greedy:
        budgets = [s.greedy_budget_mb] if s.greedy_budget_mb else [
            models.estimate_mb(space.uniform(w)) for w in widths[1:-1]]
        rows = sensitivity(job.model, cfg.quant, job.calib, first_images(job.loader, SENSITIVITY_IMAGES),
                           job.bundle.num_classes, resolve_cache_dir(cfg.cache_dir),
                           sensitivity_key(job.model, f"{job.fp_key}-first{SENSITIVITY_IMAGES}", cfg.quant,
                                           cfg.analysis.w_bits, cfg.analysis.a_bits),
                           w_bits=cfg.analysis.w_bits, a_bits=cfg.analysis.a_bits, progress=cfg.progress)
        noise = layer_noise(rows, cfg.analysis.w_bits)
        for budget in budgets:
            seeds.append(greedy_layout(space, noise, models.estimate_mb, budget))
        print(f"warm start: {len(seeds) - len(budgets)} uniform layouts, {len(budgets)} greedy layouts under "
              f"{', '.join(f'{b:.4f}' for b in budgets)} MB from per-layer sensitivity", flush=True)
    seen = set()
    for layout in seeds:
        params = space.params(layout)
        key = json.dumps(params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            study.enqueue_trial(params, user_attrs={"seed": "warm start"})


def first_images(loader: DataLoader, limit: int) -> DataLoader:
    dataset = loader.dataset
    if len(dataset) > limit:
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False)


def _summarize(cfg: DictConfig, study: optuna.Study, space: SearchSpace, models: LayoutModels, job,
               score_of, parent: Recorder | NullRecorder, out: Path, name: str) -> dict[str, Any]:
    """Tables and plots of the study; once it is complete, the top layouts on the whole test set and the best run."""
    s = cfg.search
    rows = trial_rows(study, space)
    complete = [r for r in rows if r["state"] == "complete"]
    n = counts(study)
    result: dict[str, Any] = {"study": name, "complete": n[TrialState.COMPLETE], "pruned": n[TrialState.PRUNED],
                              "failed": n[TrialState.FAIL], "output_dir": str(out)}
    if not complete:
        write_text(out / "search.json", json.dumps(result, indent=2))
        return result
    ranked = sorted(complete, key=lambda r: (-r["score"], r["size_mb"]))
    files, front = _study_figures(cfg, rows, complete, ranked, space, out, name)
    result.update(pareto=[{k: complete[i][k] for k in ("trial", "top1", "size_mb", "score")} for i in front])
    finals = _reevaluate(cfg, ranked[: max(1, s.top_k)], space, models, job, score_of) if s.top_k else [
        {**ranked[0], "full_top1": ranked[0]["top1"], "full_score": ranked[0]["score"]}]
    best = max(finals, key=lambda r: (r["full_score"], -r["size_mb"]))
    layers = {**OmegaConf.to_container(cfg.quant.layers), **space.overrides(space.layout_of(best["params"]))}
    yaml_path = _write_best_experiment(cfg, best, layers, job, out, name)
    files.append(out / yaml_path.name)
    result.update(best_trial=best["trial"], best_score=best["full_score"], best_top1=best["full_top1"],
                  best_size_mb=best["size_mb"], best_yaml=str(yaml_path),
                  top=[{k: r[k] for k in ("trial", "score", "top1", "full_top1", "full_score", "size_mb")}
                       for r in finals])
    print("top layouts on the whole test set\n" + format_table(
        [(f"trial {r['trial']}", f"score {r['full_score']:g} (trial {r['score']:g}), top-1 {r['full_top1']:.2f} %, "
                                 f"{r['size_mb']:.4f} MB") for r in finals]), flush=True)
    _log_study(parent, best, n, job, files)
    if cfg.export.enabled:
        result["best_run"] = _best_run(cfg, layers, name, out, parent)
    parent.close_parent()
    write_text(out / "search.json", json.dumps(result, indent=2, default=str))
    return result


def _study_figures(cfg: DictConfig, rows: list[dict], complete: list[dict], ranked: list[dict],
                   space: SearchSpace, out: Path, name: str) -> tuple[list[Path], list[int]]:
    """``trials.csv``, the Pareto plot, the layout heat map and the history; returns them and the front."""
    files = [write_trials_csv(rows, space, out / "trials.csv")]
    points = [(r["top1"], r["size_mb"]) for r in complete]
    front = pareto_front(points)
    files.append(plot_pareto(points, [f"#{r['trial']}" for r in complete], out / "pareto.png",
                             f"study {name}: top-1 vs size"))
    top = ranked[:30]
    files.append(plot_layout_heatmap(space.layers, [r["layout"] for r in top],
                                     [f"#{r['trial']} {r['score']:g}" for r in top], out / "layout_heatmap.png",
                                     f"study {name}: weight widths of the best {len(top)} trials"))
    history = [r for r in rows if r["score"] is not None or r["state"] == "pruned"]
    files.append(plot_history([r["trial"] for r in history],
                              [r["score"] if r["score"] is not None else float("nan") for r in history],
                              [r["state"] == "pruned" for r in history], out / "history.png", f"{cfg.score.name} score"))
    print_front(complete, front)
    return files, front


def _write_best_experiment(cfg: DictConfig, best: dict, layers: dict, job, out: Path, name: str) -> Path:
    """The best layout as an experiment overlay in a user config dir (never the installed package)."""
    best_name = f"{name}_best"
    config_dir = Path(cfg.search.best_dir) if cfg.search.best_dir else out / "conf"
    command = f"python -m qsweep --config-dir {config_dir.resolve()} +experiment=best/{best_name}"
    header = [f"Best layout of study {name!r}: trial {best['trial']}, score {best['full_score']:g}, "
              f"top-1 {best['full_top1']:.2f} % on {job.fp.images} test images, {best['size_mb']:.4f} MB.",
              f"Reproduce: {command}"]
    text = best_experiment_yaml(cfg, layers, best_name, header)
    yaml_path = write_text(config_dir / "experiment" / "best" / f"{best_name}.yaml", text)
    write_text(out / f"{best_name}.yaml", text)
    print(f"best layout written to {yaml_path}; run it with\n  {command}", flush=True)
    return yaml_path


def _log_study(parent: Recorder | NullRecorder, best: dict, n: dict, job, files: list[Path]) -> None:
    parent.log_metrics({"best_score": best["full_score"], "best_top1": best["full_top1"],
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


def _reevaluate(cfg: DictConfig, rows: list[dict[str, Any]], space: SearchSpace, models: LayoutModels, job,
                score_of) -> list[dict[str, Any]]:
    """The best trials' layouts on the whole configured test set (trials may have seen a subset)."""
    backend = "fake" if cfg.eval.backend == "fake" else "int"
    out = []
    for r in rows:
        models.apply(space.layout_of(r["params"]))
        runner, _ = models.runner(backend)
        result = evaluate(runner, job.loader, job.bundle.num_classes, job.device, cfg.progress,
                          desc=f"re-evaluate trial {r['trial']}")
        out.append({**r, "full_top1": result.top1, "full_score": score_of(r["size_mb"], result.top1)})
    return out
