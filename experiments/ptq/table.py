"""Print the recipe x bit-configuration top-1 table from a directory of qsweep multirun outputs.

    python experiments/ptq/table.py multirun/ptq-table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

COLUMNS = ["w8a8", "w4a8", "w3a8", "w4a4", "w2a8"]


def main(root: str) -> None:
    cells: dict[str, dict[str, str]] = {}
    order: list[str] = []
    for result in sorted(Path(root).glob("*/*/result.json"), key=lambda p: p.stat().st_mtime):
        cfg = OmegaConf.load(result.parent / "config.yaml")
        row = result.parent.parent.name  # the sweep directory is named after the recipe row
        if row not in cells:
            order.append(row)
            cells[row] = {}
        r = json.loads(result.read_text())
        cells[row][cfg.quant.name] = f"{r['top1']:.2f}"
    print("| recipe | " + " | ".join(c.upper() for c in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for row in order:
        print(f"| {row} | " + " | ".join(cells[row].get(c, "-") for c in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
