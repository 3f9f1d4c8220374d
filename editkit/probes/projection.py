"""Projections of mid-layer states of safe vs unsafe inputs, before and after an edit.

Each text's state is the mean over its real tokens of a decoder layer's output (by default the
middle layer). Two axes, both fixed from the states *before* the edit so that before and after are
drawn in the same coordinates and the movement shows: the mean-shift direction (mean unsafe −
mean safe, normalised) and the first principal component of all pooled states. Coordinates are
measured from the centre (mean) of the states before the edit. PC1's sign is chosen so that the
unsafe mean lies on its positive side (an SVD leaves it arbitrary).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from editkit.arch import ArchMap, check_layer, num_layers, resolve_arch
from editkit.probes.states import Applicable, check_texts, pooled
from editkit.text import ChatMode

log = logging.getLogger(__name__)

AXES = ("mean shift", "PC1")


@dataclass(frozen=True)
class ProjectionAxes:
    """The coordinate system: ``center`` [d_model], unit ``mean_shift`` and ``pc1`` [d_model], and
    the share of the pooled states' variance PC1 explains."""

    center: torch.Tensor
    mean_shift: torch.Tensor
    pc1: torch.Tensor
    pc1_explained: float

    def project(self, states: torch.Tensor) -> np.ndarray:
        """[n, 2] (mean-shift, PC1) coordinates of ``states`` [n, d_model]."""
        centred = states.float() - self.center
        return torch.stack([centred @ self.mean_shift, centred @ self.pc1], dim=1).numpy().astype(np.float64)


def projection_axes(safe: torch.Tensor, unsafe: torch.Tensor) -> ProjectionAxes:
    """Axes from pooled ``safe`` [n, d] and ``unsafe`` [m, d] states (see the module docstring)."""
    if safe.ndim != 2 or unsafe.ndim != 2 or safe.shape[1] != unsafe.shape[1]:
        raise ValueError(f"states must be [n, d] with the same d; got {list(safe.shape)} and {list(unsafe.shape)}")
    if len(safe) < 1 or len(unsafe) < 1:
        raise ValueError("need at least one safe and one unsafe state")
    safe64, unsafe64 = safe.double(), unsafe.double()
    gap = unsafe64.mean(0) - safe64.mean(0)
    if not gap.any():
        raise ValueError("safe and unsafe states have the same mean: no mean-shift direction")
    mean_shift = gap / gap.norm()
    states = torch.cat([safe64, unsafe64])
    center = states.mean(0)
    _, s, vh = torch.linalg.svd(states - center, full_matrices=False)
    pc1 = vh[0]
    if float(pc1 @ gap) < 0:  # orient PC1 towards the unsafe side
        pc1 = -pc1
    variance = s.pow(2)
    explained = float(variance[0] / variance.sum()) if float(variance.sum()) > 0 else 0.0
    return ProjectionAxes(center=center.float(), mean_shift=mean_shift.float(), pc1=pc1.float(),
                          pc1_explained=explained)


@dataclass
class ProjectedSet:
    """(mean-shift, PC1) coordinates of the safe [n, 2] and unsafe [m, 2] inputs."""

    safe: np.ndarray
    unsafe: np.ndarray

    @property
    def separation(self) -> float:
        """Mean unsafe − mean safe along the mean-shift axis."""
        return float(self.unsafe[:, 0].mean() - self.safe[:, 0].mean())

    def to_dict(self) -> dict[str, Any]:
        return {"safe": self.safe.tolist(), "unsafe": self.unsafe.tolist(), "separation": self.separation}


@dataclass
class Projection:
    """Projected states of one layer before (and, if an edit was given, after) the edit."""

    layer: int
    axes: ProjectionAxes
    before: ProjectedSet
    after: ProjectedSet | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "axes": list(AXES), "pc1_explained": self.axes.pc1_explained,
                "before": self.before.to_dict(), "after": None if self.after is None else self.after.to_dict()}


def project_states(
    model: nn.Module,
    tokenizer: Any,
    safe_texts: Sequence[str],
    unsafe_texts: Sequence[str],
    *,
    layer: int | None = None,
    edit: Applicable | None = None,
    chat_template: ChatMode = "none",
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    arch: ArchMap | Mapping[str, Any] | None = None,
) -> Projection:
    """Pooled states of ``layer`` (default the middle decoder layer) for safe and unsafe texts,
    projected on the mean-shift direction and PC1 of the states before ``edit``; with ``edit``, the
    states read with it applied are projected on the same axes (the edit restores the model)."""
    safe_texts = check_texts(safe_texts, "safe_texts")
    unsafe_texts = check_texts(unsafe_texts, "unsafe_texts")
    arch = resolve_arch(model, arch)
    layer = num_layers(model, arch) // 2 if layer is None else check_layer(model, arch, layer)
    texts = safe_texts + unsafe_texts
    n = len(safe_texts)

    def read() -> torch.Tensor:
        return pooled(model, tokenizer, texts, [layer], read="output", chat_template=chat_template,
                      max_length=max_length, batch_size=batch_size, progress=progress, arch=arch,
                      desc="projection states")[layer]  # [n + m, d_model]

    states = read()
    axes = projection_axes(states[:n], states[n:])
    before = ProjectedSet(safe=axes.project(states[:n]), unsafe=axes.project(states[n:]))
    after = None
    if edit is not None:
        with edit.applied(model):
            edited = read()
        after = ProjectedSet(safe=axes.project(edited[:n]), unsafe=axes.project(edited[n:]))
    return Projection(layer=layer, axes=axes, before=before, after=after)
