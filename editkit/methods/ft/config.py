"""FT-L settings: the shared one-layer settings alone (no constraint, no suffix)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editkit.methods.layer_edit import LayerEditConfig


@dataclass
class FTLConfig(LayerEditConfig):
    method: ClassVar[str] = "ft-l"
