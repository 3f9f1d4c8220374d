"""Pieces shared by the methods that train one additive delta on one layer's MLP output projection
(DINM, FT-L): pick the layer (given or located), and run the optimisation loop over the delta of an
:class:`editkit.engine.DeltaEditor`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from editkit.arch import ArchMap, check_layer
from editkit.engine import DeltaEditor
from editkit.instance import EditInstance
from editkit.localization import Localization, locate
from editkit.text import ChatMode

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
    early_stop_loss: float = 0.0,
    desc: str = "edit",
    progress: bool = False,
) -> list[dict[str, float]]:
    """Adam on ``editor.delta`` for at most ``steps`` steps; one record per step (the loss before
    that step's update). Stops early once the loss is below ``early_stop_loss``; clamps every entry
    to ``[-norm_constraint, norm_constraint]`` after each update. A non-finite loss raises
    FloatingPointError (the editor's context then leaves the model untouched)."""
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
    return losses
