"""Activation shift: how far an edit moves the input of the MLP output projections.

The input of a layer's MLP output projection is the vector of coefficients its value vectors are
weighted by. Its mean over a set of (adversarial) prompts — per prompt over its real tokens, then
over prompts, so every prompt weighs the same — is compared before and after an edit:
activation shift rate = ‖mean_after − mean_before‖ / ‖mean_before‖. Every layer is read in the same
pass (hooks on every layer's projection), so the profile shows where the shift starts: an edit of
layer L's projection weight alone cannot move the input of that projection (nor anything below),
while a change further down moves everything above it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap
from editkit.probes.states import Applicable, pooled
from editkit.text import ChatMode

log = logging.getLogger(__name__)


def mlp_input_means(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    chat_template: ChatMode = "auto",
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    arch: ArchMap | Mapping[str, Any] | None = None,
) -> dict[int, torch.Tensor]:
    """{layer: [d_ff] float32} the mean input of each layer's MLP output projection over ``prompts``
    (default every layer). Prompts are rendered as generation sees them (chat template when the
    tokenizer has one; ``chat_template="none"`` reads the raw text)."""
    per_prompt = pooled(model, tokenizer, prompts, layers, read="input", chat_template=chat_template,
                        max_length=max_length, batch_size=batch_size, progress=progress, arch=arch,
                        desc="projection inputs")
    return {layer: states.mean(0) for layer, states in per_prompt.items()}  # [d_ff] each


def activation_shift_rate(before: torch.Tensor, after: torch.Tensor) -> float:
    """‖after − before‖ / ‖before‖ of two mean activations."""
    if before.shape != after.shape:
        raise ValueError(f"activations differ in shape: {list(before.shape)} vs {list(after.shape)}")
    norm = float(before.float().norm())
    if norm == 0.0:
        raise ValueError("the activation shift rate is undefined when the mean activation before is 0")
    return float((after.float() - before.float()).norm()) / norm


@dataclass
class ActivationShift:
    """Activation shift rate per layer (``rates[i]`` belongs to ``layers[i]``) and the norm of the
    mean activation before the edit."""

    layers: list[int]
    rates: list[float]
    before_norms: list[float]

    def rate(self, layer: int) -> float:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not measured (measured: {self.layers})")
        return self.rates[self.layers.index(layer)]

    def as_mapping(self) -> dict[int, float]:
        return dict(zip(self.layers, self.rates))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "rates": list(self.rates), "before_norms": list(self.before_norms)}


def activation_shift(before: Mapping[int, torch.Tensor], after: Mapping[int, torch.Tensor]) -> ActivationShift:
    """Per-layer activation shift rates between two :func:`mlp_input_means` results."""
    if set(before) != set(after):
        raise ValueError(f"before and after measure different layers: {sorted(before)} vs {sorted(after)}")
    layers = sorted(before)
    return ActivationShift(layers=layers, rates=[activation_shift_rate(before[i], after[i]) for i in layers],
                           before_norms=[float(before[i].norm()) for i in layers])


def measure_activation_shift(model: nn.Module, tokenizer: Any, prompts: Sequence[str], edit: Applicable,
                             layers: Sequence[int] | None = None, **kwargs: Any) -> ActivationShift:
    """Mean projection inputs over ``prompts`` without and with ``edit`` applied (restored by the
    edit's own ``applied`` context), as shift rates per layer. ``kwargs`` go to :func:`mlp_input_means`."""
    before = mlp_input_means(model, tokenizer, prompts, layers, **kwargs)
    with edit.applied(model):
        after = mlp_input_means(model, tokenizer, prompts, layers, **kwargs)
    return activation_shift(before, after)
