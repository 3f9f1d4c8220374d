"""Ext-Sub: extraction before subtraction of an expert LoRA (safe responses) and an anti-expert LoRA
(unsafe responses), trained with trl's SFTTrainer and combined per output row into one patch of
full-weight deltas (a dataset-scope method; per instance: a dataset of one record)."""
from editkit.methods.extsub.combine import common_part, extract_subtract
from editkit.methods.extsub.config import ExtSubConfig
from editkit.methods.extsub.method import ExtSub
from editkit.registry import register_method

__all__ = ["ExtSub", "ExtSubConfig", "common_part", "extract_subtract"]

register_method("extsub", ExtSubConfig, ExtSub)
