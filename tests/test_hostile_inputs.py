"""Files and config values from someone else, through the CLI: one clear error line, nothing written astray.

Each case is built on the fly in ``tmp_path``. ``python -m qsweep`` runs in-process (``runpy``, as the
command line does), in a working folder inside ``tmp_path``; a refused input must end with exit status 1,
exactly one ``qsweep: error:`` line naming the file or key, no traceback, and no file written outside
the run's own folder. A legal input of each kind still runs.
"""

from __future__ import annotations

import json
import logging
import pickle
import runpy
import signal
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from fake_cifar import write_fake_cifar
from qsweep.evaluate import fp_cache_path
from qsweep.names import CONF_DIR
from test_imagefolder import make_folder

COMMON = ("tracking.enabled=false", "progress=false")


@dataclass
class Outcome:
    code: int
    err: str
    run_dir: Path
    written: list[Path]  # new paths under tmp_path outside the run folder (and outside `cache`)
    out: str = ""  # what it printed on stdout


def _paths(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if skip not in p.parents and p != skip}


def cli(tmp_path: Path, monkeypatch, capsys, *overrides: str, common: tuple[str, ...] = COMMON) -> Outcome:
    """``python -m qsweep COMMON OVERRIDES`` in-process from ``tmp_path/work``; what it printed and wrote."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["qsweep", *common, *overrides])
    monkeypatch.delitem(sys.modules, "qsweep.__main__", raising=False)  # imported by other tests: run it afresh
    before = _paths(tmp_path, cache)
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_module("qsweep", run_name="__main__", alter_sys=True)
    finally:  # Hydra configured logging, the SIGTERM handler and its global state for this run only
        root.handlers[:], root.level = handlers, level
        signal.signal(signal.SIGTERM, sigterm)
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    (run_dir,) = {p for p in (work / "outputs").glob("*/*")} - before
    allowed = {work / "outputs", run_dir.parent, run_dir}
    written = sorted(p for p in _paths(tmp_path, cache) - before if p not in allowed and run_dir not in p.parents)
    return Outcome(exited.value.code, err, run_dir, written, out)


def refused(outcome: Outcome, *names: str) -> str:
    """The single error line, after checking the exit status, that it names ``names`` and nothing leaked."""
    errors = [line for line in outcome.err.splitlines() if line.startswith("qsweep: error:")]
    assert outcome.code == 1 and len(errors) == 1, outcome.err[-3000:]
    assert all(name in errors[0] for name in names), errors[0]
    assert outcome.written == [], outcome.written
    assert (outcome.run_dir / "error.txt").is_file() and not (outcome.run_dir / "result.json").exists()
    return errors[0]


# --- Hugging Face folders ---------------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    """A tiny ViT for digits, saved as save_pretrained does, to damage."""
    pytest.importorskip("transformers")
    from hf_tiny import tiny_vit

    path = tmp_path / "in" / "tiny_vit"
    tiny_vit().save_pretrained(path)
    return path


def _tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def _header_edit(path: Path, edit) -> None:
    raw = (path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _shift_first_tensor(header: dict) -> None:
    entry = next(v for k, v in sorted(header.items()) if k != "__metadata__")
    entry["data_offsets"] = [n + 4 for n in entry["data_offsets"]]


def _pickle_index(path: Path) -> None:
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    index = {"weight_map": {"classifier.bias": "pytorch_model.bin"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _config_edit(path: Path, change) -> None:
    doc = json.loads((path / "config.json").read_text())
    change(doc)
    (path / "config.json").write_text(json.dumps(doc))


HF_CASES = {  # case -> (damage, file named, what the error line says)
    "missing": (lambda p: _tensors(p, lambda s: s.pop("classifier.bias")), "model.safetensors", "'classifier.bias'"),
    "unexpected": (lambda p: _tensors(p, lambda s: s.update(extra=torch.zeros(3))), "model.safetensors", "'extra'"),
    "wrong-shape": (lambda p: _tensors(p, lambda s: s.update({"classifier.weight": torch.zeros(10, 16)})),
                    "model.safetensors", "classifier.weight: file (10, 16) vs model (10, 32)"),
    "truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
                  "model.safetensors", "cut short"),
    "empty": (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors", "0 bytes"),
    "header-length-lies": (lambda p: (p / "model.safetensors").write_bytes(
        struct.pack("<Q", 10**12) + (p / "model.safetensors").read_bytes()[8:]), "model.safetensors", "header"),
    "offsets-lie": (lambda p: _header_edit(p, _shift_first_tensor), "model.safetensors", "header lies"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{model_type: vit"), "config.json", "not valid JSON"),
    "remote-code-only": (lambda p: _config_edit(p, lambda d: d.update(
        model_type="evil_net", auto_map={"AutoConfig": "evil.EvilConfig"})), "config.json", "model_type='evil_net'"),
    "index-to-pickle": (_pickle_index, "model.safetensors.index.json", "'pytorch_model.bin'"),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_damaged_hugging_face_folder(tmp_path, monkeypatch, capsys, hf_dir, case):
    damage, file, says = HF_CASES[case]
    damage(hf_dir)
    line = refused(cli(tmp_path, monkeypatch, capsys, "model.source=hf", f"model.path={hf_dir}"), says)
    assert str(hf_dir / file) in line


def test_strict_false_loads_a_partial_checkpoint_and_records_it(tmp_path, monkeypatch, capsys, hf_dir):
    _tensors(hf_dir, lambda s: s.pop("classifier.bias"))
    done = cli(tmp_path, monkeypatch, capsys, "model.source=hf", f"model.path={hf_dir}", "model.strict=false",
               "export.enabled=false")
    assert done.code == 0 and done.written == [], done.err[-3000:]
    result = json.loads((done.run_dir / "result.json").read_text())
    assert result["weights"] == "hf:tiny_vit (model.strict=false: 1 missing, 0 unexpected tensors)"
    assert "strict: false" in (done.run_dir / "config.yaml").read_text()
    assert "'classifier.bias'" in (done.run_dir / "__main__.log").read_text()


def test_a_legal_hugging_face_folder_runs_and_writes_only_its_run_folder(tmp_path, monkeypatch, capsys, hf_dir):
    done = cli(tmp_path, monkeypatch, capsys, "model.source=hf", f"model.path={hf_dir}")
    assert done.code == 0 and done.written == [], done.err[-3000:]
    result = json.loads((done.run_dir / "result.json").read_text())
    assert result["weights"] == "hf:tiny_vit" and Path(result["artifact"]).parent == done.run_dir


# --- image folders ----------------------------------------------------------------------------------

def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds none (a few dozen bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def _self_link(root: Path) -> Path:
    link = root / "val" / "cat" / "cat_0.png"
    link.unlink()
    link.symlink_to(link)
    return link


def _folder_loop(root: Path) -> Path:
    link = root / "val" / "dog" / "up"
    link.symlink_to(root / "val", target_is_directory=True)
    return link


IMAGE_CASES = {  # case -> (damage returning the path named, what the error line says)
    "decompression-bomb": (lambda root: _png_header(root / "val" / "cat" / "cat_0.png", 30000, 30000), "pixels"),
    "file-linked-to-itself": (_self_link, "symlink"),
    "folder-loop": (_folder_loop, "already read"),
}


def _image_run(tmp_path, monkeypatch, capsys, root: Path, *overrides: str) -> Outcome:
    # The embedded ViT's architecture with random weights: a tiny model for any image size.
    return cli(tmp_path, monkeypatch, capsys, "data=imagefolder", f"data.root={root}", "data.image_size=16",
               "model.weights=random", "quant.calib.num_images=12", *overrides)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_hostile_image_folder(tmp_path, monkeypatch, capsys, case):
    damage, says = IMAGE_CASES[case]
    root = make_folder(tmp_path / "in" / "imgs")
    named = damage(root)
    refused(_image_run(tmp_path, monkeypatch, capsys, root), str(named), says)


def test_long_folder_name_and_a_nan_cache_entry(tmp_path, monkeypatch, capsys):
    """A data folder whose path is longer than a file name runs; a NaN cached FP32 accuracy is measured again."""
    root = make_folder(tmp_path / "in" / ("d" * 200) / ("e" * 200))
    first = _image_run(tmp_path, monkeypatch, capsys, root, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false")
    assert first.code == 0 and first.written == [], first.err[-3000:]
    measured = json.loads((first.run_dir / "result.json").read_text())
    assert measured["eval_images"] == 6  # the 6 files of val/, each once
    (entry,) = (tmp_path / "cache" / "fp_eval").iterdir()
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "top1": float("nan")}))
    again = _image_run(tmp_path, monkeypatch, capsys, root, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false")
    assert again.code == 0, again.err[-3000:]
    assert json.loads((again.run_dir / "result.json").read_text())["fp_top1"] == measured["fp_top1"]
    assert f"ignoring the cached FP32 accuracy {entry}" in (again.run_dir / "__main__.log").read_text()
    assert json.loads(entry.read_text())["top1"] == measured["fp_top1"]


# --- CIFAR-100 pickles ------------------------------------------------------------------------------

def test_cifar_meta_of_shared_references_is_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / "in" / "cifar"
    write_fake_cifar(root)
    nested: list = []
    for _ in range(30):  # 2**30 leaves once expanded, a few hundred bytes pickled
        nested = [nested, nested]
    meta = root / "cifar-100-python" / "meta"
    meta.write_bytes(pickle.dumps({b"fine_label_names": nested}, protocol=2))
    assert meta.stat().st_size < 400
    refused(cli(tmp_path, monkeypatch, capsys, "data=cifar100", f"data.root={root}"), str(meta), "objects")


# --- config values that become paths ---------------------------------------------------------------

@pytest.mark.parametrize("override, says", [
    ("name=../../../../escaped", "name='../../../../escaped' is not allowed"),
    ("name=a/b", "path separator"),
    ("export.filename=error.txt", "export.filename='error.txt' is not allowed; the run writes its own error.txt"),
    ("export.filename=result.json", "export.filename='result.json' is not allowed"),
    ("export.filename=../quantized.pt2", "export.filename='../quantized.pt2' is not allowed"),
    ("search.study_name=../study", "search.study_name='../study' is not allowed"),
    (f"search.best_dir={CONF_DIR}", "search.best_dir="),
    ("quant.calib.num_images=1000000000000", "must be in [1, 10000000]"),
])
def test_config_value_that_would_write_astray(tmp_path, monkeypatch, capsys, override, says):
    outcome = cli(tmp_path, monkeypatch, capsys, override)
    refused(outcome, says)
    assert outcome.run_dir.parent.parent == tmp_path / "work" / "outputs"


# --- cache entries ----------------------------------------------------------------------------------

def test_a_sensitivity_cache_entry_holding_nan_is_measured_again(tmp_path, caplog):
    from qsweep.analysis.sensitivity import SCHEMA, load_sensitivity

    row = {"name": "head", "params": 10, "w_bits": 4, "a_bits": 8, "top1": 90.0, "drop": 1.0,
           "output_sqnr_db": float("inf"), "weight_sqnr_db": 20.0}
    path = tmp_path / "entry.json"
    path.write_text(json.dumps({"schema": SCHEMA, "key": "k", "rows": [row]}))
    assert load_sensitivity(path, "k")["rows"] == [row]  # an infinite SQNR (identical logits) is a measurement
    for bad in ({"top1": float("nan")}, {"top1": 120.0}, {"weight_sqnr_db": None}):
        path.write_text(json.dumps({"schema": SCHEMA, "key": "k", "rows": [{**row, **bad}]}))
        assert load_sensitivity(path, "k") is None
    assert load_sensitivity(path.with_name("other.json"), "k") is None
    path.write_text(json.dumps({"schema": SCHEMA, "key": "other", "rows": [row]}))
    assert load_sensitivity(path, "k") is None
    assert caplog.text.count(f"ignoring the cached sensitivity {path}") == 4
