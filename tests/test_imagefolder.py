"""qsweep.data.imagefolder on tiny PNG folders written with PIL."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from qsweep.config import CalibConfig, ConfigError, ImageFolderDataConfig
from qsweep.data import REGISTRY, build_data, calibration_batches, eval_loader
from qsweep.data.cifar100 import IMAGENET_MEAN, IMAGENET_STD, DataFileError
from qsweep.data.imagefolder import build_imagefolder

CLASSES = ("cat", "dog", "fox")
COLORS = {"cat": (200, 30, 60), "dog": (10, 250, 128), "fox": (90, 90, 0)}
SIZES = ((40, 30), (30, 50), (48, 48), (33, 41))


def _write(path: Path, size, color=None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        color = (128,) * len(Image.new(mode, (1, 1)).getbands())
    Image.new(mode, size, color).save(path)
    return path


def make_folder(root: Path, train_per_class: int = 4, val_per_class: int = 2, eval_split: str = "val") -> Path:
    """Solid-color images, one color per class, assorted (non-square) sizes."""
    for split, n in (("train", train_per_class), (eval_split, val_per_class)):
        for c in CLASSES:
            for i in range(n):
                _write(root / split / c / f"{c}_{i}.png", SIZES[i % len(SIZES)], COLORS[c])
    return root


def _cfg(root, **kw) -> ImageFolderDataConfig:
    base = dict(name="imagefolder", root=None if root is None else str(root), image_size=32, convert_rgb=False)
    base.update(kw)
    return ImageFolderDataConfig(**base)


def _normalized(color) -> np.ndarray:
    return (np.array(color, np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


def test_loads_with_labels_and_transform(tmp_path):
    root = make_folder(tmp_path / "imgs")
    assert REGISTRY["imagefolder"] is build_imagefolder
    b = build_data(OmegaConf.create(dict(vars(_cfg(root)))))
    assert b.name == "imagefolder" and b.num_classes == 3 and b.input_shape == (3, 32, 32)
    assert len(b.train) == 12 and len(b.test) == 6
    assert b.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(len(b.test)):
        x, y = b.test[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        want = _normalized(COLORS[CLASSES[y]])  # a solid image stays solid through resize + crop
        assert np.allclose(x.numpy(), want[:, None, None], atol=1e-5)
    cfg = _cfg(root, eval_batch_size=4)
    assert [len(y) for _, y in eval_loader(b, cfg)] == [4, 2]
    batches = calibration_batches(b, CalibConfig(num_images=6, batch_size=4, class_balanced=True, seed=0))
    assert [t.shape for t in batches] == [torch.Size([4, 3, 32, 32]), torch.Size([2, 3, 32, 32])]
    assert build_imagefolder(_cfg(root, image_size=64)).test[0][0].shape == (3, 64, 64)
    fps = {build_imagefolder(_cfg(root)).fingerprint, b.fingerprint, build_imagefolder(_cfg(root, image_size=64)).fingerprint}
    assert len(fps) == 2


def test_test_split_accepted_instead_of_val(tmp_path):
    b = build_imagefolder(_cfg(make_folder(tmp_path / "imgs", eval_split="test")))
    assert len(b.test) == 6 and b.num_classes == 3


def test_class_mismatch_names_both_splits(tmp_path):
    root = make_folder(tmp_path / "imgs")
    shutil.rmtree(root / "val" / "fox")
    _write(root / "val" / "wolf" / "w.png", (32, 32), (1, 2, 3))
    with pytest.raises(ConfigError) as err:
        build_imagefolder(_cfg(root))
    msg = str(err.value)
    assert str(root / "train") in msg and str(root / "val") in msg
    assert "only in train/: ['fox']" in msg and "only in val/: ['wolf']" in msg


def test_grayscale_image_is_an_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "imgs")
    gray = _write(root / "train" / "dog" / "dog_gray.png", (32, 32), 77, mode="L")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(gray))}.*mode 'L' \(1 channel\).*data\.convert_rgb=true"):
        build_imagefolder(_cfg(root))
    b = build_imagefolder(_cfg(root, convert_rgb=True))
    i = [p for p, _ in b.train.samples].index(str(gray))
    x, y = b.train[i]
    assert x.shape == (3, 32, 32) and y == 1
    assert np.allclose(x.numpy(), _normalized((77, 77, 77))[:, None, None], atol=1e-5)


def test_wrong_channels_past_the_upfront_check_fail_on_load(tmp_path):
    root = make_folder(tmp_path / "imgs", train_per_class=6)
    rgba = _write(root / "train" / "fox" / "fox_9.png", (32, 32), (1, 2, 3, 4), mode="RGBA")  # 7th fox: not pre-checked
    b = build_imagefolder(_cfg(root))
    i = [p for p, _ in b.train.samples].index(str(rgba))
    with pytest.raises(DataFileError, match=rf"{re.escape(str(rgba))}.*mode 'RGBA' \(4 channels\)"):
        b.train[i]


def test_extreme_aspect_ratio_and_unreadable_file(tmp_path):
    root = make_folder(tmp_path / "imgs")
    strip = _write(root / "val" / "cat" / "strip.png", (200, 20), (5, 5, 5))
    with pytest.raises(DataFileError, match=rf"{re.escape(str(strip))} is 200x20 \(aspect ratio 10.0:1\)"):
        build_imagefolder(_cfg(root))
    strip.unlink()
    broken = root / "val" / "cat" / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataFileError, match=rf"cannot read image {re.escape(str(broken))}"):
        build_imagefolder(_cfg(root))


def test_missing_root_or_split_names_layout(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root=.*nowhere.*not a directory.*train/<class>/<image>"):
        build_imagefolder(_cfg(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data\.root=None is not allowed"):
        build_imagefolder(_cfg(None))
    root = make_folder(tmp_path / "imgs")
    shutil.rmtree(root / "val")
    with pytest.raises(ConfigError, match=r"has no val/ \(or test/\).*val/<class>/<image>"):
        build_imagefolder(_cfg(root))
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "dog").mkdir()
    (root / "val" / "fox").mkdir()
    with pytest.raises(ConfigError, match=r"not a usable split"):
        build_imagefolder(_cfg(root))
