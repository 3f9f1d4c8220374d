"""EditResult: what every editing method returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from editkit.patch import Patch


@dataclass
class EditResult:
    """The outcome of one edit. The model it was computed on is unchanged; ``patch`` carries the
    edit (``result.patch.apply(model)`` or ``with result.patch.applied(model): ...``)."""

    method: str
    patch: Patch
    layer: int | None = None
    localization: Any = None  # editkit.Localization, when the method located its layer (plot it with .plot())
    losses: list[dict[str, float]] = field(default_factory=list)  # one dict per optimisation step
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: locate, edit, total
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def profile(self) -> list[float] | None:
        """Per-layer localisation distances, when the method located its layer."""
        return self.localization.profile if self.localization is not None else None

    def apply(self, model: nn.Module) -> nn.Module:
        """Apply the edit to ``model`` permanently."""
        return self.patch.apply(model)

    def applied(self, model: nn.Module) -> Any:
        """Context manager: the edit applied inside the block, restored bit-exactly after."""
        return self.patch.applied(model)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the deltas themselves stay in the patch)."""
        return {
            "method": self.method,
            "layer": self.layer,
            "profile": self.profile,
            "localization": self.localization.to_dict() if self.localization is not None else None,
            "losses": self.losses,
            "metrics": self.metrics,
            "timings": self.timings,
            "hparams": self.hparams,
            "patch_norm": self.patch.norm(),
        }
