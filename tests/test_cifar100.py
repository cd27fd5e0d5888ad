"""qsweep.data.cifar100 on a fabricated CIFAR-100 written in the real on-disk format."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from qsweep.config import CalibConfig, Cifar100DataConfig, ConfigError
from qsweep.data import REGISTRY, build_data, calibration_batches, calibration_indices, eval_loader
from qsweep.data.cifar100 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataFileError,
    build_cifar100,
    cifar100_test_set,
    load_split,
    mini_test_indices,
    read_cifar_pickle,
)
from qsweep.errors import QsweepError

from fake_cifar import expected_mini, write_fake_cifar

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    raw = write_fake_cifar(root)
    return SimpleNamespace(root=root, **raw)


def _cfg(root, **kw) -> Cifar100DataConfig:
    base = dict(name="cifar100", root=None if root is None else str(root), download=False, test_set="mini", per_class=5, image_size=32)
    base.update(kw)
    return Cifar100DataConfig(**base)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo ToTensor + Normalize (exact at image_size 32: the resize is the identity)."""
    return np.rint((x.numpy() * STD + MEAN) * 255).astype(np.int64)


def test_registered_and_builds_from_dataconfig(fake):
    assert REGISTRY["cifar100"] is build_cifar100
    b = build_data(Cifar100DataConfig(root=str(fake.root)))  # the lab's defaults
    assert b.name == "cifar100" and b.num_classes == 100 and b.input_shape == (3, 224, 224)
    assert len(b.test) == 500 and len(b.train) == 300
    x, y = b.test[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    assert b.train_labels.dtype == torch.int64 and torch.equal(b.train_labels, torch.from_numpy(fake.train_y))
    # A DictConfig with the new fields works too.
    b2 = build_data(OmegaConf.create(dict(vars(_cfg(fake.root)))))
    assert b2.input_shape == (3, 32, 32)


def test_pixels_decode_exactly(fake):
    test = build_cifar100(_cfg(fake.root, test_set="full")).test
    for i in (0, 1, 123, 699):
        x, y = test[i]
        assert y == fake.test_y[i]
        assert np.array_equal(_to_uint8(x), fake.test_x[i])  # planes R, G, B, each row-major


def test_bicubic_resize_matches_hand_computed(fake):
    test = build_cifar100(_cfg(fake.root, test_set="full", image_size=64)).test
    x, _ = test[5]
    hwc = np.ascontiguousarray(fake.test_x[5].transpose(1, 2, 0))
    resized = np.asarray(Image.fromarray(hwc).resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (resized.transpose(2, 0, 1) - MEAN) / STD
    assert x.shape == (3, 64, 64)
    assert np.allclose(x.numpy(), expected, atol=1e-5)


def test_mini_is_first_five_of_each_class_grouped(fake):
    b = build_cifar100(_cfg(fake.root))
    assert len(b.test) == 500
    want = expected_mini(fake.test_y, 5)
    assert want != sorted(want)  # the fabricated split is shuffled, so grouping matters
    assert b.test.indices.tolist() == want
    labels = [b.test[j][1] for j in range(len(b.test))]
    assert labels == np.repeat(np.arange(100), 5).tolist()
    for j in (0, 4, 5, 250, 499):
        assert np.array_equal(_to_uint8(b.test[j][0]), fake.test_x[want[j]])
    assert mini_test_indices(fake.test_y, 5).tolist() == want


def test_full_and_per_class(fake):
    full = build_cifar100(_cfg(fake.root, test_set="full"))
    assert len(full.test) == 700 and full.test.labels.tolist() == fake.test_y.tolist()
    seven = build_cifar100(_cfg(fake.root, per_class=7))
    assert len(seven.test) == 700 and seven.test.indices.tolist() == expected_mini(fake.test_y, 7)
    with pytest.raises(ConfigError, match=r"data\.per_class=8 .*only 7 test images"):
        build_cifar100(_cfg(fake.root, per_class=8))
    with pytest.raises(ConfigError, match=r"data\.test_set='val'.*mini"):
        build_cifar100(_cfg(fake.root, test_set="val"))
    with pytest.raises(ConfigError, match=r"data\.image_size=0"):
        build_cifar100(_cfg(fake.root, image_size=0))
    only_test = cifar100_test_set(fake.root, per_class=5, image_size=32)
    assert only_test.indices.tolist() == expected_mini(fake.test_y, 5)


def test_calibration_from_train_only_and_class_balanced(fake):
    b = build_cifar100(_cfg(fake.root))
    calib = CalibConfig(num_images=200, batch_size=64, class_balanced=True, seed=0)
    batches = calibration_batches(b, calib)
    assert [t.shape[0] for t in batches] == [64, 64, 64, 8]
    images = torch.cat(batches)
    train_bytes = {fake.train_x[i].tobytes(): int(fake.train_y[i]) for i in range(len(fake.train_y))}
    test_bytes = {fake.test_x[i].tobytes() for i in range(len(fake.test_y))}
    labels = []
    for x in images:
        raw = _to_uint8(x).astype(np.uint8).tobytes()
        assert raw in train_bytes and raw not in test_bytes
        labels.append(train_bytes[raw])
    assert np.bincount(labels, minlength=100).tolist() == [2] * 100
    idx = calibration_indices(b.train_labels, 200, True, 0)
    assert torch.equal(images[0], b.train[int(idx[0])][0])


def test_eval_loader_and_fingerprint(fake):
    cfg = _cfg(fake.root, eval_batch_size=64, max_eval_images=100)
    b = build_cifar100(cfg)
    batches = list(eval_loader(b, cfg))
    assert [x.shape[0] for x, _ in batches] == [64, 36]
    assert torch.cat([y for _, y in batches]).tolist() == np.repeat(np.arange(20), 5).tolist()
    again = build_cifar100(cfg).fingerprint
    assert again == b.fingerprint and str(fake.root.resolve()) in b.fingerprint
    others = {
        build_cifar100(_cfg(fake.root, test_set="full")).fingerprint,
        build_cifar100(_cfg(fake.root, per_class=6)).fingerprint,
        build_cifar100(_cfg(fake.root, image_size=224)).fingerprint,
    }
    assert b.fingerprint not in others and len(others) == 3


def test_root_may_be_the_data_folder_itself(fake):
    b = build_cifar100(_cfg(fake.root / "cifar-100-python"))
    assert len(b.test) == 500


def test_missing_root_names_layout(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_cifar100(_cfg(tmp_path / "nowhere"))
    msg = str(err.value)
    assert f"data.root={tmp_path / 'nowhere'}" in msg
    assert "cifar-100-python/{train,test,meta}" in msg and "data.download=true" in msg
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"lacks \['train', 'meta'\]"):
        build_cifar100(_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"set data\.root"):
        build_cifar100(_cfg(None))


def test_download_only_when_asked_and_missing(fake, tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR100:  # stands in for the network download
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, train, download))
            if not (Path(root) / "cifar-100-python" / "train").exists():
                write_fake_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    b = build_cifar100(_cfg(tmp_path / "dl", download=True))
    assert len(b.test) == 500 and calls and all(download for _, _, download in calls)
    calls.clear()
    build_cifar100(_cfg(fake.root, download=True))  # present: no download, no md5 check of our files
    assert calls == []


def _copy(fake, tmp_path) -> Path:
    shutil.copytree(fake.root / "cifar-100-python", tmp_path / "cifar-100-python")
    return tmp_path / "cifar-100-python"


def test_corrupted_pickles_are_clear_errors(fake, tmp_path):
    folder = _copy(fake, tmp_path)
    good = (folder / "test").read_bytes()
    (folder / "test").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataFileError, match=r"cifar-100-python/test is corrupted") as err:
        build_cifar100(_cfg(tmp_path))
    assert isinstance(err.value, QsweepError)
    (folder / "test").write_bytes(os.urandom(4096))  # garbage
    with pytest.raises(DataFileError, match=r"cifar-100-python/test"):
        build_cifar100(_cfg(tmp_path))
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]}))
    with pytest.raises(DataFileError, match=r"expected uint8 \[N, 3072\]"):
        build_cifar100(_cfg(tmp_path))
    (folder / "test").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataFileError, match=r"holds a list, expected a dict"):
        build_cifar100(_cfg(tmp_path))


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_without_running(fake, tmp_path):
    folder = _copy(fake, tmp_path)
    sentinel = tmp_path / "pwned"
    payload = {b"data": _Evil(f"touch {sentinel}"), b"fine_labels": [0]}
    (folder / "train").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataFileError, match=r"refusing to load .*cifar-100-python/train.*system"):
        build_cifar100(_cfg(tmp_path))
    assert not sentinel.exists()
    evil_eval = tmp_path / "evil_eval"
    evil_eval.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # builtins.eval('1+1') at protocol 0
    with pytest.raises(DataFileError, match=r"builtins\.eval"):
        read_cifar_pickle(evil_eval)


