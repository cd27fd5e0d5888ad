"""MLflow recording: one run per qsweep run, a SQLite store in the project by default."""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qsweep import rdb, runs_view
from qsweep.errors import QsweepError
from qsweep.files import failure_reason
from qsweep.lineage import EvalData
from qsweep.locks import file_lock

# MLflow's batch endpoint takes at most 100 params per call.
_PARAM_CHUNK = 100
_PARAM_VALUE_MAX = 6000
PROBE_TIMEOUT_S = 5.0
HOST = socket.gethostname()
_REAPED: set[tuple[str, str]] = set()  # (store, experiment) this process has closed dead runs in
# The run's output folder: where a run whose process died may have left its reason (error.txt).
OUTPUT_DIR_TAG = "qsweep.output_dir"
# What the experiment holds, for MLflow 3 UIs that read it (3.17 follows its GenAI / model-training switch,
# which the runs-table link sets: qsweep.runs_view).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
DEFAULT_UI = "http://127.0.0.1:5000"


class TrackingError(QsweepError):
    """The MLflow tracking store cannot be used."""


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


_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.:/ ]|-")


def param_key(name: str) -> str:
    """``name`` as an MLflow param key, reversibly: a character MLflow refuses (``*``, ``@``, ``[``, ...;
    ``quant.layers.blocks.0.*.w_bits``) becomes ``-XX-`` (its code point in hex), ``-`` itself ``-2D-``."""
    return _KEY_CHARS.sub(lambda m: f"-{ord(m[0]):02X}-", name)


def unparam_key(key: str) -> str:
    """The config key :func:`param_key` encoded."""
    return re.sub(r"-([0-9A-F]+)-", lambda m: chr(int(m[1], 16)), key)


