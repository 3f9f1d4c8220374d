"""FT-L: unconstrained fine-tuning of one layer's MLP output projection (the SafeEdit paper's baseline)."""
from editkit.methods.ft.config import FTLConfig
from editkit.methods.ft.method import FTL
from editkit.registry import register_method

__all__ = ["FTL", "FTLConfig"]

register_method("ft-l", FTLConfig, FTL)
