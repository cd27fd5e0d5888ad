"""``python -m qsweep [overrides]``: one quantization run (or a Hydra multirun with ``-m``)."""

from __future__ import annotations

import itertools
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qsweep.errors import Interrupted, QsweepError, interruption_taken, raise_interrupted
from qsweep.names import FAILED_FILE, folder_name


def unique_dir(base: str) -> str:
    """Create and return ``base``, or ``base-2``, ``base-3``, ... if taken: a folder no other run has.

    Run folders are named after the second a run starts, so two runs started in the same second
    would write into one. ``mkdir`` without ``exist_ok`` is atomic: concurrent runs get distinct folders.
    """
    path = Path(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            continue


# conf/config.yaml names hydra.run.dir / hydra.sweep.dir through it; registered before Hydra composes.
# Cached: a multirun's jobs resolve the sweep folder again and must get the one created first.
OmegaConf.register_new_resolver("qsweep.unique_dir", unique_dir, use_cache=True, replace=True)
# The folders' last part: `name`, or a placeholder when validation will refuse it (qsweep.names.folder_name).
OmegaConf.register_new_resolver("qsweep.folder_name", folder_name, replace=True)


def _failed(reason: str, multirun: bool) -> None:
    """One error line; the exit status 1, except in a grid, where the other jobs go on
    (the SweepOutcome callback fails the command at the end)."""
    print(f"qsweep: error: {reason}", file=sys.stderr)
    if not multirun:
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.modes import execute  # heavy imports after Hydra has parsed the command line

    # `timeout`, schedulers and `kill` send SIGTERM: stop as after Ctrl-C (the run is marked KILLED).
    signal.signal(signal.SIGTERM, raise_interrupted)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        # Every job of one multirun nests under one MLflow run named after the sweep directory.
        execute(cfg, hydra_cfg.runtime.output_dir, sweep=str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None,
                overrides=list(hydra_cfg.overrides.task))
    except QsweepError as exc:
        _failed(str(exc), multirun)
    except Exception as exc:  # a bug or a library's failure: its traceback is in the run's error.txt
        _failed(f"{type(exc).__name__}: {exc} (traceback in {Path(hydra_cfg.runtime.output_dir) / FAILED_FILE})",
                multirun)
    except Interrupted as exc:
        interruption_taken()
        print(f"qsweep: stopped by {exc}; the run is marked KILLED", file=sys.stderr)
        sys.exit(128 + exc.signum)


if __name__ == "__main__":
    main()
    from qsweep import hydra_callbacks

    sys.exit(1 if hydra_callbacks.failed_jobs else 0)
