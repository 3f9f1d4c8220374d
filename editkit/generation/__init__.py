"""Generation: ``editkit.generate`` and the parts it is made of.

* :mod:`~editkit.generation.api` — :func:`generate`: batched generation from text prompts; greedy
  decoding on a known architecture runs editkit's own loop, anything else ``model.generate``;
* :mod:`~editkit.generation.greedy_loop` — :func:`greedy_decode`, the fast greedy loop, and
  :func:`loop_blocker`, which says when it may stand in for ``model.generate``;
* :mod:`~editkit.generation.incremental` — a model run incrementally over a batch of rows with a
  key/value cache of its own (the generator's in the loop, a detoxifier's auxiliary model beside it);
* :mod:`~editkit.generation.detoxifier` — :class:`Detoxifier`, the protocol decoding-time
  detoxifiers (:mod:`editkit.decoding`) follow, and its ``LogitsProcessor`` adapter;
* :mod:`~editkit.generation.batching` — grouping prompts into batches;
* :mod:`~editkit.generation.seeding` — :func:`seeded`, sampling under a seed without disturbing the caller's RNG.
"""
from __future__ import annotations

from editkit.generation.api import generate
from editkit.generation.detoxifier import Detoxifier, follow_rows
from editkit.generation.greedy_loop import greedy_decode, loop_blocker

__all__ = ["Detoxifier", "follow_rows", "generate", "greedy_decode", "loop_blocker"]
