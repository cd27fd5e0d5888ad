"""Where qsweep keeps things it computed once (trained embedded weights, ...)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

ENV_VAR = "QSWEEP_CACHE"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override`` if given, else ``$QSWEEP_CACHE``, else ``~/.cache/qsweep`` (not created here)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qsweep"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it onto ``path``.

    Readers never see a half-written file, and concurrent writers of the same content are safe.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
