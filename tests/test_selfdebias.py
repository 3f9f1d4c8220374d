"""Self-Debiasing (editkit.decoding.selfdebias): the step rule against a hand-computed 5-token case,
λ = 0 as plain decoding (editkit's loop and model.generate), the greedy loop against a slow reference
that runs every debiasing input in full at every step while rows leave the batch, and nothing left
behind after a generation or an error."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import editkit
from editkit.decoding.selfdebias import DEBIASING_KEYWORDS, DEBIASING_PREFIXES, SelfDebiasing, self_debias_scores
from editkit.generation import incremental
from editkit.generation.greedy_loop import greedy_decode
from editkit.models import tiny_tokenizer
from helpers import peaked_model as _model, varied_prompts as _prompts, no_hooks as _no_hooks

PAD, EOS = 3, 2
NO_SPECIALS = [0, 1, 2, 3]
TEXTS = ["Hi", "What is the weather like today in Paris, and should I take an umbrella?", "x",
         "What is the weather like today in Paris, and should I stay home?", "Tell me a story."]
SHORT = ("Rude text:\n", "Hateful:\n")  # two short self-debiasing inputs keep the tests fast


class _Spy:
    """Counts calls of a bound method (``model.generate`` or ``model.forward``) and their batch rows."""

    def __init__(self, method) -> None:
        self.calls, self.rows, self.real = 0, [], method
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        ids = kwargs.get("input_ids")
        self.rows.append(None if ids is None else int(ids.shape[0]))
        return self.real(*args, **kwargs)


def _by_hand(model, tok, prompt: list[int], steps: int, decay: float, epsilon: float, prefixes=SHORT,
             suppress=(), eos=None) -> list[int]:
    """Self-debiased greedy decoding the slow way: the sequence and each prefix + sequence through
    the model in full at every step (no cache), the rule written out token by token."""
    prefix_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prefixes]
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            z = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            zb = [model(input_ids=torch.tensor([ids + seq])).logits[0, -1].float() for ids in prefix_ids]
        z[list(suppress)] = float("-inf")
        p = z.softmax(-1)
        pb = torch.stack([b.masked_fill(~torch.isfinite(z), float("-inf")).softmax(-1) for b in zb])
        delta = torch.stack([p - q for q in pb]).amin(0)
        alpha = torch.where(delta >= 0, torch.ones_like(delta), torch.exp(decay * delta)).clamp(min=epsilon)
        token = int((alpha * p).argmax())
        seq.append(token)
        if eos is not None and token == eos:
            break
    return seq[len(prompt):]


def _hf_generate(model, ids, max_new_tokens, eos, suppress, detoxifier=None) -> list[int]:
    x = torch.tensor([ids])
    extra = {"logits_processor": [detoxifier.as_logits_processor(max_new_tokens=max_new_tokens)]} if detoxifier else {}
    try:
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, suppress_tokens=suppress,
                             max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos, **extra)
    finally:
        if detoxifier is not None:
            detoxifier.finish()
    return out[0, len(ids):].tolist()


# --------------------------------------------------------------------------- the rule


def test_the_rule_on_a_hand_made_distribution() -> None:
    p = [0.4, 0.3, 0.15, 0.1, 0.05]
    p1 = [0.2, 0.5, 0.1, 0.1, 0.1]  # the first description raises token 1 (and 4)
    p2 = [0.3, 0.2, 0.3, 0.1, 0.1]  # the second raises token 2 (and 4)
    scores = torch.tensor([p]).log()
    biased = torch.tensor([[p1], [p2]]).log()
    # Δ = min over descriptions of p − p_y = [0.1, −0.2, −0.15, 0, −0.05]
    # λ = 10: α = [1, e^−2, e^−1.5, 1, e^−0.5]; p̃ ∝ α · p
    weights = [0.4, 0.3 * math.exp(-2.0), 0.15 * math.exp(-1.5), 0.1, 0.05 * math.exp(-0.5)]
    want = [w / sum(weights) for w in weights]
    got = self_debias_scores(scores, biased, decay=10.0).exp()[0].tolist()
    assert got == pytest.approx(want, rel=1e-5)
    # the authors' floor: α = max(α, ε); with ε = 0.2 only e^−2 ≈ 0.135 is raised
    weights = [0.4, 0.3 * 0.2, 0.15 * math.exp(-1.5), 0.1, 0.05 * math.exp(-0.5)]
    got = self_debias_scores(scores, biased, decay=10.0, epsilon=0.2).exp()[0].tolist()
    assert got == pytest.approx([w / sum(weights) for w in weights], rel=1e-5)
    # λ = 0: the distribution itself; a banned token stays banned (and is banned under the prefixes)
    assert self_debias_scores(scores, biased, decay=0.0).exp()[0].tolist() == pytest.approx(p, rel=1e-6)
    banned = scores.clone()
    banned[0, 0] = float("-inf")
    got = self_debias_scores(banned, biased, decay=10.0)
    assert got[0, 0] == float("-inf") and torch.isfinite(got[0, 1:]).all()
    renormed = [x / 0.6 for x in p[1:]]  # p without token 0; p_y likewise: [.625,.125,.125,.125], [2/7,3/7,1/7,1/7]
    q1, q2 = [0.5 / 0.8, 0.1 / 0.8, 0.1 / 0.8, 0.1 / 0.8], [0.2 / 0.7, 0.3 / 0.7, 0.1 / 0.7, 0.1 / 0.7]
    delta = [min(a - b, a - c) for a, b, c in zip(renormed, q1, q2)]
    weights = [a * (1.0 if d >= 0 else math.exp(10.0 * d)) for a, d in zip(renormed, delta)]
    assert got[0, 1:].exp().tolist() == pytest.approx([w / sum(weights) for w in weights], rel=1e-5)
    with pytest.raises(ValueError, match="prefixes"):
        self_debias_scores(scores, biased[0], decay=1.0)


def test_step_scores_follow_the_rule_on_a_model() -> None:
    model, tok = _model(scale=1.0), tiny_tokenizer()
    prompts = _prompts()[:3]
    detox = SelfDebiasing(model, tok, prefixes=SHORT, decay=20.0, epsilon=0.0)
    inputs = detox.debiasing_inputs(prompts)
    assert len(inputs) == 2 * len(prompts)
    assert inputs[1] == tok(SHORT[0], add_special_tokens=False)["input_ids"] + prompts[1]
    with torch.no_grad():
        z = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
        zb = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in inputs]).view(2, 3, -1)
        detox.start(prompts, max_new_tokens=3)
        got = detox.step(z, None, torch.arange(3))
        torch.testing.assert_close(got, self_debias_scores(z, zb, decay=20.0), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, z.log_softmax(-1), atol=1e-3)  # λ = 20 moved the distribution
        torch.testing.assert_close(got.exp().sum(-1), torch.ones(3))
    detox.finish()


# --------------------------------------------------------------------------- λ = 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lambda_zero_is_plain_greedy_in_the_loop(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model(model_type), tiny_tokenizer()
    prompts = _prompts()
    plain = greedy_decode(model, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    forward = _Spy(model.forward)
    monkeypatch.setattr(model, "forward", forward)
    zero = greedy_decode(model, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         detoxifier=SelfDebiasing(model, tok, decay=0.0))  # the six default descriptions
    assert zero == plain
    debiasing_steps = [n for n in forward.rows if n == 6 * len(prompts)]  # one token for each of the 30 rows
    assert len(debiasing_steps) >= 5  # the debiasing batch ran, every step
    spy = _Spy(model.generate)
    monkeypatch.setattr(model, "generate", spy)
    texts = editkit.generate(model, tok, TEXTS, max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS)
    assert editkit.generate(model, tok, TEXTS, max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS,
                            detoxifier=SelfDebiasing(model, tok, prefixes=SHORT, decay=0.0)) == texts
    assert spy.calls == 0


def test_lambda_zero_is_plain_decoding_through_model_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model("llama"), tiny_tokenizer()
    monkeypatch.setattr(model.config, "model_type", "my_llama")  # the loop does not know it: model.generate
    spy = _Spy(model.generate)
    monkeypatch.setattr(model, "generate", spy)
    greedy = dict(max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS)
    texts = editkit.generate(model, tok, TEXTS, **greedy)
    assert editkit.generate(model, tok, TEXTS, detoxifier=SelfDebiasing(model, tok, prefixes=SHORT, decay=0.0),
                            **greedy) == texts
    assert spy.calls >= 4 and len(set(texts)) > 1
    sampled = []
    for detoxifier in (None, SelfDebiasing(model, tok, prefixes=SHORT, decay=0.0)):
        torch.manual_seed(0)
        sampled.append(editkit.generate(model, tok, TEXTS, max_new_tokens=6, do_sample=True, top_k=20,
                                        detoxifier=detoxifier))
    assert sampled[0] == sampled[1]


# --------------------------------------------------------------------------- the cache follows the rows


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_loop_equals_the_slow_reference_while_rows_leave(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model(model_type, seed=3), tiny_tokenizer()
    prompts = _prompts(seed=1)
    detox = SelfDebiasing(model, tok, prefixes=SHORT, decay=50.0, epsilon=0.01)
    free = greedy_decode(model, prompts, max_new_tokens=10, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         detoxifier=detox)
    assert free != greedy_decode(model, prompts, max_new_tokens=10, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    # an "end" token the longest prompt produces early: rows stop at different steps (or never)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_at = next(j for j in range(1, 10) if free[longest][j] not in free[longest][:j])
    eos = free[longest][stop_at]
    suppress = [t for t in NO_SPECIALS if t != eos]
    kept = []  # (rows before, rows after) of each SlabBatch.keep: the generator's, then the debiasing batch's
    real_keep = incremental.SlabBatch.keep
    monkeypatch.setattr(incremental.SlabBatch, "keep",
                        lambda self, index: kept.append((self.rows, len(index))) or real_keep(self, index))
    got = greedy_decode(model, prompts, max_new_tokens=10, eos_token_id=eos, suppress_tokens=suppress,
                        detoxifier=detox)
    assert kept and all(b == (2 * a[0], 2 * a[1]) for a, b in zip(kept[0::2], kept[1::2]))
    assert len(got[longest]) == stop_at + 1 and any(len(g) == 10 for g in got)
    assert got == [_by_hand(model, tok, p, 10, 50.0, 0.01, suppress=suppress, eos=eos) for p in prompts]
    assert got == [_hf_generate(model, p, 10, eos, suppress, detoxifier=detox) for p in prompts]


# --------------------------------------------------------------------------- nothing left behind


def test_nothing_remains_after_generation_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model("llama"), tiny_tokenizer()
    config_before = model.generation_config.to_dict()
    detox = SelfDebiasing(model, tok, prefixes=SHORT)
    editkit.generate(model, tok, TEXTS, max_new_tokens=4, batch_size=2, detoxifier=detox)
    assert detox._run is None and _no_hooks(model)
    calls = {"n": 0}
    real = model.forward

    @functools.wraps(real)
    def forward(*args, **kwargs):  # fails at the third one-token forward: in the middle of decoding
        calls["n"] += kwargs["input_ids"].shape[1] == 1
        if calls["n"] == 3:
            raise RuntimeError("model failure")
        return real(*args, **kwargs)

    for generic in (False, True):  # the loop, then model.generate with the processor
        calls["n"] = 0
        with monkeypatch.context() as patch:
            patch.setattr(model, "forward", forward)
            if generic:
                patch.setattr(model.config, "model_type", "my_llama")
            with pytest.raises(RuntimeError, match="model failure"):
                editkit.generate(model, tok, TEXTS, max_new_tokens=5, batch_size=5, detoxifier=detox)
        assert detox._run is None and _no_hooks(model)
    assert model.generation_config.to_dict() == config_before  # no processor stored on the model
    assert len(editkit.generate(model, tok, TEXTS, max_new_tokens=3, detoxifier=detox)) == len(TEXTS)
    with pytest.raises(ValueError, match="another generator"):
        editkit.generate(_model("llama", seed=1), tok, TEXTS[:1], max_new_tokens=2, detoxifier=detox)


def test_from_options_and_bad_settings() -> None:
    model, tok = _model("llama"), tiny_tokenizer()
    detox = SelfDebiasing.from_options(model, tok)
    assert detox.prefixes == list(DEBIASING_PREFIXES) and detox.decay == 50.0 and detox.epsilon == 0.01
    assert detox.label == "selfdebias" and detox.settings()["kind"] == "selfdebias"
    detox = SelfDebiasing.from_options(model, tok, decay="10", epsilon="0", prefixes="keywords")
    assert detox.prefixes == list(DEBIASING_KEYWORDS) and detox.decay == 10.0 and detox.epsilon == 0.0
    detox = SelfDebiasing.from_options(model, tok, prefix="The following text is mean:\\n")
    assert detox.prefixes == ["The following text is mean:\n"]
    for bad in ({"lambda": "5"}, {"prefix": "x", "prefixes": "keywords"}, {"prefixes": "words"}):
        with pytest.raises(ValueError):
            SelfDebiasing.from_options(model, tok, **bad)
    with pytest.raises(ValueError, match="decay"):
        SelfDebiasing(model, tok, decay=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        SelfDebiasing(model, tok, epsilon=2.0)
    with pytest.raises(ValueError, match="prefixes"):
        SelfDebiasing(model, tok, prefixes="one string")
    # a leading BOS stays first; the description goes right after it
    detox = SelfDebiasing(model, tok, prefixes=["ab"])
    bos = tok.bos_token_id
    assert detox.debiasing_inputs([[bos, 50, 51], [50]]) == [[bos, *detox.prefix_ids[0], 50, 51],
                                                              [*detox.prefix_ids[0], 50]]
