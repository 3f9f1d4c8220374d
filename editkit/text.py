"""Turning prompts and targets into token ids: chat template when the tokenizer has one, exact
prompt/target boundaries, padding on the side each use needs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

# auto: the tokenizer's chat template if it has one; none: plain text, the answer on a new line;
# raw: plain text continued as it stands (RealToxicityPrompts-style continuation prompts)
ChatMode = Literal["auto", "none", "raw"]

def with_suffix(prompt: str, suffix: str | None) -> str:
    return f"{prompt} {suffix}" if suffix else prompt


def uses_chat(tokenizer: Any, mode: ChatMode = "auto") -> bool:
    if mode not in ("auto", "none", "raw"):
        raise ValueError(f"chat_template must be 'auto', 'none' or 'raw', got {mode!r}")
    return mode == "auto" and bool(getattr(tokenizer, "chat_template", None))


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def prompt_ids(tokenizer: Any, user: str, chat_template: ChatMode = "auto") -> list[int]:
    """Token ids of a prompt ready for the answer to follow (chat: up to the assistant header)."""
    return prompts_ids(tokenizer, [user], chat_template)[0]


def prompts_ids(tokenizer: Any, users: Sequence[str], chat_template: ChatMode = "auto") -> list[list[int]]:
    """:func:`prompt_ids` of many prompts, tokenized in one call: in chat mode the template renders
    each prompt to text (up to the assistant header), which is tokenized without added special
    tokens, as ``apply_chat_template(tokenize=True)`` does; otherwise the prompt and a newline
    (``raw``: the prompt as it stands) with the tokenizer's special tokens."""
    if not users:
        return []
    if uses_chat(tokenizer, chat_template):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True,
                                               tokenize=False) for u in users]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    texts = [u if chat_template == "raw" else u + "\n" for u in users]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def target_ids(tokenizer: Any, target: str, chat_template: ChatMode = "auto", append_eos: bool = True) -> list[int]:
    """Token ids of an answer; in chat mode it ends with the end-of-turn token so the model learns to stop."""
    ids = _ids(tokenizer(target, add_special_tokens=False))
    if append_eos and uses_chat(tokenizer, chat_template) and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class TokenBatch:
    """Right-padded sequences with a mask of the positions whose token is a training target."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    target_mask: torch.Tensor  # [batch, seq] bool: token t is a target (predicted from t-1)

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    @property
    def n_targets(self) -> int:
        return int(self.target_mask.sum())

    def predicting_positions(self) -> torch.Tensor:
        """[batch, seq] bool: positions whose next-token logits score a target."""
        mask = torch.zeros_like(self.target_mask)
        mask[:, :-1] = self.target_mask[:, 1:]
        return mask

    def targets(self) -> torch.Tensor:
        """[n_targets] the target token ids, in the order of :meth:`predicting_positions`."""
        return self.input_ids[:, 1:][self.target_mask[:, 1:]]


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    chat_template: ChatMode = "auto",
    max_length: int = 2048,
    max_target_tokens: int | None = None,
) -> TokenBatch:
    """(prompt, target) pairs → a right-padded TokenBatch. Over-long prompts lose their start
    (the end, where the request and suffix are, is kept); targets are capped at half of ``max_length``
    and at ``max_target_tokens`` (their opening tokens kept)."""
    if not pairs:
        raise ValueError("no (prompt, target) pairs to encode")
    rows: list[tuple[list[int], int]] = []
    for prompt, target in pairs:
        p = prompt_ids(tokenizer, prompt, chat_template)
        t = target_ids(tokenizer, target, chat_template)[: max(1, min(max_length // 2, max_target_tokens or max_length))]
        if not t:
            raise ValueError(f"target {target!r} has no tokens")
        p = p[-(max_length - len(t)):]
        rows.append((p + t, len(p)))
    input_ids, attention = pad_right([ids for ids, _ in rows], pad_id(tokenizer))
    target = torch.zeros_like(attention, dtype=torch.bool)
    for i, (ids, start) in enumerate(rows):
        target[i, start : len(ids)] = True
    return TokenBatch(input_ids, attention, target)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its end-of-sequence id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_right(seqs: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (positions stay exact, also for absolute embeddings)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, for batched generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask
