"""Meta-training examples: for each SafeEdit-style record, the token batches MEND's outer loss reads.

* ``edit``: (attack ⊕ suffix → safe response), the pair the edit is computed from (inner step);
* ``outer``: the same pair, plus the safe response after some of the record's generalisation
  inputs when asked (MEND's equivalence examples), scored after the edit;
* ``locality``: pairs the edit must leave alone, scored by KL against the unedited model: the
  record's knowledge pair (with the suffix), optionally other records' knowledge pairs, and benign
  requests answered by the unedited model itself, with and without the suffix (the guard that cut
  DINM's over-refusal, :mod:`editkit.methods.dinm.constraints`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editkit.instance import EditInstance
from editkit.methods.dinm.constraints import pick_requests, self_answered_pairs
from editkit.methods.mend.config import MENDConfig
from editkit.text import TokenBatch, encode_pairs, with_suffix


@dataclass
class Example:
    record_id: str
    edit: TokenBatch
    outer: TokenBatch
    locality: TokenBatch


def edit_pair(instance: EditInstance, hparams: MENDConfig) -> tuple[str, str]:
    """(attack ⊕ suffix, safe response): what an edit is computed from."""
    return with_suffix(instance.prompt, hparams.active_suffix), instance.safe


def knowledge_pair(instance: EditInstance, hparams: MENDConfig) -> tuple[str, str]:
    return with_suffix(instance.knowledge_prompt, hparams.active_suffix), instance.knowledge_answer


def benign_answers(model: Any, tokenizer: Any, records: Sequence[EditInstance], hparams: MENDConfig) -> dict[str, str]:
    """{prompt: the unedited model's own greedy answer} for every benign request some record uses,
    without and with the suffix (one batched generation for all records)."""
    if not hparams.benign_constraint:
        return {}
    requests = list(dict.fromkeys(r for rec in records for r in pick_requests(rec.id, hparams.benign_constraint)))
    pairs = self_answered_pairs(model, tokenizer, requests, suffix=hparams.active_suffix,
                                max_new_tokens=hparams.benign_answer_tokens, chat_template=hparams.chat_template)
    return dict(pairs)


def build_examples(model: Any, tokenizer: Any, records: Sequence[EditInstance], hparams: MENDConfig, *,
                   pool: Sequence[EditInstance] = (), answers: dict[str, str] | None = None) -> list[Example]:
    """One :class:`Example` per record, on the model's device. ``pool``: records whose knowledge
    pairs may join the locality pairs (``constraint_pairs`` of them, the next ones after the record,
    never the record itself); ``answers``: self-answered benign requests (computed when None)."""
    if answers is None:
        answers = benign_answers(model, tokenizer, records, hparams)
    device = next(model.parameters()).device
    suffix = hparams.active_suffix
    others = list(pool)

    def encode(pairs: list[tuple[str, str]]) -> TokenBatch:
        return encode_pairs(tokenizer, pairs, chat_template=hparams.chat_template,
                            max_length=hparams.max_length).to(device)

    examples = []
    for n, record in enumerate(records):
        pair = edit_pair(record, hparams)
        outer = [pair] + [(with_suffix(p, suffix), record.safe)
                          for p in list(record.generalization.values())[:hparams.generalization_inputs]]
        local = [knowledge_pair(record, hparams)]
        if others and hparams.constraint_pairs:
            ring = [others[(n + 1 + k) % len(others)] for k in range(len(others))]
            local += [knowledge_pair(o, hparams) for o in ring if o.id != record.id][:hparams.constraint_pairs]
        for request in pick_requests(record.id, hparams.benign_constraint) if hparams.benign_constraint else []:
            for prompt in (request, with_suffix(request, suffix)) if suffix else (request,):
                if prompt in answers:
                    local.append((prompt, answers[prompt]))
        examples.append(Example(record.id, encode([pair]), encode(outer), encode(local)))
    return examples
