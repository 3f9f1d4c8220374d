"""Pieces shared by the methods that train one additive delta on one layer's MLP output projection
(DINM, FT-L): their common settings, the layer choice (given or located), the optimisation loop over
the delta of an :class:`editkit.engine.DeltaEditor`, and the result."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from editkit.arch import ArchMap, check_layer
from editkit.devices import real_values
from editkit.engine import DeltaEditor
from editkit.hparams import HParams, hp
from editkit.instance import EditInstance
from editkit.localization import Localization, locate
from editkit.patch import Patch
from editkit.result import EditResult
from editkit.text import ChatMode

log = logging.getLogger(__name__)

@dataclass
class LayerEditConfig(HParams):
    """Settings every one-layer delta method has: the optimiser, the layer choice, the encoding."""

    lr: float = hp(5e-4, "Adam learning rate for the delta")
    steps: int = hp(10, "optimisation steps T")
    early_stop_loss: float = hp(1e-4, "stop when the total loss falls below this")
    weight_decay: float = hp(0.0, "Adam weight decay on the delta")
    norm_constraint: float | None = hp(None, "clamp every delta entry to [-c, c] after each step (off when null)")
    max_delta_ratio: float | None = hp(None, "after each step, scale the delta down to ratio × ‖W‖_F (Frobenius) when "
                                       "it is larger, W the edited weight (off when null)")
    chat_template: Literal["auto", "none"] = hp("auto", "render prompts with the tokenizer's chat template if it has one")
    max_length: int = hp(2048, "token budget of one prompt+answer sequence")
    layer: int | None = hp(None, "edit this layer instead of locating one (negative counts from the top)")
    locate_mode: Literal["mean", "scaled", "reference"] = hp("mean", "localisation distance: mean (the paper's L2), scaled "
                                                             "(divided by the states' norm), reference; see editkit.localization")
    locate_context: Literal["none", "prompt"] = hp("none", "run the responses alone or after the attack prompt")
    fast_path: bool = hp(True, "cache the state entering the edited layer; run only the layers above it")
    step_dtype: Literal["float32", "bfloat16"] = hp(
        "float32", "the steps' forward and backward through the layers above the edited one: float32, or under "
        "bfloat16 autocast (faster where the hardware has bf16 matrix units; the delta, the optimiser, the LM head "
        "on the fast path and the unedited reference stay float32)")
    step_attention: Literal["model", "eager", "sdpa"] = hp(
        "model", "the attention implementation the editor runs the model with (transformers' attn_implementation, "
        "restored after): model keeps the model's own; eager is faster on CPU for the short sequences an edit "
        "trains on (torch's fused CPU attention spends most of a bf16 step's attention time in overhead)")

    def __post_init__(self) -> None:
        self._check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        self._check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        self._check(self.early_stop_loss >= 0, "early_stop_loss must be >= 0")
        self._check(self.weight_decay >= 0, "weight_decay must be >= 0")
        self._check(self.norm_constraint is None or self.norm_constraint > 0, "norm_constraint must be > 0 or null")
        self._check(self.max_delta_ratio is None or self.max_delta_ratio > 0,
                    f"max_delta_ratio must be > 0 or null, got {self.max_delta_ratio}")
        self._check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        self._check(self.step_attention in ("model", "eager", "sdpa"),
                    f"step_attention must be model, eager or sdpa, got {self.step_attention!r}")
        self._check(self.step_dtype in ("float32", "bfloat16"),
                    f"step_dtype must be float32 or bfloat16, got {self.step_dtype!r}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the editor's steps autocast to (None: no autocast)."""
        return torch.bfloat16 if self.step_dtype == "bfloat16" else None

    @property
    def attention(self) -> str | None:
        """The attention implementation the editor switches the model to (None: the model's own)."""
        return None if self.step_attention == "model" else self.step_attention


# objective() -> (loss with gradient, a record of its named parts as floats)
Objective = Callable[[], tuple[torch.Tensor, dict[str, float]]]


