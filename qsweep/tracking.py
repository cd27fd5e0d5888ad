"""MLflow recording: one run per qsweep run, a SQLite store in the project by default."""

from __future__ import annotations

import copy
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# MLflow's batch endpoint takes at most 100 params per call.
_PARAM_CHUNK = 100
_PARAM_VALUE_MAX = 6000


def resolve_uri(uri: str | None, project_dir: Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the project.

    MLflow's old ``./mlruns`` file store is an error in current releases, hence SQLite.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_dir / 'mlflow.db').resolve()}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def git_commit(project_dir: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Recorder:
    """An MLflow run driven through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id: str | None = None

    @classmethod
    def for_project(cls, uri: str | None, experiment: str, project_dir: Path) -> "Recorder":
        resolved = resolve_uri(uri, project_dir)
        # A local SQLite store keeps its artifacts beside it, not in the current directory.
        sqlite = resolved.startswith("sqlite:///")
        root = Path(resolved[len("sqlite:///"):]).parent / "mlartifacts" if sqlite else None
        return cls(resolved, experiment, root)

    def start(self, run_name: str | None, tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def fork(self) -> "Recorder":
        """A recorder for another run in the same store and experiment (e.g. a study's trial)."""
        other = copy.copy(self)
        other.run_id = None
        return other

    def attach(self, run_id: str) -> None:
        """Record into an existing run (a study's parent run, joined by a second worker)."""
        self.run_id = run_id

    def sweep_parent(self, sweep: str, experiment: str) -> str:
        """The run that holds a Hydra multirun's jobs, found by its sweep directory or created."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`qsweep.sweep` = '{sweep}'",
                                        max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep:{experiment}:{Path(sweep).name}",
                                     tags={"qsweep.sweep": sweep, "qsweep.kind": "sweep", "experiment": experiment})
        return run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:_PARAM_VALUE_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_CHUNK):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAM_CHUNK])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, error: str | None = None) -> None:
        """End the run; a failed run keeps its reason as the ``error`` tag."""
        if self.run_id is None:
            return
        if error is not None:
            self.set_tags({"error": error[:5000]})
        self.client.set_terminated(self.run_id, status="FAILED" if error is not None else "FINISHED")

    def close_parent(self, parent_run_id: str) -> None:
        """Mark a parent (sweep or study) run finished; a later job or worker may reopen it."""
        self.client.set_terminated(parent_run_id, status="FINISHED")
