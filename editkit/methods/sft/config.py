"""SFT settings: the shared LoRA-training settings (editkit.methods.lora), nothing of its own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editkit.methods.lora import LoRATrainConfig


@dataclass
class SFTConfig(LoRATrainConfig):
    """Not trl's ``SFTConfig``: editkit's algorithm settings, from which the trl one is built."""

    method: ClassVar[str] = "sft"
