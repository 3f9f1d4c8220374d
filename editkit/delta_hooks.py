"""Deltas carried by forward hooks, for weights that cannot hold them (see :mod:`editkit.patch`).

Two cases: a half-precision weight, which holds ``round(W + Δ)`` while the fp32 rounding residual is
added to its module's output here; and a weight that accelerate offloads (reloaded for every
forward, so a write would not last), whose whole delta is added here. One hook per module adds
``x·rᵀ`` (or the Conv1D / embedding / bias equivalent) in fp32 for every residual it carries.
"""
from __future__ import annotations

from contextlib import contextmanager
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)

_ROUNDING_ATTR = "_editkit_rounding"
LOST_WARN_FRACTION = 1e-2  # plain rounding that loses more than this part of a delta's norm is logged


def _is_narrow(dtype: torch.dtype) -> bool:
    """A floating dtype that cannot hold an fp32 delta's small entries (fp16, bf16, fp8)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def _layout(module: nn.Module, attr: str) -> str | None:
    """How parameter ``attr`` of ``module`` enters the module's output; None when not known."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; keep plain torch models working without it
        Conv1D = ()  # noqa: N806
    if isinstance(module, (nn.Linear, Conv1D)):
        return {"weight": "conv1d" if isinstance(module, Conv1D) else "linear", "bias": "bias"}.get(attr)
    if isinstance(module, nn.Embedding) and attr == "weight" and module.max_norm is None:
        return "embedding"
    return None


@dataclass
class _Rounding:
    """One module's fp32 rounding residuals {parameter attribute: tensor}, added to its output by
    one forward hook. ``active`` is off while :func:`rounding_folded` has folded them into weights."""

    residuals: dict[str, torch.Tensor]
    layouts: dict[str, str]
    handle: RemovableHandle
    active: bool = True


def _rounding_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state: _Rounding | None = getattr(module, _ROUNDING_ATTR, None)
    if state is None or not state.active or not state.residuals or not isinstance(output, torch.Tensor):
        return None
    x = args[0] if args else next(iter(kwargs.values()))  # [..., d_in], or token ids for an embedding
    extra = torch.zeros((), dtype=torch.float32, device=output.device)
    for attr, r in list(state.residuals.items()):
        if r.device != output.device:  # the model was moved after the patch was applied
            r = state.residuals[attr] = r.to(output.device)
        layout = state.layouts[attr]
        if layout == "linear":  # nn.Linear: x·rᵀ, weight [out, in]
            extra = extra + F.linear(x.float(), r)
        elif layout == "conv1d":  # GPT-2 Conv1D: x·r, weight [in, out]
            extra = extra + x.float() @ r
        elif layout == "embedding":
            extra = extra + F.embedding(x, r)
        else:  # bias
            extra = extra + r
    return (output.float() + extra).to(output.dtype)


def _owners(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) holding ``param`` itself (tied weights have several)."""
    found, seen = [], set()
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is param and id(module) not in seen:
                seen.add(id(module))
                found.append((module, attr))
    return found


def _set_residual(module: nn.Module, attr: str, layout: str, residual: torch.Tensor) -> None:
    state: _Rounding | None = getattr(module, _ROUNDING_ATTR, None)
    if state is None:
        handle = module.register_forward_hook(_rounding_hook, with_kwargs=True)
        try:
            object.__setattr__(module, _ROUNDING_ATTR, _Rounding({}, {}, handle))
        except BaseException:
            handle.remove()
            raise
        state = getattr(module, _ROUNDING_ATTR)
    # new dicts, never changed in place: Patch.applied restores the previous ones as they were
    state.residuals = {**state.residuals, attr: residual}
    state.layouts = {**state.layouts, attr: layout}


def _drop_rounding(module: nn.Module) -> None:
    state: _Rounding | None = getattr(module, _ROUNDING_ATTR, None)
    if state is not None:
        state.handle.remove()
        object.__delattr__(module, _ROUNDING_ATTR)


def rounding_residuals(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: fp32 rounding residual} that hooks of ``model`` add (empty for fp32 models)."""
    out = {}
    for mod_name, module in model.named_modules():
        state: _Rounding | None = getattr(module, _ROUNDING_ATTR, None)
        for attr, r in (state.residuals.items() if state is not None else ()):
            out[f"{mod_name}.{attr}" if mod_name else attr] = r
    return out


