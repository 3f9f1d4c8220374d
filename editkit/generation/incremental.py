"""A causal LM run incrementally over a batch of token rows, with a key/value cache of its own.

The greedy loop runs the generator this way, and a decoding-time detoxifier runs an auxiliary model
(DExperts' anti-expert) the same way beside it. Both runners have one interface::

    batch = open_batch(model, prompts, new_tokens=n)   # prompts: token ids, no padding
    logits = batch.prefill()          # [rows, vocab] next-token logits after each prompt
    logits = batch.advance(tokens)    # [rows] one token fed per row -> [rows, vocab]
    batch.keep(index)                 # rows leave the batch: keep these (positions in the batch)

:class:`SlabBatch` is the fast one: each prompt is prefilled alone, without padding (a long token
prefix it shares with an earlier prompt of the batch is not computed twice), its keys and values are
written into one preallocated left-padded cache (a "slab" per layer, no concatenation per step), and
each row's positions are the ones ``generate`` derives from the attention mask (0 at its first real
token). It is used where it is known to give ``generate``'s logits (:func:`architecture_blocker`).
:class:`PaddedBatch` runs any causal LM whose forward takes a cache: left-padded prefill, a
transformers ``DynamicCache``.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from editkit.text import pad_left

log = logging.getLogger(__name__)

# Families whose greedy tokens the tests compare with ``model.generate`` (tests/test_generation.py);
# sliding-window layers (Mistral, Gemma-2) are only exact while the window does not bind.
SLAB_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2", "gpt2", "gpt_neox", "gptj"}
)
# a shared prefix shorter than this is prefilled again: the saving would be small, and the tokens
# after a reused prefix go through a masked attention kernel (float noise, however slight)
MIN_SHARED_PREFIX = 16
# The forward's key/value-cache argument: ``cache`` from transformers 5.24 on (where
# ``past_key_values`` is a deprecated alias, to be removed), ``past_key_values`` before. Read from the
# signature, never from a version number.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: Any) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache, or None if it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def architecture_blocker(model: Any, max_length: float) -> str | None:
    """Why :class:`SlabBatch` may not stand in for ``model``'s own cached forward on sequences of up
    to ``max_length`` tokens, or None when it may."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SLAB_MODEL_TYPES:
        return f"model_type {model_type!r} is not one the loop is tested on"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return f"attention implementation {config._attn_implementation!r}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and max_length > window:
        return f"sequences of {max_length} tokens exceed the sliding window ({window})"
    try:
        _cache_layer_class()
    except ImportError:  # the slab cache builds on transformers' per-layer cache API (4.54+)
        return "this transformers version has no per-layer cache (transformers.cache_utils.DynamicLayer)"
    if "position_ids" not in inspect.signature(model.forward).parameters or cache_keyword(model) is None:
        return f"the model's forward takes no position_ids or cache argument (one of {CACHE_KEYWORDS})"
    return None


def open_batch(model: Any, prompts: Sequence[Sequence[int]], *, new_tokens: int | None = None,
               min_shared_prefix: int = MIN_SHARED_PREFIX) -> SlabBatch | PaddedBatch:
    """The fastest exact runner for ``model`` over ``prompts``, to be fed at most ``new_tokens``
    tokens per row (None: unknown; the cache then grows as needed)."""
    longest = max((len(p) for p in prompts), default=0) + (new_tokens if new_tokens is not None else float("inf"))
    reason = architecture_blocker(model, longest)
    if reason is None:
        return SlabBatch(model, prompts, new_tokens=new_tokens, min_shared_prefix=min_shared_prefix)
    log.debug("running %s with a padded DynamicCache: %s", type(model).__name__, reason)
    return PaddedBatch(model, prompts)


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a batch needs non-empty prompts")


