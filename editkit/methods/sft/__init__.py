"""SFT: supervised fine-tuning of a LoRA adapter on (attack prompt → safe response), trained with
trl's SFTTrainer and returned as a patch of full-weight deltas (a dataset-scope method)."""
from editkit.methods.sft.config import SFTConfig
from editkit.methods.sft.method import SFT
from editkit.registry import register_method

__all__ = ["SFT", "SFTConfig"]

register_method("sft", SFTConfig, SFT)
