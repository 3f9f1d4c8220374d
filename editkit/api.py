"""editkit.edit and editkit.fit: from (model, record or records) to an EditResult, for any
registered method (see :mod:`editkit.methods.base` for the contract)."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from editkit.hparams import HParams
from editkit.instance import EditInstance
from editkit.registry import MethodSpec, get_method, load_hparams
from editkit.result import EditResult

HParamsSpec = HParams | Mapping[str, Any] | str | Path | None


def _as_instance(instance: EditInstance | Mapping[str, Any]) -> EditInstance:
    if isinstance(instance, Mapping):
        instance = EditInstance.from_record(instance)
    if not isinstance(instance, EditInstance):
        raise ValueError(f"instance must be an EditInstance or a SafeEdit record, got {type(instance).__name__}")
    return instance


def _method(method: str, scope: str) -> MethodSpec:
    spec = get_method(method)
    if spec.scope != scope:
        call = "editkit.fit(model, instances, ...)" if spec.scope == "dataset" else "editkit.edit(model, instance, ...)"
        raise ValueError(f"{spec.name!r} is a {spec.scope}-scope method: use {call}")
    return spec


def _finish(result: EditResult, model: nn.Module, start: float, apply: bool, allow_untrusted: bool) -> EditResult:
    from editkit.validation import check_edit

    result.timings.setdefault("total", time.perf_counter() - start)
    check_edit(result, model, allow_untrusted=allow_untrusted)  # raises before anything is applied
    if apply:
        result.patch.apply(model)
    return result


def edit(
    model: nn.Module,
    instance: EditInstance | Mapping[str, Any],
    *,
    tokenizer: Any,
    method: str = "dinm",
    hparams: HParamsSpec = None,
    apply: bool = False,
    allow_untrusted: bool = False,
    progress: bool = False,
    **kwargs: Any,
) -> EditResult:
    """Compute an edit of ``model`` for ``instance`` with an instance-scope ``method``.

    The model is left exactly as it was (an exception at any point included) unless
    ``apply=True``, in which case the finished patch is applied at the end. ``hparams`` is an
    HParams object, a dict, a YAML path or a preset name under ``editkit/presets/<METHOD>/``. Extra
    keyword arguments go to the method (e.g. ``layer=`` to skip localisation, ``arch=`` module
    names). An edit that cannot be trusted (non-finite, far larger than the weight it changes, or
    worse on its own objective) raises :class:`editkit.validation.UntrustedEditError` unless
    ``allow_untrusted=True``, which logs the problems instead.
    """
    if tokenizer is None:
        raise ValueError("editkit.edit needs the model's tokenizer (tokenizer=...)")
    instance = _as_instance(instance)
    spec = _method(method, "instance")
    config = load_hparams(method, hparams)
    start = time.perf_counter()
    result: EditResult = spec.method_class(config).edit(model, tokenizer, instance, progress=progress, **kwargs)
    return _finish(result, model, start, apply, allow_untrusted)


def fit(
    model: nn.Module,
    instances: Sequence[EditInstance | Mapping[str, Any]],
    *,
    tokenizer: Any,
    method: str,
    hparams: HParamsSpec = None,
    apply: bool = False,
    allow_untrusted: bool = False,
    progress: bool = False,
    **kwargs: Any,
) -> EditResult:
    """Fit a dataset-scope ``method`` on ``instances``: one patch for every later input. Same
    guarantees as :func:`edit` (model untouched unless ``apply``, untrusted results refused)."""
    if tokenizer is None:
        raise ValueError("editkit.fit needs the model's tokenizer (tokenizer=...)")
    if isinstance(instances, (str, bytes, Mapping)) or not len(instances):
        raise ValueError("editkit.fit needs a non-empty sequence of instances")
    records = [_as_instance(i) for i in instances]
    spec = _method(method, "dataset")
    config = load_hparams(method, hparams)
    start = time.perf_counter()
    result: EditResult = spec.method_class(config).fit(model, tokenizer, records, progress=progress, **kwargs)
    return _finish(result, model, start, apply, allow_untrusted)
