"""Every command in the README runs as written (issue 22).

Each command line of the README's ```bash blocks is handed to bash as written, with ``python``, ``pip``,
``make`` and ``.venv/bin/python`` standing in as recorders, so bash itself does the quoting, ``$(...)``,
line continuations and comments. Then, per command:

* ``python -m qsweep ...``: every job (a multirun's too) is composed through Hydra's compose API with the
  README's overrides, validated with ``qsweep.config.validate``, and its MLflow params logged to a
  throwaway store (what the README's glob example once failed at). The cheap ones on the embedded
  default also run end to end (``E2E``); the glob example does in ``test_runs_table.py``. Paths to data
  or checkpoints the test cannot have (``/path/...``) stay as written: validation reads no data.
* ``python -m qsweep.lab_eval ...``: its arguments parse, and the artifact named is the one the
  experiment's runs write, in a run folder named as Hydra names them;
* ``make TARGET``: the Makefile has the target; ``pip install -e '.[EXTRA]'``: pyproject.toml has the extra.

The README's Python blocks run too: the API example on a small model, the model-registry example on the
store of the default run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient

import qsweep.__main__  # noqa: F401 - registers the resolvers that name run folders
from qsweep.config import validate
from qsweep.export import load_program
from qsweep.quant.quantizer import ClippingWarning
from qsweep.run_params import run_params
from qsweep.search.summary import _best_yaml_path
from qsweep.search.study import best_experiment_yaml
from qsweep.tracking import Recorder
from test_hostile_inputs import cli

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    """The text of the README's fenced blocks of ``language`` ("" for a block without one)."""
    found, current, kind = [], None, None
    for line in README.splitlines(keepends=True):
        if current is None and line.startswith("```"):
            current, kind = [], line[3:].strip()
        elif current is not None and line.strip() == "```":
            if kind == language:
                found.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return found


