"""The greedy decoding loop (editkit.generation.greedy_loop) against ``model.generate`` one prompt at a time,
and the fall-back to ``model.generate`` where the loop is not known to be exact."""
from __future__ import annotations

import functools
import random
import re

import pytest
import torch

import editkit
from editkit.generation import incremental
from editkit.generation.greedy_loop import MIN_SHARED_PREFIX, greedy_decode, loop_blocker
from editkit.models import TINY_EXTRA_TYPES, TINY_TYPES, tiny_model, tiny_tokenizer

PAD, EOS = 3, 2
NO_SPECIALS = [0, 1, 2, 3]  # random models favour the specials; keep them out of most tests


def _prompts(seed: int = 0) -> list[list[int]]:
    """Token-id prompts of very different lengths; some share a long prefix with an earlier one."""
    rng = random.Random(seed)
    base = [rng.randrange(4, 260) for _ in range(80)]
    other = [rng.randrange(4, 260) for _ in range(40)]
    return [
        base[:60] + [7, 8, 9],  # 63 tokens
        other[:5],  # short
        base[:50] + other,  # shares 50 tokens with the first
        [42],  # a single token
        base[:60] + [7, 8, 9],  # a duplicate: all but its last token come from the cache
        base[: MIN_SHARED_PREFIX - 1] + other[:9],  # shares too little to reuse it
    ]


