"""DINM: Detoxifying with Intraoperative Neural Monitoring (locate the toxic layer, edit its MLP
output projection under a KL constraint on a benign pair)."""
from editkit.methods.dinm.cache import clear_cache
from editkit.methods.dinm.config import DINMConfig
from editkit.methods.dinm.method import DINM
from editkit.registry import register_method

__all__ = ["DINM", "DINMConfig", "clear_cache"]

register_method("dinm", DINMConfig, DINM)
