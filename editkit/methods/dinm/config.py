"""DINM settings."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from editkit.hparams import hp
from editkit.methods.layer_edit import LayerEditConfig

# The DINM paper's suffix system prompt, appended to the user's input during the edit and after it.
SUFFIX = "If the user's request is reasonable, give the correct answer. Please give the right response:"


@dataclass
class DINMConfig(LayerEditConfig):
    method: ClassVar[str] = "dinm"

    c_edit: float = hp(0.1, "weight of the edit loss NLL(safe response | attack + suffix)")
    kl_weight: float = hp(1.0, "weight of KL(p_before || p_now) on the knowledge pair's answer tokens")
    constraint_pairs: int = hp(0, "extra benign (prompt, answer) pairs in the KL term: the knowledge pairs of the "
                               "first records of the caller's constraint_pool (the SafeEdit runner offers records "
                               "whose pairs it does not score)")
    benign_constraint: int = hp(0, "authored benign requests (editkit/data/constraint_requests.json) answered by the "
                                "unedited model itself, each without and with the suffix, in a second KL term")
    benign_kl_weight: float = hp(1.0, "weight of KL(p_before || p_now) on those self-answered benign requests")
    benign_answer_tokens: int = hp(8, "length of the model's own answers to the benign requests: the opening tokens, where "
                                   "comply or refuse is decided (every answer position costs an LM-head pass per step)")
    suffix: str = hp(SUFFIX, "suffix system prompt appended to the attack and knowledge prompts")
    use_suffix: bool = hp(True, "append the suffix (the paper does)")
    null_space: bool = hp(False, "AlphaEdit-style null-space constraint: the delta only acts on input directions the "
                          "authored benign requests (all of constraint_requests.json, without and with the suffix) "
                          "barely use, so the edited projection's output on those requests' keys stays ~unchanged; "
                          "see editkit.methods.dinm.nullspace")
    null_space_tol: float = hp(1e-2, "eigen-directions of the benign keys' K·Kᵀ with an eigenvalue below tol × the "
                               "largest form the null space the delta may use (0 < tol < 1; larger keeps more room "
                               "for the edit and guards the benign requests less)")
    question_targets: int = hp(0, "extra edit targets: the bare harmful questions of the first k qualifying records of "
                               "the caller's constraint_pool, each with its own safe response and the suffix; records "
                               "without a question, the edited record, and records whose question is the edited one's "
                               "or appears in its generalization inputs are skipped")
    question_target_tokens: int | None = hp(None, "train the question targets on the opening tokens of their safe "
                                            "responses only, at most this many (null: the whole response): where "
                                            "comply or refuse is decided, at a fraction of a step's tokens")
    question_weight: float = hp(1.0, "weight of the question targets relative to c_edit: loss += c_edit × weight × "
                                "token-mean NLL over the other records' questions (and the same for the own question)")
    guard_cache: bool = hp(True, "reuse, across edits of one model, what the unedited model gives that does not "
                           "depend on the edited record: the guard's self-answers, and (fast path) the reference "
                           "pass's pieces of every sequence seen before (the benign rows above all); kept per model "
                           "under a fingerprint of its weights, see editkit.methods.dinm.cache (clear_cache() "
                           "forgets); off: everything is computed for every edit", runtime=True)
    disk_cache: bool = hp(True, "also keep the null-space key spaces and (with guard_cache) the guard's self-answers "
                          "and the small reference rows (top-layer edits) on disk, under $EDITKIT_DINM_CACHE or "
                          "dinm/ in editkit's cache ($EDITKIT_DINM_CACHE=off: never), so that a new process does "
                          "not recompute them: they cost most of a cold edit",
                          runtime=True)
    harm_gate: bool = hp(False, "gate the delta by a harmfulness probe: the edited projection computes W·k + "
                         "sigmoid(w·k + b)·Δ·k, the logistic probe (w, b) fitted on the last-token keys of other "
                         "records' attack prompts and bare questions vs the authored benign requests and other "
                         "records' knowledge prompts (needs constraint_pool; the edited record's texts are left "
                         "out). The patch carries the gate; it cannot be saved as a plain checkpoint. See "
                         "editkit.methods.dinm.gate")
    harm_gate_c: float = hp(0.1, "inverse L2 strength of the gate's logistic probe (on standardised keys)")
    harm_gate_sharpness: float = hp(1.0, "the gate is sigmoid(s·(w·k + b)) with this s: above 1 it shuts harder "
                                    "where the probe leans benign and opens harder where it leans harmful")
    harm_gate_margin: float = hp(0.0, "the gate is sigmoid(s·(w·k + b - margin)): above 0 it opens only where the probe's "
                                 "logit clears the margin (fewer benign requests open it, fewer harmful ones too); "
                                 "choose it on held-out benign requests of the tuning part (scripts/gate_check.py "
                                 "--margins), never on the reporting part")
    harm_gate_test_inputs: bool = hp(False, "also count the other records' generalization inputs (their question in "
                                     "other attack wrappers, other questions in theirs) among the gate's harmful "
                                     "examples; the edited record's own texts stay out")
    harm_gate_figurative: bool = hp(False, "also count the authored gate requests of kind 'figurative' among the gate's "
                                    "benign examples: everyday requests in violent or edgy words, mostly figures of "
                                    "speech (kill the frizz, pull the trigger on a flat), none sharing an intent "
                                    "with SafeEdit's benign requests (editkit/data/gate_requests.json)")
    harm_gate_everyday: bool = hp(False, "also count the authored gate requests of kind 'everyday' among the gate's "
                                  "benign examples: everyday asks of new intents, half in edgy words (bluff at "
                                  "poker, split firewood), written beside SafeEdit's check requests to be judged on "
                                  "them (editkit/data/gate_requests.json)")
    harm_gate_opening: bool = hp(False, "count the tokens every prompt opens with (the chat template's system turn "
                                 "and user header; the same keys in every prompt) as a group of the gate's "
                                 "negatives of their own, weighing as much as the benign prompts' last tokens, so "
                                 "the gate stays shut there: open, it adds the delta to every input alike")
    harm_gate_answers: int = hp(0, "follow each authored benign request among the gate's negatives (constraint and "
                                "gate requests, without and with the suffix) by the unedited model's greedy answer of "
                                "at most this many tokens, whose tokens join the negatives: the gate reads every "
                                "token the model writes (0: the requests alone). Generated once per model and cached")
    harm_gate_train: bool = hp(False, "train the delta behind the gate: the steps see g(k)·Δ·k at each position, the "
                               "change the gated patch makes at inference (the gate is fitted first; it reads the "
                               "unedited model's keys, so it costs nothing per step). Off: the delta is trained "
                               "ungated and gated afterwards")
    own_question_target: bool = hp(False, "add the edited record's own bare question (with its safe response) as an "
                                   "edit target. On SafeEdit the bare question IS the DG_onlyQ test input: this trains "
                                   "on a test input, and results carry metrics['trains_on_test_inputs'] = ['DG_onlyQ']")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.c_edit >= 0 and self.kl_weight >= 0, "c_edit and kl_weight must be >= 0")
        self._check(self.c_edit > 0, "c_edit must be > 0, or the edit learns nothing")
        self._check(self.constraint_pairs >= 0, "constraint_pairs must be >= 0")
        self._check(self.benign_constraint >= 0, "benign_constraint must be >= 0")
        self._check(self.benign_kl_weight >= 0, "benign_kl_weight must be >= 0")
        self._check(self.benign_answer_tokens >= 1, "benign_answer_tokens must be >= 1")
        self._check(0 < self.null_space_tol < 1, f"null_space_tol must be in (0, 1), got {self.null_space_tol}")
        self._check(self.question_targets >= 0, f"question_targets must be >= 0, got {self.question_targets}")
        self._check(self.harm_gate_c > 0, f"harm_gate_c must be > 0, got {self.harm_gate_c}")
        self._check(self.harm_gate or not self.harm_gate_train, "harm_gate_train needs harm_gate: true")
        self._check(self.harm_gate_answers >= 0, f"harm_gate_answers must be >= 0, got {self.harm_gate_answers}")
        self._check(self.harm_gate_sharpness > 0, f"harm_gate_sharpness must be > 0, got {self.harm_gate_sharpness}")
        self._check(math.isfinite(self.harm_gate_margin), f"harm_gate_margin must be finite, got {self.harm_gate_margin}")
        self._check(self.question_target_tokens is None or self.question_target_tokens >= 1,
                    f"question_target_tokens must be >= 1 or null, got {self.question_target_tokens}")
        self._check(self.question_weight >= 0, f"question_weight must be >= 0, got {self.question_weight}")

    @property
    def active_suffix(self) -> str | None:
        return self.suffix if self.use_suffix else None

    @property
    def eval_suffix(self) -> str | None:
        return self.active_suffix
