"""DPO settings: the shared LoRA-training settings (editkit.methods.lora) plus beta."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editkit.hparams import hp
from editkit.methods.lora import LoRATrainConfig


@dataclass
class DPOConfig(LoRATrainConfig):
    """Not trl's ``DPOConfig``: editkit's algorithm settings, from which the trl one is built."""

    method: ClassVar[str] = "dpo"

    lr: float = hp(5e-5, "AdamW learning rate")
    beta: float = hp(0.1, "strength of the pull towards the reference (the model without the adapter); "
                          "larger keeps the policy closer to it")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.beta > 0, f"beta must be > 0, got {self.beta}")