def test_files_written_by_numpy_1_decode(fake, tmp_path):
    """The real files name numpy.core.multiarray._reconstruct (numpy 1.x); that is allowed."""
    folder = _copy(fake, tmp_path)
    x, y = fake.test_x, fake.test_y
    blob = pickle.dumps({b"data": x.reshape(len(y), 3072), b"fine_labels": y.tolist()}, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in blob
    (folder / "test").write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    b = build_cifar100(_cfg(tmp_path, test_set="full"))
    assert np.array_equal(_to_uint8(b.test[3][0]), x[3]) and b.test[3][1] == y[3]


class _ObjectArray:
    """Pickles as ``numpy.ndarray((n,), dtype('O'), raw)``: an object array of made-up pointers."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (np.ndarray, ((self.n,), np.dtype("O"), b"\x41" * 8 * self.n))


class _ArrayWithState:
    """Pickles as numpy's own ``_reconstruct`` + BUILD, with any dtype and data."""

    def __init__(self, shape, dtype, raw):
        self.state = (1, shape, dtype, False, raw)

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state)


def test_crafted_numpy_pickle_is_refused_not_a_crash(fake, tmp_path):
    """An object array built from raw bytes used to crash the process (exit 139) on reading the labels."""
    folder = _copy(fake, tmp_path)
    n = len(fake.test_y)
    data = fake.test_x.reshape(n, 3072)
    (folder / "test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": _ObjectArray(n)}, protocol=2))
    script = (
        "import sys\n"
        "from qsweep.data.cifar100 import DataFileError, load_split\n"
        "try:\n"
        f"    load_split({str(folder / 'test')!r})\n"
        "except DataFileError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 3, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert "cifar-100-python/test" in out.stdout and "calls numpy.ndarray(...) directly" in out.stdout


@pytest.mark.parametrize("labels, data, message", [
    (lambda y: _ArrayWithState((len(y),), np.dtype("O"), b"\x41" * 8 * len(y)), None, "not a plain numeric"),
    (lambda y: _ArrayWithState((len(y),), np.dtype([("a", "O")]), b"\0" * 8 * len(y)), None, "not a plain numeric"),
    (lambda y: [float(v) for v in y], None, r"'fine_labels' is a list holding \d+\.0"),
    (lambda y: y.astype(np.float32), None, r"'fine_labels' is a float32 array"),
    (lambda y: y.tolist()[:-1], None, r"700 images but 699 labels"),
    (lambda y: [v + 100 for v in y.tolist()], None, r"fine labels range 100\.\.199"),
    (lambda y: y.tolist(), lambda x: _ArrayWithState((len(x), 3072), np.dtype("u1"), b"\0" * 10),
     r"needs 2150400 bytes"),
    (lambda y: y.tolist(), lambda x: x.astype(np.int16), r"'data' is int16 \(700, 3072\), expected uint8"),
], ids=["object", "structured-object", "float-list", "float-array", "short", "range", "short-data", "data-dtype"])
def test_malformed_arrays_and_labels_are_clear_errors(fake, tmp_path, labels, data, message):
    folder = _copy(fake, tmp_path)
    x, y = fake.test_x.reshape(len(fake.test_y), 3072), fake.test_y
    payload = {b"data": x if data is None else data(x), b"fine_labels": labels(y)}
    (folder / "test").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataFileError, match=r"cifar-100-python/test.*" + message):
        load_split(folder / "test")