def command_lines(block: str) -> list[str]:
    """The block's commands, one per item: continuation lines joined, comment and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


COMMANDS = [line for block in blocks("bash") for line in command_lines(block)]
DEFAULT_RUN = ".venv/bin/python -m qsweep"
CLIPPING_RUN = "python -m qsweep quant=w2a8 quant.act.observer=percentile quant.act.p=99.9"
E2E = (DEFAULT_RUN, CLIPPING_RUN)  # run end to end below, besides being composed like the others

# bash: each stand-in writes its argv (NUL-separated) into $CALLS/<n>, n counting calls.
RECORD = r"""
record() {
    n=$(( $(cat "$CALLS/n" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$CALLS/n"
    printf '%s\0' "$@" > "$CALLS/$n"
}
"""
STAND_INS = RECORD + "\n".join(f'{name}() {{ record {name} "$@"; }}' for name in ("python", "pip", "make")) + "\n"


def as_bash_runs(line: str, cwd: Path) -> list[list[str]]:
    """The commands (argv lists) bash runs for ``line`` in ``cwd``: nothing else may run or complain."""
    calls = cwd / "calls"
    calls.mkdir(parents=True)
    venv_python = cwd / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True, exist_ok=True)
    venv_python.write_text(f"#!/usr/bin/env bash\n{RECORD}\nrecord .venv/bin/python \"$@\"\n")
    venv_python.chmod(0o755)
    proc = subprocess.run(["bash", "-c", STAND_INS + line], cwd=cwd, env={**os.environ, "CALLS": str(calls)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    count = int((calls / "n").read_text()) if (calls / "n").exists() else 0
    return [(calls / str(i)).read_text().split("\0")[:-1] for i in range(1, count + 1)]


def composed(overrides: list[str], config_dir: str | None = None, hydra: bool = False):
    search = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*search, *overrides], return_hydra_config=hydra)


def make_run_folders(line: str, cwd: Path, monkeypatch) -> dict[str, Path]:
    """For each ``outputs/*/*-NAME`` the line globs, a run folder of experiment NAME, named as Hydra names it
    (``hydra.run.dir`` resolved in ``cwd``): {NAME: folder}."""
    folders = {}
    for name in re.findall(r"outputs/\*/\*-(\w+)", line):
        cfg = composed([f"+experiment={name}"], hydra=True)
        assert cfg.name == name  # the folder is named after the run's name
        with monkeypatch.context() as m:
            m.chdir(cwd)
            folders[name] = (cwd / cfg.hydra.run.dir).resolve()
        assert folders[name].is_dir() and folders[name].parent.parent == (cwd / "outputs").resolve()
    return folders


def hydra_jobs(args: list[str]) -> tuple[str | None, list[list[str]]]:
    """``python -m qsweep ARGS`` as Hydra reads them: (--config-dir, the override list of each job)."""
    multirun, config_dir, overrides = False, None, []
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "--config-dir":
            config_dir = next(it)
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        else:
            assert not arg.startswith("-"), f"a flag this test does not know: {arg}"
            overrides.append(arg)
    if not multirun:
        return config_dir, [overrides]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return config_dir, jobs


def write_best_overlay(config_dir: Path, experiment: str) -> None:
    """``experiment`` (``best/<study>_best``) where a study writes it, as it writes it, for a layout of two widths."""
    study_cfg = validate(composed([f"+experiment={experiment.removeprefix('best/').removesuffix('_best')}"]))
    name = study_cfg.search.study_name or study_cfg.name
    assert experiment == f"best/{name}_best"
    path = _best_yaml_path(study_cfg, config_dir.parent, name)  # the study's run folder holds conf/
    assert path == config_dir / "experiment" / "best" / f"{name}_best.yaml"
    layers = {"blocks.0.attn.qkv": {"w_bits": 3}, "head": {"w_bits": 8}}
    path.parent.mkdir(parents=True)
    path.write_text(best_experiment_yaml(study_cfg, layers, f"{name}_best", ["written by the test"]))


def check_qsweep(args: list[str], store: str, tmp_path: Path) -> None:
    config_dir, jobs = hydra_jobs(args)
    for job in jobs:
        job = [re.sub(r"^model\.path=/path/saved_model$", f"model.path={hf_config(tmp_path)}", o) for o in job]
        if config_dir:
            experiments = [o.split("=", 1)[1] for o in job if o.startswith("+experiment=best/")]
            for experiment in experiments:
                write_best_overlay(Path(config_dir), experiment)
        cfg = validate(composed(job, config_dir))
        # what `python -m qsweep` records of it: the recipe and the overridden keys, as MLflow params
        rec = Recorder(store, "qsweep")
        rec.start("readme", {})
        rec.log_params(run_params(cfg, job))
        rec.finish()


def hf_config(tmp_path: Path) -> Path:
    """A Hugging Face model folder's config.json (all that validation reads), for /path/saved_model."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "saved_model"
    if not path.exists():
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64).save_pretrained(path)
    return path


def check_lab_eval(args: list[str], folders: dict[str, Path], cwd: Path, monkeypatch) -> None:
    import qsweep.lab_eval

    graded = []
    monkeypatch.setattr(qsweep.lab_eval, "lab_eval", lambda *a, **k: graded.append((a, k)) or
                        {"images": 500, "acc": 90.0, "size_mb": 20.0, "seconds": 1.0, "score": 1.0})
    assert qsweep.lab_eval.main(args) == 0
    (((artifact, data_root, *_), _),) = graded  # one call
    (name,) = folders  # the artifact lies in the run folder of the experiment the line names...
    assert (cwd / artifact).parent.resolve() == folders[name]
    assert Path(artifact).name == composed([f"+experiment={name}"]).export.filename  # ...under the name it writes
    assert data_root == "/path/cifar"


def test_the_readme_has_the_commands_this_test_runs_end_to_end():
    assert len(blocks("bash")) >= 5 and all(map(command_lines, blocks("bash")))  # the blocks are found, none empty
    assert set(E2E) <= set(COMMANDS)


@pytest.mark.parametrize("line", COMMANDS, ids=COMMANDS)
def test_a_readme_command_runs_as_written(line, tmp_path, mlflow_store, monkeypatch, capsys):
    pyproject = (ROOT / "pyproject.toml").read_text()
    optional = pyproject[pyproject.index("[project.optional-dependencies]"):].split("\n[", 1)[0]
    extras_defined = set(re.findall(r"^([\w-]+) = \[", optional, re.M))  # (tomllib: Python 3.11+)
    makefile = (ROOT / "Makefile").read_text()
    work = tmp_path / "clone"
    work.mkdir()
    folders = make_run_folders(line, work, monkeypatch)
    calls = as_bash_runs(line, work)
    assert calls, line
    for argv in calls:
        program, *args = argv
        if program == "make":
            for target in args:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no target {target!r} in the Makefile"
        elif program == "pip":
            assert args[:2] == ["install", "-e"] and len(args) == 3, argv
            extras = re.fullmatch(r"\.\[([\w,-]+)\]", args[2]).group(1).split(",")
            assert set(extras) <= extras_defined, extras
        elif program in ("python", ".venv/bin/python") and args[:2] == ["-m", "qsweep"]:
            with monkeypatch.context() as m:
                m.chdir(work)  # relative paths (--config-dir) as from the clone's root
                check_qsweep(args[2:], mlflow_store, tmp_path)
        elif program == "python" and args[:2] == ["-m", "qsweep.lab_eval"]:
            check_lab_eval(args[2:], folders, work, monkeypatch)
        else:
            pytest.fail(f"a README command this test does not know how to check: {argv}")


# --- end to end ----------------------------------------------------------------------------------------

def run_as_written(line: str, tmp_path: Path, store: str, monkeypatch, capsys):
    """``line`` run by ``python -m qsweep`` in-process, recording into the throwaway store."""
    (argv,) = as_bash_runs(line, tmp_path / "bash")
    assert argv[1:3] == ["-m", "qsweep"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return cli(tmp_path, monkeypatch, capsys, *argv[3:], common=())


def the_run(store: str):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id])
    return client, run


@pytest.mark.slow
def test_the_default_command_runs_prints_its_result_and_registers_the_best_model(tmp_path, mlflow_store, monkeypatch,
                                                                                capsys, digits_vit):
    outcome = run_as_written(DEFAULT_RUN, tmp_path, mlflow_store, monkeypatch, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    # the summary the README shows, row for row
    (shown,) = [b for b in blocks("") if b.startswith("qsweep result\n")]
    printed = outcome.out[outcome.out.index("qsweep result\n"):]
    labels = [re.match(r"  (.+?)(\s{2,}|\s\.\.\.)", row).group(1) for row in shown.splitlines()[1:]]
    assert "score (relative)" in labels and "runs table" in labels
    assert all(re.search(rf"^  {re.escape(label)}\s", printed, re.M) for label in labels), printed
    result = json.loads((outcome.run_dir / "result.json").read_text())
    assert outcome.run_dir.name.endswith("-default")
    assert re.search(rf"^  result\s+{re.escape(str(outcome.run_dir / 'result.json'))}$", printed, re.M), printed
    assert result["fp_top1"] >= 95.0
    assert result["top1"] >= result["fp_top1"] - 3.0  # W4A8 within 3 points
    assert result["artifact_top1"] == result["top1"] and Path(result["artifact"]).exists()
    # the tiny model carries float embeddings, norms and per-channel scales: ~4.5x, not 8x
    assert result["compression"] > 4.0 and 3.9 < result["avg_weight_bits"] < 4.1

    client, run = the_run(mlflow_store)
    assert run.info.status == "FINISHED" and result["mlflow_run_id"] == run.info.run_id
    assert run.data.params["quant.weight.bits"] == "4" and run.data.params["model.name"] == "digits_vit"
    for key in ("top1", "top5", "fp_top1", "delta_top1", "size_mb", "fp32_size_mb", "compression",
                "avg_weight_bits", "score", "calibration_s", "quantization_s", "eval_s", "peak_rss_mb"):
        assert key in run.data.metrics, key
    assert run.data.metrics["size_mb"] == pytest.approx(result["size_mb"])
    assert {"model", "data", "experiment", "git_commit", "weights", "qsweep_version"} <= set(run.data.tags)
    assert run.data.tags["weights"] == "embedded"
    assert {"config.yaml", "layers.csv", "result.json", "model"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # the README's model-registry example, as written, beside the store (its relative sqlite:///mlflow.db)
    (registry,) = [b for b in blocks("python") if "register_model" in b]
    assert mlflow_store == f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-c", registry], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (version,) = client.search_model_versions("name='qsweep-best'")
    assert version.source == f"models:/{result['mlflow_model_id']}"  # the run's logged model


@pytest.mark.slow
def test_the_clipping_example_runs_and_warns_once(tmp_path, mlflow_store, monkeypatch, capsys, digits_vit):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")  # (torch.export's many warnings, recorded one by one, cost ~20 s)
        warnings.simplefilter("always", ClippingWarning)  # each one emitted counts, none merged by location
        outcome = run_as_written(CLIPPING_RUN, tmp_path, mlflow_store, monkeypatch, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    (clipping,) = [w for w in caught if issubclass(w.category, ClippingWarning)]  # one for the run, not one per layer
    assert re.match(r"quant\.act\.observer=percentile clips values that matter in \d+ of \d+ quantized inputs: "
                    r"more than 2x the output error of min-max in '[\w.]+' [\d.]+x, ", str(clipping.message))
    _, run = the_run(mlflow_store)
    assert run.info.status == "FINISHED" and run.data.params["quant.act.observer"] == "percentile"
    assert run.data.params["quant.act.p"] == "99.9"
    # the W2 artifact loads alone, takes any batch size and scores what the run did
    result = json.loads((outcome.run_dir / "result.json").read_text())
    assert result["artifact_top1"] == result["top1"]
    assert load_program(result["artifact"])(torch.randn(3, 1, 16, 16)).shape == (3, 10)


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    (example,) = [b for b in blocks("python") if "qsweep.quantize(" in b]
    monkeypatch.chdir(tmp_path)  # it writes model.pt2 into the current folder
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(128, 128), act=torch.nn.GELU(),
                                            head=torch.nn.Linear(128, 10))).eval()
    scope = {"model": model, "calib_batches": [torch.randn(8, 128) for _ in range(2)],
             "example_batch": torch.randn(2, 128)}
    exec(compile(textwrap.dedent(example), "README.md", "exec"), scope)
    assert (tmp_path / "model.pt2").is_file() and scope["qmodel"].head.__class__ is torch.nn.Linear
