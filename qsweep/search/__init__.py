"""Optuna mixed-precision search over per-layer bit layouts (``mode=search``)."""

from qsweep.search.run import run_search

__all__ = ["run_search"]
