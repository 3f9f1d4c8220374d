"""FGDILP's instance-level prefixes: self-generation, self-diagnosis and the choice of the positive
and negative continuations (Yi et al., 2024, "Fine-Grained Detoxification via Instance-Level
Prefixes for Large Language Models", §3.1).

For one prompt the model samples ``k`` continuations of it (:func:`self_generate`), then judges each
for six toxicity attributes by comparing P(" Yes") with P(" No") after a question about the text
(:func:`diagnose`). The most toxic continuation per attribute becomes a negative example (up to six,
duplicates merged) and the least toxic one (by the ``toxicity`` attribute) the positive example
(:func:`choose_examples`). A prefix is the example followed by an instruction (toxic for the
negatives, kind for the positive); the prefixed sequence is the prefix followed by the prompt's own
token ids (:func:`prefixed`). The questions and instructions below are ours, in the spirit of the
paper's (which take the attribute descriptions of Self-Diagnosis, Schick et al., 2021).
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editkit.generation.seeding import seeded
from editkit.text import pad_right

# attribute -> what the diagnosis question asks the text to contain
ATTRIBUTES: dict[str, str] = {
    "toxicity": "rude, disrespectful or unreasonable language",
    "severe_toxicity": "very hateful, aggressive or disrespectful language",
    "sexually_explicit": "sexually explicit language",
    "threat": "a threat against someone",
    "profanity": "swear words, curse words or other obscene or profane words",
    "identity_attack": "negative or hateful language aimed at someone because of their identity",
}
QUESTION = 'Text: "{text}"\nQuestion: Does the text above contain {description}?\nAnswer:'
ANSWERS = (" Yes", " No")
NEGATIVE_INSTRUCTION = ("The text above is an example. The following text is just as rude, hateful, obscene, "
                        "aggressive and toxic:")
POSITIVE_INSTRUCTION = ("The text above is an example. The following text is just as kind, polite, respectful, "
                        "positive and supportive:")


@dataclass
class InstancePrefixes:
    """One prompt's self-generated continuations, their diagnosis and the prefixes built from them."""

    continuations: list[str]
    scores: torch.Tensor  # [k, n_attributes] P(Yes) / (P(Yes) + P(No))
    positive: int  # index of the positive example among the continuations
    negatives: list[int]  # indices of the negative examples (one per attribute, duplicates merged)
    positive_prefix: list[int]  # token ids: example, kind instruction
    negative_prefixes: list[list[int]]  # token ids: example, toxic instruction (one per negative)


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids") else encoded)


# --------------------------------------------------------------------------- self-diagnosis


@torch.no_grad()
def diagnose(model: Any, tokenizer: Any, texts: Sequence[str], attributes: Mapping[str, str] | None = None, *,
             answers: tuple[str, str] = ANSWERS, batch_size: int = 32) -> torch.Tensor:
    """[len(texts), len(attributes)] float32: for each text and attribute, P(yes) / (P(yes) + P(no))
    where P(answer) is the model's probability of the whole answer string after the question
    :data:`QUESTION` about the text (its white space collapsed to single spaces; each answer's tokens
    teacher-forced; a token prefix both answers share cancels).

    ``attributes``: {name: description} (default :data:`ATTRIBUTES`, six of them). Deterministic: no
    sampling, the model as it is (call ``model.eval()`` for dropout-free scores)."""
    attributes = ATTRIBUTES if attributes is None else attributes
    if not attributes:
        raise ValueError("diagnose needs at least one attribute")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    yes, no = (_ids(tokenizer(a, add_special_tokens=False)) for a in answers)
    shared = 0
    while shared < min(len(yes), len(no)) and yes[shared] == no[shared]:
        shared += 1
    yes, no, common = yes[shared:], no[shared:], yes[:shared]
    if not yes or not no:
        raise ValueError(f"the answers {answers!r} must differ in more than a token prefix")
    questions = [_ids(tokenizer(QUESTION.format(text=" ".join(t.split()), description=d), add_special_tokens=True))
                 + common for t in texts for d in attributes.values()]
    if not questions:
        return torch.zeros((0, len(attributes)))
    scores = _answer_logprobs(model, questions, [yes, no], batch_size)  # [n_questions, 2]
    return torch.sigmoid(scores[:, 0] - scores[:, 1]).view(len(texts), len(attributes))


def _answer_logprobs(model: Any, questions: list[list[int]], answers: list[list[int]], batch_size: int) -> torch.Tensor:
    """[len(questions), len(answers)] log P(answer tokens | question), in right-padded batches; only
    the positions that predict an answer token go through the LM head (``logits_to_keep``)."""
    device = next(model.parameters()).device
    single = all(len(a) == 1 for a in answers)  # the usual case: one forward per question suffices
    pairs = [(q, []) for q in questions] if single else [(q, a) for q in questions for a in answers]
    keeps = _keeps_positions(model)
    out: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask = pad_right([q + a for q, a in chunk], 0)
        # per row, the positions whose next-token logits score the answer (the question's last, ...)
        wanted = [list(range(len(q) - 1, len(q) - 1 + max(1, len(a)))) for q, a in chunk]
        width = max(len(w) for w in wanted)
        index = torch.tensor([w + [w[-1]] * (width - len(w)) for w in wanted], device=device)  # [rows, width]
        ids, mask = ids.to(device), mask.to(device)
        if keeps:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=index).logits
        else:
            logits = torch.take_along_dim(model(input_ids=ids, attention_mask=mask).logits, index[..., None], dim=1)
        logprobs = logits.float().log_softmax(-1)  # [rows, width, vocab]
        if single:
            out.append(logprobs[:, 0, [a[0] for a in answers]])
            continue
        for row, (_, a) in enumerate(chunk):
            out.append(logprobs[row, torch.arange(len(a), device=device), torch.tensor(a, device=device)].sum().view(1))
    return torch.cat(out).view(len(questions), len(answers)).cpu()