@functools.cache
def _cache_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A cache layer over a preallocated [batch, heads, capacity, head_dim] slab: an update
        writes into the slab, and keys/values are views of its filled part (no concatenation)."""

        _layer_type = None  # never register in transformers' layer-type mapping

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self.slab_keys, self.slab_values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._set_length(length)

        def _set_length(self, length: int) -> None:
            if length > self.slab_keys.shape[2]:
                raise RuntimeError(f"cache slab of {self.slab_keys.shape[2]} positions overflows")
            self.length = length
            self.keys = self.slab_keys[:, :, :length]
            self.values = self.slab_values[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            n = key_states.shape[-2]
            self.slab_keys[:, :, self.length:self.length + n].copy_(key_states)
            self.slab_values[:, :, self.length:self.length + n].copy_(value_states)
            self._set_length(self.length + n)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    return SlabLayer


def _slab_cache(slabs: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> Any:
    from transformers import DynamicCache

    layer_class = _cache_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_class(k, v, length) for k, v in slabs]
    cache.layer_class_to_replicate = None
    return cache


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SlabBatch:
    """``model`` over a batch of prompts: unpadded prefill into per-layer slabs
    [rows, kv_heads, capacity, head_dim], right-aligned at column ``max(lengths)``, then one token per
    row per :meth:`advance`. Check :func:`architecture_blocker` first (or use :func:`open_batch`)."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], *, new_tokens: int | None = None,
                 min_shared_prefix: int = MIN_SHARED_PREFIX) -> None:
        _check_prompts(prompts)
        self.model, self.prompts = model, [list(p) for p in prompts]
        self.min_shared_prefix = min_shared_prefix
        self.device = next(model.parameters()).device
        self.cache_arg = cache_keyword(model)
        lengths = [len(p) for p in prompts]
        self.width = max(lengths)  # absolute column `width + t` holds the t-th fed token (t >= 0)
        # the last generated token is never fed: room for new_tokens - 1 (grown when unknown or exceeded)
        capacity = self.width + (max(0, new_tokens - 1) if new_tokens is not None else 32)
        self.mask = torch.zeros((len(prompts), capacity), dtype=torch.long, device=self.device)
        for r, n in enumerate(lengths):
            self.mask[r, self.width - n:] = 1
        self.position = torch.tensor(lengths, device=self.device)  # position of the token fed next, per row
        self.fed = 0  # tokens fed after the prompts
        self.offset = 0  # absolute column of the slabs' column 0 (once all-padding columns are trimmed away)
        self.slabs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache: Any = None

    @property
    def rows(self) -> int:
        return int(self.position.shape[0])

    def prefill(self) -> torch.Tensor:
        """Each prompt through the model alone, its keys and values written into the slabs; a prefix
        of at least ``min_shared_prefix`` tokens shared with an earlier prompt is taken from that
        prompt's slab row instead of being recomputed. Returns [rows, vocab] last-position logits."""
        from transformers import DynamicCache

        model, prompts, width = self.model, self.prompts, self.width
        keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        lengths = [len(p) for p in prompts]
        logits: torch.Tensor | None = None
        slabs = self.slabs
        for r, ids in enumerate(prompts):
            n = lengths[r]
            source, shared = -1, 0
            for j in range(r):
                common = _shared_prefix(ids, prompts[j])
                if common > shared:
                    source, shared = j, common
            shared = min(shared, n - 1)  # at least one token goes through the model, for its logits
            if shared >= self.min_shared_prefix:
                start = width - lengths[source]
                cache = DynamicCache(ddp_cache_data=[(k[source:source + 1, :, start:start + shared],
                                                      v[source:source + 1, :, start:start + shared]) for k, v in slabs])
            else:
                shared, cache = 0, DynamicCache()
            out = model(input_ids=torch.tensor([ids[shared:]], device=self.device),
                        attention_mask=torch.ones((1, n), dtype=torch.long, device=self.device),
                        position_ids=torch.arange(shared, n, device=self.device)[None],
                        use_cache=True, **{self.cache_arg: cache}, **keep_last)
            last = out.logits[0, -1]
            if logits is None:
                logits = last.new_empty((len(prompts), last.shape[-1]))
            logits[r] = last
            layers = out.get(self.cache_arg, cache).layers  # the cache it was given, filled
            if not slabs:
                for layer in layers:  # [1, kv_heads, n, head_dim] -> [rows, kv_heads, capacity, head_dim]
                    shape = (len(prompts), layer.keys.shape[1], self.mask.shape[1], layer.keys.shape[3])
                    slabs.append((layer.keys.new_zeros(shape), layer.values.new_zeros(shape)))
            for (k, v), layer in zip(slabs, layers):
                k[r, :, width - n:width] = layer.keys[0]
                v[r, :, width - n:width] = layer.values[0]
            del out, cache, layers
        self.cache = _slab_cache(slabs, width)
        return logits  # type: ignore[return-value]  # prompts are non-empty: every row set it

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([rows]); returns the next-token logits [rows, vocab]."""
        if self.cache is None:
            raise RuntimeError("prefill() before advance()")
        end = self.width + self.fed + 1  # absolute end of the filled columns once this token is in
        if end > self.mask.shape[1]:
            self._grow(max(32, self.mask.shape[1] - self.offset))
        out = self.model(input_ids=tokens.to(self.device)[:, None], attention_mask=self.mask[:, self.offset:end],
                         position_ids=self.position[:, None], use_cache=True, **{self.cache_arg: self.cache})
        self.fed += 1
        self.position = self.position + 1
        return out.logits[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows at ``index`` (positions in the current batch) stay; cache columns that are
        padding in every remaining row are trimmed away (the slabs are copied once)."""
        index = index.to(self.device)
        self.position, self.mask = self.position[index], self.mask[index]
        if self.cache is None:  # before prefill: only the prompts change
            self.prompts = [self.prompts[i] for i in index.tolist()]
            return
        trim = int((self.mask[:, self.offset:].cumsum(1) == 0).sum(1).min())  # padding in all rows
        length = self.width + self.fed - self.offset
        self.slabs = [(k[:, :, trim:][index], v[:, :, trim:][index]) for k, v in self.slabs]  # copies
        self.offset += trim
        self.cache = _slab_cache(self.slabs, length - trim)

    def _grow(self, extra: int) -> None:
        """Room for ``extra`` more positions (when more tokens are fed than announced)."""
        length = self.width + self.fed - self.offset
        ones = self.mask.new_ones((self.rows, extra))
        self.mask = torch.cat([self.mask, ones], 1)
        grown = []
        for k, v in self.slabs:
            pad = k.new_zeros((*k.shape[:2], extra, k.shape[3]))
            grown.append((torch.cat([k, pad], 2), torch.cat([v, pad], 2)))
        self.slabs = grown
        self.cache = _slab_cache(self.slabs, length)


