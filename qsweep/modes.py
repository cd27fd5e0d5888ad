"""The job a config asks for: one run (``mode=run`` or ``analyze``) or a study's worker (``mode=search``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qsweep.app import record_refused, run
from qsweep.config import validate
from qsweep.job import PROJECT_DIR, check_environment, record_failure
from qsweep.search import run_search
from qsweep.tracking import NullRecorder


def execute(cfg: DictConfig, output_dir: str | Path, sweep: str | None = None,
            overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``cfg``'s mode; a Hydra multirun passes its ``sweep`` directory so jobs nest under one parent run,
    the CLI its ``overrides`` so the run records what they changed."""
    if cfg.get("mode") != "search":
        return run(cfg, output_dir, sweep=sweep, overrides=overrides)
    output_dir = Path(output_dir)
    try:
        checked = validate(cfg)
        check_environment(checked, output_dir)
    except BaseException as exc:
        record_failure(output_dir, record_refused(cfg, output_dir, None, sweep, overrides), exc)
        raise
    try:
        return run_search(checked, output_dir, PROJECT_DIR, sweep=sweep, overrides=overrides)
    except BaseException as exc:
        record_failure(output_dir, NullRecorder(), exc)  # the study's own runs record themselves
        raise
