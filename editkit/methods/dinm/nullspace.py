"""Null-space constraint for DINM (the AlphaEdit idea): the delta may only act on input directions
that benign text barely uses.

Keys K are the inputs of the edited layer's MLP output projection at every non-pad token of the
authored benign requests (:func:`editkit.methods.dinm.constraints.constraint_requests`, all of
them, without and with the suffix, rendered as the edit renders its prompts). The eigen-directions
of G = K·Kᵀ/n whose eigenvalue is below ``tol`` × the largest span the null space, and
P = U_null·U_nullᵀ projects onto it. A delta composed with P (Δ·P for an [out, in] weight, P·Δ for
GPT-2's [in, out] Conv1D) changes the projection's output on a key k by at most
‖Δ‖·‖P·k‖, which is small for every key, whatever the training does.

The keys depend on the model's weights up to the edited layer, the layer, and the rendered token
ids; their eigendecomposition is cached per model under those (a
:class:`~editkit.methods.dinm.cache.ModelCache`, the weights identified by
:func:`~editkit.methods.dinm.cache.weights_digest`; a model carrying forward hooks is not cached).
A second edit of the same layer, with any ``tol``, costs a tokenisation and a fingerprint instead
of a forward pass over ~90 prompts and an eigendecomposition; each tol's projector is kept too.
The eigendecomposition is also kept on disk (:class:`~editkit.methods.dinm.cache.DiskStore`, ~9 MB
a layer of SmolLM2-135M), so an edit in a new process reads it instead of computing it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap, decoder_layers, get_module
from editkit.devices import execution_device, is_offloaded
from editkit.hooks import Trace
from editkit.methods.dinm.cache import DiskStore, ModelCache, cache_blocker, weights_digest
from editkit.methods.dinm.constraints import constraint_requests
from editkit.text import ChatMode, pad_id, pad_right, prompts_ids, with_suffix

log = logging.getLogger(__name__)

BATCH_SIZE = 16  # prompts per forward pass while collecting keys
CACHE_PER_MODEL = 4  # key spaces kept per model (least recently used dropped first)

_CACHE = ModelCache(CACHE_PER_MODEL)  # model -> cache key -> KeySpace
_DISK = DiskStore("nullspace")  # cache key -> eigenvalues, eigenvectors, n_keys


@dataclass(frozen=True)
class KeySpace:
    """Eigendecomposition of the keys' second-moment matrix G = K·Kᵀ / n_keys (fp32)."""

    eigenvalues: torch.Tensor  # [d_in] ascending, >= 0
    eigenvectors: torch.Tensor  # [d_in, d_in] orthonormal columns
    n_keys: int
    _projectors: dict[float, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def null_mask(self, tol: float) -> torch.Tensor:
        """[d_in] bool: the eigen-directions in the null space (eigenvalue below tol × the largest)."""
        top = float(self.eigenvalues[-1])
        if top <= 0:  # keys that are all zero constrain nothing
            return torch.ones_like(self.eigenvalues, dtype=torch.bool)
        return self.eigenvalues < tol * top

    def projector(self, tol: float) -> torch.Tensor:
        """[d_in, d_in] fp32 orthogonal projector onto the null space at ``tol`` (kept per tol)."""
        if tol not in self._projectors:
            basis = self.eigenvectors[:, self.null_mask(tol)]  # [d_in, r]
            self._projectors[tol] = basis @ basis.T
        return self._projectors[tol]

    def output_change(self, delta: torch.Tensor, weight: torch.Tensor, transposed: bool) -> float:
        """‖Δ-part of the projection's output on the keys‖_F / ‖its output on the keys‖_F, from G
        alone: ‖Δ·K‖² = tr(Δ·G·Δᵀ) = ‖Δ·S‖² with G = S·Sᵀ ([in, out] layouts transposed)."""
        root = self.eigenvectors * self.eigenvalues.clamp_min(0).sqrt()  # [d_in, d_in], G = root·rootᵀ

        def energy(matrix: torch.Tensor) -> float:
            matrix = matrix.detach().to(root.device, torch.float32)
            return float((root.T @ matrix).norm() if transposed else (matrix @ root).norm())

        base = energy(weight)
        return energy(delta) / base if base > 0 else float("inf")


class _StopForward(Exception):
    """Raised by the collecting hook once the keys are read: the layers above are not needed."""


def _stop(output: Any, module: nn.Module) -> Any:
    raise _StopForward


def guard_prompts(suffix: str | None, requests: Sequence[str] | None = None) -> list[str]:
    """The benign prompts whose keys the delta must leave alone: every authored request, then
    (when ``suffix`` is given) every request with the suffix, as the edited model is asked both ways."""
    requests = list(constraint_requests() if requests is None else requests)
    return requests + ([with_suffix(r, suffix) for r in requests] if suffix else [])


def render(tokenizer: Any, prompts: Sequence[str], *, chat_template: ChatMode, max_length: int) -> list[list[int]]:
    """Token ids of ``prompts`` as the edit encodes a prompt (its end kept when over-long)."""
    return [ids[-max_length:] for ids in prompts_ids(tokenizer, prompts, chat_template)]


@torch.no_grad()
def _key_batches(model: nn.Module, arch: ArchMap, layer: int, ids: Sequence[list[int]], pad: int,
                 batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(positions in ``ids``, keys [b, t, d_in], mask [b, t]) per batch of similar lengths, right
    padded: the input of ``layer``'s MLP output projection. The model runs in eval mode (restored
    after); unless accelerate offloads some of it, the forward stops at the projection."""
    module = get_module(decoder_layers(model, arch)[layer], arch.mlp_out)
    base = get_module(model, arch.base)
    device = execution_device(module)
    # raising through accelerate's offload hooks would skip their post-forward (weights left loaded)
    stop = not any(is_offloaded(m) for m in model.modules())
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    was_training = model.training
    model.eval()  # no dropout in the keys
    try:
        with Trace(module, retain_input=True, retain_output=False, edit_output=_stop if stop else None,
                   detach=True) as trace:
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                input_ids, mask = pad_right([ids[i] for i in chosen], pad)
                input_ids, mask = input_ids.to(device), mask.to(device)
                try:
                    base(input_ids=input_ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                yield chosen, trace.input, mask.bool()
    finally:
        model.train(was_training)


def collect_gram(model: nn.Module, arch: ArchMap, layer: int, ids: Sequence[list[int]], pad: int,
                 *, batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, int]:
    """(Σ k·kᵀ over the keys [d_in, d_in] fp32, number of keys): k the input of ``layer``'s MLP
    output projection at every non-pad position of ``ids`` (see :func:`_key_batches`)."""
    gram: torch.Tensor | None = None
    n_keys = 0
    for _, inputs, mask in _key_batches(model, arch, layer, ids, pad, batch_size):
        keys = inputs[mask].float()  # [n_tokens, d_in]
        gram = keys.T @ keys if gram is None else gram.addmm_(keys.T, keys)
        n_keys += keys.shape[0]
    if gram is None:
        raise ValueError("no prompts to collect null-space keys from")
    return gram, n_keys


def collect_keys(model: nn.Module, arch: ArchMap, layer: int, ids: Sequence[list[int]], pad: int,
                 *, last_only: bool = False, batch_size: int = BATCH_SIZE) -> list[torch.Tensor]:
    """Per sequence of ``ids`` (in order), its keys [len, d_in] fp32, or with ``last_only`` the
    key of its last token [d_in]."""
    out: list[torch.Tensor | None] = [None] * len(ids)
    for chosen, inputs, mask in _key_batches(model, arch, layer, ids, pad, batch_size):
        for row, i in enumerate(chosen):
            n = int(mask[row].sum())
            out[i] = inputs[row, n - 1].float().clone() if last_only else inputs[row, :n].float().clone()
    return out  # type: ignore[return-value]


def key_space(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchMap,
    layer: int,
    *,
    suffix: str | None,
    chat_template: ChatMode,
    max_length: int,
    requests: Sequence[str] | None = None,
    disk: bool = True,
) -> tuple[KeySpace, bool]:
    """The key space of ``layer`` on the guard prompts (see :func:`guard_prompts`), and whether it
    came from a cache (memory, or with ``disk`` the disk store)."""
    ids = render(tokenizer, guard_prompts(suffix, requests), chat_template=chat_template, max_length=max_length)
    module = get_module(decoder_layers(model, arch)[layer], arch.mlp_out)
    blocker = cache_blocker(model)
    key = None
    if blocker is None:
        key = (layer, f"{arch.layers}.{layer}.{arch.mlp_out}", str(module.weight.dtype),
               hashlib.sha256(json.dumps(ids).encode()).hexdigest(), weights_digest(model, arch, layer))
        space = _CACHE.get(model, key)
        if space is None and disk:
            space = _read_disk(key, module.weight.shape[1 if not arch.mlp_out_transposed else 0],
                               execution_device(module))
            if space is not None:
                _CACHE.put(model, key, space)
        if space is not None:
            return space, True
    else:
        log.debug("null-space keys not cached: %s", blocker)
    gram, n_keys = collect_gram(model, arch, layer, ids, pad_id(tokenizer))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram / n_keys)  # fp32, ascending
    space = KeySpace(eigenvalues.clamp_min(0), eigenvectors, n_keys)
    if key is not None:
        _CACHE.put(model, key, space)
        if disk:
            _DISK.write_tensors(key, {"eigenvalues": space.eigenvalues, "eigenvectors": space.eigenvectors},
                                {"n_keys": str(n_keys)})
    return space, False


def _read_disk(key: tuple, d_in: int, device: torch.device) -> KeySpace | None:
    """The key space stored under ``key``, on ``device``, or None (absent, unreadable or malformed)."""
    found = _DISK.read_tensors(key)
    if found is None:
        return None
    tensors, meta = found
    values, vectors = tensors.get("eigenvalues"), tensors.get("eigenvectors")
    if (values is None or vectors is None or values.shape != (d_in,) or vectors.shape != (d_in, d_in)
            or not meta.get("n_keys", "").isdigit()):
        log.warning("null-space disk cache entry malformed, recomputing")
        return None
    return KeySpace(values.to(device, torch.float32), vectors.to(device, torch.float32), int(meta["n_keys"]))


def clear_cache() -> None:
    """Forget every cached key space (e.g. after changing a model's weights in a way fingerprint
    samples could miss; :func:`editkit.methods.dinm.cache.clear_cache` forgets every DINM cache)."""
    _CACHE.clear()
