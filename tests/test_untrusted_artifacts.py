"""Crafted ``.pt2`` files that run code when torch.export.load reads them are refused unless trusted."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from qsweep.export import UntrustedArtifactError, _pickle_offense, export_program, inspect_artifact, load_program
from qsweep.lab_eval import main

REPO = Path(__file__).resolve().parents[1]


class Touch:
    """Unpickling it creates ``marker`` (a stand-in for any payload)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _payload(marker: Path) -> str:
    """Python source that creates ``marker`` when evaluated."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real artifact written by qsweep (dynamic batch, so it has shape expressions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    return export_program(model, torch.zeros(1, 3, 4, 4), tmp_path_factory.mktemp("art") / "model.pt2")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy archive ``src`` to ``dst``, ``edit`` changing its ``{member: bytes}`` (names below the root folder)."""
    with zipfile.ZipFile(src) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        members = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(f"{root}/{name}", data)
    return dst


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_json(members: dict, name: str, change) -> None:
    doc = json.loads(members[name])
    change(doc)
    members[name] = json.dumps(doc).encode()


def _pickled_weight(marker):
    def edit(m):
        def change(cfg):
            entry = next(iter(cfg["config"].values()))
            entry.update(path_name="weight_evil", use_pickle=True)
        _edit_json(m, "data/weights/model_weights_config.json", change)
        m["data/weights/weight_evil"] = _torch_save(Touch(marker))
    return edit, "the global io.open"


def _sample_inputs(marker):
    def edit(m):
        m["data/sample_inputs/model.pt"] = _torch_save(((Touch(marker),), {}))
    return edit, "the global io.open"


def _opaque_constant(marker):
    def edit(m):
        def change(cfg):
            cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
        _edit_json(m, "data/constants/model_constants_config.json", change)
        m["data/constants/opaque_obj_0"] = pickle.dumps(Touch(marker), protocol=4)  # STACK_GLOBAL
    return edit, "the global io.open"


def _walk(doc, visit):
    if isinstance(doc, dict):
        visit(doc)
        for v in doc.values():
            _walk(v, visit)
    elif isinstance(doc, list):
        for v in doc:
            _walk(v, visit)


def _shape_expression(marker):
    def edit(m):
        def change(doc):
            _walk(doc, lambda d: d.update(expr_str=_payload(marker)) if "expr_str" in d else None)
        _edit_json(m, "models/model.json", change)
    return edit, "expr_str"


def _guard(marker):
    def edit(m):
        _edit_json(m, "models/model.json", lambda doc: doc.update(guards_code=[f"{_payload(marker)} is None"]))
    return edit, "guard"


def _input_name(marker):
    """The graph input's name becomes a default argument in the source FX compiles."""
    evil = f"x={_payload(marker)}"

    def edit(m):
        def change(doc):
            graph = doc["graph_module"]["graph"]
            old = graph["inputs"][-1]["as_tensor"]["name"]

            def rename(d):
                if d.get("as_tensor", {}).get("name") == old:
                    d["as_tensor"] = {"name": evil}
                if old in d.get("tensor_values", {}):
                    d["tensor_values"][evil] = d["tensor_values"].pop(old)
            _walk(doc, rename)
        _edit_json(m, "models/model.json", change)
    return edit, "not a Python identifier"


PAYLOADS = [_pickled_weight, _sample_inputs, _opaque_constant, _shape_expression, _guard, _input_name]


