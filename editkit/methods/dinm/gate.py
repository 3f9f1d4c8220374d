"""Harmfulness gate for the DINM delta: the edited projection computes W·k + g(k)·Δ·k with
g(k) = sigmoid(w·k + b), a logistic probe on the projection's own input k.

Why: a delta confined to the null space of benign keys acts on an input through that input's key
energy inside the null space, and on SmolLM2 the bare harmful question has the same share there as
a benign request (``scripts/null_space_share.py``): no null space tells them apart, so defense on
the bare question and over-refusal move together. A linear probe on the key of the prompt's last
token does tell them apart. The gate reads every token's key and keeps no state across decoding
steps, so it must stay shut on every token of benign text, not only where the answer is decided:
its positives are the last-token keys of harmful prompts (other records' attack prompts and bare
questions, with ``harm_gate_test_inputs`` their test inputs too), its negatives the keys at every
token of benign sequences (the authored constraint and gate requests, other records' knowledge
prompts with their answers; ``harm_gate_answers``: the requests with the unedited model's answers),
each prompt without and with the suffix (:func:`fit_gate`); ``harm_gate_opening`` makes the tokens
every prompt opens with a group of their own, so the gate is shut where all inputs are alike. The
patch carries the gate (:class:`editkit.patch.Patch` ``gates``); no plain checkpoint can hold it.

The harmful examples come from the caller's ``constraint_pool`` (records other than the edited
one); texts that are or contain the edited record's question, prompt or test inputs are left out,
so an edit is never gated by a probe that saw what it is scored on. The keys depend on the weights
up to the edited layer and on the token ids; they are kept per sequence in memory and on disk, so
the edits of one run compute each sequence's keys once.
"""
from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap
from editkit.instance import EditInstance
from editkit.methods.dinm.cache import DiskStore, ModelCache, cache_blocker, weights_digest
from editkit.methods.dinm.constraints import constraint_requests, self_answered_pairs
from editkit.methods.dinm.nullspace import collect_keys, render
from editkit.text import ChatMode, pad_id, prompts_ids, target_ids, with_suffix

log = logging.getLogger(__name__)

GATE_REQUESTS_FILE = Path(__file__).resolve().parents[2] / "data" / "gate_requests.json"
_KEYS = ModelCache(1 << 15)  # model -> (layer, weights digest, last only, ids digest) -> keys
MAX_NEGATIVES = 6000  # benign token keys a probe is fitted on (a fixed draw beyond that)
_DISK = DiskStore("gatekeys")


@dataclass(frozen=True)
class Gate:
    """g(k) = sigmoid(k·weight + bias) for keys k [..., d_in]; ``accuracy`` on the fitting texts."""

    weight: torch.Tensor  # [d_in] fp32
    bias: torch.Tensor  # [] fp32
    n_harmful: int  # harmful prompts (each variant counted)
    n_benign: int  # benign sequences (each variant counted), each of whose tokens is a negative
    accuracy: float

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(keys.float() @ self.weight.to(keys.device) + self.bias.to(keys.device))

    def shifted(self, margin: float) -> Gate:
        """sigmoid(k·weight + bias - margin): open only where the probe's logit clears ``margin``."""
        return replace(self, bias=self.bias - margin)

    def sharpened(self, s: float) -> Gate:
        """sigmoid(s·(k·weight + bias)): the same decision, shut and open harder for s > 1."""
        return replace(self, weight=s * self.weight, bias=s * self.bias)


@lru_cache(maxsize=4)
def gate_requests(figurative: bool = False, everyday: bool = False) -> tuple[str, ...]:
    """More authored benign requests, many edgy-sounding (kill it at a recital, a murder-mystery
    plot, fireworks' colours), for the gate's negatives only: their intents are none of those of
    the constraint requests, of SafeEdit's benign requests (tuning or reporting part) or of its check
    requests. ``figurative``: also the requests of kind "figurative" (added 2026-12-07), everyday
    requests in violent or edgy words, mostly figures of speech (kill the frizz, explode a CAD block,
    pull the trigger on a flat): the kind of request a probe trained on literal harm alone reads as
    harmful. ``everyday``: also those of kind "everyday" (added 2026-12-07, later), everyday asks of
    new intents, half of them in edgy words (bluff at poker, kill the compost smell, split firewood),
    written beside SafeEdit's check requests (:func:`safeedit.metrics.load_check_requests`) to be
    judged on them."""
    kinds = {"plain", "edgy"} | ({"figurative"} if figurative else set()) | ({"everyday"} if everyday else set())
    requests = json.loads(GATE_REQUESTS_FILE.read_text(encoding="utf-8"))
    return tuple(r["request"] for r in requests if r["kind"] in kinds)


