"""Seeded sampling that leaves the caller's random state alone."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch seeded with ``seed`` for the block (CPU and, for a CUDA ``device``, that device); the
    caller's RNG state is given back afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
