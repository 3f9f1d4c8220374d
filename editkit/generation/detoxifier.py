"""Decoding-time detoxifiers: the protocol generation calls, on both of its paths.

A detoxifier changes generation, not weights (DESIGN §2, §7). It may

(a) adjust each step's next-token scores given the sequences so far (:meth:`Detoxifier.step`, like
    a transformers ``LogitsProcessor``; :meth:`Detoxifier.as_logits_processor` makes it one for
    ``model.generate``), keeping per-row state of its own (an auxiliary model's KV cache), and/or
(b) install temporary forward hooks on the model for the duration of a generation
    (:meth:`Detoxifier.install`, entered through ``with detoxifier.active(model):``).

Call order, for one ``editkit.generate(model, tok, prompts, detoxifier=d)``::

    with d.active(model):                         # d.install(model, stack): hooks, removed on exit (also on error)
        for each batch of prompts:
            d.start(prompts, max_new_tokens=n)    # rows 0..len(prompts)-1: prompt token ids, no padding
            scores = d.step(scores, None, rows)   # scores of the first new token (after each prompt)
            scores = d.step(scores, fed, rows)    # each later token; fed[i] = the token row rows[i] was just fed
            ...
            d.finish()                            # the batch is over (also after an error): drop per-row state

``scores`` is [len(rows), vocab] float32, after the generator's own processors (suppressed tokens
are −inf) and before the token is chosen. ``rows`` ([len(rows)] long) holds the original row numbers
(positions in ``start``'s prompts) of the rows of ``scores``, in order. The greedy loop drops
finished rows between steps, so ``rows`` shrinks, only ever to a subsequence of the previous call's
``rows``; a detoxifier with per-row state keeps the same rows (:func:`follow_rows`). Under
``model.generate`` (the processor adapter) rows never leave: ``rows`` is every row, and a finished
row is fed the pad token.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class Detoxifier:
    """Base class of decoding-time detoxifiers: every method is optional (the base changes nothing).

    Subclasses override :meth:`step` (scores), :meth:`install` (hooks), or both, plus :meth:`start`
    and :meth:`finish` when they keep per-row state. ``runs_in_greedy_loop = False`` sends greedy
    generation through ``model.generate`` instead of editkit's loop: for a detoxifier whose hooks
    must see every row of the batch in every forward (the loop prefills one prompt at a time and
    drops finished rows, telling the detoxifier which rows remain only through :meth:`step`).
    """

    label = "detoxifier"
    runs_in_greedy_loop = True

    def settings(self) -> dict[str, Any]:
        """What identifies this detoxifier in a run folder (JSON-ready)."""
        return {"kind": type(self).__name__}

    @contextlib.contextmanager
    def active(self, model: Any) -> Iterator[Detoxifier]:
        """The detoxifier installed on ``model`` for one generation call: the hooks :meth:`install`
        registers (inside the ``try``) are removed, and :meth:`finish` called, on exit, also on error."""
        with contextlib.ExitStack() as stack:  # the stack's exit is the ``finally``
            stack.callback(self.finish)
            self.install(model, stack)
            yield self

    def install(self, model: Any, stack: contextlib.ExitStack) -> None:
        """Register temporary hooks on ``model``, pushing each removal onto ``stack`` right after it
        is registered (``stack.callback(handle.remove)``, or ``stack.enter_context(Trace(...))``), so
        that a failure half-way still removes the hooks registered so far."""

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None) -> None:
        """A new batch: row ``i`` continues ``prompts[i]`` (token ids, no padding) by at most
        ``max_new_tokens`` tokens (None: unknown). Set up per-row state here."""

    def step(self, scores: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """The next-token scores [len(rows), vocab] of rows ``rows`` (original row numbers), adjusted.
        ``fed`` [len(rows)]: the token each row was fed since the previous call (None at the first
        call of a batch, when the scores follow the prompts). Must not change ``scores`` in place."""
        return scores

    def finish(self) -> None:
        """The batch is over (also called after an error, and again when ``active`` exits): free
        per-row state. Must be safe to call more than once."""

    def as_logits_processor(self, prompt_mask: torch.Tensor | None = None, *,
                            max_new_tokens: int | None = None) -> Any:
        """This detoxifier as a transformers ``LogitsProcessor`` for one ``model.generate`` call.
        ``prompt_mask`` [batch, prompt_len]: the attention mask of a left-padded batch, so that
        :meth:`start` gets the prompts without their padding (None: the prompts are not padded).
        Call :meth:`finish` after the generation (``active`` does it on exit)."""
        return _processor_class()(self, prompt_mask, max_new_tokens)


def follow_rows(previous: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """Positions in ``previous`` (the original row numbers a detoxifier's per-row state holds, in
    order) of ``rows``, to keep with ``index_select``; None when ``rows`` is ``previous``."""
    if rows.shape == previous.shape and torch.equal(rows.to(previous.device), previous):
        return None
    slot = torch.full((int(max(previous.max(), rows.max())) + 1,), -1, dtype=torch.long, device=previous.device)
    slot[previous] = torch.arange(len(previous), device=previous.device)
    index = slot[rows.to(previous.device)]
    if bool((index < 0).any()):
        missing = rows[(index < 0).to(rows.device)].tolist()
        raise RuntimeError(f"rows {missing} are not in the batch any more (rows only leave the batch)")
    return index


class FollowingRun:
    """A detoxifier's own incremental run beside the generator (its own KV cache), kept in step with
    the generator's rows: ``copies`` blocks of the generator's batch (block ``j`` holds generator row
    ``i`` at ``j * n + i``, for several auxiliary inputs per prompt). ``first`` is what the run's
    prefill returned, handed out at the first step; later steps feed every block the token its
    generator row was fed."""

    def __init__(self, batch: Any, first: torch.Tensor, rows: int, *, copies: int = 1) -> None:
        self.batch, self.copies, self._first = batch, copies, first
        self.rows = torch.arange(rows, device=first.device)  # original row of each generator row still here

    def next(self, fed: torch.Tensor | None, rows: torch.Tensor, advance: Any = None) -> torch.Tensor:
        """The run's output for this step after dropping the rows that left the generator's batch;
        ``advance(tokens)`` steps the batch (default ``batch.advance``)."""
        index = follow_rows(self.rows, rows)
        if index is not None:
            n = len(self.rows)
            keep = torch.cat([index + j * n for j in range(self.copies)]) if self.copies > 1 else index
            self.batch.keep(keep)
            self.rows = self.rows[index]
            if self._first is not None:
                self._first = self._first[keep.to(self._first.device)]
        if fed is None:
            if self._first is None:
                raise RuntimeError("a detoxifier step got no fed tokens after its first step")
            out, self._first = self._first, None
            return out
        return (advance or self.batch.advance)(fed.repeat(self.copies) if self.copies > 1 else fed)


@functools.cache
def _processor_class() -> type:
    from transformers import LogitsProcessor

    class DetoxifierLogitsProcessor(LogitsProcessor):
        """A :class:`Detoxifier` inside ``model.generate``: the first call starts the batch from the
        prompts (padding removed with ``prompt_mask``), each later call steps it with the token each
        row was fed. One processor serves one ``generate`` call; rows must keep their order (no beam
        search, whose beams are reordered between steps)."""

        def __init__(self, detoxifier: Detoxifier, prompt_mask: torch.Tensor | None,
                     max_new_tokens: int | None) -> None:
            self.detoxifier, self.prompt_mask, self.max_new_tokens = detoxifier, prompt_mask, max_new_tokens
            self._seen: torch.Tensor | None = None
            self._rows: torch.Tensor | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self._seen is None or self._rows is None:
                prompts = input_ids.tolist()
                if self.prompt_mask is not None:
                    if tuple(self.prompt_mask.shape) != tuple(input_ids.shape):
                        raise ValueError(f"prompt_mask has shape {tuple(self.prompt_mask.shape)}, the prompts "
                                         f"{tuple(input_ids.shape)} (num_return_sequences or beams expand the rows)")
                    prompts = [[t for t, m in zip(ids, mask) if m] for ids, mask in
                               zip(prompts, self.prompt_mask.tolist())]
                self.detoxifier.start(prompts, max_new_tokens=self.max_new_tokens)
                self._rows = torch.arange(input_ids.shape[0], device=scores.device)
                fed = None
            else:
                seen = self._seen
                if (input_ids.shape[0] != seen.shape[0] or input_ids.shape[1] != seen.shape[1] + 1
                        or not torch.equal(input_ids[:, :-1], seen)):
                    raise RuntimeError("the sequences are not the previous call's plus one token per row: rows "
                                       "were reordered (beam search) or the processor is reused across generate "
                                       "calls; make one processor per call with as_logits_processor()")
                fed = input_ids[:, -1]
            self._seen = input_ids.clone()
            return self.detoxifier.step(scores, fed, self._rows)

    return DetoxifierLogitsProcessor
