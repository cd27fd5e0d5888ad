"""The FP32 accuracy cache ($QSWEEP_CACHE/fp_eval/*.json): entries checked when read, writes never collide."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qsweep.evaluate import FP_CACHE_SCHEMA, cached_fp_eval, fp_cache_path

KEY = "model-data-none"


@pytest.fixture(scope="module")
def job():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).eval()
    x = torch.randn(12, 4)
    loader = DataLoader(TensorDataset(x, model(x).argmax(1).detach()), batch_size=4)
    return model, loader


def _entry(**values) -> bytes:
    return json.dumps({"schema": FP_CACHE_SCHEMA, "key": KEY, "top1": 50.0, "top5": 90.0, "images": 12,
                       "seconds": 0.1, **values}).encode()


@pytest.mark.parametrize("content", [
    b"", b"{\"top1\": 10", b"[1, 2]", b"{\"top1\": 1}", b"\xff\xfe", _entry(top1="x"), _entry(top1=float("nan")),
    _entry(top5=float("inf")), _entry(top1=101.0), _entry(images=0), _entry(schema=1), _entry(key="other-model"),
], ids=["empty", "truncated", "list", "missing-fields", "binary", "wrong-type", "nan", "inf", "out-of-range",
        "no-images", "old-schema", "other-key"])
def test_untrustworthy_entry_is_recomputed_with_a_warning(job, tmp_path, content, caplog):
    model, loader = job
    entry = fp_cache_path(tmp_path, KEY)
    entry.parent.mkdir()
    entry.write_bytes(content)
    result, cached = cached_fp_eval(model, loader, 3, tmp_path, KEY)
    assert not cached and result.top1 == 100.0 and result.images == 12
    assert str(entry) in caplog.text and "measuring it again" in caplog.text
    assert json.loads(entry.read_text())["top1"] == 100.0
    again, cached = cached_fp_eval(model, loader, 3, tmp_path, KEY)
    assert cached and again == result


def test_a_key_embedding_a_long_path_is_a_short_file_name(job, tmp_path):
    """Keys embed the data set's path; the entry's file name is a hash of the key, never the key."""
    model, loader = job
    key = f"model-imagefolder:root=/{'a' * 300}/{'b' * 300}-none"
    result, cached = cached_fp_eval(model, loader, 3, tmp_path, key)
    assert not cached and cached_fp_eval(model, loader, 3, tmp_path, key) == (result, True)
    (entry,) = (tmp_path / "fp_eval").iterdir()
    assert entry == fp_cache_path(tmp_path, key) and len(entry.name) < 64


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
    assert list(folder.iterdir()) == [fp_cache_path(tmp_path, KEY)]  # no temp file left behind
    assert cached_fp_eval(model, loader, 3, tmp_path, KEY) == (result, True)
