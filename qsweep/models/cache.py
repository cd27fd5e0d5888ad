"""Where qsweep keeps things it computed once (trained embedded weights, ...)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "QSWEEP_CACHE"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override`` if given, else ``$QSWEEP_CACHE``, else ``~/.cache/qsweep`` (not created here)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qsweep"
