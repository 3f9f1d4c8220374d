"""Where a weight really is: models dispatched by accelerate (``device_map``, CPU or disk offload).

An offloaded module keeps its parameters on the ``meta`` device and accelerate's hook loads the real
values to the module's execution device for each forward, then drops them. So the values of such a
weight are read inside ``accelerate.utils.align_module_device`` (its public API), a delta for it
lives on its execution device, and a patch adds its effect through a forward hook (a weight
written between forwards would be dropped by the next one). Without accelerate, or for modules it
does not offload, every function here is the plain PyTorch answer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own parameters off-device between forwards."""
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:
        return False
    return has_offloaded_params(module)


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``module``'s own parameters hold their real values on its execution
    device (a no-op for a module that is not offloaded)."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` and the parameter's attribute name there."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def execution_device(module: nn.Module, attr: str = "weight") -> torch.device:
    """The device on which ``module``'s parameter ``attr`` takes part in the forward."""
    with materialized(module):
        return getattr(module, attr).device


@torch.no_grad()
def real_values(model: nn.Module, name: str) -> torch.Tensor:
    """The values of parameter ``name`` (a detached tensor on its execution device; a copy for an
    offloaded weight, the parameter itself otherwise)."""
    module, attr = owner(model, name)
    if not is_offloaded(module):
        return getattr(module, attr).detach()
    with materialized(module):
        return getattr(module, attr).detach().clone()
