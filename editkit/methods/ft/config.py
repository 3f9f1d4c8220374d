"""FT-L settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from editkit.hparams import HParams, hp


@dataclass
class FTLConfig(HParams):
    method: ClassVar[str] = "ft-l"

    lr: float = hp(5e-4, "Adam learning rate for the delta")
    steps: int = hp(10, "optimisation steps")
    early_stop_loss: float = hp(1e-4, "stop when the loss falls below this")
    weight_decay: float = hp(0.0, "Adam weight decay on the delta")
    norm_constraint: float | None = hp(None, "clamp every delta entry to [-c, c] after each step (off when null)")
    chat_template: Literal["auto", "none"] = hp("auto", "render prompts with the tokenizer's chat template if it has one")
    max_length: int = hp(2048, "token budget of one prompt+answer sequence")
    layer: int | None = hp(None, "edit this layer instead of locating one (negative counts from the top)")
    locate_mode: Literal["mean", "reference"] = hp("mean", "localisation distance, see editkit.localization")
    locate_context: Literal["none", "prompt"] = hp("none", "run the responses alone or after the attack prompt")
    fast_path: bool = hp(True, "cache the state entering the edited layer; run only the layers above it")

    def __post_init__(self) -> None:
        self._check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        self._check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        self._check(self.early_stop_loss >= 0, "early_stop_loss must be >= 0")
        self._check(self.weight_decay >= 0, "weight_decay must be >= 0")
        self._check(self.norm_constraint is None or self.norm_constraint > 0, "norm_constraint must be > 0 or null")
        self._check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
