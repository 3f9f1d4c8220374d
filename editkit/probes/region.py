"""Region toxicity: how much a layer's MLP writes along the toxic direction.

The MLP output projection of a layer maps d_ff coefficients to the residual stream; its value
vectors (one per hidden unit, each in d_model space) are what it can write. Region toxicity is the
mean cosine similarity between those vectors and the probe's toxic direction; the most toxic
vectors (highest cosine) are shown through the unembedding, as in the dpo_toxic line of work.
``nn.Linear`` stores the projection as [d_model, d_ff] (value vectors are columns), GPT-2's
``Conv1D`` as [d_ff, d_model] (rows): the architecture map's transposition flag says which.

Measured on a model with an edit applied (``with patch.applied(model): ...``, or
:func:`compare_region_toxicity`), the change gives the toxicity reduction rate.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap, check_layer, lm_head, mlp_out_name, num_layers, resolve_arch
from editkit.delta_hooks import rounding_residuals
from editkit.devices import materialized, real_values
from editkit.probes.probe import ToxicityProbe
from editkit.probes.states import Applicable

log = logging.getLogger(__name__)


@torch.no_grad()
def value_vectors(model: nn.Module, layer: int, arch: ArchMap | Mapping[str, Any] | None = None) -> torch.Tensor:
    """[d_ff, d_model] float32 copy of the value vectors of ``layer``'s MLP output projection, as the
    model computes with them (a patch's half-precision rounding residual or offloaded delta, carried
    by a hook, included)."""
    arch = resolve_arch(model, arch)
    name = mlp_out_name(model, arch, layer)
    weight = real_values(model, name).float()
    residual = rounding_residuals(model).get(name)
    if residual is not None:
        weight = weight + residual.to(weight.device, torch.float32)
    # declared by the map, never guessed from shapes (d_ff == d_model is possible)
    vectors = weight if arch.mlp_out_transposed else weight.T
    return vectors.detach().to("cpu").contiguous().clone()


def _direction(probe: ToxicityProbe | torch.Tensor, model: nn.Module, arch: ArchMap) -> torch.Tensor:
    if isinstance(probe, ToxicityProbe):
        probe.check_model(model, arch)
        return probe.direction
    if not isinstance(probe, torch.Tensor) or probe.ndim != 1 or not probe.any():
        raise ValueError("probe must be a ToxicityProbe or a non-zero 1-d direction tensor")
    return (probe / probe.norm()).detach().to("cpu", torch.float32)


def _cosines(vectors: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    if vectors.shape[1] != direction.numel():
        raise ValueError(f"direction has {direction.numel()} entries; the value vectors have {vectors.shape[1]}")
    norms = vectors.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # a dead unit counts as 0
    return (vectors @ direction) / norms  # [d_ff]


@dataclass(frozen=True)
class ToxicVector:
    """One value vector: its hidden-unit index, cosine with the toxic direction, top tokens."""

    index: int
    cosine: float
    tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "cosine": self.cosine, "tokens": list(self.tokens)}


@dataclass
class RegionToxicity:
    """Region toxicity of one layer: ``mean_cosine`` over its value vectors, the ``top`` most toxic
    ones, and every vector's cosine (``cosines`` [d_ff])."""

    layer: int
    mean_cosine: float
    top: list[ToxicVector]
    cosines: torch.Tensor

    def to_dict(self, include_cosines: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "mean_cosine": self.mean_cosine, "d_ff": int(self.cosines.numel()),
                               "top": [v.to_dict() for v in self.top]}
        if include_cosines:
            out["cosines"] = self.cosines.tolist()
        return out