def _keeps_positions(model: Any) -> bool:
    """Whether ``model.forward`` takes per-row positions as ``logits_to_keep`` (transformers' 2-D form)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (the 2-D form's helper)
    except ImportError:
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


# --------------------------------------------------------------------------- self-generation


def prompt_text(tokenizer: Any, prompt: Sequence[int]) -> str:
    """The text of token-id ``prompt`` as ``editkit.generate(..., chat_template="raw")`` re-encodes it:
    special tokens kept as text, a leading BOS left out when the tokenizer adds one itself."""
    ids = list(prompt)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] == [bos] and _ids(tokenizer("a", add_special_tokens=True))[:1] == [bos]:
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prompt_seed(seed: int, prompt: Sequence[int]) -> int:
    """The seed of one prompt's self-generation: from the run seed and the prompt's token ids, so it
    does not depend on the prompt's position in the batch or on the prompts before it."""
    digest = hashlib.sha256(f"{seed}\0{','.join(map(str, prompt))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def self_generate(model: Any, tokenizer: Any, prompt: Sequence[int], *, k: int, max_new_tokens: int,
                  top_p: float = 0.9, seed: int = 0) -> list[str]:
    """``k`` sampled continuations (nucleus sampling at ``top_p``) of token-id ``prompt``, through
    ``editkit.generate``; the same for the same ``seed`` and prompt, and the caller's RNG untouched."""
    import editkit

    text = prompt_text(tokenizer, prompt)
    with seeded(prompt_seed(seed, prompt), next(model.parameters()).device):
        return editkit.generate(model, tokenizer, [text] * k, max_new_tokens=max_new_tokens, batch_size=k,
                                chat_template="raw", do_sample=True, top_p=top_p, top_k=0, temperature=1.0)


# --------------------------------------------------------------------------- the prefixes


def choose_examples(scores: torch.Tensor) -> tuple[int, list[int]]:
    """(positive, negatives) from a [k, n_attributes] diagnosis whose column 0 is ``toxicity``: the
    positive is the continuation least toxic by column 0; the negatives are, per attribute, the most
    likely continuation, in attribute order, each continuation once (first occurrence kept)."""
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [k >= 1, n_attributes >= 1], got {tuple(scores.shape)}")
    positive = int(scores[:, 0].argmin())
    negatives: list[int] = []
    for column in scores.t():
        best = int(column.argmax())
        if best not in negatives:
            negatives.append(best)
    return positive, negatives


def prefix_ids(tokenizer: Any, example: str, instruction: str) -> list[int]:
    """Token ids of ``example``, a new line, ``instruction`` and a new line (the prompt follows)."""
    return _ids(tokenizer(f"{example}\n{instruction}\n", add_special_tokens=False))


def prefixed(prefix: Sequence[int], prompt: Sequence[int], bos_token_id: int | None) -> list[int]:
    """``prefix`` put before ``prompt``: after the prompt's BOS token when it starts with one."""
    if bos_token_id is not None and list(prompt[:1]) == [bos_token_id]:
        return [bos_token_id, *prefix, *prompt[1:]]
    return [*prefix, *prompt]


def build_prefixes(model: Any, tokenizer: Any, prompt: Sequence[int], *, k: int, max_new_tokens: int,
                   top_p: float = 0.9, seed: int = 0, attributes: Mapping[str, str] | None = None,
                   batch_size: int = 32) -> InstancePrefixes:
    """Self-generate, self-diagnose and choose: one prompt's :class:`InstancePrefixes`."""
    attributes = ATTRIBUTES if attributes is None else attributes
    if next(iter(attributes), None) != "toxicity":
        raise ValueError("the first attribute must be 'toxicity' (it chooses the positive example)")
    texts = self_generate(model, tokenizer, prompt, k=k, max_new_tokens=max_new_tokens, top_p=top_p, seed=seed)
    scores = diagnose(model, tokenizer, texts, attributes, batch_size=batch_size)
    positive, negatives = choose_examples(scores)
    return InstancePrefixes(
        continuations=texts, scores=scores, positive=positive, negatives=negatives,
        positive_prefix=prefix_ids(tokenizer, texts[positive], POSITIVE_INSTRUCTION),
        negative_prefixes=[prefix_ids(tokenizer, texts[j], NEGATIVE_INSTRUCTION) for j in negatives],
    )
