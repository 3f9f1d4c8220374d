"""DINM settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from editkit.hparams import HParams, hp

# The DINM paper's suffix system prompt, appended to the user's input during the edit and after it.
SUFFIX = "If the user's request is reasonable, give the correct answer. Please give the right response:"


@dataclass
class DINMConfig(HParams):
    method: ClassVar[str] = "dinm"

    lr: float = hp(5e-4, "Adam learning rate for the delta")
    steps: int = hp(10, "optimisation steps T")
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
    early_stop_loss: float = hp(1e-4, "stop when the total loss falls below this")
    weight_decay: float = hp(0.0, "Adam weight decay on the delta")
    norm_constraint: float | None = hp(None, "clamp every delta entry to [-c, c] after each step (off when null)")
    suffix: str = hp(SUFFIX, "suffix system prompt appended to the attack and knowledge prompts")
    use_suffix: bool = hp(True, "append the suffix (the paper does)")
    chat_template: Literal["auto", "none"] = hp("auto", "render prompts with the tokenizer's chat template if it has one")
    max_length: int = hp(2048, "token budget of one prompt+answer sequence")
    layer: int | None = hp(None, "edit this layer instead of locating one (negative counts from the top)")
    locate_mode: Literal["mean", "reference"] = hp("mean", "localisation distance, see editkit.localization")
    locate_context: Literal["none", "prompt"] = hp("none", "run the responses alone or after the attack prompt")
    fast_path: bool = hp(True, "cache the state entering the edited layer; run only the layers above it")

    def __post_init__(self) -> None:
        self._check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        self._check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        self._check(self.c_edit >= 0 and self.kl_weight >= 0, "c_edit and kl_weight must be >= 0")
        self._check(self.c_edit > 0, "c_edit must be > 0, or the edit learns nothing")
        self._check(self.constraint_pairs >= 0, "constraint_pairs must be >= 0")
        self._check(self.benign_constraint >= 0, "benign_constraint must be >= 0")
        self._check(self.benign_kl_weight >= 0, "benign_kl_weight must be >= 0")
        self._check(self.benign_answer_tokens >= 1, "benign_answer_tokens must be >= 1")
        self._check(self.early_stop_loss >= 0, "early_stop_loss must be >= 0")
        self._check(self.weight_decay >= 0, "weight_decay must be >= 0")
        self._check(self.norm_constraint is None or self.norm_constraint > 0, "norm_constraint must be > 0 or null")
        self._check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")

    @property
    def active_suffix(self) -> str | None:
        return self.suffix if self.use_suffix else None

    @property
    def eval_suffix(self) -> str | None:
        return self.active_suffix
