"""``python -m qsweep [overrides]``: one quantization run (or a Hydra multirun with ``-m``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qsweep.errors import QsweepError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.app import run  # heavy imports after Hydra has parsed the command line

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        # Every job of one multirun nests under one MLflow run named after the sweep directory.
        run(cfg, hydra_cfg.runtime.output_dir, sweep=str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None)
    except QsweepError as exc:
        print(f"qsweep: error: {exc}", file=sys.stderr)
        if not multirun:  # in a grid, the failed job is recorded (FAILED in MLflow) and the others go on
            sys.exit(1)


if __name__ == "__main__":
    main()
