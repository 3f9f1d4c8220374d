"""Decoding-time detoxifiers (editkit.generation.detoxifier, editkit.decoding): DExperts against its
formula computed by hand, the greedy loop against ``model.generate`` with the same detoxifier as a
logits processor (also while rows leave the loop's batch), and nothing left behind after a
generation, also after an error."""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from torch import nn

import editkit
from editkit.decoding import DExperts
from editkit.decoding.nucleus import nucleus_mask
from editkit.generation import Detoxifier, follow_rows, incremental
from editkit.generation.greedy_loop import greedy_decode
from editkit.models import tiny_tokenizer
from helpers import peaked_model as _model, varied_prompts as _prompts, no_hooks as _no_hooks

PAD, EOS = 3, 2
NO_SPECIALS = [0, 1, 2, 3]  # random models favour the specials; keep them out of most tests
TEXTS = ["Hi", "What is the weather like today in Paris, and should I take an umbrella?", "x",
         "What is the weather like today in Paris, and should I stay home?", "Tell me a story."]


def _biased_anti_expert(model, tokens: list[int], bias: float):
    """A hand-made anti-expert: the generator itself plus ``bias`` on the logits of ``tokens``, so
    z⁻ = z + bias·1[tokens] and DExperts' z + α(z − z⁻) is z − α·bias on those tokens."""
    anti = copy.deepcopy(model)
    head = anti.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokens] = bias
    anti.set_output_embeddings(biased)
    return anti


def _hf_generate(model, ids: list[int], max_new_tokens: int, eos, suppress=None, detoxifier=None) -> list[int]:
    """``model.generate`` greedily on one unpadded prompt, the detoxifier as a logits processor."""
    x = torch.tensor([ids])
    extra = {"suppress_tokens": suppress} if suppress else {}
    if detoxifier is not None:
        extra["logits_processor"] = [detoxifier.as_logits_processor(max_new_tokens=max_new_tokens)]
    try:
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos, **extra)
    finally:
        if detoxifier is not None:
            detoxifier.finish()
    return out[0, len(ids):].tolist()


