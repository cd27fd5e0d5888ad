"""A mixed-precision study: open or join it, seed it, run this worker's trials, record, write the best.

Nothing here knows how quantization works: layouts become ``quant.layers`` overrides, models
come from :class:`~qsweep.search.trials.LayoutModels`, the best layout runs through the
ordinary single-run pipeline.
"""

from __future__ import annotations

import csv
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from qsweep.config import quant_recipe
from qsweep.errors import QsweepError
from qsweep.quant.plan import resolve_plan
from qsweep.report import format_table
from qsweep.score import compute_score
from qsweep.search.space import SearchSpace
from qsweep.search.storage import StorageError
from qsweep.search.trials import LayoutModels, TrialImages, evaluate_in_steps
from qsweep.tracking import Recorder, flatten

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial: who ran it
MAX_FAILURES_IN_A_ROW = 5


class SearchError(QsweepError):
    """The search cannot go on (every trial failing, an unusable study)."""


class ScoreBoundPruner(optuna.pruners.BasePruner):
    """Prunes a trial once even a perfect rest of its evaluation could not beat the best score.

    Never prunes a trial that might win, unlike the median rule; the trial's size is known
    before evaluation, and with the lab's stepped score that often settles it early.
    """

    def __init__(self, score_of: Callable[[float, float], float]):
        self.score_of = score_of

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        attrs = trial.user_attrs
        if "seen" not in attrs:
            return False
        try:
            best = study.best_value
        except ValueError:  # nothing complete yet
            return False
        optimistic = 100.0 * (attrs["correct"] + attrs["total"] - attrs["seen"]) / attrs["total"]
        return self.score_of(attrs["size_mb"], optimistic) < best


@dataclass
class Worker:
    """This process's part of the study: the cached models, the trial images and the recorder."""

    cfg: DictConfig
    space: SearchSpace
    models: LayoutModels
    images: TrialImages
    score_of: Callable[[float, float], float]
    backend: str
    device: Any
    parent: Recorder | None
    tags: dict[str, str]

    def objective(self, trial: optuna.Trial):
        s = self.cfg.search
        start = time.perf_counter()
        layout = self.space.suggest(trial)
        trial.set_user_attr("worker", WORKER)
        rec = None
        if self.parent is not None:
            rec = self.parent.fork()
            rec.start(f"{trial.study.study_name}:trial {trial.number}",
                      {**self.tags, "qsweep.kind": "trial", "optuna.trial": str(trial.number)},
                      parent_run_id=self.parent.run_id)
            trial.set_user_attr("mlflow_run_id", rec.run_id)
            rec.log_params({f"layout.{k}": v for k, v in flatten(layout).items()})
        metrics: dict[str, float] = {}
        try:
            self.models.apply(layout)
            size = self.models.size_mb()
            runner, fallbacks = self.models.runner(self.backend)
            total = self.images.images
            metrics.update(size_mb=size, avg_weight_bits=average_bits(self.space, layout, self.models),
                           int_fallback_layers=len(fallbacks))
            trial.set_user_attr("size_mb", size)
            trial.set_user_attr("total", total)
            eval_start = time.perf_counter()

            def on_step(step: int, correct: int, seen: int) -> None:
                top1 = 100.0 * correct / seen
                if s.objective == "score" and seen < total:
                    trial.set_user_attr("correct", correct)  # the bound pruner reads these two
                    trial.set_user_attr("seen", seen)
                    trial.report(self.score_of(size, top1), step)
                    if trial.should_prune():
                        metrics.update(partial_top1=top1, images=seen)
                        raise optuna.TrialPruned(f"after {seen}/{total} images at {top1:.2f} % top-1")

            correct, seen = evaluate_in_steps(runner, self.images, s.prune_steps, self.device, on_step)
            top1 = 100.0 * correct / seen
            score = self.score_of(size, top1)
            metrics.update(top1=top1, score=score, images=seen, eval_s=time.perf_counter() - eval_start,
                           trial_s=time.perf_counter() - start, pruned=0.0)
            for key in ("top1", "score"):
                trial.set_user_attr(key, metrics[key])
            print(f"trial {trial.number}: score {score:g}, top-1 {top1:.2f} %, {size:.4f} MB, "
                  f"{metrics['trial_s']:.1f} s", flush=True)
            if rec is not None:
                rec.log_metrics(metrics)
                rec.finish()
            return (top1, size) if s.objective == "pareto" else score
        except optuna.TrialPruned as exc:
            metrics.update(pruned=1.0, trial_s=time.perf_counter() - start)
            print(f"trial {trial.number}: pruned {exc}", flush=True)
            if rec is not None:
                rec.log_metrics(metrics)
                rec.set_tags({"pruned": "true"})
                rec.finish()
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", reason[:1000])
            print(f"qsweep: trial {trial.number} failed: {reason}", flush=True)
            if rec is not None:
                rec.finish(error=reason)
            raise


def average_bits(space: SearchSpace, layout: dict, models: LayoutModels) -> float:
    """Parameter-weighted mean weight width of the searched layers (float counts as 32)."""
    sizes = models.param_counts
    total = sum(sizes[n] for n in space.layers)
    return sum(choice["w"] * sizes[n] for n, choice in space.per_layer(layout).items()) / total