@contextmanager
def rounding_folded(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block each rounding residual is folded into its weight (rounded to the weight's
    dtype) and the hooks are idle, so the state dict holds the edit as far as its dtypes can: all of
    it for fp32 weights (e.g. after ``model.float()``), little of it for half precision. Yields
    {parameter name: ‖part still lost‖_F}. On exit the weights and hooks are restored bit-exactly.
    For saving; the model gives the same outputs inside only where nothing is lost."""
    states = [(name, m, getattr(m, _ROUNDING_ATTR)) for name, m in model.named_modules()
              if getattr(m, _ROUNDING_ATTR, None) is not None]
    originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    lost: dict[str, float] = {}
    try:
        with torch.no_grad():
            for mod_name, module, state in states:
                state.active = False
                for attr, r in state.residuals.items():
                    param = module._parameters[attr]
                    if id(param) in originals:  # tied: folded through its other owner
                        continue
                    originals[id(param)] = (param, param.detach().clone())
                    target = param.float() + r.to(param.device)
                    param.copy_(target.to(param.dtype))
                    remaining = float((target - param.float()).norm())
                    if remaining > 0:
                        lost[f"{mod_name}.{attr}" if mod_name else attr] = remaining
        yield lost
    finally:
        with torch.no_grad():
            for param, original in originals.values():
                param.copy_(original)
        for _, _, state in states:
            state.active = True




# -- gated deltas ------------------------------------------------------------------------------
_GATED_ATTR = "_editkit_gated"
GATED_LAYOUTS = ("linear", "conv1d")


@dataclass
class _Gated:
    """One module's gated deltas {token: (layout, Δ, w, b)}: its output gains sigmoid(x·w + b)·(x·Δᵀ)
    for each (x·Δ for a Conv1D), in fp32, from one forward hook."""

    entries: dict[int, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]
    handle: RemovableHandle
    next_token: int = 0


def _gated_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state: _Gated | None = getattr(module, _GATED_ATTR, None)
    if state is None or not state.entries or not isinstance(output, torch.Tensor):
        return None
    x = (args[0] if args else next(iter(kwargs.values()))).float()
    extra = torch.zeros((), dtype=torch.float32, device=output.device)
    for token, (layout, delta, weight, bias) in list(state.entries.items()):
        if delta.device != x.device:  # the model was moved after the patch was applied
            delta, weight, bias = delta.to(x.device), weight.to(x.device), bias.to(x.device)
            state.entries[token] = (layout, delta, weight, bias)
        carried = F.linear(x, delta) if layout == "linear" else x @ delta
        extra = extra + torch.sigmoid(x @ weight + bias).unsqueeze(-1) * carried
    return (output.float() + extra).to(output.dtype)


def add_gated(module: nn.Module, layout: str, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """Carry ``delta`` on ``module``'s output behind the gate sigmoid(x·weight + bias); returns a
    token for :func:`remove_gated`."""
    if layout not in GATED_LAYOUTS:
        raise ValueError(f"a gated delta needs a linear or Conv1D module, not layout {layout!r}")
    state: _Gated | None = getattr(module, _GATED_ATTR, None)
    if state is None:
        handle = module.register_forward_hook(_gated_hook, with_kwargs=True)
        try:
            object.__setattr__(module, _GATED_ATTR, _Gated({}, handle))
        except BaseException:
            handle.remove()
            raise
        state = getattr(module, _GATED_ATTR)
    token = state.next_token
    state.next_token += 1
    state.entries[token] = (layout, delta.float(), weight.float(), bias.float())
    return token


def remove_gated(module: nn.Module, token: int) -> None:
    """Drop one gated delta (and the hook with the module's last one)."""
    state: _Gated | None = getattr(module, _GATED_ATTR, None)
    if state is None:
        return
    state.entries.pop(token, None)
    if not state.entries:
        state.handle.remove()
        object.__delattr__(module, _GATED_ATTR)


def gated_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that carry gated deltas (a change no weight holds)."""
    return [name for name, module in model.named_modules() if getattr(module, _GATED_ATTR, None) is not None]
