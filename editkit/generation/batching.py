"""Grouping prompts into batches for generation."""
from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], batch_size: int, max_waste: float = 0.25) -> list[list[int]]:
    """Split positions of length-sorted (descending) sequences into batches of at most
    ``batch_size`` whose left padding stays under ``max_waste`` of the batch's tokens."""
    batches: list[list[int]] = []
    for i, n in enumerate(lengths):
        if batches:
            batch = batches[-1]
            longest = lengths[batch[0]]
            real = sum(lengths[j] for j in batch) + n
            if len(batch) < batch_size and longest * (len(batch) + 1) - real <= max_waste * longest * (len(batch) + 1):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def fixed_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
