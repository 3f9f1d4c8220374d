"""Trace / TraceDict: read or replace module inputs and outputs during a forward pass.

Hooks are registered inside ``try`` and always removed in ``finally``, so an exception in the
forward pass leaves no hook behind.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from editkit.arch import get_module

OutputEdit = Callable[[Any, nn.Module], Any]
InputEdit = Callable[[tuple, dict, nn.Module], tuple[tuple, dict] | None]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class Trace:
    """Within the ``with`` block, keep the input and/or output of ``module`` of the last call.

    ``edit_output(output, module)`` may return a replacement output; ``edit_input(args, kwargs,
    module)`` may return replacement ``(args, kwargs)``. ``detach`` stores detached copies.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: OutputEdit | None = None,
        edit_input: InputEdit | None = None,
        detach: bool = False,
    ) -> None:
        self.module = module
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_output = edit_output
        self.edit_input = edit_input
        self.detach = detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.raw_output: Any = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t.detach() if (t is not None and self.detach) else t

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        replaced = self.edit_input(args, kwargs, module) if self.edit_input is not None else None
        if replaced is not None:
            args, kwargs = replaced
        if self.retain_input:
            self.input = self._keep(_first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states")))
        return replaced

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.edit_output is not None:
            new = self.edit_output(output, module)
            if new is not None:
                output = new
        if self.retain_output:
            self.raw_output = output
            self.output = self._keep(_first_tensor(output))
        return output

    def __enter__(self) -> Trace:
        try:
            if self.retain_input or self.edit_input is not None:
                self._handles.append(self.module.register_forward_pre_hook(self._pre, with_kwargs=True))
            if self.retain_output or self.edit_output is not None:
                self._handles.append(self.module.register_forward_hook(self._post))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


class TraceDict(dict):
    """One :class:`Trace` per dotted module name of ``root``: ``with TraceDict(model, names) as td:
    td[name].output``."""

    def __init__(self, root: nn.Module, names: Iterable[str], **trace_kwargs: Any) -> None:
        super().__init__()
        self._stack = ExitStack()
        self._root = root
        self._names = list(names)
        self._kwargs = trace_kwargs

    def __enter__(self) -> TraceDict:
        try:
            for name in self._names:
                self[name] = self._stack.enter_context(Trace(get_module(self._root, name), **self._kwargs))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in ``model`` (tests check it returns to 0)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
