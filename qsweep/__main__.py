"""``python -m qsweep [overrides]``: one quantization run (or a Hydra multirun with ``-m``)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qsweep.errors import QsweepError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.app import run  # heavy imports after Hydra has parsed the command line

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except QsweepError as exc:
        print(f"qsweep: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
