"""export.filename must be a plain file name that none of the run's other outputs uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qsweep.config import ConfigError, validate
from qsweep.names import validate_export_filename

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.mark.parametrize("name, message", [
    ("", "it is empty"),
    ("   ", "it is empty"),
    ("../x.pt2", "'..' leads out"),
    ("a/b.pt2", "path separator"),
    ("..", "'..' leads out"),
    ("dir\\x.pt2", "path separator"),
    ("x" * 201 + ".pt2", "longer than 200 bytes"),
    ("error.txt", "writes its own error.txt"),
    ("__main__.log", "writes its own __main__.log"),
    ("layers.csv", "writes its own layers.csv"),
    ("result.json", "writes its own result.json"),
    ("Config.YAML", "writes its own Config.YAML"),
    ("trials.csv", "writes its own trials.csv"),
    ("model.pte", "ExecuTorch program"),
])
def test_bad_filenames_are_refused(name, message):
    with pytest.raises(ConfigError) as err:
        validate_export_filename(name)
    assert str(err.value).startswith(f"export.filename={name!r} is not allowed") and message in str(err.value)


def test_good_filenames_pass_and_validate_checks_the_key():
    for name in ("quantized.pt2", "deits_quantized.pth", "model"):
        validate_export_filename(name)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["export.filename=result.json"])
    with pytest.raises(ConfigError, match=r"export\.filename='result\.json' is not allowed"):
        validate(cfg)
