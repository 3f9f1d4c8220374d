"""Teacher-forced scores: answer NLL and greedy token accuracy of (prompt, answer) pairs, and the
token NLL of plain text (for perplexity). Batched; model unchanged."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from editkit.text import ChatMode, encode_pairs, pad_id, pad_right, with_suffix


@torch.no_grad()
def answer_scores(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    suffix: str | None = None,
    chat_template: ChatMode = "auto",
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[dict[str, float]]:
    """Per pair: mean NLL of the answer tokens given the prompt (⊕ suffix), and the fraction of
    answer tokens that are the model's greedy next token."""
    device = next(model.parameters()).device
    out: list[dict[str, float]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(with_suffix(p, suffix), a) for p, a in pairs[start : start + batch_size]]
        batch = encode_pairs(tokenizer, chunk, chat_template=chat_template, max_length=max_length).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float()  # [batch, seq-1, vocab] predicting tokens 1..
        targets = batch.input_ids[:, 1:]
        mask = batch.target_mask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [batch, seq-1]
        hit = (logits.argmax(-1) == targets).float()
        for row in range(len(chunk)):
            m = mask[row]
            out.append({"nll": float(nll[row][m].mean()), "token_acc": float(hit[row][m].mean())})
    return out


@torch.no_grad()
def text_nll(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 512) -> tuple[float, int]:
    """(summed NLL, token count) of plain texts; perplexity = exp(sum / count)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        seqs = [tokenizer(t, add_special_tokens=True).input_ids[:max_length] for t in texts[start : start + batch_size]]
        ids, mask = pad_right(seqs, pad)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(nll[valid].sum())
        count += int(valid.sum())
    return total, count
