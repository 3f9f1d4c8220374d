"""What DINM reads from the unedited model and may reuse across edits of that model.

Across the edits of a SafeEdit run (one model, many records, a few layers) much of an edit does not
depend on the edited record: the guard's self-answers (the unedited model's greedy answers to the
authored benign requests, see :mod:`~editkit.methods.dinm.constraints`), the reference pass's
pieces of every sequence that recurs (the benign rows above all: the state entering the edited
layer, and the final hidden state where the losses read logits, see
:class:`editkit.engine.RowReference`), the null-space key spaces (:mod:`~editkit.methods.dinm.nullspace`).

Each in-memory cache here is a :class:`ModelCache`: entries per model, held weakly (a model's entries are
freed with the model), least recently used dropped first beyond a bound. Entries are keyed under a
:func:`weights_digest` of the weights they depend on, taken from :func:`editkit.patch.fingerprint`
samples: a dense change such as an applied patch shows in them, a change to a few entries may not
(:func:`clear_cache` forgets everything). A model that carries forward hooks (a hook-carried patch,
an intervention, a trace) computes what its weights alone do not say: :func:`cache_blocker` names
the reason and nothing is read from or written to a cache for it.

Three of them also live on disk (:class:`DiskStore`, under :func:`disk_dir`), because they cost a
cold edit most and depend on nothing a process owns: the null-space key spaces (a forward pass over
~90 prompts and an eigendecomposition), the guard's self-answers (a generation) and the small
reference rows (the guard's rows of an edit of the top layer, which keeps the predicting positions
only). A new process, e.g. each ``editkit edit`` call, then pays for them once per model and layer,
not once per edit.
The disk key holds the same weights digest as the memory key; files are written atomically and a
file that cannot be read is recomputed (and rewritten), never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap
from editkit.devices import real_values
from editkit.engine import RowReference
from editkit.patch import fingerprint

log = logging.getLogger(__name__)

# reference rows kept per model, in bytes: ~0.2 MB a benign row on SmolLM2-135M (fp32), so every authored
# request with and without the suffix at several layers, and the recurring rows of a run, fit
REFERENCE_BYTES = 256 * 2**20

_CACHES: weakref.WeakSet[ModelCache] = weakref.WeakSet()  # every cache, for clear_cache()
DISK_FORMAT = 1  # bump when what a disk entry holds changes meaning: older files are then ignored


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


# rows up to this size also go to disk. On SmolLM2-135M a row of a top-layer edit keeps its predicting
# positions only, ~11 KB each: a guard row (the same requests recur in every edit, 9 positions) is
# ~100 KB, a record's own edit and knowledge rows (50-70 positions, of no use to another record) are
# larger; a row of a lower layer keeps every position (~8 KB a token) and rarely fits
DISK_ROW_BYTES = 128 * 2**10


def _plain_key(key: Hashable) -> Any:
    """``key`` with its bytes replaced by their digest (JSON-able, for the disk store)."""
    if isinstance(key, bytes):
        return hashlib.sha256(key).hexdigest()
    if isinstance(key, tuple):
        return [_plain_key(k) for k in key]
    return key


class _ReferenceRows:
    """The :class:`editkit.engine.RowStore` of one model in one state of its weights (small rows
    also on disk when ``disk``)."""

    def __init__(self, model: nn.Module, digest: str, disk: bool = False) -> None:
        self.model, self.digest, self.disk = model, digest, disk

    def get(self, key: Hashable) -> RowReference | None:
        row = _ROWS.get(self.model, (self.digest, key))
        if row is None and self.disk:
            found = _DISK_ROWS.read_tensors([self.digest, _plain_key(key)])
            if found is not None and ("entry" in found[0] or "keys" in found[0]):  # (head_input is optional)
                row = RowReference(**found[0])
                _ROWS.put(self.model, (self.digest, key), row)
        return row

    def put(self, key: Hashable, value: RowReference) -> None:
        _ROWS.put(self.model, (self.digest, key), value)
        if self.disk and value.nbytes <= DISK_ROW_BYTES:
            _DISK_ROWS.write_tensors([self.digest, _plain_key(key)], value.tensors(), {})


def reference_rows(model: nn.Module, digest: str, *, disk: bool = False) -> _ReferenceRows:
    """The reference rows kept for ``model`` whose weights have ``digest`` (see :func:`weights_digest`;
    the caller checks :func:`cache_blocker` first); with ``disk``, rows up to ``DISK_ROW_BYTES`` are
    also kept in and read from the disk store."""
    return _ReferenceRows(model, digest, disk)


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


def disk_dir() -> Path | None:
    """Where DINM keeps its disk caches: ``$EDITKIT_DINM_CACHE``, else ``dinm/`` in editkit's cache
    (:func:`editkit.models.cache_dir`); None (no disk cache) when ``$EDITKIT_DINM_CACHE`` is ``off``."""
    from editkit.models import cache_dir

    root = os.environ.get("EDITKIT_DINM_CACHE")
    if root is not None and root.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    return Path(root).expanduser() if root else cache_dir() / "dinm"


class DiskStore:
    """Files of one kind under :func:`disk_dir`, one per key (a JSON-able value, hashed into the
    file name and stored inside the file, so a read checks it). Reads that fail (missing, truncated,
    another key, another format) return None; writes are atomic (a temporary file renamed) and a
    write that fails is logged and skipped: the cache is an optimisation, never a source of errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _path(self, key: Any, suffix: str) -> tuple[Path, str] | None:
        root = disk_dir()
        if root is None:
            return None
        text = json.dumps([DISK_FORMAT, self.kind, key], sort_keys=True, default=str)
        return root / self.kind / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}{suffix}", text

    def _write(self, path: Path, write: Callable[[Path], None]) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            tmp.replace(path)
        except OSError as err:
            log.warning("DINM disk cache not written (%s): %s", path, err)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # its folder is not there to hold it
                pass

    def read_json(self, key: Any) -> Any | None:
        found = self._path(key, ".json")
        if found is None or not found[0].is_file():
            return None
        try:
            stored = json.loads(found[0].read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("DINM disk cache entry unreadable, recomputing (%s): %s", found[0], err)
            return None
        return stored.get("value") if isinstance(stored, dict) and stored.get("key") == found[1] else None

    def write_json(self, key: Any, value: Any) -> None:
        found = self._path(key, ".json")
        if found is not None:
            text = json.dumps({"key": found[1], "value": value}, ensure_ascii=False)
            self._write(found[0], lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def read_tensors(self, key: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors on CPU, string metadata) or None."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        found = self._path(key, ".safetensors")
        if found is None or not found[0].is_file():
            return None
        try:
            with safe_open(str(found[0]), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("key") != found[1]:
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}, meta
        except (OSError, ValueError, SafetensorError) as err:
            log.warning("DINM disk cache entry unreadable, recomputing (%s): %s", found[0], err)
            return None

    def write_tensors(self, key: Any, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        found = self._path(key, ".safetensors")
        if found is not None:
            cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
            self._write(found[0], lambda tmp: save_file(cpu, str(tmp), metadata={**meta, "key": found[1]}))


_DISK_ROWS = DiskStore("rows")  # [weights digest, editor's key] -> the tensors of a small RowReference
