"""A greedy decoding loop of our own, for batches of prompts of very different lengths.

``model.generate`` on a left-padded batch prefills every row at the batch's full width (the padding
is computed, and the padding mask keeps attention off its fastest kernel) and grows its key/value
cache by concatenation, copying the whole cache at every step. Here each prompt is prefilled alone,
without padding (a long token prefix it shares with an earlier prompt of the batch is not computed
twice), its keys and values are written into one preallocated left-padded cache, and all rows are
then decoded together: each row's positions are the ones ``generate`` derives from the attention
mask (0 at its first real token), and rows that have stopped leave the batch when that pays.

The loop is only used where it is known to give ``generate``'s greedy tokens (see
:func:`loop_blocker`); ``editkit.generate`` falls back to ``model.generate`` everywhere else.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

# Families whose greedy tokens the tests compare with ``model.generate`` (tests/test_generation.py);
# sliding-window layers (Mistral, Gemma-2) are only exact while the window does not bind.
LOOP_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2", "gpt2", "gpt_neox", "gptj"}
)
# ``generate`` options the loop honours; any other option (sampling, beams, penalties...) falls back.
_LOOP_OPTIONS = frozenset({"do_sample", "max_new_tokens", "pad_token_id", "eos_token_id", "temperature",
                           "top_p", "top_k", "suppress_tokens", "use_cache"})
# generation-config fields that would add a logits processor, a stopping rule or another search
_CONFIG_FIELDS = ("num_beams", "num_beam_groups", "penalty_alpha", "repetition_penalty", "encoder_repetition_penalty",
                  "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length",
                  "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                  "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "guidance_scale",
                  "watermarking_config", "stop_strings", "max_time", "assistant_model", "prompt_lookup_num_tokens",
                  "cache_implementation", "renormalize_logits", "token_healing", "dola_layers")
# a shared prefix shorter than this is prefilled again: the saving would be small, and the tokens
# after a reused prefix go through a masked attention kernel (float noise, however slight)
MIN_SHARED_PREFIX = 16


def loop_blocker(model: Any, options: Mapping[str, Any], max_length: int) -> str | None:
    """Why :func:`greedy_decode` may not stand in for ``model.generate(**options)`` on sequences
    of up to ``max_length`` tokens, or None when it may."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LOOP_MODEL_TYPES:
        return f"model_type {model_type!r} is not one the loop is tested on"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return f"attention implementation {config._attn_implementation!r}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and max_length > window:
        return f"sequences of {max_length} tokens exceed the sliding window ({window})"
    unknown = sorted(set(options) - _LOOP_OPTIONS)
    if unknown:
        return f"generation options {unknown}"
    if options.get("do_sample") or options.get("use_cache", True) is False:
        return "sampling or no cache"
    if any(options.get(k) is not None for k in ("temperature", "top_p", "top_k")):
        return "temperature/top_p/top_k given"
    if eos_ids(options.get("eos_token_id")) is None:
        return "no end-of-sequence token"
    try:
        _cache_layer_class()
    except ImportError:  # the slab cache builds on transformers' per-layer cache API (4.54+)
        return "this transformers version has no per-layer cache (transformers.cache_utils.DynamicLayer)"
    if "position_ids" not in inspect.signature(model.forward).parameters or cache_keyword(model) is None:
        return f"the model's forward takes no position_ids or cache argument (one of {CACHE_KEYWORDS})"
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        from transformers import GenerationConfig

        default = GenerationConfig()
        changed = [f for f in _CONFIG_FIELDS if getattr(gen_config, f, None) != getattr(default, f, None)]
        if changed:
            return f"the model's generation config sets {changed}"
    return None


# The forward's key/value-cache argument: ``cache`` from transformers 5.24 on (where
# ``past_key_values`` is a deprecated alias, to be removed), ``past_key_values`` before. Read from the
# signature, never from a version number.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: Any) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache, or None if it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def eos_ids(eos: int | Sequence[int] | None) -> list[int] | None:
    if eos is None:
        return None
    ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return ids or None


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


