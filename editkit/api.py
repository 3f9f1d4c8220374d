"""editkit.edit: one call from (model, instance) to an EditResult."""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from editkit.hparams import HParams
from editkit.instance import EditInstance
from editkit.registry import get_method, load_hparams
from editkit.result import EditResult


def edit(
    model: nn.Module,
    instance: EditInstance | Mapping[str, Any],
    *,
    tokenizer: Any,
    method: str = "dinm",
    hparams: HParams | Mapping[str, Any] | str | Path | None = None,
    apply: bool = False,
    progress: bool = False,
    **kwargs: Any,
) -> EditResult:
    """Compute an edit of ``model`` for ``instance`` with ``method``.

    The model is left exactly as it was (an exception at any point included) unless
    ``apply=True``, in which case the finished patch is applied at the end. ``hparams`` is an
    HParams object, a dict, a YAML path or a short name under ``hparams/<METHOD>/``. Extra keyword
    arguments go to the method (e.g. ``layer=`` to skip localisation, ``arch=`` module names).
    """
    if tokenizer is None:
        raise ValueError("editkit.edit needs the model's tokenizer (tokenizer=...)")
    if isinstance(instance, Mapping):
        instance = EditInstance.from_record(instance)
    if not isinstance(instance, EditInstance):
        raise ValueError(f"instance must be an EditInstance or a SafeEdit record, got {type(instance).__name__}")
    spec = get_method(method)
    config = load_hparams(method, hparams)
    start = time.perf_counter()
    result: EditResult = spec.method_class(config).edit(model, tokenizer, instance, progress=progress, **kwargs)
    result.timings.setdefault("total", time.perf_counter() - start)
    if apply:
        result.patch.apply(model)
    return result
