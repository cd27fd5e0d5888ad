"""Shared fixtures. Add yours below; keep the session cache fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def qsweep_cache(tmp_path_factory):
    """A throwaway qsweep cache for the whole session (``$QSWEEP_CACHE``, inherited by subprocesses)."""
    path = tmp_path_factory.mktemp("qsweep_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSWEEP_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def digits_bundle():
    """The digits data with the default split."""
    from qsweep.config import DigitsDataConfig
    from qsweep.data import build_data

    return build_data(DigitsDataConfig())


@pytest.fixture(scope="session")
def digits_vit(digits_bundle, qsweep_cache):
    """The embedded digits ViT, trained once per session into the throwaway cache."""
    from qsweep.models import load_digits_vit

    return load_digits_vit(digits_bundle, qsweep_cache, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the digits ViT's ops are tiny, and one thread is faster
    (much faster when other processes share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib(digits_bundle):
    """64 class-balanced calibration images of the digits train split, in batches of 32."""
    from qsweep.config import CalibConfig
    from qsweep.data import calibration_batches

    return calibration_batches(digits_bundle, CalibConfig(num_images=64, batch_size=32))