def _prefill(
    model: Any,
    prompts: Sequence[Sequence[int]],
    capacity: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    min_shared_prefix: int,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Each prompt through the model alone, without padding, its keys and values written into
    per-layer slabs [rows, kv_heads, capacity, head_dim] right-aligned at column ``max(lengths)``;
    a prefix of at least ``min_shared_prefix`` tokens shared with an earlier prompt is taken from
    that prompt's slab row instead of being recomputed. Returns the slabs and each row's first token."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_arg = cache_keyword(model)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    slabs: list[tuple[torch.Tensor, torch.Tensor]] = []
    first = torch.empty(len(prompts), dtype=torch.long, device=device)
    for r, ids in enumerate(prompts):
        n = lengths[r]
        source, shared = -1, 0
        for j in range(r):
            common = _shared_prefix(ids, prompts[j])
            if common > shared:
                source, shared = j, common
        shared = min(shared, n - 1)  # at least one token goes through the model, for its logits
        if shared >= min_shared_prefix:
            start = width - lengths[source]
            cache = DynamicCache(ddp_cache_data=[(k[source:source + 1, :, start:start + shared],
                                                  v[source:source + 1, :, start:start + shared]) for k, v in slabs])
        else:
            shared, cache = 0, DynamicCache()
        out = model(input_ids=torch.tensor([list(ids[shared:])], device=device),
                    attention_mask=torch.ones((1, n), dtype=torch.long, device=device),
                    position_ids=torch.arange(shared, n, device=device)[None],
                    use_cache=True, **{cache_arg: cache}, **keep_last)
        first[r] = pick(out.logits[:, -1])[0]
        layers = out.get(cache_arg, cache).layers  # the cache it was given, filled
        if not slabs:
            for layer in layers:  # [1, kv_heads, n, head_dim] -> [rows, kv_heads, capacity, head_dim]
                shape = (len(prompts), layer.keys.shape[1], capacity, layer.keys.shape[3])
                slabs.append((layer.keys.new_zeros(shape), layer.values.new_zeros(shape)))
        for (k, v), layer in zip(slabs, layers):
            k[r, :, width - n:width] = layer.keys[0]
            v[r, :, width - n:width] = layer.values[0]
        del out, cache, layers
    return slabs, first


@torch.no_grad()
def greedy_decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    suppress_tokens: Sequence[int] | None = None,
    min_shared_prefix: int = MIN_SHARED_PREFIX,
) -> list[list[int]]:
    """Greedy continuations of the token-id ``prompts`` (one batch), as ``model.generate`` would
    give them one prompt at a time: at most ``max_new_tokens`` ids each, ending at the first
    end-of-sequence id (included). Check :func:`loop_blocker` first."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_decode needs non-empty prompts")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be positive")
    device = next(model.parameters()).device
    stop = torch.tensor(eos_ids(eos_token_id) or [], dtype=torch.long, device=device)
    suppress = torch.tensor(list(suppress_tokens or []), dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [rows, vocab] -> [rows], as generate's greedy step
        scores = logits.float()
        if suppress.numel():
            scores = scores.index_fill(-1, suppress, float("-inf"))
        return scores.argmax(-1)

    rows = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    # absolute column `width + t - 1` holds the t-th generated token (t >= 1); the last is never fed
    capacity = width + max_new_tokens - 1
    slabs, tokens = _prefill(model, prompts, capacity, pick, min_shared_prefix)

    # decode all rows together from the merged left-padded cache
    new: list[list[int]] = [[t] for t in tokens.tolist()]
    done = torch.isin(tokens, stop)
    active = torch.arange(rows, device=device)  # original row of each batch row
    position = torch.tensor(lengths, device=device)  # position of the token fed next, per batch row
    mask = torch.zeros((rows, capacity), dtype=torch.long, device=device)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    cache_arg = cache_keyword(model)
    offset = 0  # absolute column of the slabs' column 0 (once all-padding columns are trimmed away)
    cache = _slab_cache(slabs, width)
    for step in range(1, max_new_tokens):
        if bool(done.all()):
            break
        finished = int(done.sum())
        if finished and finished * (max_new_tokens - step) >= len(active):  # the copy pays for itself
            keep = (~done).nonzero().squeeze(1)
            active, position, tokens, done, mask = active[keep], position[keep], tokens[keep], done[keep], mask[keep]
            trim = int((mask[:, offset:].cumsum(1) == 0).sum(1).min())  # columns that are padding in all rows
            length = width + step - 1 - offset
            slabs = [(k[:, :, trim:][keep], v[:, :, trim:][keep]) for k, v in slabs]  # copies
            offset += trim
            cache = _slab_cache(slabs, length - trim)
        out = model(input_ids=tokens[:, None], attention_mask=mask[:, offset:width + step],
                    position_ids=position[:, None], use_cache=True, **{cache_arg: cache})
        tokens = pick(out.logits[:, -1])
        del out
        position = position + 1
        for row, token, stopped in zip(active.tolist(), tokens.tolist(), done.tolist()):
            if not stopped:
                new[row].append(token)
        done = done | torch.isin(tokens, stop)
    return new
