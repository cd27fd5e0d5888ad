"""``mode=search``: one worker of a study, from config to the best layout's run."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from qsweep.errors import interruption_taken
from qsweep.job import prepare_job, run_tags
from qsweep.run_params import run_params
from qsweep.search.fidelity import quality_of, reference_outputs
from qsweep.search.front import FrontLog
from qsweep.search.space import SearchSpace
from qsweep.search.storage import has_heartbeat, open_storage, redact, resolve
from qsweep.search.study import (
    SearchError, Worker, close_stale_runs, counts, eval_backend, layer_names_of, open_study, score_function,
    size_budget, stop_parent, wait_for_attr, work,
)
from qsweep.search.summary import print_study_run, summarize
from qsweep.search.trials import LayoutModels, TrialImages
from qsweep.search.warm import warm_start
from qsweep.tracking import NullRecorder, Recorder


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
    space = SearchSpace.build(layer_names_of(job.model, cfg), s, model=job.model)
    score_of = score_function(cfg, job.fp_size_mb, job.fp.top1)
    budget = size_budget(s, job.fp_size_mb)
    study, created = open_study(name, storage, s, _fingerprint(cfg, space, job, budget), score_of)
    print(f"study {name!r} at {redact(resolve(s.storage, project_dir))}: {space.describe()}; {_goal(s, budget, job)}; "
          f"{counts(study)[TrialState.COMPLETE]} complete trials so far", flush=True)

    parent = _parent_recorder(cfg, study, created, name, project_dir, sweep, overrides)
    print_study_run(parent)
    try:
        worker = _worker(cfg, space, job, score_of, parent, name, budget, output_dir)
        if created:
            warm_start(cfg, study, space, worker.models, job, budget)
        work(study, worker, has_heartbeat(storage))
        return summarize(cfg, study, worker, job, output_dir, name)
    except BaseException as exc:  # Ctrl-C, SIGTERM, an error: the study's run is not left RUNNING
        interruption_taken()
        stop_parent(study, parent, exc)
        raise
    finally:
        close_stale_runs(study, parent)


def _fingerprint(cfg: DictConfig, space: SearchSpace, job, budget: int | None) -> str:
    """What a resumed or joined study must share with this worker (keys a default leaves out are not added)."""
    s = cfg.search
    extra = {"quality": s.quality} if s.objective == "pareto" and s.quality != "top1" else {}
    if budget is not None:
        extra["max_size_bytes"] = budget
    return space.fingerprint({
        "objective": s.objective, "score": OmegaConf.to_container(cfg.score), "data": job.bundle.fingerprint,
        "model": job.fp_key, "recipe": OmegaConf.to_container(cfg.quant), "trial_images": s.trial_images,
        "adaround": OmegaConf.to_container(cfg.adaround), "lsq": OmegaConf.to_container(cfg.lsq), **extra,
    })


def _goal(s: DictConfig, budget: int | None, job) -> str:
    """What the study optimizes, in words, with its size budget."""
    q = quality_of(s)
    text = {"score": "maximizing the score", "pareto": f"the front of {q.unit} ({q.direction}) and size"}.get(
        s.objective, f"{q.direction[:-1]}ing {q.unit} to the FP32 outputs")
    if budget is None:
        return text
    return f"{text}, under {budget / 1e6:.6f} MB ({budget} bytes, {budget / 1e6 / job.fp_size_mb:.1%} of FP32)"


def _worker(cfg: DictConfig, space: SearchSpace, job, score_of, parent: Recorder | NullRecorder, name: str,
            budget: int | None, output_dir: Path) -> Worker:
    """The cached layouts, the trial images (with the FP32 outputs on them for fidelity) and the front's log."""
    s = cfg.search
    quality = quality_of(s)
    models = LayoutModels(job.model, cfg.quant, job.calib, space, cfg.adaround, cfg.lsq, progress=cfg.progress,
                          kernels=cfg.export.kernels)
    images = TrialImages.from_dataset(job.loader.dataset, s.trial_images, cfg.data.eval_batch_size,
                                      seed=s.seed or 0, steps=s.prune_steps)
    if quality.needs_labels and not images.labelled:
        raise SearchError(f"search.objective={s.objective} needs labelled test data; without labels use a fidelity "
                          "objective: search.objective=agreement, kl or cosine")
    reference = reference_outputs(job.model, images.batches, job.device) if not quality.needs_labels else None
    tags = {**run_tags(cfg), "qsweep.study": name, "weights": job.weights}
    worker = Worker(cfg, space, models, images, score_of, eval_backend(cfg), job.device, parent, tags,
                    reference, budget)
    worker.front = FrontLog(output_dir, name, space, quality, budget, worker.layout_hash, parent)
    return worker


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
