"""DPO: direct preference optimisation of a LoRA adapter on (attack prompt, safe ≻ unsafe) pairs,
trained with trl's DPOTrainer and returned as a patch of full-weight deltas (a dataset-scope method)."""
from editkit.methods.dpo.config import DPOConfig
from editkit.methods.dpo.method import DPO
from editkit.registry import register_method

__all__ = ["DPO", "DPOConfig"]

register_method("dpo", DPOConfig, DPO)