@torch.no_grad()
def region_toxicity(
    model: nn.Module,
    probe: ToxicityProbe | torch.Tensor,
    layer: int | None = None,
    *,
    top_k: int = 10,
    tokenizer: Any = None,
    top_tokens: int = 10,
    arch: ArchMap | Mapping[str, Any] | None = None,
) -> RegionToxicity:
    """Region toxicity of ``layer`` (default: the probe's layer) against the probe's direction
    (a :class:`ToxicityProbe`, checked against ``model``, or a raw direction tensor). The ``top_k``
    vectors with the highest cosine are listed; with ``tokenizer``, each with the ``top_tokens``
    tokens it promotes most through the unembedding (the LM head weight, no final norm)."""
    arch = resolve_arch(model, arch)
    if layer is None:
        if not isinstance(probe, ToxicityProbe):
            raise ValueError("give the layer when the probe is a bare direction")
        layer = probe.layer
    layer = check_layer(model, arch, layer)
    if top_k < 0 or top_tokens < 1:
        raise ValueError(f"top_k must be >= 0 and top_tokens >= 1, got {top_k} and {top_tokens}")
    direction = _direction(probe, model, arch)
    vectors = value_vectors(model, layer, arch)  # [d_ff, d_model]
    cosines = _cosines(vectors, direction)
    k = min(top_k, cosines.numel())
    order = torch.sort(cosines, descending=True, stable=True).indices[:k].tolist()
    tokens: list[list[str]] = [[] for _ in order]
    if tokenizer is not None and order:
        head = lm_head(model, arch)
        with materialized(head):
            unembed = head.weight.detach().float()  # [vocab, d_model]
            logits = vectors[order].to(unembed.device) @ unembed.T  # [k, vocab]
        ids = logits.topk(min(top_tokens, logits.shape[1]), dim=1).indices.tolist()
        tokens = [[tokenizer.decode([i]) for i in row] for row in ids]
    top = [ToxicVector(index=i, cosine=float(cosines[i]), tokens=t) for i, t in zip(order, tokens)]
    return RegionToxicity(layer=layer, mean_cosine=float(cosines.mean()), top=top, cosines=cosines)


@torch.no_grad()
def region_profile(model: nn.Module, probe: ToxicityProbe | torch.Tensor, layers: Sequence[int] | None = None, *,
                   arch: ArchMap | Mapping[str, Any] | None = None) -> dict[int, float]:
    """{layer: mean cosine} for ``layers`` (default every decoder layer): where the toxic writers sit."""
    arch = resolve_arch(model, arch)
    direction = _direction(probe, model, arch)
    chosen = range(num_layers(model, arch)) if layers is None else [check_layer(model, arch, i) for i in layers]
    return {i: float(_cosines(value_vectors(model, i, arch), direction).mean()) for i in chosen}


def toxicity_reduction_rate(before: float | RegionToxicity, after: float | RegionToxicity) -> float:
    """(before − after) / |before| of two region toxicities (or mean cosines)."""
    b = before.mean_cosine if isinstance(before, RegionToxicity) else float(before)
    a = after.mean_cosine if isinstance(after, RegionToxicity) else float(after)
    if b == 0.0:
        raise ValueError("the toxicity reduction rate is undefined when the region toxicity before is 0")
    return (b - a) / abs(b)


@dataclass
class RegionComparison:
    """Region toxicity of one layer before and after an edit."""

    before: RegionToxicity
    after: RegionToxicity

    @property
    def reduction_rate(self) -> float:
        return toxicity_reduction_rate(self.before, self.after)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.before.layer, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "reduction_rate": self.reduction_rate}


def compare_region_toxicity(model: nn.Module, probe: ToxicityProbe | torch.Tensor, edit: Applicable,
                            layer: int | None = None, **kwargs: Any) -> RegionComparison:
    """Region toxicity of ``layer`` without and with ``edit`` applied (the model is restored by the
    edit's own ``applied`` context). ``kwargs`` go to :func:`region_toxicity`."""
    before = region_toxicity(model, probe, layer, **kwargs)
    with edit.applied(model):
        after = region_toxicity(model, probe, before.layer, **kwargs)
    return RegionComparison(before=before, after=after)
