"""The study's product: its current Pareto front (quality vs exact MB), kept on disk and in MLflow as it runs.

After every finished trial each worker rewrites ``pareto.json`` and ``pareto.csv`` in its run folder and
in the study's MLflow run, each under a temp name renamed into place: a study killed at any moment
still has the front of every trial finished before it.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import optuna
from optuna.trial import FrozenTrial, TrialState

from qsweep.files import atomic_write
from qsweep.search.fidelity import Quality
from qsweep.search.plots import pareto_front
from qsweep.search.space import FLOAT, SearchSpace
from qsweep.tracking import NullRecorder, Recorder

FILES = ("pareto.json", "pareto.csv")


def feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def front_trials(study: optuna.Study, quality: Quality) -> list[FrozenTrial]:
    """The complete, feasible trials no other beats on both quality and size, smallest first."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if quality.name in t.user_attrs and "size_mb" in t.user_attrs and feasible(t)]
    points = [(-quality.key(t.user_attrs[quality.name]), t.user_attrs["size_mb"]) for t in trials]
    return [trials[i] for i in pareto_front(points)]


def front_entry(trial: FrozenTrial, space: SearchSpace, quality: Quality,
                hash_of: Callable[[dict], str]) -> dict[str, Any]:
    """One member: its numbers, the ``layout`` hash its run records and its widths per layer (32 = float)."""
    a = trial.user_attrs
    layout = space.layout_of(trial.params)
    per_layer = space.per_layer(layout)
    entry = {"trial": trial.number, quality.name: a[quality.name], "size_mb": a["size_mb"],
             "size_bytes": a.get("size_bytes", round(a["size_mb"] * 1e6)), "top1": a.get("top1"),
             "score": a.get("score"), "layout": hash_of(layout), "w_bits": {n: c["w"] for n, c in per_layer.items()}}
    if any("a" in c for c in per_layer.values()):
        entry["a_bits"] = {n: c.get("a", FLOAT) for n, c in per_layer.items()}
    return entry


class FrontLog:
    """Writes a study's front after each trial into ``out`` and the study's MLflow run."""

    def __init__(self, out: Path, study_name: str, space: SearchSpace, quality: Quality, budget_bytes: int | None,
                 hash_of: Callable[[dict], str], parent: Recorder | NullRecorder):
        self.out, self.study_name, self.space, self.quality = Path(out), study_name, space, quality
        self.budget_bytes, self.hash_of, self.parent = budget_bytes, hash_of, parent
        self._artifact_dir: Path | None | bool = False  # False: not looked up yet; None: not a local folder

    def update(self, study: optuna.Study) -> list[dict[str, Any]]:
        """The current front, written (``pareto.json``, ``pareto.csv``) and published; returns its entries."""
        entries = [front_entry(t, self.space, self.quality, self.hash_of) for t in front_trials(study, self.quality)]
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
        doc = {"study": self.study_name, "quality": self.quality.name, "direction": self.quality.direction,
               "budget_mb": None if self.budget_bytes is None else self.budget_bytes / 1e6,
               "budget_bytes": self.budget_bytes, "trials_finished": finished, "front": entries}
        paths = [atomic_write(self.out / FILES[0], lambda tmp: tmp.write_text(json.dumps(doc, indent=2))),
                 atomic_write(self.out / FILES[1], lambda tmp: self._write_csv(tmp, entries))]
        self._publish(paths)
        return entries

    def _write_csv(self, path: Path, entries: list[dict[str, Any]]) -> None:
        columns = list(dict.fromkeys(["trial", self.quality.name, "size_mb", "size_bytes", "top1", "score", "layout"]))
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns + self.space.layers)
            for e in entries:
                writer.writerow([e[k] for k in columns] + [e["w_bits"][n] for n in self.space.layers])

    def _publish(self, paths: list[Path]) -> None:
        """Into the study's run: renamed into place in a local artifact store, else uploaded whole."""
        if self.parent.run_id is None:
            return
        if self._artifact_dir is False:
            uri = urlparse(self.parent.get_run(self.parent.run_id).info.artifact_uri)
            self._artifact_dir = Path(url2pathname(uri.path)) if uri.scheme in ("", "file") else None
        for path in paths:
            if self._artifact_dir is None:
                self.parent.log_artifact(path)
            else:
                atomic_write(self._artifact_dir / path.name, lambda tmp, src=path: shutil.copyfile(src, tmp))
