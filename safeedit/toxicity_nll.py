"""Perplexity of sampled continuations under a reference model, for the toxicity evaluation
(:mod:`safeedit.toxicity`): each continuation's summed token NLL given its prompt, the k
continuations of one prompt scored from one run of the prompt where the decoding loop's cache can
run the model."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["continuation_nll", "perplexity"]


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(total NLL / total tokens); NaN when there is no token."""
    if len(nll_sums) != len(token_counts):
        raise ValueError(f"got {len(nll_sums)} NLL sums but {len(token_counts)} token counts")
    tokens = sum(int(c) for c in token_counts)
    return math.exp(sum(float(s) for s in nll_sums) / tokens) if tokens else float("nan")


@torch.no_grad()
def continuation_nll(
    model: Any, tokenizer: Any, prompt: str, continuations: Sequence[str], *, chat_template: str = "raw",
    batch_size: int = 8, max_length: int = 2048,
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each continuation's tokens after ``prompt``, encoded as
    ``editkit.generate`` encodes a prompt (:func:`editkit.text.prompt_ids`); the prompt loses its
    start when the pair would exceed ``max_length``. An empty continuation gives ``(0.0, 0)``.

    The k continuations of one prompt share it: where the decoding loop's cache runs the model
    (:func:`editkit.generation.incremental.architecture_blocker`), the prompt is run once per batch and
    the continuations are fed token by token from its cache (the LM head only at their positions);
    elsewhere each (prompt, continuation) sequence runs whole."""
    from editkit.generation.incremental import architecture_blocker
    from editkit.text import pad_id, pad_right, prompt_ids

    device = next(model.parameters()).device
    window = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(max_length, window) if window else max_length
    head = prompt_ids(tokenizer, prompt, chat_template)  # type: ignore[arg-type]
    tails = [tokenizer(c, add_special_tokens=False).input_ids[: max_length - 1] if c else [] for c in continuations]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(tails)
    todo = [i for i, t in enumerate(tails) if t]
    longest = max((len(tails[i]) for i in todo), default=0)
    if todo and architecture_blocker(model, min(len(head) + longest, max_length)) is None:
        for start in range(0, len(todo), batch_size):
            batch = todo[start: start + batch_size]
            for i, value in zip(batch, _shared_prompt_nll(model, head, [tails[i] for i in batch], max_length,
                                                          pad_id(tokenizer))):
                out[i] = value
        return out
    for start in range(0, len(todo), batch_size):
        batch = todo[start: start + batch_size]
        seqs = [head[-(max_length - len(tails[i])):] + tails[i] for i in batch]
        ids, mask = pad_right(seqs, pad_id(tokenizer))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(device), reduction="none")
        for row, i in enumerate(batch):  # [seq-1]: the last len(tail) targets are the continuation's
            n, end = len(tails[i]), len(seqs[row]) - 1
            out[i] = (float(nll[row, end - n: end].sum()), n)
    return out


@torch.no_grad()
def _shared_prompt_nll(model: Any, head: list[int], tails: list[list[int]], max_length: int,
                       pad: int) -> list[tuple[float, int]]:
    """(summed NLL, count) of each tail after the same ``head``: the head runs once (its duplicates
    reuse its keys and values), then all tails are fed one position at a time."""
    from editkit.generation.incremental import SlabBatch

    steps = max(len(t) for t in tails)
    head = head[-(max_length - steps):]  # the longest tail decides how much of the prompt fits
    runner = SlabBatch(model, [head] * len(tails), new_tokens=steps)
    logits = runner.prefill()  # [rows, vocab]: the prediction of each tail's first token
    device = logits.device
    lengths = torch.tensor([len(t) for t in tails], device=device)
    total = torch.zeros(len(tails), dtype=torch.float64, device=device)
    for j in range(steps):
        target = torch.tensor([t[j] if j < len(t) else pad for t in tails], device=device)
        nll = F.cross_entropy(logits.float(), target, reduction="none")
        total += torch.where(lengths > j, nll, torch.zeros_like(nll)).double()
        if j + 1 < steps:
            logits = runner.advance(target)
    return [(float(v), len(t)) for v, t in zip(total.tolist(), tails)]