def make_sampler(s: DictConfig) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    # constant_liar: workers running in parallel do not all propose the same layout.
    return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True)


def make_pruner(s: DictConfig, score_of: Callable[[float, float], float]) -> optuna.pruners.BasePruner:
    if s.objective == "pareto" or s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return ScoreBoundPruner(score_of)


def open_study(name: str, storage, s: DictConfig, fingerprint: str, score_of) -> tuple[optuna.Study, bool]:
    """Create the study, or resume / join it when it exists with the same search space.

    Returns ``(study, created)``: exactly one of several workers started together creates it
    (the storage refuses a second study of the same name), so only that one seeds it.
    """
    directions = ["maximize", "minimize"] if s.objective == "pareto" else ["maximize"]
    sampler, pruner = make_sampler(s), make_pruner(s, score_of)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=directions)
        study.set_user_attr("qsweep_space", fingerprint)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    found = wait_for_attr(study, "qsweep_space", timeout_s=30)
    if found != fingerprint:
        raise StorageError(
            f"search.study_name={name!r} already exists in this storage with a different search space, "
            f"objective, model or data (fingerprint {found} != {fingerprint}); choose another "
            "search.study_name or delete the study (optuna delete-study)")
    return study, False


def wait_for_attr(study: optuna.Study, key: str, timeout_s: float) -> Any:
    """A study attribute another worker is about to set (None if it does not appear in time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs.get(key)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def counts(study: optuna.Study) -> dict[TrialState, int]:
    out = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state] += 1
    return out


def work(study: optuna.Study, worker: Worker, heartbeat: bool) -> None:
    """Run trials until the study holds ``n_trials`` finished ones (over all workers) or time is up.

    With a heartbeat storage, trials of dead workers are failed here and retried (same layout).
    """
    s = worker.cfg.search
    deadline = time.monotonic() + s.timeout_s if s.timeout_s else None
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        if heartbeat:
            optuna.storages.fail_stale_trials(study)
        n = counts(study)
        done = n[TrialState.COMPLETE] + n[TrialState.PRUNED]
        if done >= s.n_trials:
            return
        if done + n[TrialState.RUNNING] >= s.n_trials:
            if not heartbeat:
                return  # the other workers finish the rest
            time.sleep(min(1.0, s.heartbeat_s / 4))  # wait for them, or for their trials to go stale
            continue
        study.optimize(worker.objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        last = study.get_trials(deepcopy=False)[-1]
        failures = failures + 1 if last.state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise SearchError(f"{failures} trials in a row failed; last: {last.user_attrs.get('error', '?')}")


def close_stale_runs(study: optuna.Study, parent: Recorder) -> None:
    """A trial failed because its worker died still shows RUNNING in MLflow: mark it FAILED with why."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and parent.client.get_run(run_id).info.status == "RUNNING":
            rec = parent.fork()
            rec.attach(run_id)
            rec.finish(error=t.user_attrs.get("error", "its worker stopped (no heartbeat); the trial was retried"))


def trial_rows(study: optuna.Study, space: SearchSpace) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), "score": a.get("score"),
                     "top1": a.get("top1"), "size_mb": a.get("size_mb"),
                     "layout": {n: c["w"] for n, c in space.per_layer(space.layout_of(t.params)).items()},
                     "params": t.params, "duration_s": t.duration.total_seconds() if t.duration else None})
    return rows


def write_trials_csv(rows: list[dict[str, Any]], space: SearchSpace, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "score", "top1", "size_mb", "duration_s", *space.layers])
        for r in rows:
            writer.writerow([r["trial"], r["state"], r["score"], r["top1"], r["size_mb"], r["duration_s"],
                             *(r["layout"][n] for n in space.layers)])
    return path


def best_experiment_yaml(cfg: DictConfig, layers: dict[str, Any], name: str, header: list[str]) -> str:
    """A ``conf/experiment`` overlay that reproduces the layout as an ordinary run."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    keep = ("model", "data", "quant", "score", "export", "eval", "adaround", "lsq", "seed")
    doc = {k: plain[k] for k in keep}
    doc["quant"]["layers"] = layers
    doc["quant"]["name"] = name
    doc.update(experiment=name, mode="run")
    lines = ["# @package _global_", *(f"# {line}" for line in header)]
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(doc))


def score_function(cfg: DictConfig, fp_size_mb: float, fp_top1: float) -> Callable[[float, float], float]:
    def score_of(size_mb: float, top1: float) -> float:
        return compute_score(cfg.score.name, size_mb, top1, fp_size_mb, fp_top1, cfg.score.ref_size_mb,
                             cfg.score.ref_acc)

    return score_of


def print_front(rows: list[dict[str, Any]], front: list[int]) -> None:
    table = [(f"trial {rows[i]['trial']}", f"top-1 {rows[i]['top1']:.2f} %, {rows[i]['size_mb']:.4f} MB, "
                                           f"score {rows[i]['score']:g}") for i in front]
    print("Pareto front (top-1 vs size)\n" + format_table(table), flush=True)


def layer_names_of(model, cfg: DictConfig) -> list[str]:
    """The recipe's layers with quantized weights, in model order (the candidates for the search)."""
    return [n for n, p in resolve_plan(model, quant_recipe(cfg.quant)).items() if p.weight is not None]

