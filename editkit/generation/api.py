"""``editkit.generate``: batched generation with left padding (the way SafeEdit responses are
produced), optionally through a decoding-time detoxifier."""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from editkit.generation.batching import fixed_batches, length_batches
from editkit.generation.detoxifier import Detoxifier
from editkit.generation.greedy_loop import greedy_decode, loop_blocker
from editkit.text import ChatMode, pad_id, pad_left, prompt_ids, with_suffix

log = logging.getLogger(__name__)


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Log once per distinct reason (a long run would otherwise repeat it per batch)."""
    log.warning("editkit.generate: using model.generate on padded batches, not the batched greedy loop: %s", reason)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    suffix: str | None = None,
    chat_template: ChatMode = "auto",
    max_prompt_tokens: int = 2048,
    progress: bool | str = False,
    detoxifier: Detoxifier | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy responses to ``prompts`` (each optionally followed by ``suffix``), in input order.

    Prompts are sorted by length and decoded ``batch_size`` at a time; over-long prompts keep their
    last ``max_prompt_tokens`` tokens. For greedy decoding on a tested architecture each prompt is
    prefilled without padding and the batch decoded from one merged left-padded cache
    (:mod:`editkit.generation.greedy_loop`); otherwise (sampling, other options, other models)
    ``model.generate`` runs on length-bucketed left-padded batches.

    ``progress``: a progress bar over the batches (a string: its label).

    ``detoxifier`` (a :class:`~editkit.generation.detoxifier.Detoxifier`) is active on the model for
    the whole call and adjusts every step's scores: inside the greedy loop (so it costs only its own
    compute), or as a logits processor of ``model.generate`` (after ``generate``'s own processors,
    before its sampling warpers).
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, not one string")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    if detoxifier is not None and (generate_kwargs.get("num_beams") or 1) > 1:
        raise ValueError("a detoxifier cannot follow beam search (beams are reordered between steps)")
    config = getattr(model, "config", None)
    window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if window:  # keep prompt + answer inside the model's position range
        max_prompt_tokens = max(1, min(max_prompt_tokens, window - max_new_tokens))
    encoded = [prompt_ids(tokenizer, with_suffix(p, suffix), chat_template)[-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    options = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    if not generate_kwargs.get("do_sample", False):
        options.update(temperature=None, top_p=None, top_k=None)
    options.update(generate_kwargs)
    out: list[str] = [""] * len(encoded)
    if not encoded:
        return out
    label = progress if isinstance(progress, str) else "generate"  # the progress bar's label
    blocker = loop_blocker(model, options, max(len(e) for e in encoded) + max_new_tokens)
    if blocker is None and not all(encoded):
        blocker = "an empty prompt"
    if blocker is None and detoxifier is not None and not detoxifier.runs_in_greedy_loop:
        blocker = f"{type(detoxifier).__name__} needs every row in every forward"
    sampling = ({k: options[k] for k in ("temperature", "top_k", "top_p")}
                if blocker is None and options.get("do_sample") else None)
    with detoxifier.active(model) if detoxifier is not None else contextlib.nullcontext():
        if blocker is None:
            for batch in tqdm(fixed_batches(order, batch_size), desc=label, disable=not progress, leave=False):
                new = greedy_decode(model, [encoded[i] for i in batch], max_new_tokens=max_new_tokens,
                                    eos_token_id=options["eos_token_id"], suppress_tokens=options.get("suppress_tokens"),
                                    detoxifier=detoxifier, sampling=sampling)
                for i, ids in zip(batch, new):
                    out[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            return out
        _warn_fallback(blocker)
        batches = length_batches([len(encoded[i]) for i in order], batch_size)
        batches = [[order[j] for j in batch] for batch in batches]
        for batch in tqdm(batches, desc=label, disable=not progress, leave=False):
            ids, mask = pad_left([encoded[i] for i in batch], pad)
            call = dict(options)
            if detoxifier is not None:
                from transformers import LogitsProcessorList

                processor = detoxifier.as_logits_processor(mask, max_new_tokens=max_new_tokens)
                call["logits_processor"] = LogitsProcessorList([*(options.get("logits_processor") or []), processor])
            try:
                result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **call)
            finally:
                if detoxifier is not None:
                    detoxifier.finish()
            new = result[:, ids.shape[1]:]
            for row, i in enumerate(batch):
                out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    return out