@pytest.mark.parametrize("craft", PAYLOADS, ids=lambda f: f.__name__.strip("_"))
def test_crafted_artifact_is_refused_and_its_payload_is_real(artifact, tmp_path, craft, capsys):
    marker = tmp_path / "payload_ran"
    edit, offense = craft(marker)
    evil = _rewrite(artifact, tmp_path / "evil.pt2", edit)

    assert main([str(evil), "--data-root", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"refusing to load {evil}" in err and offense in err and "--trust-artifact" in err
    with pytest.raises(UntrustedArtifactError, match="refusing to load"):
        load_program(evil)
    assert not marker.exists()

    # Trusted, torch.export.load reads it and the payload runs: the refusal above was the only guard.
    try:
        load_program(evil, trust=True)(torch.zeros(2, 3, 4, 4))
    except Exception:  # noqa: BLE001 - the crafted program need not work after its payload ran
        pass
    assert marker.exists()


def test_cli_refuses_with_exit_2_and_trust_flag_skips_the_check(artifact, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = _rewrite(artifact, tmp_path / "evil.pt2", _pickled_weight(marker)[0])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "qsweep.lab_eval", str(evil), "--data-root", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 2
    assert "data/weights/weight_evil" in out.stderr and "io.open" in out.stderr
    assert not marker.exists()
    out = subprocess.run(cmd + ["--trust-artifact"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert "refusing" not in out.stderr and marker.exists()


@pytest.mark.parametrize("edit, offense", [
    (lambda m: m.__setitem__("data/aotinductor/model/x.so", b"\x7fELF"), "AOTInductor"),
    (lambda m: m.__setitem__("data/sample_inputs/model.pt", pickle.dumps(((), {}))), "legacy torch.save stream"),
    (lambda m: _edit_json(m, "models/model.json", lambda d: _walk(d, lambda n: n.update(
        target="torch.ops.load_library") if "target" in n and "inputs" in n else None)), "not an operator"),
    (lambda m: _edit_json(m, "models/model.json", lambda d: _walk(d, lambda n: n.update(
        in_spec=json.dumps([1, {"type": "collections.defaultdict", "context": json.dumps(
            {"default_factory_module": "os", "default_factory_name": "system", "dict_context": []}),
            "children_spec": []}])) if "in_spec" in n else None)), "collections.defaultdict"),
], ids=["aoti", "legacy-pickle", "target", "pytree-import"])
def test_other_code_carriers_are_refused(artifact, tmp_path, edit, offense):
    evil = _rewrite(artifact, tmp_path / "evil.pt2", edit)
    with pytest.raises(UntrustedArtifactError, match=offense):
        inspect_artifact(evil)


def test_legacy_archive_format_is_refused(artifact, tmp_path):
    evil = _rewrite(artifact, tmp_path / "evil.pt2", lambda m: None)
    with zipfile.ZipFile(evil, "a") as zf:
        zf.writestr("version", "1.0.0")
    with pytest.raises(UntrustedArtifactError, match=r"member version marks the legacy"):
        inspect_artifact(evil)


def test_pickle_scan():
    tensors = {"w": nn.Parameter(torch.randn(2)), "codes": torch.zeros(3, dtype=torch.uint8),
               "bf": torch.zeros(1, dtype=torch.bfloat16), "u16": torch.zeros(1, dtype=torch.uint16)}
    with zipfile.ZipFile(io.BytesIO(_torch_save(tensors))) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert _pickle_offense(data) is None
    for protocol in (0, 2, 4):
        assert _pickle_offense(pickle.dumps(Touch(Path("x")), protocol=protocol)) == "the global io.open"
    # STACK_GLOBAL fed from the memo, not from literal strings: refused without resolving it.
    memo_fed = b"\x80\x04\x8c\x08builtins\x94\x8c\x04open\x9400h\x00h\x01\x93."
    assert "computed" in _pickle_offense(memo_fed)
    assert "malformed" in _pickle_offense(b"\x80\x02c")


def test_plain_exports_with_guards_pass(tmp_path):
    """What torch.export.save writes for derived dynamic dims (guards, shape expressions) is accepted."""

    class Pairs(nn.Module):
        def forward(self, x, y):
            return x.reshape(x.shape[0] // 2, 2, -1).sum(1) + y[: x.shape[0] // 2]

    half = Dim("half", min=2, max=32)
    ep = torch.export.export(Pairs(), (torch.randn(8, 4), torch.randn(8, 4)),
                             dynamic_shapes=({0: 2 * half}, {0: Dim("n")}))
    assert ep._guards_code, "the case must carry guards"
    path = tmp_path / "pairs.pt2"
    torch.export.save(ep, str(path))
    inspect_artifact(path)
    assert load_program(path)(torch.ones(6, 4), torch.ones(6, 4)).shape == (3, 4)
