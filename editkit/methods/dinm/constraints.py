"""Benign requests answered by the unedited model: KL pairs that guard the comply-or-refuse decision.

A KL term over a factual knowledge answer watches how the model continues an answer it has already
begun; it barely watches the first answer token of an ordinary request, which is where an edit
towards "I'm sorry, but…" shows up as over-refusal. Pairs made of benign requests and the unedited
model's *own* greedy answers put exactly those positions under the constraint. The requests
(``editkit/data/constraint_requests.json``, written for this project, a third of them harmless but
edgy-sounding) are disjoint from the over-refusal set the SafeEdit benchmark measures on.

The answers depend on the unedited model, the rendered prompt and the answer length, not on the
edited record: given a weights digest, :func:`self_answered_pairs` keeps them per model and on disk
(:mod:`~editkit.methods.dinm.cache`) and generates only the missing ones.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from editkit.generation import generate
from editkit.methods.dinm.cache import DiskStore, ModelCache
from editkit.text import ChatMode, prompt_ids, uses_chat, with_suffix

REQUESTS_FILE = Path(__file__).resolve().parents[2] / "data" / "constraint_requests.json"
ANSWERS_PER_MODEL = 4096  # self-answers kept per model (short strings; the authored set renders to ~90 prompts)

_ANSWERS = ModelCache(ANSWERS_PER_MODEL)  # model -> (digest, tokenizer, prompt ids, length, training) -> answer
_DISK = DiskStore("answers")  # (digest, tokenizer, length, training) -> {digest of prompt ids: answer}


@lru_cache(maxsize=1)
def constraint_requests() -> tuple[str, ...]:
    """The authored benign requests, in file order."""
    records = json.loads(REQUESTS_FILE.read_text(encoding="utf-8"))
    return tuple(r["request"] for r in records)


def pick_requests(key: str, n: int) -> list[str]:
    """``n`` requests, a different contiguous run of the set for each ``key`` (the instance id)."""
    pool = constraint_requests()
    n = min(n, len(pool))
    start = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(n)]


def _ids_digest(ids: tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:32]


def self_answered_pairs(
    model: Any,
    tokenizer: Any,
    requests: list[str],
    *,
    suffix: str | None,
    max_new_tokens: int,
    chat_template: ChatMode = "auto",
    digest: str | None = None,
    disk: bool = True,
) -> list[tuple[str, str]]:
    """(prompt, the model's own greedy answer) for every request, without and (when ``suffix`` is
    given) with the suffix, since a method's edited model is asked both ways. In chat mode an empty
    answer stays (its target is the end-of-turn token: the model's choice to stop at once).

    ``digest``: :func:`~editkit.methods.dinm.cache.weights_digest` of ``model`` as it is now (the
    caller checks :func:`~editkit.methods.dinm.cache.cache_blocker`). Given, answers are kept per
    model under it, the prompt as rendered and the answer length, and only the missing ones are
    generated (in one batch); with ``disk`` they are also read from and added to the disk store.
    None: all are generated and nothing is kept."""
    prompts = list(requests) + ([with_suffix(r, suffix) for r in requests] if suffix else [])
    if digest is None:
        answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts),
                           chat_template=chat_template)
    else:
        speaker = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None),
                   len(tokenizer) if hasattr(tokenizer, "__len__") else None)
        keys = [(digest, speaker, tuple(prompt_ids(tokenizer, p, chat_template)), max_new_tokens, model.training)
                for p in prompts]
        found = [_ANSWERS.get(model, key) for key in keys]
        file_key = [digest, speaker, max_new_tokens, model.training]
        stored: dict[str, str] | None = None
        if disk and any(a is None for a in found):
            stored = _DISK.read_json(file_key)
            stored = stored if isinstance(stored, dict) else {}
            for i, key in enumerate(keys):
                answer = stored.get(_ids_digest(key[2]))
                if found[i] is None and isinstance(answer, str):
                    found[i] = answer
                    _ANSWERS.put(model, key, answer)
        missing = sorted({keys[i]: i for i, a in enumerate(found) if a is None}.values())  # a repeated prompt once
        fresh: dict[tuple, str] = {}
        if missing:
            new = generate(model, tokenizer, [prompts[i] for i in missing], max_new_tokens=max_new_tokens,
                           batch_size=len(missing), chat_template=chat_template)
            for i, answer in zip(missing, new):
                fresh[keys[i]] = answer
                _ANSWERS.put(model, keys[i], answer)
            if stored is not None:
                again = _DISK.read_json(file_key)  # another process may have added answers meanwhile
                merged = {**(again if isinstance(again, dict) else {}), **stored}
                _DISK.write_json(file_key, {**merged, **{_ids_digest(key[2]): a for key, a in fresh.items()}})
        answers = [fresh[key] if a is None else a for key, a in zip(keys, found)]
    keep_empty = uses_chat(tokenizer, chat_template)
    return [(p, a) for p, a in zip(prompts, answers) if keep_empty or a.strip()]