def normal_text(text: str) -> str:
    """``text`` with whitespace runs collapsed and case folded: how texts are compared for leaks."""
    return " ".join(text.split()).casefold()


def gate_texts(instance: EditInstance, pool: Sequence[EditInstance], *, test_inputs: bool = False,
               figurative: bool = False, everyday: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """(harmful prompts, benign (prompt, answer) pairs) for the probe of ``instance``'s edit, before
    the suffix is added.

    Harmful: the attack prompt and bare question of every other record of ``pool`` (``test_inputs``:
    and that record's generalization inputs too, more attack wrappers around more questions).
    Benign: the authored constraint requests and gate requests (answer ""; ``figurative``,
    ``everyday``: with those kinds, see :func:`gate_requests`) and the knowledge pairs of those records. Left out:
    the edited record (by id) and any text that is, or contains, its question, its prompt or one of
    its generalization inputs (SafeEdit records share questions, and test inputs quote other
    questions).
    """
    own = [normal_text(t) for t in (instance.question, instance.prompt, *instance.generalization.values()) if t.strip()]
    question = normal_text(instance.question) if instance.question.strip() else None

    def leaks(text: str) -> bool:
        t = normal_text(text)
        return t in own or (question is not None and question in t) or any(t in o for o in own)

    others = [o for o in pool if o.id != instance.id]
    harmful = [t for o in others for t in (o.prompt, o.question, *(o.generalization.values() if test_inputs else ()))
               if t.strip() and not leaks(t)]
    benign = [*((r, "") for r in (*constraint_requests(), *gate_requests(figurative, everyday))),
              *((o.knowledge_prompt, o.knowledge_answer) for o in others if o.knowledge_prompt.strip())]
    return list(dict.fromkeys(harmful)), list(dict.fromkeys(b for b in benign if not leaks(b[0])))


def sequence_ids(tokenizer: Any, prompt: str, answer: str, *, chat_template: ChatMode, max_length: int) -> list[int]:
    """Token ids of ``prompt`` rendered as the edit renders it, followed by ``answer``'s (if any)."""
    return _sequences(tokenizer, [(prompt, answer)], chat_template=chat_template, max_length=max_length)[0][0]


def _sequences(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, chat_template: ChatMode,
               max_length: int) -> tuple[list[list[int]], list[int]]:
    """(:func:`sequence_ids` of each pair, the position of its prompt's last token in them)."""
    sequences, ends = [], []
    for ids, (_, answer) in zip(prompts_ids(tokenizer, [p for p, _ in pairs], chat_template), pairs):
        end = len(ids)
        ids = ids + (target_ids(tokenizer, answer, chat_template) if answer else [])
        sequences.append(ids[-max_length:])
        ends.append(max(end - 1 - max(len(ids) - max_length, 0), 0))
    return sequences, ends


def _new_positions(sequences: Sequence[list[int]], skip: Sequence[int]) -> list[list[int]]:
    """Per sequence, the positions (but ``skip``'s) whose token prefix no earlier position had: a
    causal model gives equal prefixes equal keys (the chat template's opening, a prompt asked
    without and with the suffix), and a key seen once is kept once."""
    seen: set[int] = set()
    kept = []
    for ids, end in zip(sequences, skip):
        prefix, own = 0, []
        for t, token in enumerate(ids):
            prefix = hash((prefix, token))
            if prefix not in seen:
                seen.add(prefix)
                if t != end:
                    own.append(t)
        kept.append(own)
    return kept


@torch.no_grad()
def sequence_keys(model: nn.Module, tokenizer: Any, arch: ArchMap, layer: int, sequences: Sequence[list[int]], *,
                  last_only: bool, disk: bool = True) -> list[torch.Tensor]:
    """Per token sequence, the inputs of ``layer``'s MLP output projection: at its last token [d_in]
    (``last_only``) or at every token [len, d_in], fp32 on the CPU, from the caches where they have
    them (keyed per sequence under the weights up to ``layer``)."""
    blocker = cache_blocker(model)
    digest = None if blocker is not None else weights_digest(model, arch, layer)
    keys: list[torch.Tensor | None] = [None] * len(sequences)
    names = [(layer, digest, bool(last_only), hashlib.sha256(json.dumps(list(i)).encode()).hexdigest())
             for i in sequences]
    if digest is not None:
        for n, name in enumerate(names):
            keys[n] = _KEYS.get(model, name)
            if keys[n] is None and disk:
                found = _DISK.read_tensors(list(name))
                if found is not None and "keys" in found[0]:
                    keys[n] = found[0]["keys"].float()
                    _KEYS.put(model, name, keys[n])
    missing = [n for n, k in enumerate(keys) if k is None]
    if missing:
        computed = collect_keys(model, arch, layer, [sequences[n] for n in missing], pad_id(tokenizer),
                                last_only=last_only)
        for n, key in zip(missing, computed):
            keys[n] = key.cpu()
            if digest is not None:
                _KEYS.put(model, names[n], keys[n])
                if disk:
                    _DISK.write_tensors(list(names[n]), {"keys": keys[n]}, {})
    return keys  # type: ignore[return-value]


def last_keys(model: nn.Module, tokenizer: Any, arch: ArchMap, layer: int, prompts: Sequence[str], *,
              chat_template: ChatMode, max_length: int, disk: bool = True) -> torch.Tensor:
    """[len(prompts), d_in] fp32: each prompt's last-token key (prompts rendered as the edit does)."""
    ids = render(tokenizer, prompts, chat_template=chat_template, max_length=max_length)
    return torch.stack(sequence_keys(model, tokenizer, arch, layer, ids, last_only=True, disk=disk))


def shared_opening(sequences: Sequence[Sequence[int]]) -> int:
    """How many tokens every sequence opens with (the chat template's system turn and the user
    turn's header, when the prompts are rendered with one): the same ids at the same positions, so
    under a causal model the same keys in every prompt."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for t in range(n):
        if any(s[t] != first[t] for s in sequences):
            return t
    return n


def _self_answers(model: nn.Module, tokenizer: Any, requests: Sequence[str], *, suffix: str | None,
                  chat_template: ChatMode, max_new_tokens: int, disk: bool, chunk: int = 32) -> dict[str, str]:
    """{prompt: the unedited model's greedy answer} for ``requests`` without and with ``suffix``,
    from :func:`self_answered_pairs` (kept per model and on disk), ``chunk`` requests per call so no
    generation batch grows with the request set."""
    digest = None if cache_blocker(model) is not None else weights_digest(model)
    return {p: a for start in range(0, len(requests), chunk)
            for p, a in self_answered_pairs(model, tokenizer, list(requests[start:start + chunk]), suffix=suffix,
                                            max_new_tokens=max_new_tokens, chat_template=chat_template,
                                            digest=digest, disk=disk)}


def fit_gate(model: nn.Module, tokenizer: Any, arch: ArchMap, layer: int, harmful: Sequence[str],
             benign: Sequence[tuple[str, str]], *, suffix: str | None, chat_template: ChatMode, max_length: int,
             c: float = 0.1, max_negatives: int = MAX_NEGATIVES, opening: bool = False, answers: int = 0,
             disk: bool = True) -> Gate:
    """A logistic probe, harmful (1) vs benign (0): the positives are the last-token keys of the
    ``harmful`` prompts, the negatives the keys at *every* token of the ``benign`` (prompt, answer)
    sequences (prompt and answer), each prompt without and (``suffix`` given) with the suffix. The
    gate reads every token's key, so it must stay shut on every token of benign text, not only on
    the prompt's last one. Three groups weigh the same: the positives, the benign prompts' last
    tokens, and every other benign token (a token prefix seen before, e.g. the chat template's
    shared opening, once; at most ``max_negatives`` of them, a fixed draw). Features standardised
    (fp32: the fit is a chain of matrix-vector products over the keys), L2 strength 1/``c``; the
    standardisation is folded into the weights. ``accuracy`` is the weighted one.

    ``opening``: the tokens every prompt opens with (:func:`shared_opening`) are a fourth group of
    negatives, weighing as much as each of the others, instead of one key each among the other
    tokens. Their keys are the same in every prompt, harmful or benign, so a gate open there adds
    the delta to every input alike; on SmolLM2 the probe fitted without them opened (0.95, layer 13)
    on the newline that ends the user turn's header, a token much like the last one of a prompt
    (the newline after the assistant's header) that harmful prompts end on.

    ``answers``: a benign prompt given without an answer (the authored requests) is followed by the
    unedited model's greedy answer of at most this many tokens (the guard's self-answers,
    :func:`~editkit.methods.dinm.constraints.self_answered_pairs`, kept per model and on disk), whose
    tokens join the other negatives: the gate reads every token the model writes, and on SmolLM2 it
    opened on some tokens of plain answers (an explanation of climate) fitted without them."""
    import numpy as np

    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError("harm_gate fits its probe with scikit-learn: pip install 'editkit[train]' "
                          "(or scikit-learn)") from err

    if not harmful or not benign:
        raise ValueError(f"the harmfulness gate needs harmful and benign examples; got {len(harmful)} harmful "
                         f"and {len(benign)} benign texts (pass other records as constraint_pool)")
    variants = [None, suffix] if suffix else [None]
    positives = last_keys(model, tokenizer, arch, layer, [with_suffix(t, s) for s in variants for t in harmful],
                          chat_template=chat_template, max_length=max_length, disk=disk)
    prompts = [with_suffix(p, s) for s in variants for p, _ in benign]
    replies = [a for _ in variants for _, a in benign]
    if answers:
        own = _self_answers(model, tokenizer, [p for p, a in benign if not a], suffix=suffix,
                            chat_template=chat_template, max_new_tokens=answers, disk=disk)
        replies = [a or own.get(p, "") for p, a in zip(prompts, replies)]
    sequences, ends = _sequences(tokenizer, list(zip(prompts, replies)), chat_template=chat_template,
                                 max_length=max_length)
    every = sequence_keys(model, tokenizer, arch, layer, sequences, last_only=False, disk=disk)
    # the prompt's last token (where the answer is decided) and the other tokens, as two groups
    last = torch.stack([k[e] for k, e in zip(every, ends)])
    kept = _new_positions(sequences, ends)
    shared = shared_opening(sequences) if opening else 0
    if shared:  # the opening's keys once each (the first sequence's), apart from the other tokens
        head = every[0][:shared]
        kept[0] = [t for t in kept[0] if t >= shared]
    rest = torch.cat([k[keep] for k, keep in zip(every, kept)])
    if len(rest) > max_negatives:
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:max_negatives]]
    groups = [positives, last, *([head] if shared else []), rest]
    x = torch.cat(groups).float().numpy()
    y = np.r_[np.ones(len(positives)), np.zeros(len(x) - len(positives))]
    # each group weighs the same in the loss: harmful prompts' last tokens, benign prompts' last
    # tokens, (opening: the shared opening's tokens,) every other benign token
    w = np.concatenate([np.full(len(g), 1 / len(g)) for g in groups]) * len(x) / len(groups)
    z, mean, scale = _standardised(x)
    probe = LogisticRegression(C=c, max_iter=5000).fit(z, y, sample_weight=w)
    weight = probe.coef_[0].astype(np.float64) / scale
    bias = float(probe.intercept_[0]) - float(weight @ mean)
    accuracy = float(probe.score(z, y, sample_weight=w))
    return Gate(torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32),
                len(positives), len(sequences), accuracy)


def _standardised(x: Any) -> tuple[Any, Any, Any]:
    """(z, mean, scale): ``x`` [n, d] standardised as sklearn's StandardScaler does (fp64 mean and
    population std, near-constant features left unscaled, ``x``'s dtype kept), in one pass: on the
    gate's keys the scaler's incremental fit took as long as the probe's."""
    import numpy as np

    mean = x.mean(0, dtype=np.float64)
    std = np.sqrt(x.var(0, dtype=np.float64))
    scale = np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
    z = x.copy()
    z -= mean
    z /= scale
    return z, mean, scale


def layer_gate(model: nn.Module, tokenizer: Any, arch: ArchMap, layer: int, instance: EditInstance,
               pool: Sequence[EditInstance], *, suffix: str | None, chat_template: ChatMode, max_length: int,
               c: float, test_inputs: bool = False, figurative: bool = False, everyday: bool = False,
               opening: bool = False, answers: int = 0, disk: bool = True) -> Gate:
    """The gate of ``instance``'s edit at ``layer``, fitted on ``pool`` (see :func:`gate_texts`)."""
    harmful, benign = gate_texts(instance, pool, test_inputs=test_inputs, figurative=figurative, everyday=everyday)
    log.info("fitting the harmfulness gate of layer %d on %d harmful prompts and %d benign texts", layer,
             len(harmful), len(benign))
    return fit_gate(model, tokenizer, arch, layer, harmful, benign, suffix=suffix, chat_template=chat_template,
                    max_length=max_length, c=c, opening=opening, answers=answers, disk=disk)
