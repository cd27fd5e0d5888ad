"""Writing files so that nothing is lost: temp name then rename, space checked first, clear write errors."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qsweep.errors import QsweepError
from qsweep.names import FAILED_FILE

# Room left beside an output: the file system's own overhead and whatever else writes meanwhile.
SPACE_MARGIN_MB = 16.0
# How torch's C++ zip writer reports a full disk or a file-size limit: never with errno's words.
_TORCH_WRITE_FAILURES = ("iostream error", "inline_container.cc", "file write failed")
# What a user can do about the errors a write fails with when the file cannot grow.
_WRITE_HINTS = {errno.EFBIG: "over this process's file-size limit (ulimit -f)",
                errno.ENOSPC: "free some space or write elsewhere (hydra.run.dir=...)"}


class OutputError(QsweepError):
    """An output cannot be written (disk full, read-only folder, ...)."""


def free_mb(folder: Path) -> float:
    """Free space (MB) of the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free / 2**20


def ensure_space(path: Path, size_mb: float) -> None:
    """Raise :class:`OutputError` before writing ``size_mb`` to ``path`` if its disk cannot take it."""
    free = free_mb(Path(path).parent)
    if free < size_mb + SPACE_MARGIN_MB:
        raise OutputError(f"No space left on device for {path}: it needs about {size_mb:.1f} MB "
                          f"(+{SPACE_MARGIN_MB:.0f} MB margin) and {free:.1f} MB are free; free some space "
                          f"or write elsewhere (hydra.run.dir=...)")


def ensure_writable(folder: Path, key: str) -> None:
    """Raise :class:`OutputError` naming ``key`` unless a file can be created in ``folder`` (created if missing)."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".qsweep-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{key}={str(folder)!r} is not writable: {exc.strerror or exc}; "
                          f"choose a folder you can write to") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it onto ``path``.

    Readers never see a half-written file, a killed writer leaves no file under the final name,
    and concurrent writers of the same content are safe. A failed write (full disk, ...) raises
    :class:`OutputError` naming ``path``; the temp file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the final suffix kept: some writers check it (torch.export.save wants ``.pt2``)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            hint = f" ({_WRITE_HINTS[exc.errno]})" if exc.errno in _WRITE_HINTS else ""
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}{hint}") from None
        if isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _TORCH_WRITE_FAILURES):
            raise OutputError(f"cannot write {path}: the write failed ({exc}); {free_mb(path.parent):.1f} MB "
                              f"free on its disk") from None
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


# error.txt holds the reason, then any details (a traceback) below this line.
_DETAILS = "\n\n--- details ---\n"


def write_failure(folder: str | Path, reason: str, details: str = "") -> None:
    """``error.txt`` in a failed run's folder: the reason it failed, then ``details`` if any."""
    try:
        write_text(Path(folder) / FAILED_FILE, reason + (_DETAILS + details if details else "") + "\n")
    except OutputError:
        pass  # an unwritable folder is itself the error being raised


def failure_reason(folder: str | Path, limit: int = 300, since: float = 0.0) -> str | None:
    """The reason a failed run wrote to ``error.txt`` in its folder (its start), or None if it wrote
    none (at or after the time ``since``: an older file is another run's, in a reused folder)."""
    path = Path(folder) / FAILED_FILE
    try:
        if path.stat().st_mtime < since:
            return None
        text = path.read_bytes()
    except OSError:
        return None
    # Whatever bytes it holds: a reason quotes file names and values from the user.
    return text.decode("utf-8", "replace").split(_DETAILS, 1)[0].strip()[:limit]
