"""A mixed-precision study: open or join it, seed it, run this worker's trials, record, write the best.

Nothing here knows how quantization works: layouts become ``quant.layers`` overrides, models
come from :class:`~qsweep.search.trials.LayoutModels`, the best layout runs through the
ordinary single-run pipeline.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from qsweep.config import compose_shipped, quant_recipe
from qsweep.errors import QsweepError, interruption_taken
from qsweep.files import atomic_write
from qsweep.quant.embedding import embedding_widths
from qsweep.quant.plan import resolve_plan
from qsweep.score import compute_score
from qsweep.search.retries import claim, claim_retry, enqueue_retry, fail_dead_trials
from qsweep.search.space import FLOAT, SearchSpace
from qsweep.search.storage import StorageError
from qsweep.search.fidelity import QUALITIES, Quality, describe, quality_of
from qsweep.search.front import FrontLog
from qsweep.search.local_sampler import LocalSampler
from qsweep.search.trials import LayoutModels, Tally, TrialImages, evaluate_in_steps
from qsweep.search.warm import COST_ATTR, weight_param
from qsweep.run_params import layout_hash
from qsweep.tracking import NullRecorder, Recorder

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial: who ran it
MAX_FAILURES_IN_A_ROW = 5
OVER_BUDGET_PER_TRIAL = 10  # a study stops after this many layouts over the size budget per trial asked for


class SearchError(QsweepError):
    """The search cannot go on (every trial failing, an unusable study)."""


class ScoreBoundPruner(optuna.pruners.BasePruner):
    """Prunes a trial once even a perfect rest of its evaluation could not beat the best value.

    Never prunes a trial that might win, unlike the median rule; the trial's size is known
    before evaluation, and with the lab's stepped score that often settles it early. ``value_of(size_mb,
    quality)`` is the trial's value (the score of its top-1, or the fidelity itself); the trial's ``partial``
    (the quality summed over the ``seen`` of its ``total`` inputs) bounds its quality.
    """

    def __init__(self, value_of: Callable[[float, float], float], quality: Quality = QUALITIES["top1"]):
        self.value_of, self.quality = value_of, quality

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        attrs = trial.user_attrs
        if "seen" not in attrs:
            return False
        try:
            best = study.best_value
        except ValueError:  # nothing complete yet
            return False
        bound = self.value_of(attrs["size_mb"], self.quality.optimistic(attrs["partial"], attrs["seen"], attrs["total"]))
        return bound < best if study.direction == optuna.study.StudyDirection.MAXIMIZE else bound > best


def value_function(s: DictConfig, score_of: Callable[[float, float], float]) -> Callable[[float, float], float]:
    """A single-objective trial's value from its size and quality: the score of its top-1, or the fidelity."""
    return score_of if s.objective == "score" else (lambda size_mb, quality: quality)


def directions(s: DictConfig) -> list[str]:
    quality = quality_of(s)
    if s.objective == "pareto":
        return [quality.direction, "minimize"]
    return ["maximize"] if s.objective == "score" else [quality.direction]


def size_budget(s: DictConfig, fp_size_mb: float) -> int | None:
    """The hard size budget in bytes (``search.max_size_mb``, ``search.max_size_fraction`` of FP32: the smaller)."""
    budgets = []
    if s.max_size_mb is not None:
        budgets.append(math.floor(round(s.max_size_mb * 1e6, 3)))
    if s.max_size_fraction is not None:
        budgets.append(math.floor(round(s.max_size_fraction * fp_size_mb * 1e6, 3)))
    return min(budgets) if budgets else None


