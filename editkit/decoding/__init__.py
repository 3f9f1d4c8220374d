"""Decoding-time detoxifiers (DESIGN §7): they change generation, not weights.

Each follows :class:`editkit.generation.detoxifier.Detoxifier` and is passed to
``editkit.generate(model, tok, prompts, detoxifier=...)``; by name through
:func:`build_detoxifier` (the command line's ``--detoxifier NAME --detoxifier-opt key=value``):

* :class:`~editkit.decoding.dexperts.DExperts` — an anti-expert's logits subtracted inside the
  generator's nucleus (the DExperts peer, anti-expert only);
* :class:`~editkit.decoding.detoxigen.DetoxiGen` — contrast with the same model behind a soft prompt
  prompt-tuned on toxic text (:func:`train_detoxigen_prompt`);
* :class:`~editkit.decoding.fgdilp.FGDILP` — instance-level prefixes and fused per-head subtoxicity
  vectors steering the attention outputs;
* :class:`~editkit.decoding.calibration.CalibrationFusion` — a small non-toxic calibration model's
  state, aligned by InfoNCE, fused before the LM head;
* :class:`~editkit.decoding.selfdebias.SelfDebiasing` — the Self-Debiasing peer.
"""
from __future__ import annotations

from editkit.decoding.calibration import Alignment, CalibrationFusion, load_alignment
from editkit.decoding.detoxigen import DetoxiGen, SoftPrompt, SoftPromptError
from editkit.decoding.detoxigen_train import load_toxic_texts, train_detoxigen_prompt
from editkit.decoding.dexperts import DExperts
from editkit.decoding.fgdilp import FGDILP
from editkit.decoding.registry import (build_detoxifier, get_detoxifier, list_detoxifiers, parse_options,
                                       register_detoxifier)
from editkit.decoding.selfdebias import SelfDebiasing

__all__ = ["Alignment", "CalibrationFusion", "DExperts", "DetoxiGen", "FGDILP", "SelfDebiasing", "SoftPrompt",
           "SoftPromptError", "build_detoxifier", "get_detoxifier", "list_detoxifiers", "load_alignment",
           "load_toxic_texts", "parse_options", "register_detoxifier", "train_detoxigen_prompt"]
