"""Runs started in the same second get their own output folders (hydra.run.dir / hydra.sweep.dir)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from qsweep.__main__ import unique_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def test_unique_dir_never_hands_out_a_taken_folder(tmp_path):
    base = str(tmp_path / "outputs" / "2024-01-01" / "12-00-00-default")
    first, second, third = unique_dir(base), unique_dir(base), unique_dir(base)
    assert first == base and second == f"{base}-2" and third == f"{base}-3"
    assert all(Path(p).is_dir() for p in (first, second, third))


def _dirs() -> tuple[str, str]:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    # Resolved again (as a multirun's jobs do with the sweep folder): the same folder, not a new one.
    assert cfg.hydra.sweep.dir == cfg.hydra.sweep.dir and cfg.hydra.run.dir == cfg.hydra.run.dir
    return cfg.hydra.run.dir, cfg.hydra.sweep.dir


def test_two_runs_composed_at_once_get_different_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the folders are relative to where qsweep runs
    (run_a, sweep_a), (run_b, sweep_b) = _dirs(), _dirs()
    assert run_a != run_b and sweep_a != sweep_b
    for path in (run_a, run_b):
        assert path.startswith("outputs/") and path.split("/")[-1].split("-")[3] == "default"
        assert (tmp_path / path).is_dir()
    assert all(p.startswith("multirun/") and (tmp_path / p).is_dir() for p in (sweep_a, sweep_b))


def test_a_name_that_would_leave_outputs_gets_a_placeholder_folder(tmp_path, monkeypatch):
    """Hydra makes the folder before validation refuses the name (tests/test_hostile_inputs.py): it stays in outputs/."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["name=../../../escaped"], return_hydra_config=True)
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir.parent.parent == Path("outputs") and run_dir.name.endswith("-refused-name")
    assert (tmp_path / run_dir).is_dir() and not (tmp_path.parent / "escaped").exists()
