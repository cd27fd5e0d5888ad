"""Hydra callbacks: a multirun's parent run, its summary table, and a non-zero exit naming the jobs that failed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qsweep.files import failure_reason
from qsweep.names import FAILED_FILE


def _sweep_recorder(config: DictConfig):
    if not config.tracking.enabled:
        return None
    from qsweep.tracking import Recorder  # MLflow is heavy: only multiruns that record pay for it

    return Recorder.for_project(config.tracking.uri, config.tracking.experiment, Path.cwd())


class SweepOutcome(Callback):
    """A multirun's parent MLflow run, opened before its jobs and closed after them, and its outcome.

    The parent is made here, in the launching process, so jobs a launcher runs in parallel
    processes all find the same one. At the end the jobs' table (:mod:`qsweep.sweep_summary`) is printed
    and logged to the parent, and job folders holding a failure are counted:
    folders rather than in-process state, so jobs of any launcher count. Hydra swallows a
    callback's exception, so ``python -m qsweep`` reads :data:`failed_jobs` for its exit status.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        rec = _sweep_recorder(config)
        if rec is not None:
            run_id = rec.sweep_parent(str(Path(config.hydra.sweep.dir).resolve()), config.name)
            print(f"mlflow: sweep run {run_id} at {rec.uri}; runs table {rec.runs_url()}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global failed_jobs
        sweep = Path(config.hydra.sweep.dir)
        jobs = [p.parent for p in sweep.glob("*/.hydra")]
        failed = sorted(job for job in jobs if (job / FAILED_FILE).exists())
        failed_jobs = len(failed)  # first: Hydra drops an exception raised below, the exit status must not
        files = _summary(sweep)
        rec = _sweep_recorder(config)
        if rec is not None:
            rec.attach(rec.sweep_parent(str(sweep.resolve()), config.name))
            for path in files:
                rec.log_artifact(path)
            rec.close_sweep(rec.run_id)
            print(f"mlflow: sweep run {rec.run_id} at {rec.uri} ({', '.join(p.name for p in files)}); "
                  f"runs table {rec.runs_url()}", flush=True)
        if failed:
            reasons = "\n".join(f"  {job}: {failure_reason(job)}" for job in failed)
            print(f"qsweep: error: {len(failed)} of {len(jobs)} jobs of the multirun in {sweep} failed:\n{reasons}",
                  file=sys.stderr, flush=True)


def _summary(sweep: Path) -> list[Path]:
    """Print the jobs' table; its files. A table that cannot be made is a warning: the sweep's outcome stands."""
    from qsweep.sweep_summary import summarize

    try:
        text, files = summarize(sweep)
    except Exception as exc:  # noqa: BLE001 - e.g. a job folder damaged by hand
        print(f"qsweep: warning: no multirun summary: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return []
    print("\n" + text, flush=True)
    return files


failed_jobs = 0  # set by SweepOutcome at the end of a multirun
