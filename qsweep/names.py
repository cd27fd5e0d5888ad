"""Config values that become file and folder names, checked before anything is written.

``name`` names the run's folder, ``search.study_name`` the best layout's file, ``export.filename``
the artifact in the run's folder, ``search.best_dir`` the folder the best layout goes to. None of
them may lead out of where it belongs or onto a file the run writes itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsweep.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
# The failure marker: qsweep.job writes it into a run's folder when the run fails or is killed.
FAILED_FILE = "error.txt"
# What a run writes into its output folder besides the artifact (app, search, Hydra, the failure marker).
RUN_OUTPUTS = ("config.yaml", "result.json", "layers.csv", "analysis", "search.json", "trials.csv", "pareto.png",
               "layout_heatmap.png", "history.png", "best", "conf", ".hydra", "__main__.log", FAILED_FILE)
# File names are limited to 255 bytes; the run folder adds a time prefix and maybe "-2", the study "_best.yaml".
MAX_NAME_BYTES = 200
# The run folder of a `name` that is refused: Hydra creates the folder before qsweep sees the config.
REFUSED_NAME_FOLDER = "refused-name"


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a single file or folder name, or None if it can."""
    if not isinstance(value, str) or not value.strip():
        return "it is empty"
    if value in (".", "..") or ".." in value:
        return "'..' leads out of the folder it is meant for"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains a control character"
    if len(value.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_name(key: str, value: Any, example: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` is a plain name."""
    problem = name_problem(value)
    if problem:
        raise ConfigError(f"{key}={value!r} is not allowed: {problem}; give a plain name (no '/', '\\' or '..', "
                          f"at most {MAX_NAME_BYTES} bytes), e.g. {example}")


def folder_name(name: Any) -> str:
    """``name`` as the last part of the run's folder; a refused name gets a fixed placeholder.

    Hydra resolves the folder before qsweep validates the config, and an error raised while it
    resolves is a traceback: the placeholder keeps the folder under ``outputs/`` and
    :func:`validate_output_names` then refuses the name with a clear error recorded in it.
    """
    return str(name) if name_problem(str(name)) is None else REFUSED_NAME_FOLDER


def validate_export_filename(name: Any) -> None:
    """``export.filename``: a plain file name in the run directory that no other output of the run uses."""
    key = "export.filename"
    check_name(key, name, "quantized.pt2")
    taken = {out.casefold() for out in RUN_OUTPUTS}
    if name.casefold() in taken:
        raise ConfigError(f"{key}={name!r} is not allowed; the run writes its own {name} there "
                          f"(reserved names: {', '.join(RUN_OUTPUTS)})")
    if name.casefold().endswith(".pte"):
        raise ConfigError(f"{key}={name!r} is not allowed; <name>.pte is where export.pte=true writes the "
                          "ExecuTorch program beside the artifact (use e.g. quantized.pt2)")


def check_outside_package(key: str, folder: str) -> None:
    """An output folder chosen by the user may not be inside qsweep's installed package or its shipped conf/."""
    resolved = Path(folder).expanduser().resolve()
    for shipped in (PACKAGE_DIR, CONF_DIR):
        if resolved == shipped or shipped in resolved.parents:
            raise ConfigError(f"{key}={folder!r} is not allowed: it is inside qsweep's own {shipped}, which an "
                              "upgrade or checkout replaces; choose a folder of your own (null: the run's folder)")


def validate_output_names(cfg: Any) -> None:
    """Every config value that becomes a file or folder name (see the module docstring)."""
    check_name("name", cfg.name, "name=deit_w4a8")
    if cfg.search.study_name is not None:
        check_name("search.study_name", cfg.search.study_name, "search.study_name=deit_mixed")
    validate_export_filename(cfg.export.filename)
    if cfg.search.best_dir:
        check_outside_package("search.best_dir", str(cfg.search.best_dir))