def _by_hand(gen, anti, prompt: list[int], steps: int, alpha: float, suppress=(), top_p=None) -> list[int]:
    """DExperts greedy decoding computed the slow way: whole sequences through both models at every
    step (no cache), z̃ = z + α(z − z⁻) inside the nucleus of z, argmax."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            z = gen(input_ids=torch.tensor([seq])).logits[0, -1].float()
            za = anti(input_ids=torch.tensor([seq])).logits[0, -1].float()
        z[list(suppress)] = float("-inf")
        scores = z + alpha * (z - za)
        scores[~_nucleus_by_hand(z, top_p)] = float("-inf")
        seq.append(int(scores.argmax()))
    return seq[len(prompt):]


def _nucleus_by_hand(z: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """The smallest set of most probable tokens reaching ``top_p``, one token at a time."""
    keep = torch.isfinite(z)
    if top_p is None:
        return keep
    probs = z.softmax(-1).tolist()
    chosen, total = torch.zeros_like(keep), 0.0
    for token in sorted(range(len(probs)), key=lambda t: (-probs[t], t)):
        chosen[token] = True
        total += probs[token]
        if total > top_p:
            break
    return chosen & keep


class _Spy:
    """Counts calls of a bound method (``model.generate`` or ``model.forward``)."""

    def __init__(self, method) -> None:
        self.calls, self.real = 0, method
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


# --------------------------------------------------------------------------- the formula


def test_step_scores_are_the_formula() -> None:
    gen, anti = _model("llama", scale=1.0), _model("llama", seed=5, scale=1.0)  # unscaled: wide nuclei
    prompts = _prompts()[:3]
    with torch.no_grad():
        z = torch.stack([gen(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
        za = torch.stack([anti(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
        rows = torch.arange(len(prompts))
        plain = DExperts(anti, alpha=1.5, top_p=None)
        plain.start(prompts, max_new_tokens=3)
        torch.testing.assert_close(plain.step(z, None, rows), 2.5 * z - 1.5 * za, rtol=1e-5, atol=1e-5)
        # one token later: the anti-expert's own cache has taken the token in
        fed = torch.tensor([11, 12, 13])
        z1 = torch.stack([gen(input_ids=torch.tensor([p + [t]])).logits[0, -1] for p, t in zip(prompts, fed.tolist())])
        za1 = torch.stack([anti(input_ids=torch.tensor([p + [t]])).logits[0, -1] for p, t in zip(prompts, fed.tolist())])
        torch.testing.assert_close(plain.step(z1, fed, rows), 2.5 * z1 - 1.5 * za1, rtol=1e-5, atol=1e-5)
        plain.finish()

        nucleus = DExperts(anti, alpha=1.5, top_p=0.9)
        nucleus.start(prompts)
        got = nucleus.step(z, None, rows)
    for row in range(len(prompts)):
        inside = _nucleus_by_hand(z[row], 0.9)
        assert 1 < int(inside.sum()) < z.shape[1]  # a real nucleus, neither one token nor all
        assert torch.equal(torch.isfinite(got[row]), inside)
        torch.testing.assert_close(got[row][inside], (2.5 * z[row] - 1.5 * za[row])[inside], rtol=1e-5, atol=1e-5)
        assert torch.equal(nucleus_mask(z[row:row + 1], 0.9)[0], inside)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_alpha_moves_tokens_as_the_formula_says(model_type: str) -> None:
    gen = _model(model_type)
    prompts = _prompts()
    plain = greedy_decode(gen, prompts, max_new_tokens=6, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    # the anti-expert favours every token the plain model chose: DExperts must steer off them
    banned = sorted({t for row in plain for t in row})
    anti = _biased_anti_expert(gen, banned, bias=30.0)
    steered = greedy_decode(gen, prompts, max_new_tokens=6, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                            detoxifier=DExperts(anti, alpha=1.0, top_p=None))
    assert all(row[0] != p[0] for row, p in zip(steered, plain))
    assert all(t not in banned for row in steered for t in row)
    for prompt, row in zip(prompts, steered):
        assert row == _by_hand(gen, anti, prompt, 6, alpha=1.0, suppress=NO_SPECIALS)
    # a random anti-expert, its nucleus on: the slow way agrees too
    anti = _model(model_type, seed=9)
    detox = DExperts(anti, alpha=2.0, top_p=0.9)
    steered = greedy_decode(gen, prompts, max_new_tokens=6, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                            detoxifier=detox)
    assert steered == [_by_hand(gen, anti, p, 6, 2.0, NO_SPECIALS, top_p=0.9) for p in prompts]


# --------------------------------------------------------------------------- alpha = 0


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_alpha_zero_is_plain_greedy_in_the_loop(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen, anti = _model(model_type), _model(model_type, seed=4)
    anti_forward = _Spy(anti.forward)
    monkeypatch.setattr(anti, "forward", anti_forward)
    prompts = _prompts()
    plain = greedy_decode(gen, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    zero = greedy_decode(gen, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         detoxifier=DExperts(anti, alpha=0.0))
    assert zero == plain and anti_forward.calls > len(prompts)  # the anti-expert did run, every step
    # through editkit.generate: the loop, not model.generate
    tok = tiny_tokenizer()
    spy = _Spy(gen.generate)
    monkeypatch.setattr(gen, "generate", spy)
    texts = editkit.generate(gen, tok, TEXTS, max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS)
    assert editkit.generate(gen, tok, TEXTS, max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS,
                            detoxifier=DExperts(anti, alpha=0.0)) == texts
    assert spy.calls == 0


def test_alpha_zero_is_plain_decoding_through_model_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, anti = _model("llama"), _model("llama", seed=4)
    monkeypatch.setattr(gen.config, "model_type", "my_llama")  # a family the loop does not know
    tok = tiny_tokenizer()
    spy = _Spy(gen.generate)
    monkeypatch.setattr(gen, "generate", spy)
    greedy = dict(max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS)
    texts = editkit.generate(gen, tok, TEXTS, **greedy)
    assert editkit.generate(gen, tok, TEXTS, detoxifier=DExperts(anti, alpha=0.0), **greedy) == texts
    assert spy.calls >= 4 and len(set(texts)) > 1
    # sampling goes through model.generate whatever the model: same seed, same samples (no nucleus)
    sampled = []
    for detoxifier in (None, DExperts(anti, alpha=0.0, top_p=None)):
        torch.manual_seed(0)
        sampled.append(editkit.generate(gen, tok, TEXTS, max_new_tokens=6, do_sample=True, top_k=20,
                                        detoxifier=detoxifier))
    assert sampled[0] == sampled[1]


# --------------------------------------------------------------------------- loop == generate


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_loop_equals_generate_with_the_processor_while_rows_leave(model_type: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gen, anti = _model(model_type, seed=3), _model(model_type, seed=8)
    prompts = _prompts(seed=1)
    detox = DExperts(anti, alpha=1.0, top_p=None)
    free = greedy_decode(gen, prompts, max_new_tokens=12, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         detoxifier=detox)
    # an "end" token the longest prompt produces early: rows stop at different steps (or never)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_at = next(j for j in range(1, 12) if free[longest][j] not in free[longest][:j])
    eos = free[longest][stop_at]
    suppress = [t for t in NO_SPECIALS if t != eos]
    kept = []  # (rows before, rows after) each time the anti-expert's batch drops rows
    real_keep = incremental.SlabBatch.keep
    monkeypatch.setattr(incremental.SlabBatch, "keep",
                        lambda self, index: kept.append((self.rows, len(index))) or real_keep(self, index))
    got = greedy_decode(gen, prompts, max_new_tokens=12, eos_token_id=eos, suppress_tokens=suppress, detoxifier=detox)
    # the generator's batch and the anti-expert's batch dropped the same rows at the same steps
    assert kept and kept[0::2] == kept[1::2]
    assert len(got[longest]) == stop_at + 1 and any(len(g) == 12 for g in got)
    want = [_hf_generate(gen, p, 12, eos, suppress, detoxifier=detox) for p in prompts]
    assert got == want
    assert got != [_hf_generate(gen, p, 12, eos, suppress) for p in prompts]  # the detoxifier mattered


def test_fallback_batches_equal_the_loop_with_a_detoxifier(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, anti = _model("llama"), _model("llama", seed=6)
    tok = tiny_tokenizer()
    opts = dict(max_new_tokens=8, batch_size=5, suppress_tokens=NO_SPECIALS)
    loop = editkit.generate(gen, tok, TEXTS, detoxifier=DExperts(anti, alpha=1.0), **opts)
    assert loop != editkit.generate(gen, tok, TEXTS, **opts)
    monkeypatch.setattr(gen.config, "model_type", "my_llama")
    spy = _Spy(gen.generate)
    monkeypatch.setattr(gen, "generate", spy)
    assert editkit.generate(gen, tok, TEXTS, detoxifier=DExperts(anti, alpha=1.0), **opts) == loop
    assert spy.calls >= 1  # padded batches through model.generate, the detoxifier as its processor


def test_an_anti_expert_the_loop_does_not_know_runs_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, anti = _model("llama"), _model("llama", seed=6)
    prompts = _prompts(seed=2)
    args = dict(max_new_tokens=10, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    want = greedy_decode(gen, prompts, **args, detoxifier=DExperts(anti, alpha=1.0))
    monkeypatch.setattr(anti.config, "model_type", "my_llama")
    padded = incremental.open_batch(anti, prompts, new_tokens=10)
    assert isinstance(padded, incremental.PaddedBatch)
    slab = incremental.SlabBatch(anti, prompts, new_tokens=10)
    with torch.no_grad():
        torch.testing.assert_close(padded.prefill(), slab.prefill(), rtol=1e-4, atol=1e-4)
        keep = torch.tensor([0, 2, 3])
        padded.keep(keep), slab.keep(keep)
        fed = torch.tensor([40, 41, 42])
        torch.testing.assert_close(padded.advance(fed), slab.advance(fed), rtol=1e-4, atol=1e-4)
    assert greedy_decode(gen, prompts, **args, detoxifier=DExperts(anti, alpha=1.0)) == want


# --------------------------------------------------------------------------- nothing left behind


class _Hooked(Detoxifier):
    """A detoxifier with hooks on every decoder layer (they count the forwards) and per-row state
    (a step counter), failing at step ``fail_at`` when asked."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.forwards, self.steps, self.started, self.finished = fail_at, 0, 0, 0, 0

    def install(self, model, stack: contextlib.ExitStack) -> None:
        for layer in model.model.layers:
            handle = layer.register_forward_hook(self._count)
            stack.callback(handle.remove)

    def _count(self, module, args, output) -> None:
        self.forwards += 1

    def start(self, prompts, *, max_new_tokens=None) -> None:
        self.started += 1
        self.steps = 0

    def step(self, scores, fed, rows):
        self.steps += 1
        if self.fail_at is not None and self.steps == self.fail_at:
            raise RuntimeError("injected failure")
        return scores

    def finish(self) -> None:
        self.finished += 1