@dataclass
class Worker:
    """This process's part of the study: the cached models, the trial images and the recorder.

    ``reference``: the FP32 model's outputs on the trial images (computed once; fidelity qualities);
    ``budget_bytes``: the hard size budget; ``front``: where the Pareto front is kept after each trial.
    """

    cfg: DictConfig
    space: SearchSpace
    models: LayoutModels
    images: TrialImages
    score_of: Callable[[float, float], float]
    backend: str
    device: Any
    parent: Recorder | NullRecorder
    tags: dict[str, str]
    reference: list[torch.Tensor] | None = None
    budget_bytes: int | None = None
    front: FrontLog | None = None

    @property
    def quality(self) -> Quality:
        return quality_of(self.cfg.search)

    def objective(self, trial: optuna.Trial):
        start = time.perf_counter()
        layout = self.space.suggest(trial)
        trial.set_user_attr("worker", WORKER)
        rec = self._trial_recorder(trial, layout)
        metrics: dict[str, float] = {}
        try:
            value = self._measure(trial, layout, metrics)
            metrics["trial_s"] = time.perf_counter() - start
            print(f"trial {trial.number}: {self.describe(metrics)}, {metrics['trial_s']:.1f} s", flush=True)
            rec.log_metrics(metrics)
            rec.finish()
            return value
        except optuna.TrialPruned as exc:
            metrics.update(pruned=1.0, trial_s=time.perf_counter() - start)
            print(f"trial {trial.number}: pruned {exc}", flush=True)
            rec.log_metrics(metrics)
            rec.set_tags({"pruned": "true", **({"over_budget": str(exc)} if "over_budget" in metrics else {})})
            rec.finish()
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", reason[:1000])
            print(f"qsweep: trial {trial.number} failed: {reason}", flush=True)
            rec.finish(error=reason)
            raise

    def describe(self, metrics: dict[str, float]) -> str:
        """A trial's numbers in a line: score, quality, top-1 (where measured) and size."""
        return (f"{describe(self.quality, metrics.get('score'), metrics.get(self.quality.name), metrics.get('top1'))}, "
                f"{metrics['size_mb']:.6f} MB")

    def _trial_recorder(self, trial: optuna.Trial, layout: dict) -> Recorder | NullRecorder:
        """The trial's MLflow run, nested under the study's, with its layout as params (:meth:`layout_params`)."""
        rec = self.parent.fork()
        rec.start(f"{trial.study.study_name}:trial {trial.number}",
                  {**self.tags, "qsweep.kind": "trial", "optuna.trial": str(trial.number)},
                  parent_run_id=self.parent.run_id)
        if rec.run_id is not None:  # tracked: the trial names its run (a retry's run says so)
            trial.set_user_attr("mlflow_run_id", rec.run_id)
        rec.log_params(self.layout_params(layout))
        return rec

    def layout_hash(self, layout: dict) -> str:
        """The ``layout`` hash a run of ``layout`` records (the best run's matches its trial's)."""
        q = self.cfg.quant
        return layout_hash(q.skip, {**OmegaConf.to_container(q.layers), **self.space.overrides(layout)})

    def layout_params(self, layout: dict) -> dict[str, str]:
        """A layout in a few params, not one per layer (DeiT-S has 50, each a runs-table column): the
        ``layout`` hash a run of it records, and the widths in group order (``trials.csv``'s columns; 32 = float)."""
        params = {"layout": self.layout_hash(layout), "layout.w_bits": ",".join(str(c["w"]) for c in layout.values())}
        if any("a" in c for c in layout.values()):
            params["layout.a_bits"] = ",".join(str(c.get("a", FLOAT)) for c in layout.values())
        return params

    def _measure(self, trial: optuna.Trial, layout: dict, metrics: dict[str, float]):
        """Size, then quality (and top-1 where labelled), reported step by step so the pruner can stop it."""
        s = self.cfg.search
        self.models.apply(layout)
        size_bytes = self.models.size_bytes()
        size, total = size_bytes / 1e6, self.images.images
        metrics.update(size_mb=size, avg_weight_bits=average_bits(self.space, layout, self.models))
        for key, value in dict(size_mb=size, size_bytes=size_bytes, total=total).items():
            trial.set_user_attr(key, value)
        self._check_budget(trial, size_bytes, metrics)
        if s.objective == "score" and isinstance(trial.study.pruner, ScoreBoundPruner):
            # The size alone may settle it: not one image is needed to know 100 % top-1 would lose.
            trial.set_user_attr("partial", 0)
            trial.set_user_attr("seen", 0)
            if trial.should_prune():
                metrics.update(images=0)
                raise optuna.TrialPruned("by its size: even 100 % top-1 would not beat the best score")
        runner, fallbacks = self.models.runner(self.backend)
        metrics.update(int_fallback_layers=len(fallbacks))
        eval_start = time.perf_counter()
        tally = evaluate_in_steps(runner, self.images, s.prune_steps, self.device,
                                  self._on_step(trial, size, total, metrics), self.quality, self.reference)
        quality, top1 = self.quality.mean(tally.total, tally.seen), tally.top1()
        score = self.score_of(size, top1) if top1 is not None else None
        metrics.update({self.quality.name: quality}, top1=top1, score=score, images=tally.seen,
                       eval_s=time.perf_counter() - eval_start, pruned=0.0)
        for key, value in {self.quality.name: quality, "top1": top1, "score": score}.items():
            if value is not None:
                trial.set_user_attr(key, value)
        if s.objective == "pareto":
            return quality, size
        return score if s.objective == "score" else quality

    def _check_budget(self, trial: optuna.Trial, size_bytes: int, metrics: dict[str, float]) -> None:
        """A layout over the size budget is not evaluated: pruned, with the reason; the sampler is told
        (its constraint: MB over the budget, > 0 infeasible)."""
        if self.budget_bytes is None:
            return
        trial.set_constraint("max_size_mb", (size_bytes - self.budget_bytes) / 1e6)
        if size_bytes > self.budget_bytes:
            reason = (f"over the size budget: {size_bytes} > {self.budget_bytes} bytes "
                      f"({size_bytes / 1e6:.6f} > {self.budget_bytes / 1e6:.6f} MB), not evaluated")
            trial.set_user_attr("over_budget", reason)
            metrics.update(images=0, over_budget=1.0)
            raise optuna.TrialPruned(reason)

    def _on_step(self, trial: optuna.Trial, size: float, total: int,
                 metrics: dict[str, float]) -> Callable[[int, Tally], None]:
        """After each evaluation step of a single-objective study: report the value so far, prune if told."""
        s, quality = self.cfg.search, self.quality
        value_of = value_function(s, self.score_of)

        def on_step(step: int, tally: Tally) -> None:
            if s.objective == "pareto" or tally.seen >= total:
                return
            trial.set_user_attr("partial", tally.total)  # the bound pruner reads these two
            trial.set_user_attr("seen", tally.seen)
            so_far = quality.mean(tally.total, tally.seen)
            trial.report(value_of(size, so_far), step)
            if trial.should_prune():
                metrics.update({f"partial_{quality.name}": so_far}, images=tally.seen)
                raise optuna.TrialPruned(f"after {tally.seen}/{total} images at {quality.format(so_far)}")

        return on_step

    def after_trial(self, study: optuna.Study) -> None:
        """Keep the study's front (a write that fails is reported, and the study goes on)."""
        if self.front is None:
            return
        try:
            self.front.update(study)
        except (QsweepError, OSError, MlflowException) as exc:
            print(f"qsweep: the Pareto front could not be written: {exc}", flush=True)


