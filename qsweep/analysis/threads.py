"""Temporarily set torch's intra-op thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads (None: leave as is), then restore.

    Small models (the digits ViT) run many tiny ops, where one thread is as fast as several
    on an idle machine and many times faster on a busy one (OpenMP threads spin-wait on each
    other when the CPUs are oversubscribed). Large models want the default.
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r}; need at least 1 (or None for torch's default)")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
