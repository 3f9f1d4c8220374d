"""Trust checks on a finished edit, run before anything is applied.

An optimiser with a wild setting (DINM with ``lr: 1e30``) still returns a patch: finite entries of
2e30, the edit's own NLL up from 2.6 to 10.8, a patched model that answers with an empty string.
:func:`check_edit` catches such results with three checks that need no knowledge of the method:

* every delta is finite (a NaN or inf can never be applied, so this one cannot be overridden);
* ``‖Δ‖_F / ‖W‖_F`` is at most ``max_relative_norm`` for every weight the patch changes;
* the edit's own objective did not get worse: methods report ``edit_nll_before`` and
  ``edit_nll_after`` in their metrics, and ``after`` may not exceed ``before``.

``editkit.edit`` / ``editkit.fit`` call it on every result (``allow_untrusted=True`` turns the
error into a logged warning).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from editkit.devices import real_values
from editkit.patch import Patch
from editkit.result import EditResult

log = logging.getLogger(__name__)

# ‖Δ‖/‖W‖ above which an edit is no longer a change of the weight but its replacement. Measured
# with DINM on SmolLM2-135M (located down_proj, ‖W‖ ≈ 170): committed settings 0.064, the same
# without the benign guard 0.10-0.15, the paper's 7B settings 0.018, lr 1e-2 × 40 steps 0.26,
# lr 1e-1 × 20 steps 3.0 (edit NLL worse than at lr 1e-2), lr 1e30 9e30. Adam moves every entry by
# ~lr per step whatever the weight's scale, so the random tiny test models (weights ~0.02) reach
# 2.4-5 at lr 1e-2 for 5 steps. Ten refuses any delta that outgrows its weight tenfold, ~40x above
# the largest sensible real edit measured, and leaves the tiny models' quick settings room.
MAX_RELATIVE_NORM = 10.0
# edit_nll_after may exceed edit_nll_before by this fraction of max(before, 1) and still count as
# "not worse": before and after come from different passes (full model / fast path), which differ
# by float noise (~1e-6), and an edit that moved nothing is useless but not harmful.
OBJECTIVE_RTOL = 1e-3


class UntrustedEditError(ValueError):
    """An edit refused by :func:`check_edit`; the model was not changed."""


def _frobenius(tensor: torch.Tensor) -> float:
    """‖t‖_F in double precision: the fp32 sum of squares overflows for entries above ~1e19."""
    t = tensor.detach().float()
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    return peak * float((t / peak).norm())


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        return float(value)  # a Python, NumPy or 0-d torch number
    except (TypeError, ValueError):
        return None


def check_edit(
    result: EditResult | Patch,
    model: nn.Module,
    *,
    max_relative_norm: float = MAX_RELATIVE_NORM,
    allow_untrusted: bool = False,
) -> list[str]:
    """Check that ``result`` (an EditResult, or a bare Patch) can be trusted on ``model``.

    Returns the problems found (empty when the edit passes). A non-empty list raises
    :class:`UntrustedEditError` naming each problem, unless ``allow_untrusted=True``, in which case
    the problems are logged as a warning and returned. Non-finite deltas always raise: no model
    can carry them. ``model`` is only read (the weights each delta is compared with, in fp32); it
    is the model the edit was computed on, before the patch is applied.
    """
    if max_relative_norm <= 0 or math.isnan(max_relative_norm):
        raise ValueError(f"max_relative_norm must be > 0, got {max_relative_norm}")
    patch = result.patch if isinstance(result, EditResult) else result
    metrics = {**patch.metrics, **getattr(result, "metrics", {})}

    # Patch refuses NaN/inf when built; a delta changed in place afterwards is caught here.
    non_finite = [f"{name}: the delta contains NaN or inf" for name, delta in patch.deltas.items()
                  if not torch.isfinite(delta).all()]
    if non_finite:
        raise UntrustedEditError(_message(non_finite, overridable=False))

    problems: list[str] = []
    targets = patch.check(model, strict=False)  # names and shapes (PatchError if they do not fit)
    for name, delta in patch.deltas.items():
        weight_norm = _frobenius(real_values(model, name) if targets[name].is_meta else targets[name])
        if weight_norm == 0.0:
            continue  # an all-zero weight (e.g. a fresh bias) gives no scale to compare with
        ratio = _frobenius(delta) / weight_norm
        if ratio > max_relative_norm:
            problems.append(f"{name}: ‖delta‖/‖weight‖ = {ratio:.3g}, above max_relative_norm={max_relative_norm:g} "
                            f"(the delta is far larger than the weight it changes)")

    before, after = _metric(metrics, "edit_nll_before"), _metric(metrics, "edit_nll_after")
    if before is not None and after is not None:
        if not math.isfinite(after):
            problems.append(f"the edit's own objective is {after} after the edit (edit NLL before: {before:.4g})")
        elif after > before + OBJECTIVE_RTOL * max(abs(before), 1.0):
            problems.append(f"the edit made its own objective worse: edit NLL {before:.4g} -> {after:.4g}")

    if problems:
        if not allow_untrusted:
            raise UntrustedEditError(_message(problems, overridable=True))
        log.warning("accepting an untrusted edit because allow_untrusted=True:\n  - %s", "\n  - ".join(problems))
    return problems


def _message(problems: list[str], *, overridable: bool) -> str:
    listed = "\n  - ".join(problems)
    advice = ("Check the method's settings (a learning rate far too large is the usual cause); "
              "to accept the edit anyway pass allow_untrusted=True (the problems are then logged)."
              if overridable else "NaN or inf cannot be applied to any model; this cannot be overridden.")
    return f"refusing an edit that cannot be trusted; the model is untouched.\n  - {listed}\n{advice}"
