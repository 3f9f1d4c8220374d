"""A decoding loop of our own (greedy, or sampling with generate's warpers), for batches of prompts of
very different lengths, or many samples of one prompt.

``model.generate`` on a left-padded batch prefills every row at the batch's full width (the padding
is computed, and the padding mask keeps attention off its fastest kernel) and grows its key/value
cache by concatenation, copying the whole cache at every step. Here the generator runs as a
:class:`~editkit.generation.incremental.SlabBatch`: each prompt is prefilled alone, without padding (a
long token prefix it shares with an earlier prompt of the batch is not computed twice), its keys and
values are written into one preallocated left-padded cache, and all rows are then decoded together;
rows that have stopped leave the batch when that pays.

A :class:`~editkit.generation.detoxifier.Detoxifier` runs inside the loop: its ``step`` sees each
step's scores of the rows still in the batch, with their original row numbers, so its own per-row
state follows the rows that leave.

The loop is only used where it is known to give ``generate``'s greedy tokens (see
:func:`loop_blocker`); ``editkit.generate`` falls back to ``model.generate`` everywhere else.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from editkit.generation.incremental import (
    CACHE_KEYWORDS,
    MIN_SHARED_PREFIX,
    SLAB_MODEL_TYPES,
    SlabBatch,
    architecture_blocker,
    cache_keyword,
)

if TYPE_CHECKING:  # pragma: no cover
    from editkit.generation.detoxifier import Detoxifier

__all__ = ["CACHE_KEYWORDS", "LOOP_MODEL_TYPES", "MIN_SHARED_PREFIX", "cache_keyword", "eos_ids", "greedy_decode",
           "loop_blocker", "sampling_warpers"]

LOOP_MODEL_TYPES = SLAB_MODEL_TYPES
# ``generate`` options the loop honours; any other option (sampling, beams, penalties...) falls back.
_LOOP_OPTIONS = frozenset({"do_sample", "max_new_tokens", "pad_token_id", "eos_token_id", "temperature",
                           "top_p", "top_k", "suppress_tokens", "use_cache"})
# generation-config fields that would add a logits processor, a stopping rule or another search
_CONFIG_FIELDS = ("num_beams", "num_beam_groups", "penalty_alpha", "repetition_penalty", "encoder_repetition_penalty",
                  "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length",
                  "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                  "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "guidance_scale",
                  "watermarking_config", "stop_strings", "max_time", "assistant_model", "prompt_lookup_num_tokens",
                  "cache_implementation", "renormalize_logits", "token_healing", "dola_layers")


# sampling warpers the loop applies (as generate does, after the processors), and the generation-config
# fields that would add another one
_WARPERS = ("temperature", "top_k", "top_p")
_SAMPLING_FIELDS = ("top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> list[Any]:
    """The warpers ``generate`` adds for ``do_sample=True`` with these settings, in its order
    (temperature, top-k, top-p; each only where it changes anything), from transformers."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def loop_blocker(model: Any, options: Mapping[str, Any], max_length: int) -> str | None:
    """Why :func:`greedy_decode` may not stand in for ``model.generate(**options)`` on sequences
    of up to ``max_length`` tokens, or None when it may."""
    reason = architecture_blocker(model, max_length)
    if reason is not None:
        return reason
    unknown = sorted(set(options) - _LOOP_OPTIONS)
    if unknown:
        return f"generation options {unknown}"
    if options.get("use_cache", True) is False:
        return "no cache"
    if options.get("do_sample"):
        if any(options.get(k) is None for k in _WARPERS):
            return "sampling without explicit temperature, top_p and top_k (generate would read the model's defaults)"
    elif any(options.get(k) is not None for k in _WARPERS):
        return "temperature/top_p/top_k given without sampling"
    if eos_ids(options.get("eos_token_id")) is None:
        return "no end-of-sequence token"
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        from transformers import GenerationConfig

        default = GenerationConfig()
        fields = _CONFIG_FIELDS + (_SAMPLING_FIELDS if options.get("do_sample") else ())
        changed = [f for f in fields if getattr(gen_config, f, None) != getattr(default, f, None)]
        if changed:
            return f"the model's generation config sets {changed}"
    return None


def eos_ids(eos: int | Sequence[int] | None) -> list[int] | None:
    if eos is None:
        return None
    ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return ids or None


@torch.no_grad()
def greedy_decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    suppress_tokens: Sequence[int] | None = None,
    min_shared_prefix: int = MIN_SHARED_PREFIX,
    detoxifier: Detoxifier | None = None,
    sampling: Mapping[str, float] | None = None,
) -> list[list[int]]:
    """Greedy continuations of the token-id ``prompts`` (one batch), as ``model.generate`` would
    give them one prompt at a time: at most ``max_new_tokens`` ids each, ending at the first
    end-of-sequence id (included). Check :func:`loop_blocker` first.

    ``sampling`` (``temperature``, ``top_k``, ``top_p``): sample instead, as ``generate(do_sample=True,
    ...)`` does: the same warpers after the processors, one ``torch.multinomial`` draw per row and
    step from the global generator (seed it for repeatable samples). Identical prompts of a batch
    (k samples of one prompt) are prefilled once.

    With a ``detoxifier``, each step's scores go through ``detoxifier.step`` after the suppressed
    tokens are masked and before the argmax (the order of ``generate``'s processors, where it would
    be a custom logits processor); ``start`` and ``finish`` bracket the batch (``finish`` also on an
    error). Its hooks, if any, are the caller's to install (``with detoxifier.active(model):``).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_decode needs non-empty prompts")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be positive")
    device = next(model.parameters()).device
    stop = torch.tensor(eos_ids(eos_token_id) or [], dtype=torch.long, device=device)
    suppress = torch.tensor(list(suppress_tokens or []), dtype=torch.long, device=device)

    warpers = sampling_warpers(**sampling) if sampling is not None else None

    def pick(logits: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] -> [rows], as generate's step (processors, then argmax or warpers and a draw)."""
        scores = logits.float()
        if suppress.numel():
            scores = scores.index_fill(-1, suppress, float("-inf"))
        if detoxifier is not None:
            scores = detoxifier.step(scores, fed, rows)
        if warpers is None:
            return scores.argmax(-1)
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)

    batch = SlabBatch(model, prompts, new_tokens=max_new_tokens, min_shared_prefix=min_shared_prefix)
    active = torch.arange(len(prompts), device=device)  # original row of each batch row
    try:
        if detoxifier is not None:
            detoxifier.start(prompts, max_new_tokens=max_new_tokens)
        tokens = pick(batch.prefill(), None, active)
        new: list[list[int]] = [[t] for t in tokens.tolist()]
        done = torch.isin(tokens, stop)
        # decode all rows together from the merged left-padded cache
        for step in range(1, max_new_tokens):
            if bool(done.all()):
                break
            finished = int(done.sum())
            if finished and finished * (max_new_tokens - step) >= len(active):  # the copy pays for itself
                keep = (~done).nonzero().squeeze(1)
                active, tokens, done = active[keep], tokens[keep], done[keep]
                batch.keep(keep)
            fed = tokens
            tokens = pick(batch.advance(fed), fed, active)
            for row, token, stopped in zip(active.tolist(), tokens.tolist(), done.tolist()):
                if not stopped:
                    new[row].append(token)
            done = done | torch.isin(tokens, stop)
    finally:
        if detoxifier is not None:
            detoxifier.finish()
    return new
