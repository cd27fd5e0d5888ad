"""A fabricated CIFAR-100 in the real on-disk format (``cifar-100-python/{train,test,meta}`` pickles).

Pixel R[0, 0] of every image holds a class code, so tests know what a code-reading model scores.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

TEST_PER_CLASS = 7
TRAIN_PER_CLASS = 3
WRONG_AT = 4  # the 5th test image of every class carries the code of the next class (see _split)


def _split(per_class: int, seed: int, wrong_at: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Random pixels ``[N, 3, 32, 32]`` and shuffled labels; R[0, 0] holds a class code.

    The code is the label, except for the ``wrong_at``-th appearance of each class (label + 1),
    so a model that reads pixel (0, 0) back scores a known accuracy.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(100), per_class)).astype(np.int64)
    planes = rng.integers(0, 256, size=(labels.size, 3, 32, 32), dtype=np.uint8)
    seen = np.zeros(100, dtype=np.int64)
    code = labels.copy()
    for i, c in enumerate(labels):
        if seen[c] == wrong_at:
            code[i] = (c + 1) % 100
        seen[c] += 1
    planes[:, 0, 0, 0] = code
    return planes, labels


def write_fake_cifar(root: Path) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` as CIFAR's pickles; returns the raw arrays."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    test_x, test_y = _split(TEST_PER_CLASS, 1, WRONG_AT)
    train_x, train_y = _split(TRAIN_PER_CLASS, 2, None)
    for name, (x, y), protocol in (("train", (train_x, train_y), 2), ("test", (test_x, test_y), 4)):
        d = {
            b"batch_label": f"{name} batch".encode(),
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(y))],
            b"fine_labels": [int(v) for v in y],
            b"coarse_labels": [int(v) // 5 for v in y],
            b"data": x.reshape(len(y), 3072),  # row-major R, G, B planes of 32x32
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
    meta = {
        b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
        b"coarse_label_names": [f"super{c:02d}".encode() for c in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=5))
    return {"test_x": test_x, "test_y": test_y, "train_x": train_x, "train_y": train_y}


def expected_mini(labels: np.ndarray, per_class: int) -> list[int]:
    """The lab's selection, written independently: walk in order, keep per_class of each, group."""
    kept: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        if len(kept.setdefault(c, [])) < per_class:
            kept[c].append(i)
    return [i for c in sorted(kept) for i in kept[c]]
