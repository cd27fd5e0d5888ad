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

from qsweep.errors import QsweepError
from qsweep.names import folder_name


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


def _raise_interrupted(signum: int, frame) -> None:
    from qsweep.job import Interrupted

    raise Interrupted(signum)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.job import Interrupted  # heavy imports after Hydra has parsed the command line
    from qsweep.modes import execute

    # `timeout`, schedulers and `kill` send SIGTERM: stop as after Ctrl-C (the run is marked KILLED).
    signal.signal(signal.SIGTERM, _raise_interrupted)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        # Every job of one multirun nests under one MLflow run named after the sweep directory.
        execute(cfg, hydra_cfg.runtime.output_dir, sweep=str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None)
    except QsweepError as exc:
        print(f"qsweep: error: {exc}", file=sys.stderr)
        if not multirun:  # in a grid the others go on; the sweep_outcome callback fails the command at the end
            sys.exit(1)
    except Interrupted as exc:
        print(f"qsweep: stopped by {exc}; the run is marked KILLED", file=sys.stderr)
        sys.exit(128 + exc.signum)


if __name__ == "__main__":
    main()
    from qsweep import hydra_callbacks

    sys.exit(1 if hydra_callbacks.failed_jobs else 0)
