"""Hydra's launchers run a grid's jobs in parallel processes; every job lands under its sweep's parent run."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def sweep_runs(uri: str):
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id])
    parents = [r for r in found if r.data.tags.get("qsweep.kind") == "sweep"]
    return parents, [r for r in found if r not in parents]


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_launcher_runs_the_grid_and_loses_no_job(tmp_path, digits_vit, launcher):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parallel = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=30"]
    proc = subprocess.run(
        [sys.executable, "-m", "qsweep", "-m", f"hydra/launcher={launcher}", *parallel,
         "quant.act.observer=minmax,percentile", "quant=w8a8", "export.enabled=false", "eval.backend=fake",
         f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri={uri}", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,), jobs = sweep_runs(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["qsweep.sweep"] == str((tmp_path / "sweep").resolve())
    assert len(jobs) == 2 and all(j.data.tags["mlflow.parentRunId"] == parent.info.run_id for j in jobs)
    assert sorted(j.data.params["quant.act.observer"] for j in jobs) == ["minmax", "percentile"]
    assert all(j.info.status == "FINISHED" for j in jobs)
    assert len({j.data.tags["qsweep.process"] for j in jobs}) == 2  # two processes, one store
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/result.json")) == ["0", "1"]
