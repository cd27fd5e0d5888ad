"""qsweep.data: the digits split, calibration sampling and evaluation loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from qsweep.config import CalibConfig, ConfigError, DataConfig, DigitsDataConfig
from qsweep.data import DataBundle, build_data, calibration_batches, calibration_indices, eval_loader
from qsweep.data.digits import stratified_split


def _labels(ds) -> torch.Tensor:
    return ds.tensors[1]


def test_digits_split_sizes_and_shapes(digits_bundle):
    b = digits_bundle
    assert b.name == "digits" and b.num_classes == 10 and b.input_shape == (1, 16, 16)
    assert len(b.train) + len(b.test) == 1797
    assert len(b.test) == 450  # ceil(0.25 * 1797)
    x, y = b.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert torch.equal(b.train_labels, _labels(b.train)) and b.train_labels.dtype == torch.int64
    # normalized with train-split constants
    train_x = b.train.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3


def test_split_is_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    y = load_digits().target
    train_idx, test_idx = stratified_split(y, 0.25, seed=0)
    assert set(train_idx).isdisjoint(test_idx) and len(train_idx) + len(test_idx) == len(y)
    full = np.bincount(y, minlength=10) / len(y)
    test = np.bincount(y[test_idx], minlength=10)
    assert (test > 0).all()
    assert np.abs(test / len(test_idx) - full).max() < 0.01


def test_every_class_in_test(digits_bundle):
    counts = torch.bincount(_labels(digits_bundle.test), minlength=10)
    assert (counts >= 40).all()


def test_split_is_deterministic():
    a = build_data(DigitsDataConfig(seed=3))
    b = build_data(OmegaConf.structured(DigitsDataConfig(seed=3)))  # DictConfig works too
    c = build_data(DigitsDataConfig(seed=4))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert a.fingerprint == b.fingerprint
    assert c.fingerprint != a.fingerprint
    assert not torch.equal(a.train_labels, c.train_labels)


def test_test_fraction_changes_split_and_fingerprint():
    a = build_data(DigitsDataConfig(test_fraction=0.5))
    assert len(a.test) == 899 and "test=0.5" in a.fingerprint


def test_unknown_dataset_lists_registered_names():
    with pytest.raises(ConfigError, match=r"data.name='mnist'.*digits"):
        build_data(DataConfig(name="mnist"))


def test_data_configs_are_read_on_their_dataset_schema():
    """Defaults come from the dataset's dataclass; a key the dataset does not read is an error naming it."""
    assert build_data(DataConfig()).fingerprint == build_data({"name": "digits", "seed": 0}).fingerprint
    with pytest.raises(ConfigError, match=r"data\.per_class.*DigitsDataConfig"):
        build_data({"name": "digits", "per_class": 3})


@pytest.mark.parametrize("n,lo,hi", [(20, 2, 2), (25, 2, 3), (100, 10, 10), (7, 0, 1)])
def test_class_balanced_counts(digits_bundle, n, lo, hi):
    labels = digits_bundle.train_labels
    idx = calibration_indices(labels, n, class_balanced=True, seed=0)
    assert idx.dtype == torch.int64 and len(idx) == n and len(set(idx.tolist())) == n
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.min() >= lo and counts.max() <= hi and counts.sum() == n


def test_class_balanced_when_a_class_runs_out():
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    idx = calibration_indices(labels, 20, class_balanced=True, seed=1)
    assert len(set(idx.tolist())) == 20
    assert torch.bincount(labels[idx]).tolist() == [2, 9, 9]


def test_calibration_indices_seeded(digits_bundle):
    labels = digits_bundle.train_labels
    for balanced in (True, False):
        a = calibration_indices(labels, 64, balanced, seed=5)
        b = calibration_indices(labels, 64, balanced, seed=5)
        c = calibration_indices(labels, 64, balanced, seed=6)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert len(set(a.tolist())) == 64 and int(a.max()) < len(labels)


def test_too_many_calibration_images(digits_bundle):
    n = len(digits_bundle.train_labels)
    with pytest.raises(ConfigError, match=rf"quant.calib.num_images={n + 1}.*{n}"):
        calibration_indices(digits_bundle.train_labels, n + 1, class_balanced=True, seed=0)
    with pytest.raises(ConfigError, match="quant.calib.num_images"):
        calibration_batches(digits_bundle, CalibConfig(num_images=5000))


def test_calibration_batches_shapes(digits_bundle):
    batches = calibration_batches(digits_bundle, OmegaConf.structured(CalibConfig(num_images=100, batch_size=32)))
    assert [b.shape for b in batches] == [(32, 1, 16, 16)] * 3 + [(4, 1, 16, 16)]
    assert all(b.dtype == torch.float32 for b in batches)


def test_calibration_never_uses_test_images():
    # Train images are all +1, test images all -1: any test image in a batch would show.
    train = TensorDataset(torch.ones(40, 1, 4, 4), torch.arange(40) % 4)
    test = TensorDataset(-torch.ones(40, 1, 4, 4), torch.arange(40) % 4)
    bundle = DataBundle("toy", train, test, torch.arange(40) % 4, 4, (1, 4, 4), "toy")
    for balanced in (True, False):
        batches = calibration_batches(bundle, CalibConfig(num_images=40, batch_size=16, class_balanced=balanced))
        images = torch.cat(batches)
        assert images.shape[0] == 40 and bool((images == 1).all())


def test_calibration_images_come_from_train_at_the_sampled_indices(digits_bundle):
    cfg = CalibConfig(num_images=50, batch_size=50, seed=2)
    (batch,) = calibration_batches(digits_bundle, cfg)
    idx = calibration_indices(digits_bundle.train_labels, 50, True, 2)
    assert torch.equal(batch, digits_bundle.train.tensors[0][idx])


def test_eval_loader(digits_bundle):
    loader = eval_loader(digits_bundle, DataConfig(eval_batch_size=100))
    ys = torch.cat([y for _, y in loader])
    assert loader.batch_size == 100 and torch.equal(ys, _labels(digits_bundle.test))  # no shuffle
    limited = eval_loader(digits_bundle, OmegaConf.structured(DataConfig(eval_batch_size=64, max_eval_images=70)))
    sizes = [x.shape[0] for x, _ in limited]
    assert sizes == [64, 6]
    first = next(iter(limited))[0]
    assert torch.equal(first, digits_bundle.test.tensors[0][:64])