def choose_layer(
    model: Any,
    tokenizer: Any,
    instance: EditInstance,
    arch: ArchMap,
    layer: int | None,
    *,
    mode: str,
    context: str,
    chat_template: ChatMode,
    max_length: int,
) -> tuple[int, Localization | None, float]:
    """``layer`` checked against the model, or the located layer when it is None. Returns the
    layer index, the localisation (None when given) and the seconds it took."""
    start = time.perf_counter()
    found = None
    if layer is None:
        found = locate(model, tokenizer, instance, mode=mode, context=context, chat_template=chat_template,
                       max_length=max_length, arch=arch)
        layer = found.layer
    return check_layer(model, arch, layer), found, time.perf_counter() - start


def optimize_delta(
    editor: DeltaEditor,
    objective: Objective,
    *,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    norm_constraint: float | None = None,
    max_delta_ratio: float | None = None,
    weight_norm: float | None = None,
    early_stop_loss: float = 0.0,
    desc: str = "edit",
    progress: bool = False,
) -> list[dict[str, float]]:
    """Adam on ``editor.delta`` for at most ``steps`` steps; one record per step (the loss before
    that step's update). Stops early once the loss is below ``early_stop_loss``; clamps every entry
    to ``[-norm_constraint, norm_constraint]`` after each update, then, with ``max_delta_ratio``,
    scales the delta down so that the change it makes (``editor.effective_delta()``) has a Frobenius
    norm of at most ``max_delta_ratio · weight_norm`` (‖W‖_F of the edited weight; scaling down
    keeps the clamp). A non-finite loss raises FloatingPointError (the editor's context then leaves
    the model untouched)."""
    max_norm = None
    if max_delta_ratio is not None:
        if weight_norm is None or not weight_norm > 0:
            raise ValueError(f"{desc}: max_delta_ratio needs the edited weight's norm (> 0), got {weight_norm}")
        max_norm = max_delta_ratio * weight_norm
    optimizer = torch.optim.Adam([editor.delta], lr=lr, weight_decay=weight_decay)
    losses: list[dict[str, float]] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss, parts = objective()
        record = {"step": step, "loss": loss.item(), **parts}
        losses.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"{desc}: the loss became {record['loss']} at step {step}; model untouched")
        if record["loss"] < early_stop_loss:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[editor.delta])
        optimizer.step()
        if norm_constraint is not None:
            with torch.no_grad():
                editor.delta.clamp_(-norm_constraint, norm_constraint)
        if max_norm is not None:
            with torch.no_grad():
                norm = float(editor.effective_delta().norm())
                if norm > max_norm:  # the effective delta is linear in the delta: scaling one scales the other
                    editor.delta.mul_(max_norm / norm)
    return losses


def weight_norm(model: Any, param_name: str) -> float:
    """‖W‖_F of parameter ``param_name`` in fp32 (read where it really is, also when offloaded)."""
    return float(real_values(model, param_name).float().norm())


def layer_result(
    model: Any,
    method: str,
    hparams: HParams,
    *,
    param_name: str,
    delta: torch.Tensor,
    layer: int,
    localization: Localization | None,
    losses: list[dict[str, float]],
    metrics: dict[str, Any],
    timings: dict[str, float],
    gate: dict[str, torch.Tensor] | None = None,
) -> EditResult:
    """The EditResult of a finished one-layer edit: its patch (the delta behind ``gate``, when
    given: see :class:`editkit.patch.Patch`) and what led to it."""
    patch = Patch.from_deltas(model, {param_name: delta}, method=method, layer=layer, hparams=hparams.to_dict(),
                              metrics=metrics, gates={param_name: gate} if gate is not None else {})
    log.info("%s edited layer %d in %.1fs: edit NLL %.3f -> %.3f", method, layer, timings.get("edit", 0.0),
             metrics.get("edit_nll_before", math.nan), metrics.get("edit_nll_after", math.nan))
    return EditResult(method=method, patch=patch, layer=layer, localization=localization, losses=losses,
                      metrics=metrics, timings=timings, hparams=hparams.to_dict())