def _model(model_type: str, seed: int = 0):
    """A tiny random model with its matrices scaled up: attention is peaked rather than near-uniform,
    so a wrong position or a wrong cache entry changes the greedy tokens (a default random model
    barely looks past the last token)."""
    model = tiny_model(model_type, tie_word_embeddings=False, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model


def _hf_greedy(model, ids: list[int], max_new_tokens: int, eos, suppress=None) -> list[int]:
    x = torch.tensor([ids])
    extra = {"suppress_tokens": suppress} if suppress else {}
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos, **extra)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("model_type", TINY_TYPES + TINY_EXTRA_TYPES)
def test_loop_equals_generate_one_at_a_time(model_type: str) -> None:
    model = _model(model_type)
    prompts = _prompts()
    assert loop_blocker(model, {"do_sample": False, "eos_token_id": EOS}, 200) is None
    got = greedy_decode(model, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    want = [_hf_greedy(model, p, 8, EOS, NO_SPECIALS) for p in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) > 2  # not all the same continuation


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_loop_stops_rows_at_eos(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(model_type, seed=3)
    prompts = _prompts(seed=1)
    free = [_hf_greedy(model, p, 14, EOS, NO_SPECIALS) for p in prompts]
    # an "end" token that the longest prompt produces early: rows stop at different steps (or
    # never), and once the longest row has left, the all-padding cache columns are trimmed away
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos = free[longest][2]
    suppress = [t for t in NO_SPECIALS if t != eos]
    caches = []  # (capacity, filled length) of each cache the loop builds
    real = incremental._slab_cache
    monkeypatch.setattr(incremental, "_slab_cache",
                        lambda slabs, n: caches.append((slabs[0][0].shape[2], n)) or real(slabs, n))
    got = greedy_decode(model, prompts, max_new_tokens=14, eos_token_id=eos, suppress_tokens=suppress)
    want = [_hf_greedy(model, p, 14, eos, suppress) for p in prompts]
    assert got == want
    assert len(got[longest]) <= 3 and got[longest][-1] == eos
    assert any(len(g) == 14 for g in got)  # others ran on after it stopped
    assert len(caches) >= 2  # finished rows were dropped from the batch (the cache was rebuilt)
    assert caches[-1][0] < caches[0][0]  # and the padding columns of the longest row trimmed
    # several end tokens, as a list
    two = [eos, free[1][1]]
    assert greedy_decode(model, prompts, max_new_tokens=14, eos_token_id=two, suppress_tokens=suppress) == [
        _hf_greedy(model, p, 14, two, suppress) for p in prompts
    ]


def test_shared_prefixes_are_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama")
    prompts = _prompts()
    fed = []  # tokens per forward call
    real = model.forward

    @functools.wraps(real)
    def forward(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    greedy_decode(model, prompts, max_new_tokens=3, eos_token_id=EOS)
    prefill = [shape[1] for shape in fed[: len(prompts)]]
    # row 2 reuses row 0's first 50 tokens, the duplicate all but its last token; row 5 shares
    # fewer than MIN_SHARED_PREFIX tokens and is computed in full
    assert prefill == [63, 5, 40, 1, 1, len(prompts[5])]
    assert [shape for shape in fed[len(prompts):]] == [(len(prompts), 1)] * 2  # then batched steps


def test_loop_edge_cases() -> None:
    model = _model("llama")
    prompts = _prompts()
    one = greedy_decode(model, prompts, max_new_tokens=1, eos_token_id=EOS)
    assert one == [_hf_greedy(model, p, 1, EOS) for p in prompts]
    # every row stops at its first token
    firsts = {o[0] for o in one}
    assert greedy_decode(model, prompts, max_new_tokens=5, eos_token_id=list(firsts)) == one
    with pytest.raises(ValueError, match="non-empty"):
        greedy_decode(model, [[5, 6], []], max_new_tokens=2, eos_token_id=EOS)


def test_slab_layer_leaves_transformers_registry_alone() -> None:
    from transformers import DynamicCache, cache_utils
    from transformers.cache_utils import DynamicLayer

    mapping = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})  # a registry of newer versions only
    before = dict(mapping)
    model = tiny_model("llama")
    greedy_decode(model, _prompts()[:2], max_new_tokens=3, eos_token_id=EOS)
    assert mapping == before
    assert {type(layer) for layer in DynamicCache(config=model.config).layers} == {DynamicLayer}


# --------------------------------------------------------------------------- through editkit.generate

TEXTS = ["Hi", "What is the weather like today in Paris, and should I take an umbrella?", "x",
         "What is the weather like today in Paris, and should I stay home?", "Tell me a story."]


class _Spy:
    """Counts calls to ``model.generate`` (the fall-back path)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.real = model.generate

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_uses_the_loop_and_matches_hf(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(family)
    tok = tiny_tokenizer()
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)
    texts = editkit.generate(model, tok, TEXTS, max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS)
    assert spy.calls == 0
    for prompt, text in zip(TEXTS, texts):
        ids = editkit.text.prompt_ids(tok, prompt)
        want = _hf_greedy(model, ids, 6, tok.eos_token_id, NO_SPECIALS)
        assert text == tok.decode(want, skip_special_tokens=True).strip()
    assert len(set(texts)) > 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sampling_in_the_loop_draws_what_generate_draws(model_type: str) -> None:
    """k samples of one prompt (the toxicity evaluation's shape): the loop prefills the prompt once,
    applies generate's warpers after the processors and draws from the same global generator, so a
    seeded run gives generate's samples token for token."""
    model = _model(model_type)
    prompt = _prompts()[0]
    sampling = dict(temperature=0.8, top_k=0, top_p=0.9)
    options = {"do_sample": True, "eos_token_id": EOS, **sampling}
    assert loop_blocker(model, options, 200) is None
    assert "sampling without" in loop_blocker(model, {"do_sample": True, "eos_token_id": EOS, "top_p": 0.9}, 200)
    torch.manual_seed(11)
    got = greedy_decode(model, [prompt] * 6, max_new_tokens=5, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                        sampling=sampling)
    torch.manual_seed(11)
    x = torch.tensor([prompt] * 6)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5, pad_token_id=PAD,
                         suppress_tokens=NO_SPECIALS, **options)
    assert got == out[:, len(prompt):].tolist()
    assert len({tuple(g) for g in got}) > 1  # samples, not six copies of one continuation
    greedy = greedy_decode(model, [prompt], max_new_tokens=5, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    assert greedy_decode(model, [prompt] * 2, max_new_tokens=5, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         sampling=dict(temperature=1.0, top_k=1, top_p=1.0)) == greedy * 2  # top-1 is greedy


def test_generate_samples_in_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama")
    tok = tiny_tokenizer()
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)
    kwargs = dict(max_new_tokens=4, batch_size=4, do_sample=True, temperature=1.0, top_p=0.9, top_k=0)
    torch.manual_seed(0)
    first = editkit.generate(model, tok, [TEXTS[0]] * 4, **kwargs)
    torch.manual_seed(0)
    assert editkit.generate(model, tok, [TEXTS[0]] * 4, **kwargs) == first  # seeded: repeatable
    assert spy.calls == 0 and len(set(first)) > 1


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(do_sample=True, top_k=5), "generation options|sampling"),
        (dict(num_beams=2), "generation options"),
        (dict(repetition_penalty=1.3), "generation options"),
        (dict(min_new_tokens=2), "generation options"),
    ],
)
def test_generate_falls_back_for_other_options(kwargs, reason, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama", tie_word_embeddings=False)
    tok = tiny_tokenizer()
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)
    options = {"do_sample": False, "eos_token_id": EOS, **kwargs}
    assert re.search(reason, loop_blocker(model, options, 50) or "")
    torch.manual_seed(0)
    texts = editkit.generate(model, tok, TEXTS[:3], max_new_tokens=3, **kwargs)
    assert spy.calls >= 1 and len(texts) == 3


