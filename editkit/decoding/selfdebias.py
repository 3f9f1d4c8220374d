"""Self-Debiasing (Schick, Udupa & Schütze, TACL 2021: "Self-Diagnosis and Self-Debiasing: A
Proposal for Reducing Corpus-Based Bias in NLP"), a decoding-time peer of the detoxifiers here."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from editkit.generation.detoxifier import Detoxifier, FollowingRun
from editkit.generation.incremental import MIN_SHARED_PREFIX, open_batch

# The self-debiasing inputs of the authors' toxicity experiments (their code's DEBIASING_PREFIXES),
# one per Perspective API attribute, and the keyword variant (DEBIASING_KEYWORDS).
DEBIASING_PREFIXES = (
    "The following text contains rude, disrespectful, or unreasonable language:\n",
    "The following text contains very hateful, aggressive, disrespectful language:\n",
    "The following text contains sexually explicit language:\n",
    "The following text contains a threat:\n",
    "The following text contains negative or hateful language targeting someone because of their identity:\n",
    "The following text contains swear words, curse words, or other obscene or profane language:\n",
)
DEBIASING_KEYWORDS = ("(rude) ", "(sexually explicit) ", "(hateful) ", "(aggressive) ", "(racist) ", "(threat) ",
                      "(violent) ", "(sexist) ")


def self_debias_scores(scores: torch.Tensor, biased: torch.Tensor, *, decay: float,
                       epsilon: float = 0.0) -> torch.Tensor:
    """Self-debiased log-probabilities [rows, vocab] from the generator's ``scores`` [rows, vocab] and
    its logits under each self-debiasing input ``biased`` [prefixes, rows, vocab].

    With p = softmax(scores) and p_y = softmax(biased[y]) (tokens the scores ban, −∞, banned there too):
    Δ(w) = min_y (p(w) − p_y(w)),  α(Δ) = 1 if Δ ≥ 0 else exp(decay · Δ),  floored at ``epsilon``,
    p̃(w) = α(Δ(w)) · p(w) / Σ_v α(Δ(v)) · p(v); returns log p̃ (−∞ where p̃ is 0)."""
    if biased.ndim != 3 or biased.shape[1:] != scores.shape:
        raise ValueError(f"biased logits must be [prefixes, {scores.shape[0]}, {scores.shape[1]}], "
                         f"got {tuple(biased.shape)}")
    banned = ~torch.isfinite(scores)
    log_p = torch.log_softmax(scores.float(), -1)
    p_biased = torch.softmax(biased.float().masked_fill(banned, float("-inf")), -1).amax(0)  # max_y p_y
    delta = log_p.exp() - p_biased  # [rows, vocab] = min_y Δ_y
    log_alpha = (decay * delta).clamp(max=0.0)  # log α(Δ) = λ · min(Δ, 0)
    if epsilon > 0:
        log_alpha = log_alpha.clamp(min=math.log(epsilon))
    steered = log_p + log_alpha
    return steered - torch.logsumexp(steered, -1, keepdim=True)


class SelfDebiasing(Detoxifier):
    """Scale down the tokens whose probability rises when the model is told the text is toxic.

    The paper's rule (§3, Eqs. 2–5). For the prefix x generated so far and a textual description y of
    the unwanted behaviour, sdb(x, y) is x prefixed with a self-debiasing input such as "The following
    text contains rude, disrespectful, or unreasonable language:\\n". With p_M the model's next-token
    distribution::

        Δ(w, x, y) = p_M(w | x) − p_M(w | sdb(x, y))
        α(x) = 1 if x ≥ 0, else e^(λ·x)
        p̃_M(w | x) ∝ α(Δ(w, x, y)) · p_M(w | x)

    and for several descriptions Y, Δ(w, x, Y) = min_{y ∈ Y} Δ(w, x, y) (the largest p_M(w | sdb(x, y))).
    ``decay`` is λ. The paper reports more than one value (its Table 4 examples use λ = 10); 50 is the
    default of the authors' code (github.com/timoschick/self-debiasing), whose runs also floor α at
    ``epsilon`` = 0.01 (a token's probability is divided by at most 100, then renormalised);
    ``epsilon=0`` is the formula as printed. With ``decay=0`` every α is 1 and decoding is the model's
    own. Tokens the generator's processors banned (score −∞) are banned under the prefixes too, as in
    the authors' code, where the self-debiasing inputs go through the same processors.

    ``model`` is the generator itself (``from_options`` passes it): it is run a second time, on each
    prompt with each prefix's tokens in front (after a leading BOS token, if the prompt has one), with
    a key/value cache of its own, fed the same tokens as the generator, dropping the rows the
    generator's batch drops. The scores returned are the log-probabilities log p̃ (renormalised), so
    greedy and sampled decoding both follow p̃. Costs one extra forward per prefix per step.
    """

    label = "selfdebias"

    def __init__(self, model: Any, tokenizer: Any, *, prefixes: Sequence[str] = DEBIASING_PREFIXES,
                 decay: float = 50.0, epsilon: float = 0.01, min_shared_prefix: int = MIN_SHARED_PREFIX) -> None:
        if not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay (λ) must be a finite number ≥ 0, got {decay!r}")
        if not math.isfinite(epsilon) or not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        if isinstance(prefixes, str) or not prefixes:
            raise ValueError("prefixes must be a non-empty sequence of strings")
        if not callable(getattr(model, "forward", None)):
            raise ValueError(f"model must be a causal LM (a module with forward), got {type(model).__name__}")
        self.model, self.prefixes = model, [str(p) for p in prefixes]
        self.prefix_ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.prefixes]
        if any(not ids for ids in self.prefix_ids):
            raise ValueError("every self-debiasing prefix must encode to at least one token")
        self.bos = tokenizer.bos_token_id
        self.decay, self.epsilon, self.min_shared_prefix = float(decay), float(epsilon), min_shared_prefix
        self._run: FollowingRun | None = None  # the debiasing inputs' run: one block of rows per prefix

    @classmethod
    def from_options(cls, model: Any, tokenizer: Any, **options: str) -> SelfDebiasing:
        """From command-line strings: ``decay=`` (λ, default 50), ``epsilon=`` (default 0.01),
        ``prefixes=sentences|keywords`` (the authors' six descriptions, default, or their keywords), or
        ``prefix=TEXT`` for one description of your own (``\\n`` in it is a newline)."""
        unknown = sorted(set(options) - {"decay", "epsilon", "prefixes", "prefix"})
        if unknown or {"prefixes", "prefix"} <= set(options):
            raise ValueError(f"selfdebias takes decay=, epsilon=, and prefixes=sentences|keywords or prefix=TEXT; "
                             f"got {sorted(options)}")
        choice = options.get("prefixes", "sentences").lower()
        if choice not in ("sentences", "keywords"):
            raise ValueError(f"prefixes must be 'sentences' or 'keywords', got {choice!r}")
        prefixes: Sequence[str] = DEBIASING_PREFIXES if choice == "sentences" else DEBIASING_KEYWORDS
        if "prefix" in options:
            prefixes = [options["prefix"].replace("\\n", "\n")]
        return cls(model, tokenizer, prefixes=prefixes, decay=float(options.get("decay", 50.0)),
                   epsilon=float(options.get("epsilon", 0.01)))

    def settings(self) -> dict[str, Any]:
        return {"kind": "selfdebias", "decay": self.decay, "epsilon": self.epsilon, "prefixes": list(self.prefixes)}

    def install(self, model: Any, stack: contextlib.ExitStack) -> None:
        if model is not self.model:  # the debiasing inputs must go through the generator itself
            raise ValueError("this SelfDebiasing was built for another generator model")

    def debiasing_inputs(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """sdb(x, y) for every prefix y (outer) and prompt x (inner): row ``k * len(prompts) + i``."""
        out = []
        for prefix in self.prefix_ids:
            for prompt in prompts:
                head = [prompt[0]] if self.bos is not None and prompt and prompt[0] == self.bos else []
                out.append(head + prefix + list(prompt[len(head):]))
        return out

    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None) -> None:
        self.finish()
        batch = open_batch(self.model, self.debiasing_inputs(prompts), new_tokens=max_new_tokens,
                           min_shared_prefix=self.min_shared_prefix)
        self._run = FollowingRun(batch, batch.prefill(), len(prompts), copies=len(self.prefix_ids))

    @torch.no_grad()
    def step(self, scores: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("SelfDebiasing.step before start (or after finish)")
        biased = self._run.next(fed, rows)  # every prefix's row of each prompt, block by block
        biased = biased.to(scores.device).view(len(self.prefix_ids), len(self._run.rows), -1)
        return self_debias_scores(scores, biased, decay=self.decay, epsilon=self.epsilon)

    def finish(self) -> None:
        self._run = None
