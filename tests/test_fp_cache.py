"""The FP32 accuracy cache ($QSWEEP_CACHE/fp_eval/*.json): unreadable entries are misses, writes never collide."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qsweep.evaluate import cached_fp_eval

KEY = "model-data-none"


@pytest.fixture(scope="module")
def job():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).eval()
    x = torch.randn(12, 4)
    loader = DataLoader(TensorDataset(x, model(x).argmax(1).detach()), batch_size=4)
    return model, loader


@pytest.mark.parametrize("content", [b"", b"{\"top1\": 10", b"[1, 2]", b"{\"top1\": 1}", b"\xff\xfe",
                                     json.dumps({"top1": "x", "top5": 1, "images": 1, "seconds": 1}).encode()],
                         ids=["empty", "truncated", "list", "missing-fields", "binary", "wrong-type"])
def test_unreadable_entry_is_a_miss_and_is_rewritten(job, tmp_path, content):
    model, loader = job
    entry = tmp_path / "fp_eval" / f"{KEY}.json"
    entry.parent.mkdir()
    entry.write_bytes(content)
    result, cached = cached_fp_eval(model, loader, 3, tmp_path, KEY)
    assert not cached and result.top1 == 100.0 and result.images == 12
    assert json.loads(entry.read_text())["top1"] == 100.0
    again, cached = cached_fp_eval(model, loader, 3, tmp_path, KEY)
    assert cached and again == result


def test_concurrent_writers_use_their_own_temp_files(job, tmp_path, monkeypatch):
    """A second writer finishing while the first is about to rename its temp file breaks neither."""
    model, loader = job
    real_replace, temps = os.replace, []

    def racing_replace(src, dst):
        temps.append(os.fspath(src))
        if len(temps) == 1:  # another process writes the same entry right now
            cached_fp_eval(model, loader, 3, tmp_path, KEY)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    result, cached = cached_fp_eval(model, loader, 3, tmp_path, KEY)
    assert not cached and len(temps) == 2 and temps[0] != temps[1]
    folder = tmp_path / "fp_eval"
    assert all(os.path.dirname(t) == str(folder) for t in temps)  # same directory: the rename is atomic
    assert [p.name for p in folder.iterdir()] == [f"{KEY}.json"]  # no temp file left behind
    assert cached_fp_eval(model, loader, 3, tmp_path, KEY) == (result, True)