def _forward_arguments(model: Any) -> tuple[str | None, bool]:
    """(cache keyword, takes position_ids) of ``model.forward``, looking through a wrapper whose
    forward passes ``**kwargs`` on to ``get_base_model()`` (a PEFT model)."""
    parameters = inspect.signature(model.forward).parameters
    keyword, positions = cache_keyword(model), "position_ids" in parameters
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if passes_on and hasattr(model, "get_base_model"):
        base = model.get_base_model()
        keyword = keyword or cache_keyword(base)
        positions = positions or "position_ids" in inspect.signature(base.forward).parameters
    return keyword, positions


class PaddedBatch:
    """Any causal LM whose forward takes a key/value cache: a left-padded prefill with positions
    from the attention mask, a transformers ``DynamicCache``, rows selected in place when they leave."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]]) -> None:
        _check_prompts(prompts)
        self.model, self.prompts = model, [list(p) for p in prompts]
        self.device = next(model.parameters()).device
        self.cache_arg, self.takes_positions = _forward_arguments(model)
        if self.cache_arg is None:
            raise ValueError(f"{type(model).__name__}.forward takes no key/value cache (one of {CACHE_KEYWORDS})")
        self.mask: torch.Tensor | None = None
        self.position: torch.Tensor | None = None
        self.cache: Any = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra = {"position_ids": positions} if self.takes_positions else {}
        out = self.model(input_ids=ids, attention_mask=self.mask, use_cache=True, **{self.cache_arg: self.cache}, **extra)
        return out.logits[:, -1]

    def prefill(self) -> torch.Tensor:
        from transformers import DynamicCache

        pad = next((t for p in self.prompts for t in p), 0)  # any id: padded positions are masked
        ids, mask = pad_left(self.prompts, pad)
        self.mask, ids = mask.to(self.device), ids.to(self.device)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        logits = self._forward(ids, positions)
        self.position = positions[:, -1] + 1
        return logits

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None or self.mask is None or self.position is None:
            raise RuntimeError("prefill() before advance()")
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], 1)
        logits = self._forward(tokens.to(self.device)[:, None], self.position[:, None])
        self.position = self.position + 1
        return logits

    def keep(self, index: torch.Tensor) -> None:
        if self.cache is None or self.mask is None or self.position is None:
            self.prompts = [self.prompts[i] for i in index.tolist()]
            return
        index = index.to(self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.position = self.mask[index], self.position[index]
