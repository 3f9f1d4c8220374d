"""What DINM reads from the unedited model and may reuse across edits of that model.

Across the edits of a SafeEdit run (one model, many records, a few layers) much of an edit does not
depend on the edited record: the guard's self-answers (the unedited model's greedy answers to the
authored benign requests, see :mod:`~editkit.methods.dinm.constraints`), the reference pass's
pieces of every sequence that recurs (the benign rows above all: the state entering the edited
layer, and the final hidden state where the losses read logits, see
:class:`editkit.engine.RowReference`), the null-space key spaces (:mod:`~editkit.methods.dinm.nullspace`).

Each cache here is a :class:`ModelCache`: entries per model, held weakly (a model's entries are
freed with the model), least recently used dropped first beyond a bound. Entries are keyed under a
:func:`weights_digest` of the weights they depend on, taken from :func:`editkit.patch.fingerprint`
samples: a dense change such as an applied patch shows in them, a change to a few entries may not
(:func:`clear_cache` forgets everything). A model that carries forward hooks (a hook-carried patch,
an intervention, a trace) computes what its weights alone do not say: :func:`cache_blocker` names
the reason and nothing is read from or written to a cache for it.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from torch import nn

from editkit.arch import ArchMap
from editkit.devices import real_values
from editkit.engine import RowReference
from editkit.patch import fingerprint

# reference rows kept per model, in bytes: ~0.2 MB a benign row on SmolLM2-135M (fp32), so every authored
# request with and without the suffix at several layers, and the recurring rows of a run, fit
REFERENCE_BYTES = 256 * 2**20

_CACHES: weakref.WeakSet[ModelCache] = weakref.WeakSet()  # every cache, for clear_cache()


class ModelCache:
    """Per-model LRU maps: ``get(model, key)`` / ``put(model, key, value)``. Each model's entries
    are bounded by ``capacity`` in units of ``size(value)`` (1 per entry unless given); a value
    larger than the whole capacity is not kept."""

    def __init__(self, capacity: int, size: Callable[[Any], int] | None = None) -> None:
        self.capacity = capacity
        self._size = size or (lambda value: 1)
        # model -> (entries in use order, their total size); weak, so a model's entries go with it
        self._models: weakref.WeakKeyDictionary[nn.Module, tuple[OrderedDict[Hashable, Any], list[int]]] = (
            weakref.WeakKeyDictionary())
        _CACHES.add(self)

    def get(self, model: nn.Module, key: Hashable) -> Any | None:
        held = self._models.get(model)
        if held is None or key not in held[0]:
            return None
        held[0].move_to_end(key)
        return held[0][key]

    def put(self, model: nn.Module, key: Hashable, value: Any) -> None:
        size = self._size(value)
        if size > self.capacity:
            return
        entries, total = self._models.setdefault(model, (OrderedDict(), [0]))
        if key in entries:
            total[0] -= self._size(entries.pop(key))
        entries[key] = value
        total[0] += size
        while total[0] > self.capacity:
            total[0] -= self._size(entries.popitem(last=False)[1])

    def used(self, model: nn.Module) -> tuple[int, int]:
        """(entries, total size) held for ``model``."""
        held = self._models.get(model)
        return (0, 0) if held is None else (len(held[0]), held[1][0])

    def clear(self) -> None:
        self._models.clear()


_ROWS = ModelCache(REFERENCE_BYTES, size=lambda row: row.nbytes)  # model -> (digest, editor's key) -> RowReference


class _ReferenceRows:
    """The :class:`editkit.engine.RowStore` of one model in one state of its weights."""

    def __init__(self, model: nn.Module, digest: str) -> None:
        self.model, self.digest = model, digest

    def get(self, key: Hashable) -> RowReference | None:
        return _ROWS.get(self.model, (self.digest, key))

    def put(self, key: Hashable, value: RowReference) -> None:
        _ROWS.put(self.model, (self.digest, key), value)


def reference_rows(model: nn.Module, digest: str) -> _ReferenceRows:
    """The reference rows kept for ``model`` whose weights have ``digest`` (see :func:`weights_digest`;
    the caller checks :func:`cache_blocker` first)."""
    return _ReferenceRows(model, digest)


def clear_cache() -> None:
    """Forget everything every DINM cache holds (self-answers, reference rows, key spaces), e.g.
    after changing a model's weights in a way fingerprint samples could miss."""
    for cache in list(_CACHES):
        cache.clear()


def cache_blocker(model: nn.Module) -> str | None:
    """Why ``model``'s results may not be cached (it carries forward hooks), or None."""
    import torch.nn.modules.module as torch_module

    if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
        return "global forward hooks are registered"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or type(model).__name__!r} carries forward hooks"
    return None


def weights_digest(model: nn.Module, arch: ArchMap | None = None, layer: int | None = None) -> str:
    """A digest of :func:`~editkit.patch.fingerprint` samples of ``model``'s weights: all of them,
    or (``arch`` and ``layer`` given) those a state entering ``layer``'s MLP output projection
    depends on: the weights outside the decoder layers (embeddings; the head and final norm too,
    harmlessly) and those of layers 0..``layer``."""
    if (arch is None) != (layer is None):
        raise ValueError("weights_digest needs both arch and layer, or neither")
    prefix = f"{arch.layers}." if arch is not None else None
    digest = hashlib.sha256()
    for name, _ in model.named_parameters():
        if prefix is not None and name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) > layer:
            continue
        sample = fingerprint(real_values(model, name))
        digest.update(json.dumps([name, sample["shape"], sample["values"]]).encode())
    return digest.hexdigest()
