"""A Hydra multirun's jobs in one table: the swept keys, top-1, size and score, and which keys changed nothing.

Read from the job folders (``.hydra/overrides.yaml``, ``result.json``, ``error.txt``), so jobs of any
launcher, in any process, are counted.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from qsweep.files import failure_reason, write_text
from qsweep.names import FAILED_FILE

RESULTS = ("top1", "size_mb", "score")  # the table's result columns
SAME = ("top1", "top5", "size_mb", "score")  # equal in all of these: identical results
SUMMARY_CSV, SUMMARY_TXT = "summary.csv", "summary.txt"


@dataclass
class Job:
    folder: Path
    overrides: dict[str, str]
    result: dict | None  # result.json; None if the job failed or left none
    error: str | None

    @property
    def num(self) -> int:
        return int(self.folder.name) if self.folder.name.isdigit() else -1

    def outcome(self) -> tuple | None:
        return tuple(self.result.get(k) for k in SAME) if self.result else None


def read_jobs(sweep: Path) -> list[Job]:
    """Every job folder of the multirun in ``sweep``, in job order."""
    jobs = []
    for hydra_dir in sweep.glob("*/.hydra"):
        folder = hydra_dir.parent
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) if (
            hydra_dir / "overrides.yaml").exists() else []
        result_file = folder / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        error = failure_reason(folder) if (folder / FAILED_FILE).exists() else None
        jobs.append(Job(folder, dict(_split(o) for o in overrides or []), result, error))
    return sorted(jobs, key=lambda j: (j.num, j.folder.name))


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_keys(jobs: list[Job]) -> list[str]:
    """The override keys whose values differ between jobs (all of them if none do), in command-line order."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    return swept or keys


def no_effect(jobs: list[Job], keys: list[str]) -> list[str]:
    """The swept keys that changed no result: jobs differing only in that key have identical results."""
    done = [j for j in jobs if j.outcome() is not None]
    found = []
    for key in keys:
        groups: dict[tuple, list[Job]] = {}
        for j in done:
            groups.setdefault(tuple(j.overrides.get(k) for k in keys if k != key), []).append(j)
        compared = [g for g in groups.values() if len({j.overrides.get(key) for j in g}) > 1]
        if compared and all(len({j.outcome() for j in g}) == 1 for g in compared):
            found.append(key)
    return found


def table(jobs: list[Job], keys: list[str]) -> list[list[str]]:
    """Header and one row per job: number, swept values, results (or the failure), MLflow run id."""
    rows = [["job", *keys, "top-1 %", "size MB", "score", "status", "mlflow run"]]
    for j in jobs:
        r = j.result or {}
        values = [f"{r['top1']:.2f}", f"{r['size_mb']:.4f}", f"{r['score']:g}"] if j.result else ["-"] * 3
        status = "ok" if j.result else f"FAILED: {j.error}" if j.error else "no result"
        rows.append([str(j.num), *(j.overrides.get(k, "") for k in keys), *values, status,
                     r.get("mlflow_run_id") or ""])
    return rows


def format_rows(rows: list[list[str]], width: int = 60) -> str:
    """Aligned columns, each cell cut at ``width`` characters; the MLflow run id left to the CSV."""
    cells = [[c if len(c) <= width else c[:width - 3] + "..." for c in row[:-1]] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def summarize(sweep: Path) -> tuple[str, list[Path]]:
    """The multirun's table and identical-results line as text, also written to ``summary.txt`` and
    ``summary.csv`` in ``sweep``; returns the text and the two files."""
    jobs = read_jobs(sweep)
    keys = swept_keys(jobs)
    rows = table(jobs, keys)
    lines = [f"multirun summary: {len(jobs)} jobs in {sweep}", format_rows(rows)]
    done = [j for j in jobs if j.outcome() is not None]
    idle = no_effect(jobs, keys)
    if len(done) > 1 and len({j.outcome() for j in done}) == 1:
        lines.append(f"identical results in all {len(done)} finished jobs (top-1, top-5, size, score): "
                     f"{', '.join(idle or keys) or 'the swept keys'} had no effect")
    elif idle:
        lines.append(f"identical results in jobs that differ only in {', '.join(idle)}: no effect")
    text = "\n".join(lines)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    files = [write_text(sweep / SUMMARY_TXT, text + "\n"), write_text(sweep / SUMMARY_CSV, buffer.getvalue())]
    return text, files
