"""Decoding-time detoxifiers (DESIGN §7): they change generation, not weights.

Each follows :class:`editkit.generation.detoxifier.Detoxifier` and is passed to
``editkit.generate(model, tok, prompts, detoxifier=...)``; by name through
:func:`build_detoxifier` (the command line's ``--detoxifier NAME --detoxifier-opt key=value``):

* :class:`~editkit.decoding.dexperts.DExperts` — an anti-expert's logits subtracted inside the
  generator's nucleus (the DExperts peer, anti-expert only).
"""
from __future__ import annotations

from editkit.decoding.dexperts import DExperts
from editkit.decoding.registry import (build_detoxifier, get_detoxifier, list_detoxifiers, parse_options,
                                       register_detoxifier)

__all__ = ["DExperts", "build_detoxifier", "get_detoxifier", "list_detoxifiers", "parse_options",
           "register_detoxifier"]
