"""After a Hydra multirun: one table of its jobs (swept keys, top-1, size, score), printed and logged to the
sweep's parent run, saying when a swept key changed no result."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from qsweep.files import write_failure
from qsweep.sweep_summary import summarize

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("quant=w8a8", "export.enabled=false", "eval.backend=fake", "progress=false")


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
@pytest.mark.slow
def test_a_multirun_prints_and_logs_one_table_and_names_the_key_without_effect(tmp_path, digits_vit):
    uri, sweep = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "qsweep", "-m", "quant.weight.bits=4,8", "tracking.run_name=a,b",
                           *CHEAP, f"hydra.sweep.dir={sweep}", f"tracking.uri={uri}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    table = out[out.index("multirun summary: 4 jobs"):].splitlines()
    assert table[1].split()[:3] == ["job", "quant.weight.bits", "tracking.run_name"]
    assert [row.split()[:3] for row in table[2:6]] == [["0", "4", "a"], ["1", "4", "b"], ["2", "8", "a"], ["3", "8", "b"]]
    assert all(row.split()[-1] == "ok" for row in table[2:6])
    assert "identical results in jobs that differ only in tracking.run_name: no effect" in out

    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id],
                                   filter_string="tags.`qsweep.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["qsweep.sweep"] == str(sweep.resolve())
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"summary.csv", "summary.txt"}
    assert out.count(f"mlflow: sweep run {parent.info.run_id}") == 2  # at its start and its end, with the link
    assert "viewStateShareKey=qsweep" in out
    with open(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))) as f:
        rows = list(csv.DictReader(f))
    # one MLflow run per job, all under the sweep's parent run, each with its swept value as a param
    everything = client.search_runs([parent.info.experiment_id])
    jobs = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(everything) == 5 and len(jobs) == 4 and all(j.info.status == "FINISHED" for j in jobs)
    assert sorted((j.data.params["quant.weight.bits"], j.info.run_name) for j in jobs) == \
        [("4", "a"), ("4", "b"), ("8", "a"), ("8", "b")]
    assert sorted(r["mlflow run"] for r in rows) == sorted(j.info.run_id for j in jobs)


def job(sweep: Path, num: int, overrides: list[str], result: dict | None = None, error: str | None = None) -> None:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        (folder / "result.json").write_text(json.dumps({"top5": 100.0, "mlflow_run_id": f"run{num}", **result}))
    if error is not None:
        write_failure(folder, error, "")


def test_identical_results_are_said_once_and_a_failed_job_keeps_its_row(tmp_path):
    same = {"top1": 98.0, "size_mb": 0.12, "score": 44.0}
    job(tmp_path, 0, ["quant.act.observer=minmax", "progress=false"], same)
    job(tmp_path, 1, ["quant.act.observer=percentile", "progress=false"], same)
    job(tmp_path, 2, ["quant.act.observer=mse", "progress=false"], error="RuntimeError: observer state lost")
    text, files = summarize(tmp_path)
    lines = text.splitlines()
    assert lines[1].split() == ["job", "quant.act.observer", "top-1", "%", "size", "MB", "score", "status"]
    assert lines[2].split() == ["0", "minmax", "98.00", "0.1200", "44", "ok"]
    assert lines[4].split()[:5] == ["2", "mse", "-", "-", "-"] and "FAILED: RuntimeError: observer" in lines[4]
    assert lines[-1] == ("identical results in all 2 finished jobs (top-1, top-5, size, score): "
                         "quant.act.observer had no effect")
    assert [f.name for f in files] == ["summary.txt", "summary.csv"] and (tmp_path / "summary.txt").read_text() == text + "\n"


def test_results_that_differ_are_not_called_identical(tmp_path):
    job(tmp_path, 0, ["quant.weight.bits=4"], {"top1": 97.0, "size_mb": 0.12, "score": 44.0})
    job(tmp_path, 1, ["quant.weight.bits=8"], {"top1": 99.0, "size_mb": 0.19, "score": 30.0})
    text, _ = summarize(tmp_path)
    assert "identical" not in text and len(text.splitlines()) == 4