def git_commit(project_dir: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def process_token(pid: int) -> str | None:
    """``pid`` plus its start time (Linux), so a reused pid is not mistaken for the process; None if gone.

    A zombie (killed, not yet waited for by its parent) is gone: it runs nothing any more.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else f"{pid}:{fields[19]}"
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)


def own_process() -> str:
    """This process's :func:`process_token` (the pid alone where there is no /proc)."""
    return process_token(os.getpid()) or str(os.getpid())


def process_gone(token: str) -> bool:
    """Whether the process of a :func:`process_token` on this host has ended (a reused pid counts as ended)."""
    pid = token.split(":")[0]
    return pid.isdigit() and process_token(int(pid)) != token


def probe(uri: str) -> None:
    """Fail fast, naming ``tracking.uri``, if a tracking server or database does not answer within seconds.

    An HTTP server gets :data:`PROBE_TIMEOUT_S`, a database server :data:`qsweep.rdb.CONNECT_TIMEOUT_S`:
    MLflow's own connections to a database set no timeout, so a silent server is caught here.
    """
    if rdb.is_server_url(uri):
        _probe_database(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered: a server that has no /health route is still a server
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking.uri={uri!r} cannot be reached ({reason}; waited {PROBE_TIMEOUT_S:g} s); "
                            f"start the server, fix the URI, or run without it: tracking.enabled=false") from None


def _probe_database(uri: str) -> None:
    try:
        rdb.probe(uri)
    except Exception as exc:  # sqlalchemy raises many kinds: driver missing, refused, silent, auth
        raise TrackingError(f"tracking.uri={rdb.redact(uri)!r} cannot be reached: {rdb.failure_reason(exc, uri)}; "
                            f"start the server, fix the URI, or run without it: tracking.enabled=false") from None


class Recorder:
    """An MLflow run driven through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        probe(uri)
        sqlite = uri.startswith("sqlite:///")
        # The first use of a new SQLite store creates and migrates its schema: two processes doing it
        # at once leave it half-migrated for good, so the first use is serialized.
        with file_lock(Path(uri[len("sqlite:///"):] + ".lock")) if sqlite else nullcontext():
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, artifact_root)
        self.run_id: str | None = None

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            try:
                return self.client.create_experiment(name, artifact_location=location, tags={
                    **EXPERIMENT_KIND, runs_view.VIEW_TAG: runs_view.view_tag_value(int(time.time() * 1000))})
            except MlflowException:  # created meanwhile by another process on a shared server
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.tags.get("mlflow.experimentKind") is None:
            self.client.set_experiment_tag(found.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        self._set_view(found.experiment_id, found.tags.get(runs_view.VIEW_TAG))
        return found.experiment_id

    def _set_view(self, experiment_id: str, current: str | None) -> None:
        """qsweep's runs-table view (:mod:`qsweep.runs_view`) on the experiment, rewritten only when it changed."""
        if not runs_view.is_current(current):
            self.client.set_experiment_tag(experiment_id, runs_view.VIEW_TAG,
                                           runs_view.view_tag_value(int(time.time() * 1000)))

    def runs_url(self, ui: str = DEFAULT_UI) -> str:
        """The experiment's runs table in the MLflow UI (``make ui``), sorted by score with the compared columns."""
        base = self.uri if self.uri.startswith(("http://", "https://")) else ui
        return runs_view.runs_url(base, self.experiment_id)

    @classmethod
    def for_project(cls, uri: str | None, experiment: str, project_dir: Path) -> "Recorder":
        resolved = resolve_uri(uri, project_dir)
        # A local SQLite store keeps its artifacts beside it, not in the current directory.
        sqlite = resolved.startswith("sqlite:///")
        root = Path(resolved[len("sqlite:///"):]).parent / "mlartifacts" if sqlite else None
        return cls(resolved, experiment, root)

    def start(self, run_name: str | None, tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
        """Start a run tagged with this host and process, after closing the runs of dead ones.

        Dead runs are looked for once per process and store: a study's trials start runs often.
        """
        if (self.uri, self.experiment_id) not in _REAPED:
            self.reap_dead_runs()
            _REAPED.add((self.uri, self.experiment_id))
        all_tags = {**tags, **self.owner_tags()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    @staticmethod
    def owner_tags() -> dict[str, str]:
        """This host and process: the reaper's test of whether a RUNNING run's process still lives."""
        return {"qsweep.host": HOST, "qsweep.process": own_process()}

    def reap_dead_runs(self) -> list[str]:
        """Close the RUNNING runs of this experiment whose process on this host is gone (SIGKILL, power loss,
        a store lost while recording a failure): FAILED if it left its reason, else KILLED."""
        found = self.client.search_runs([self.experiment_id], max_results=1000,
                                        filter_string=f"attributes.status = 'RUNNING' and tags.`qsweep.host` = '{HOST}'")
        reaped = []
        for run in found:
            token = run.data.tags.get("qsweep.process", "")
            if process_gone(token):
                self._close_dead_run(run, token.split(":")[0])
                reaped.append(run.info.run_id)
        return reaped

    def _close_dead_run(self, run, pid: str) -> None:
        """FAILED with the reason its process wrote to ``error.txt`` in its folder before dying or losing
        the store; KILLED if it wrote none."""
        folder = run.data.tags.get(OUTPUT_DIR_TAG)
        # A second's margin: file times lag the clock by up to a scheduler tick.
        reason = failure_reason(folder, since=run.info.start_time / 1000 - 1) if folder else None
        if reason:
            self.client.set_tag(run.info.run_id, "error", reason)
            self.client.set_terminated(run.info.run_id, status="FAILED")
            return
        self.client.set_tag(run.info.run_id, "error", f"its process ({HOST}:{pid}) is gone: it was killed")
        self.client.set_terminated(run.info.run_id, status="KILLED")

    def fork(self) -> "Recorder":
        """A recorder for another run in the same store and experiment (e.g. a study's trial)."""
        other = copy.copy(self)
        other.run_id = None
        return other

    def attach(self, run_id: str) -> None:
        """Record into an existing run (a study's parent run, joined by a second worker)."""
        self.run_id = run_id

    def get_run(self, run_id: str):
        """Another run of the store (its status and tags), e.g. a study's trial's."""
        return self.client.get_run(run_id)

    def sweep_parent(self, sweep: str, experiment: str) -> str:
        """The run that holds a Hydra multirun's jobs, found by its sweep directory or created (RUNNING)."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`qsweep.sweep` = '{sweep}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep:{experiment}:{Path(sweep).name}",
                                     tags={"qsweep.sweep": sweep, "qsweep.kind": "sweep", "experiment": experiment,
                                           **self.owner_tags()})
        return run.info.run_id

    def close_sweep(self, sweep_run_id: str) -> None:
        """End a multirun's parent: FAILED, with the count, if any of its jobs failed or was killed."""
        jobs = self.client.search_runs([self.experiment_id], max_results=10000,
                                       filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
        bad = [r for r in jobs if r.info.status in ("FAILED", "KILLED")]
        if bad:
            self.client.set_tag(sweep_run_id, "error", f"{len(bad)} of {len(jobs)} jobs failed")
        self.client.set_terminated(sweep_run_id, status="FAILED" if bad else "FINISHED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(param_key(k), str(v)[:_PARAM_VALUE_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_CHUNK):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAM_CHUNK])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None,
                    data: EvalData | None = None) -> None:
        """The run's metrics; with ``model_id`` also that logged model's, measured on ``data``."""
        now = int(time.time() * 1000)
        link = {"model_id": model_id, "dataset_name": data.name if data else None,
                "dataset_digest": data.digest if data else None} if model_id else {}
        # 7 significant digits, float32's: the runs table then shows 99.11111, not 99.1111099...
        items = [Metric(k, float(f"{float(v):.7g}"), now, step, **link) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)

    def log_input(self, data: EvalData) -> None:
        """The images the run is evaluated on, as its dataset input."""
        self.client.log_inputs(self.run_id, datasets=[data.input()])

    def log_model(self, name: str, files: list[Path], params: Mapping[str, str], model_type: str) -> str:
        """``files`` as a logged model of this run (READY once uploaded), with ``params``; returns its id."""
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                params=dict(params), model_type=model_type)
        try:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
            for path in files:
                self.client.log_model_artifact(model.model_id, str(path))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model.model_id

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, error: str | None = None, killed: bool = False) -> None:
        """End the run: FINISHED, FAILED with its reason as the ``error`` tag, or KILLED (interrupted)."""
        if self.run_id is None:
            return
        if error is not None:
            self.set_tags({"error": error[:5000]})
        status = "KILLED" if killed else "FAILED" if error is not None else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)

    def close_parent(self, status: str = "FINISHED") -> None:
        """End this study's run (FAILED or KILLED: a worker stopped early); a later worker may reopen it."""
        self.client.set_terminated(self.run_id, status=status)



class NullRecorder:
    """Stands in for a :class:`Recorder` when tracking is off: records nothing, so callers need no checks."""

    uri = run_id = None

    def fork(self) -> "NullRecorder":
        return self

    def start(self, run_name: str | None, tags: Mapping[str, str], parent_run_id: str | None = None) -> None:
        return None

    def attach(self, run_id: str) -> None:
        pass

    def get_run(self, run_id: str) -> None:
        return None

    def close_parent(self, status: str = "FINISHED") -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None,
                    data: EvalData | None = None) -> None:
        pass

    def log_input(self, data: EvalData) -> None:
        pass

    def log_model(self, name: str, files: list[Path], params: Mapping[str, str], model_type: str) -> None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, error: str | None = None, killed: bool = False) -> None:
        pass

    def sweep_parent(self, sweep: str, experiment: str) -> None:
        return None

    def runs_url(self, ui: str = "") -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m qsweep.tracking STORE UI [EXPERIMENT]``: print the UI's link to the experiment's runs table
    (creating the experiment and its view if the store has none yet)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qsweep.tracking", description=main.__doc__)
    parser.add_argument("store", help="tracking URI, e.g. sqlite:///mlflow.db")
    parser.add_argument("ui", help="the UI's address, e.g. http://127.0.0.1:5000")
    parser.add_argument("experiment", nargs="?", default="qsweep")
    args = parser.parse_args(argv)
    print(f"runs of experiment {args.experiment!r}: {Recorder(args.store, args.experiment).runs_url(args.ui)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
