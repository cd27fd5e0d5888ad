"""CSV tables of the analysis (written atomically)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qsweep.files import atomic_write


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``rows`` (dicts; columns in first-seen key order) as CSV at ``path``."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    return atomic_write(Path(path), write)
