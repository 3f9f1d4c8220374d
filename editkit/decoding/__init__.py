"""Decoding-time detoxifiers (DESIGN §7): they change generation, not weights.

Each follows :class:`editkit.generation.detoxifier.Detoxifier` and is passed to
``editkit.generate(model, tok, prompts, detoxifier=...)``:

* :class:`~editkit.decoding.dexperts.DExperts` — an anti-expert's logits subtracted inside the
  generator's nucleus (the DExperts peer, anti-expert only).
"""
from __future__ import annotations

from editkit.decoding.dexperts import DExperts

__all__ = ["DExperts"]
