"""Ext-Sub settings: the shared LoRA-training settings (editkit.methods.lora), used alike for the
expert and the anti-expert, plus λ of the combination."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from editkit.hparams import hp
from editkit.methods.lora import LoRATrainConfig


@dataclass
class ExtSubConfig(LoRATrainConfig):
    """Both adapters are trained with the same settings (r, alpha, targets, lr, steps, seed...);
    ``lam`` only enters the combination, so changing it never retrains (with an ``output_dir`` a
    second fit with another λ resumes both finished runs and recombines)."""

    method: ClassVar[str] = "extsub"

    lam: float = hp(1.0, "λ: strength of the subtraction of the anti-expert's own part, "
                         "ΔW = ΔW⁺ − λ(ΔW⁻ − common); 0 gives the expert alone (SFT). 1.0 is the reference "
                         "code's default (HITsz-TMG/Ext-Sub ext_sub.py --alpha)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(math.isfinite(self.lam) and self.lam >= 0, f"lam must be a finite number >= 0, got {self.lam}")

    def training_settings(self) -> LoRATrainConfig:
        """The settings each adapter is trained with: everything but ``lam``, so that the training
        runs' identity (what an ``output_dir`` resume checks) does not depend on λ."""
        return LoRATrainConfig(**{name: getattr(self, name) for name in LoRATrainConfig.field_names()})
