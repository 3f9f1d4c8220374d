"""Running a third-party trainer on the caller's model and giving the model back as it came:
:func:`preserved` restores what trainers change besides weights (flags, wrappers, hooks, config),
:func:`global_rng_kept` the global random generators they seed, and :func:`quiet` their progress
bars and deprecation notices. Used by the LoRA methods (:mod:`editkit.methods.lora`)."""
from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors: compare by identity only
        return a is b


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block anything may wrap, re-flag, hook or re-configure ``model``; on exit (also by
    exception) every module's attributes and containers (children, parameters, buffers, hooks), the
    parameters' ``requires_grad`` and the model's config and generation config are put back. Tensor
    contents are not copied: use it around code that does not write weights."""
    saved = []
    for module in model.modules():
        attrs = {key: (value, copy.copy(value) if isinstance(value, (dict, set, list)) else _MISSING)
                 for key, value in vars(module).items()}
        saved.append((module, attrs))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    configs = [(c, copy.deepcopy(vars(c))) for c in (getattr(model, "config", None),
                                                     getattr(model, "generation_config", None)) if c is not None]
    try:
        yield model
    finally:
        for module, attrs in saved:
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            for key, (value, content) in attrs.items():
                now[key] = value
                if content is _MISSING:
                    continue
                if isinstance(value, list):
                    value[:] = content
                else:
                    value.clear()
                    value.update(content)
        for param, flag in flags:
            param.requires_grad_(flag)
        for config, values in configs:
            now = vars(config)
            for key in [k for k in now if k not in values]:
                del now[key]
            for key, value in values.items():
                if key not in now or not _same(now[key], value):
                    now[key] = value


@contextmanager
def global_rng_kept() -> Iterator[None]:
    """The trainers seed the global generators; give the caller's states back afterwards."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def quiet(progress: bool) -> Iterator[None]:
    """No dataset-map bars unless ``progress``; no deprecation notices about trl's own arguments."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress and bars_were_on:
        datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*deprecated and will be removed in v6.*", FutureWarning)
            yield
    finally:
        if not progress and bars_were_on:
            datasets.enable_progress_bars()


