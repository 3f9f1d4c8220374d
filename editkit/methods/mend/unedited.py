"""What the unedited model gives MEND's meta-training that no step changes, computed once.

MEND edits weights of the top layers only, so for a given token batch

* the residual stream entering the lowest edited layer is the same before and after any edit, at
  every step: :meth:`UneditedCache.skipping` computes it once (one no-grad forward) and afterwards
  swaps the layers below for pass-through modules that hand the kept state to the first edited
  layer, so the step runs only the top layers and the LM head (on SmolLM2-135M, editing layers
  27–29, three of thirty layers);
* the unedited log-probabilities of a locality batch are the same at every step:
  :meth:`UneditedCache.reference` keeps them.

Both are exact (the model's weights are frozen during meta-training; the states are those of the
full forward) and keyed by the batch's token ids, so an example seen again in a later epoch costs no
second forward. Off (a plain full forward each time) where the architecture map does not declare
the fast path exact, or when the lowest edited layer is the first.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from editkit.arch import ArchMap, decoder_layers, get_module
from editkit.engine import PassThrough, replace_first_arg
from editkit.hooks import Trace
from editkit.methods.mend.factors import Target, answer_logits
from editkit.text import TokenBatch


def target_layer(target: Target, arch: ArchMap) -> int:
    """The decoder layer index of ``target`` (its module is ``<arch.layers>.<index>.…``)."""
    prefix = arch.layers + "."
    if not target.module.startswith(prefix):
        raise ValueError(f"{target.module} is not inside the decoder layers ({arch.layers})")
    return int(target.module[len(prefix):].split(".")[0])


def _key(batch: TokenBatch) -> tuple:
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    targets = batch.target_mask.cpu()
    return tuple(ids.shape), ids.numpy().tobytes(), mask.numpy().tobytes(), targets.numpy().tobytes()


class UneditedCache:
    """Entry states of the lowest edited layer and unedited locality log-probs, per token batch."""

    def __init__(self, model: nn.Module, arch: ArchMap, targets: Sequence[Target]) -> None:
        self.model, self.arch = model, arch
        self.layer = min(target_layer(t, arch) for t in targets)
        self.enabled = arch.fast_path and self.layer > 0
        self._entries: dict[tuple, torch.Tensor] = {}
        self._references: dict[tuple, torch.Tensor] = {}
        self._as_tuple: bool | None = None
        self.forwards = 0  # full forwards run (for tests and timing)

    def _entry(self, batch: TokenBatch, key: tuple) -> torch.Tensor:
        """[batch, seq, d_model] the state entering the lowest edited layer, from one full forward."""
        if key not in self._entries:
            layers = decoder_layers(self.model, self.arch)
            with torch.no_grad(), Trace(layers[self.layer], retain_input=True, retain_output=False,
                                        detach=True) as entry, Trace(layers[self.layer - 1]) as below:
                get_module(self.model, self.arch.base)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                       use_cache=False)
            self.forwards += 1
            self._as_tuple = isinstance(below.raw_output, tuple)
            self._entries[key] = entry.input
        return self._entries[key]

    @contextmanager
    def skipping(self, batch: TokenBatch) -> Iterator[None]:
        """Within the block, a forward of ``batch`` runs from the lowest edited layer on (the layers
        below are pass-through, fed the kept state); the layers are put back on exit, also by
        exception. A forward of any other batch inside the block would be wrong: only ``batch``."""
        if not self.enabled:
            yield
            return
        entry = self._entry(batch, _key(batch))
        layers = decoder_layers(self.model, self.arch)
        originals = [layers[i] for i in range(self.layer)]
        try:
            for i, module in enumerate(originals):
                layers[i] = PassThrough(bool(self._as_tuple), module)
            with Trace(layers[self.layer], edit_input=lambda args, kwargs, module: replace_first_arg(args, kwargs, entry),
                       retain_output=False):
                yield
        finally:
            for i, module in enumerate(originals):
                layers[i] = module

    @torch.no_grad()
    def reference(self, batch: TokenBatch) -> torch.Tensor:
        """[n_targets, vocab] fp32 log-probabilities of the unedited model at ``batch``'s predicting
        positions (call it outside any edit)."""
        key = _key(batch)
        if key not in self._references:
            with self.skipping(batch):
                self._references[key] = F.log_softmax(answer_logits(self.model, self.arch, batch), -1)
        return self._references[key]

    def logits(self, batch: TokenBatch) -> torch.Tensor:
        """:func:`~editkit.methods.mend.factors.answer_logits` of ``batch`` with the lower layers skipped."""
        with self.skipping(batch):
            return answer_logits(self.model, self.arch, batch)