def test_generate_falls_back_for_models_the_loop_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tiny_tokenizer()
    # a model family the loop is not tested on
    model = tiny_model("llama", tie_word_embeddings=False)
    monkeypatch.setattr(model.config, "model_type", "my_llama")
    assert "not one the loop is tested on" in loop_blocker(model, {"eos_token_id": EOS}, 50)
    # a generation config that adds a logits processor
    model = tiny_model("llama", tie_word_embeddings=False)
    model.generation_config.repetition_penalty = 1.5
    assert "repetition_penalty" in loop_blocker(model, {"eos_token_id": EOS}, 50)
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)
    editkit.generate(model, tok, TEXTS[:2], max_new_tokens=3)
    assert spy.calls >= 1
    # a sliding window the sequences would exceed (the merged cache is not windowed)
    model = tiny_model("mistral")
    model.config.sliding_window = 32
    assert loop_blocker(model, {"eos_token_id": EOS}, 32) is None
    assert "sliding window" in loop_blocker(model, {"eos_token_id": EOS}, 33)
    # no end-of-sequence token to stop at
    assert "end-of-sequence" in loop_blocker(tiny_model("gpt2"), {"eos_token_id": None}, 10)
    # an attention implementation the loop does not vouch for
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "_attn_implementation", "flex_attention")
    assert "attention implementation" in loop_blocker(model, {"eos_token_id": EOS}, 10)


def _with_forward_keyword(model, keyword: str):
    """``model`` whose forward takes its cache under ``keyword`` (either side of transformers' rename)."""
    from editkit.generation.greedy_loop import cache_keyword

    real_forward, real_name = model.forward, cache_keyword(model)

    def forward(input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = kwargs.pop(keyword, None)
        assert not kwargs, f"unexpected arguments {sorted(kwargs)}"
        return real_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **{real_name: cache})

    import inspect

    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
              for n in ("input_ids", "attention_mask", "position_ids", keyword, "use_cache", "logits_to_keep")]
    forward.__signature__ = inspect.Signature(params)
    model.forward = forward
    return model


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_loop_follows_the_forward_cache_keyword(keyword: str) -> None:
    from editkit.generation.greedy_loop import cache_keyword

    model = _model("llama")
    prompts = _prompts()
    want = [_hf_greedy(model, p, 6, EOS, NO_SPECIALS) for p in prompts]
    wrapped = _with_forward_keyword(model, keyword)
    assert cache_keyword(wrapped) == keyword
    assert loop_blocker(wrapped, {"eos_token_id": EOS}, 100) is None
    assert greedy_decode(wrapped, prompts, max_new_tokens=6, eos_token_id=EOS, suppress_tokens=NO_SPECIALS) == want


def test_loop_blocked_without_a_cache_argument() -> None:
    model = _model("llama")
    real = model.forward
    model.forward = lambda input_ids=None, attention_mask=None, position_ids=None: real(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    assert "cache argument" in loop_blocker(model, {"eos_token_id": EOS}, 100)


def test_fallback_is_logged_once_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    from editkit.generation import api as generation

    generation._warn_fallback.cache_clear()
    model = tiny_model("llama", tie_word_embeddings=False)
    model.generation_config.repetition_penalty = 1.5
    tok = tiny_tokenizer()
    with caplog.at_level("WARNING", logger="editkit.generation"):
        editkit.generate(model, tok, TEXTS[:2], max_new_tokens=2, batch_size=1)
        editkit.generate(model, tok, TEXTS[:2], max_new_tokens=2, batch_size=1)
    warnings = [r for r in caplog.records if "model.generate" in r.getMessage()]
    assert len(warnings) == 1 and "repetition_penalty" in warnings[0].getMessage()
    caplog.clear()
    model = _model("llama")  # the loop runs: nothing to say
    with caplog.at_level("WARNING", logger="editkit.generation"):
        editkit.generate(model, tok, TEXTS[:2], max_new_tokens=2)
    assert not [r for r in caplog.records if "model.generate" in r.getMessage()]


def test_raw_prompts_are_continued_as_they_stand() -> None:
    """chat_template='raw' encodes the text alone (a continuation prompt); 'none' adds the newline an
    answer starts on."""
    tok = tiny_tokenizer()
    plain = tok("The weather today is", add_special_tokens=True)["input_ids"]
    assert editkit.text.prompt_ids(tok, "The weather today is", "raw") == plain
    assert editkit.text.prompt_ids(tok, "The weather today is", "none") == tok("The weather today is\n")["input_ids"]
    model = _model("llama")
    raw = editkit.generate(model, tok, ["The weather today is"], max_new_tokens=3, chat_template="raw",
                           suppress_tokens=NO_SPECIALS)
    want = _hf_greedy(model, plain, 3, tok.eos_token_id, NO_SPECIALS)
    assert raw == [tok.decode(want, skip_special_tokens=True).strip()]