@pytest.mark.parametrize("path", ["loop", "model.generate"])
def test_nothing_remains_after_generation_or_an_error(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _model("llama")
    if path == "model.generate":
        monkeypatch.setattr(gen.config, "model_type", "my_llama")
    tok = tiny_tokenizer()
    config_before = gen.generation_config.to_dict()
    hooked = _Hooked()
    plain = editkit.generate(gen, tok, TEXTS, max_new_tokens=5, batch_size=2, suppress_tokens=NO_SPECIALS)
    assert editkit.generate(gen, tok, TEXTS, max_new_tokens=5, batch_size=2, suppress_tokens=NO_SPECIALS,
                            detoxifier=hooked) == plain
    assert hooked.forwards > 0 and hooked.started == 3 and hooked.finished >= 3
    assert _no_hooks(gen)
    # an error in the middle of the generation: hooks removed, per-row state dropped
    failing = _Hooked(fail_at=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        editkit.generate(gen, tok, TEXTS, max_new_tokens=5, batch_size=2, detoxifier=failing)
    assert failing.forwards > 0 and failing.started == 1 and failing.finished >= 1
    assert _no_hooks(gen)
    # DExperts: its anti-expert fails mid-way; its cache is dropped, and it works again afterwards
    anti = _model("llama", seed=4)
    detox = DExperts(anti, alpha=1.0)
    calls = {"n": 0}
    real = anti.forward

    @functools.wraps(real)
    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("anti-expert failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(anti, "forward", forward)
    with pytest.raises(RuntimeError, match="anti-expert failure"):
        editkit.generate(gen, tok, TEXTS, max_new_tokens=5, batch_size=5, detoxifier=detox)
    assert detox._run is None and _no_hooks(gen) and _no_hooks(anti)
    assert gen.generation_config.to_dict() == config_before  # no processor stored on the model
    assert len(editkit.generate(gen, tok, TEXTS, max_new_tokens=3, detoxifier=detox)) == len(TEXTS)


def test_a_detoxifier_can_send_greedy_decoding_to_model_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, tok = _model("llama"), tiny_tokenizer()
    hooked = _Hooked()
    hooked.runs_in_greedy_loop = False  # its hooks would need every row in every forward
    spy = _Spy(gen.generate)
    monkeypatch.setattr(gen, "generate", spy)
    editkit.generate(gen, tok, TEXTS[:2], max_new_tokens=3, detoxifier=hooked)
    assert spy.calls >= 1 and hooked.steps == 3 and _no_hooks(gen)  # steps: those of the last batch


def test_processor_and_generate_refuse_what_they_cannot_follow() -> None:
    gen, anti = _model("llama"), _model("llama", seed=4)
    processor = DExperts(anti, alpha=1.0).as_logits_processor()
    scores = torch.zeros((2, 260))
    processor(torch.tensor([[5, 6], [7, 8]]), scores)
    with pytest.raises(RuntimeError, match="reordered"):
        processor(torch.tensor([[7, 8, 9], [5, 6, 9]]), scores)  # rows swapped (beam search)
    with pytest.raises(ValueError, match="beam search"):
        editkit.generate(gen, tiny_tokenizer(), ["Hi"], max_new_tokens=2, num_beams=2,
                         detoxifier=DExperts(anti, alpha=1.0))
    with pytest.raises(ValueError, match="alpha"):
        DExperts(anti, alpha=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        DExperts(anti, top_p=0.0)


def test_follow_rows() -> None:
    rows = torch.tensor([0, 2, 3, 5])
    assert follow_rows(rows, rows.clone()) is None
    assert follow_rows(rows, torch.tensor([2, 5])).tolist() == [1, 3]
    with pytest.raises(RuntimeError, match=r"rows \[1\]"):
        follow_rows(rows, torch.tensor([1, 2]))


def test_every_builtin_detoxifier_is_registered_and_buildable_by_name() -> None:
    from editkit.decoding import get_detoxifier, list_detoxifiers, register_detoxifier
    from editkit.generation.detoxifier import Detoxifier

    names = list_detoxifiers()
    assert {"dexperts", "detoxigen", "fgdilp", "calibration", "selfdebias"} <= set(names)
    for name in names:
        cls = get_detoxifier(name)
        assert issubclass(cls, Detoxifier) and callable(cls.from_options)
    with pytest.raises(ValueError, match="already registered"):
        register_detoxifier("dexperts", get_detoxifier("fgdilp"))
    with pytest.raises(ValueError, match="unknown detoxifier"):
        get_detoxifier("nope")