def average_bits(space: SearchSpace, layout: dict, models: LayoutModels) -> float:
    """Parameter-weighted mean weight width of the searched layers (float counts as 32)."""
    sizes = models.param_counts
    total = sum(sizes[n] for n in space.layers)
    return sum(choice["w"] * sizes[n] for n, choice in space.per_layer(layout).items()) / total


# constant_liar: workers running in parallel do not all propose the same layout.
SAMPLERS: dict[str, Callable[[int | None], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "local": lambda seed: LocalSampler(seed=seed),  # its byte and cost tables come with the worker: local_sampler
}
# Each takes the trial's value function and quality (see value_function, quality_of).
PRUNERS: dict[str, Callable[[Callable[[float, float], float], Quality], optuna.pruners.BasePruner]] = {
    "bound": ScoreBoundPruner,
    "median": lambda value_of, quality: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
    "none": lambda value_of, quality: optuna.pruners.NopPruner(),
}


def make_sampler(s: DictConfig) -> optuna.samplers.BaseSampler:
    return SAMPLERS[s.sampler](s.seed)


def local_sampler(s: DictConfig, space: SearchSpace, models: LayoutModels, budget_bytes: int | None,
                  cost: dict[str, dict[int, float]] | None) -> LocalSampler:
    """``search.sampler=local`` that knows each group's planned bytes at each width (so it proposes only layouts
    that fit ``budget_bytes``, and exchanges that do not grow their parent) and the warm start's ``cost``."""
    sizes = {weight_param(space, g): {w: models.choice_bytes(g, w) for w in space.w_choices} for g in space.groups}
    return LocalSampler(seed=s.seed, choice_bytes=sizes, fixed_bytes=models.fixed_bytes, budget_bytes=budget_bytes,
                        cost=cost)


def stored_cost(study: optuna.Study) -> dict[str, dict[int, float]] | None:
    """The warm start's cost per (weight param, width), as the study keeps it (None: no knapsack warm start)."""
    cost = study.user_attrs.get(COST_ATTR)
    return None if cost is None else {p: {int(w): c for w, c in by.items()} for p, by in cost.items()}


def make_pruner(s: DictConfig, score_of: Callable[[float, float], float]) -> optuna.pruners.BasePruner:
    """The configured pruner (none for pareto: a multi-objective trial reports no single value)."""
    return PRUNERS["none" if s.objective == "pareto" else s.pruner](value_function(s, score_of), quality_of(s))


def open_study(name: str, storage, s: DictConfig, fingerprint: str, score_of) -> tuple[optuna.Study, bool]:
    """Create the study, or resume / join it when it exists with the same search space.

    Returns ``(study, created)``: exactly one of several workers started together creates it
    (the storage refuses a second study of the same name), so only that one seeds it.
    """
    sampler, pruner = make_sampler(s), make_pruner(s, score_of)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=directions(s))
        study.set_user_attr("qsweep_space", fingerprint)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    found = wait_for_attr(study, "qsweep_space", timeout_s=30)
    if found != fingerprint:
        raise StorageError(
            f"search.study_name={name!r} already exists in this storage with a different search space, "
            f"objective, size budget, model or data (fingerprint {found} != {fingerprint}); choose another "
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
    return trial_counts(study)[0]


def trial_counts(study: optuna.Study) -> tuple[dict[TrialState, int], int]:
    """Trials per state, and how many of the pruned ones were over the size budget (not evaluated)."""
    out, over = {state: 0 for state in TrialState}, 0
    for t in study.get_trials(deepcopy=False):
        out[t.state] += 1
        over += t.state == TrialState.PRUNED and "over_budget" in t.user_attrs
    return out, over


def work(study: optuna.Study, worker: Worker, heartbeat: bool) -> None:
    """Run trials until the study holds ``n_trials`` finished ones (over all workers) or time is up.

    A layout over the size budget is not evaluated and does not count (its trial costs a size
    measurement); at most :data:`OVER_BUDGET_PER_TRIAL` of them per trial asked for are proposed.
    Retries run before other waiting trials. Trials of dead workers are failed here and retried
    (same layout): by Optuna's heartbeat on RDB storages, else by their owner process on this host
    being gone. A trial this worker is interrupted in is retried too.
    """
    s = worker.cfg.search
    if s.sampler == "local":
        study.sampler = local_sampler(s, worker.space, worker.models, worker.budget_bytes, stored_cost(study))
    deadline = time.monotonic() + s.timeout_s if s.timeout_s else None
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        if heartbeat:
            optuna.storages.fail_stale_trials(study)
        else:
            fail_dead_trials(study, s.retries)
        n, over = trial_counts(study)
        done = n[TrialState.COMPLETE] + n[TrialState.PRUNED] - over
        if done >= s.n_trials:
            return
        if over >= OVER_BUDGET_PER_TRIAL * s.n_trials:
            print(f"qsweep: stopping: {over} proposed layouts were over the size budget", flush=True)
            return
        if done + n[TrialState.RUNNING] >= s.n_trials:
            if not heartbeat:
                return  # the other workers finish the rest
            time.sleep(min(1.0, s.heartbeat_s / 4))  # wait for them, or for their trials to go stale
            continue
        last = run_trial(study, worker, claim_retry(study) or _ask(study), heartbeat)
        worker.after_trial(study)
        failures = failures + 1 if last.state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise SearchError(f"{failures} trials in a row failed; last: {last.user_attrs.get('error', '?')}")


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():  # that ask() starts no heartbeat thread: run_trial starts one
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def run_trial(study: optuna.Study, worker: Worker, trial: optuna.Trial, heartbeat: bool) -> FrozenTrial:
    """Run ``trial`` (as ``study.optimize`` would) and tell the study how it ended.

    An interrupt (Ctrl-C, SIGTERM, any exception that is not an ``Exception``) requeues the trial
    and goes on up.
    """
    claim(study, trial._trial_id)
    if heartbeat:  # now, not when the thread first runs: a trial without any heartbeat never goes stale
        study._storage.record_heartbeat(trial._trial_id)
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            value = worker.objective(trial)
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except Exception:
        traceback.print_exc()
        state = TrialState.FAIL
    except BaseException as exc:
        interruption_taken()  # a stop signal is not raised again while the trial is requeued
        requeue(study, trial._trial_id, exc, worker.parent)
        raise
    else:
        return study.tell(trial, value, skip_if_finished=True)  # finished already: failed as stale meanwhile
    return study.tell(trial, state=state, skip_if_finished=True)


def requeue(study: optuna.Study, trial_id: int, exc: BaseException, parent: Recorder | NullRecorder) -> None:
    """Fail a trial this worker was stopped in and queue it to run again; its MLflow run says so.

    Being stopped is not the layout's fault: unlike a dead worker's trial, this one is retried
    however often it was before.
    """
    trial = study._storage.get_trial(trial_id)
    if trial.state.is_finished():  # this worker hung so long that another failed the trial as stale, and retried it
        return
    retry = enqueue_retry(study, trial)
    reason = f"interrupted ({type(exc).__name__}); retried as trial {retry}"
    study._storage.set_trial_user_attr(trial_id, "error", reason)
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id is not None:
        rec = parent.fork()
        rec.attach(run_id)
        rec.set_tags({"retried_as": str(retry)})
        rec.finish(error=reason, killed=True)


def stop_parent(study: optuna.Study, parent: Recorder | NullRecorder, exc: BaseException) -> None:
    """This worker stops early: unless other workers still run trials, the study's run is no longer RUNNING.

    KILLED when interrupted, FAILED on an error; a worker that joins later sets it RUNNING again.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        parent.close_parent("FAILED" if isinstance(exc, Exception) else "KILLED")


def close_stale_runs(study: optuna.Study, parent: Recorder | NullRecorder) -> None:
    """The MLflow run of a trial whose worker died says so, and whether (as which trial) it was retried.

    Such a run is still RUNNING, or KILLED by a later run's check for dead processes, which cannot
    know of the retry.
    """
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if "retry_history" in t.system_attrs}
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.state != TrialState.FAIL or run_id is None:
            continue
        run = parent.get_run(run_id)  # None: this worker records nothing (tracking.enabled=false)
        if run is None or run.info.status not in ("RUNNING", "KILLED") or "retried_as" in run.data.tags:
            continue
        retry = retried_as.get(t.number)
        rec = parent.fork()
        rec.attach(run_id)
        rec.set_tags({"retried_as": str(retry)})
        why = run.data.tags.get("error", "its worker stopped (no heartbeat)")
        rec.finish(error=f"{why}; " + (f"retried as trial {retry}" if retry is not None else
                                       "not retried (search.retries used up)"), killed=True)


def trial_rows(study: optuna.Study, space: SearchSpace, quality: Quality = QUALITIES["top1"]) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), "score": a.get("score"),
                     "top1": a.get("top1"), "quality": a.get(quality.name), "size_mb": a.get("size_mb"),
                     "layout": {n: c["w"] for n, c in space.per_layer(space.layout_of(t.params)).items()},
                     "params": t.params, "duration_s": t.duration.total_seconds() if t.duration else None})
    return rows


def write_trials_csv(rows: list[dict[str, Any]], space: SearchSpace, path: Path,
                     quality: Quality = QUALITIES["top1"]) -> Path:
    """One row per finished trial: its numbers (and its quality, a fidelity one) and its width per layer."""
    extra = [quality.name] if quality.name != "top1" else []

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["trial", "state", "score", "top1", *extra, "size_mb", "duration_s", *space.layers])
            for r in rows:
                writer.writerow([r["trial"], r["state"], r["score"], r["top1"], *([r["quality"]] if extra else []),
                                 r["size_mb"], r["duration_s"], *(r["layout"][n] for n in space.layers)])

    return atomic_write(path, write)


# What a run of the best layout takes from the study's config (not its search, tracking or mode).
BEST_RUN_KEYS = ("model", "data", "quant", "score", "export", "eval", "adaround", "lsq", "seed")


def best_experiment_yaml(cfg: DictConfig, layers: dict[str, Any], name: str, header: list[str]) -> str:
    """A ``conf/experiment`` overlay that reproduces the layout as an ordinary run.

    It selects the study's dataset (its schema) and states only what differs from that: the name,
    ``quant.layers`` and whatever the study's experiment and command line changed.
    """
    defaults = [{"override /data": cfg.data.name}, "_self_"]
    base = OmegaConf.to_container(compose_shipped([f"data={cfg.data.name}"]), resolve=True)
    plain = OmegaConf.to_container(cfg, resolve=True)
    run = {k: plain[k] for k in BEST_RUN_KEYS}
    run["quant"] = {**run["quant"], "name": name, "layers": layers}
    doc = {"defaults": defaults, "name": name, **_changes(run, base)}
    lines = ["# @package _global_", *(f"# {line}" for line in header)]
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(doc))


def _changes(new: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``new`` whose values differ from ``base``'s, nested mappings compared key by key."""
    out = {}
    for key, value in new.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            value = _changes(value, old)
            if value:
                out[key] = value
        elif key not in base or value != old:
            out[key] = value
    return out


def score_function(cfg: DictConfig, fp_size_mb: float, fp_top1: float) -> Callable[[float, float], float]:
    def score_of(size_mb: float, top1: float) -> float:
        return compute_score(cfg.score.name, size_mb, top1, fp_size_mb, fp_top1, cfg.score.ref_size_mb,
                             cfg.score.ref_acc)

    return score_of


def layer_names_of(model, cfg: DictConfig) -> list[str]:
    """The recipe's layers with quantized weights and the embedding tables it quantizes, in model order (the
    candidates for the search)."""
    recipe = quant_recipe(cfg.quant)
    names = {n for n, p in resolve_plan(model, recipe).items() if p.weight is not None}
    names |= {n for n, b in embedding_widths(model, recipe.embeddings, recipe.layers).items() if b is not None}
    return [n for n, _ in model.named_modules() if n in names]



def eval_backend(cfg: DictConfig) -> str:
    """The backend a run of this config evaluates on (``eval.backend=auto``: the artifact's kernels when exporting)."""
    backend = cfg.eval.backend
    if backend == "auto":
        backend = cfg.export.kernels if cfg.export.enabled else "int"
    return backend
