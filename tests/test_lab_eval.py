"""qsweep.lab_eval: the grader's procedure on a fabricated CIFAR-100 and small exported models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qsweep.data.cifar100 import IMAGENET_MEAN, IMAGENET_STD
from qsweep.export import export_program, load_program, state_dict_size_mb
from qsweep.lab_eval import ArtifactError, lab_eval, main
from qsweep.score import lab4

from fake_cifar import expected_mini, write_fake_cifar

REPO = Path(__file__).resolve().parents[1]


class CodeReader(nn.Module):
    """Predicts the class code stored in pixel R[0, 0] (undoing the ImageNet normalization)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("classes", torch.arange(100, dtype=torch.float32))
        self.proj = nn.Linear(4, 4)  # some real weights, so the state dict is not trivial

    def forward(self, x):
        v = (x[:, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0
        return -((v[:, None] - self.classes[None, :]) ** 2) + 0.0 * self.proj(x[:, 0, 0, :4]).sum()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    raw = write_fake_cifar(tmp / "data")
    test_x, test_y = raw["test_x"], raw["test_y"]
    torch.manual_seed(0)
    artifact = export_program(CodeReader().eval(), torch.zeros(1, 3, 32, 32), tmp / "reader.pt2")
    return tmp, tmp / "data", artifact, test_x, test_y


def _own_mini(test_x, test_y, per_class=5):
    """The mini set from the raw arrays, without qsweep's loader: normalized tensors + labels."""
    idx = expected_mini(test_y, per_class)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    x = (torch.from_numpy(test_x[idx]).float() / 255 - mean) / std
    return x, torch.from_numpy(test_y[idx])


def test_lab_eval_matches_own_evaluation(setup):
    tmp, data, artifact, test_x, test_y = setup
    r = lab_eval(artifact, data, image_size=32, progress=False)
    assert set(r) == {"size_mb", "acc", "seconds", "images", "score"}
    module = load_program(artifact)
    assert r["images"] == 500
    assert r["size_mb"] == state_dict_size_mb(module)
    x, y = _own_mini(test_x, test_y)
    with torch.no_grad():
        own = 100.0 * float((module(x).argmax(1) == y).float().mean())
    assert r["acc"] == pytest.approx(own) and r["acc"] == pytest.approx(80.0)
    assert r["score"] == lab4(r["size_mb"], r["acc"]) and r["seconds"] > 0
    limited = lab_eval(artifact, data, image_size=32, limit=50, progress=False)
    assert limited["images"] == 50 and limited["acc"] == pytest.approx(80.0)
    seven = lab_eval(artifact, data, per_class=7, image_size=32, progress=False)
    assert seven["images"] == 700 and seven["acc"] == pytest.approx(600 / 7)


def test_plain_torch_export_artifact_works(setup):
    tmp, data, _, test_x, test_y = setup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100)).eval()
    path = tmp / "plain.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), str(path))
    r = lab_eval(path, data, image_size=32, progress=False)
    assert r["images"] == 500
    module = load_program(path)
    assert r["size_mb"] == state_dict_size_mb(module)
    x, y = _own_mini(test_x, test_y)
    with torch.no_grad():
        preds = torch.cat([module(x[i : i + 1]) for i in range(len(x))]).argmax(1)  # batch 1, as exported
    assert r["acc"] == pytest.approx(100.0 * float((preds == y).float().mean()))


def test_bad_artifacts_are_clear_errors(setup, tmp_path):
    _, data, _, _, _ = setup
    with pytest.raises(ArtifactError, match=r"artifact .*missing\.pt2 does not exist"):
        lab_eval(tmp_path / "missing.pt2", data, image_size=32)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"definitely not a zip")
    with pytest.raises(ArtifactError, match=r"garbage\.pt2 is not a torch\.export program"):
        lab_eval(garbage, data, image_size=32)
    checkpoint = tmp_path / "weights.pth"
    torch.save(nn.Linear(2, 2).state_dict(), checkpoint)
    with pytest.raises(ArtifactError, match=r"weights\.pth is not a torch\.export program"):
        lab_eval(checkpoint, data, image_size=32)


def test_cli_table_json_and_errors(setup, capsys):
    tmp, data, artifact, _, _ = setup
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "qsweep.lab_eval", str(artifact), "--data-root", str(data), "--image-size", "32"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    for word in ("model size", "MB", "accuracy", "80.00 %", "execution time", "lab score", "images", "500"):
        assert word in out.stdout
    # In-process for the rest (faster): --json, and the error path.
    assert main([str(artifact), "--data-root", str(data), "--image-size", "32", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 500 and result["acc"] == pytest.approx(80.0)
    assert {"size_mb", "seconds", "score"} <= set(result)
    assert main([str(tmp / "nope.pt2"), "--data-root", str(data)]) == 2
    assert "nope.pt2 does not exist" in capsys.readouterr().err
    assert main([str(artifact), "--data-root", str(tmp / "empty"), "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "--data-root=" in err and "cifar-100-python/{train,test,meta}" in err


def test_an_artifact_exported_for_another_input_shape_is_a_clear_error(setup, capsys):
    _, data, artifact, _, _ = setup  # exported for 32x32 inputs
    assert main([str(artifact), "--data-root", str(data), "--image-size", "24", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not accept the data's input of shape (1, 3, 24, 24)" in err and "--image-size" in err
