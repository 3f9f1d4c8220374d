"""FGDILP (editkit.decoding.fgdilp): the fusion and the steering against their formulas worked by
hand, the self-diagnosis against the probabilities computed the slow way, decoding against the whole
method recomputed without caches (vectors read and used at the same position, also while rows leave
the loop's batch), plain decoding when the steering vanishes, and nothing left behind."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import editkit
from editkit.arch import decoder_layers, get_module, resolve_arch
from editkit.decoding.fgdilp import FGDILP, fuse_subtoxicity, steer_heads
from editkit.decoding.fgdilp_prefixes import (ATTRIBUTES, NEGATIVE_INSTRUCTION, POSITIVE_INSTRUCTION, QUESTION,
                                              choose_examples, diagnose, prefix_ids, prefixed)
from editkit.generation.greedy_loop import greedy_decode
from editkit.hooks import hook_count
from editkit.models import tiny_tokenizer
from helpers import peaked_model as _model

NO_SPECIALS = [0, 1, 2, 3]
TEXTS = ["Hi", "What is the weather like today in Paris, and should I take an umbrella?", "x", "Tell me a story."]
SMALL = dict(k=2, sample_tokens=4)  # self-generation kept tiny


@functools.cache
def _tok():
    return tiny_tokenizer()


class _Spy:
    """Counts calls of ``model.forward``, failing at call ``fail_at`` when asked."""

    def __init__(self, method, fail_at: int | None = None) -> None:
        self.calls, self.real, self.fail_at = 0, method, fail_at
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return self.real(*args, **kwargs)


# --------------------------------------------------------------------------- fusion, by hand


def test_fusion_masks_elects_signs_and_aligns_as_by_hand() -> None:
    deltas = torch.tensor([[3.0, -1.0, 0.5, -4.0],
                           [-3.5, -5.0, 1.0, 0.2],
                           [1.0, 2.0, -6.0, 0.1]])
    # keep 50%: two entries per vector -> [3,0,0,-4], [-3.5,-5,0,0], [0,2,-6,0]; masses per entry
    # -0.5, -3, -6, -4 -> all negative; the largest negative magnitude per entry
    assert fuse_subtoxicity(deltas, 0.5).tolist() == [-3.5, -5.0, -6.0, -4.0]
    # nothing masked: entry 0's mass is 3 - 3.5 + 1 = 0.5 > 0, so the largest positive, 3, wins
    assert fuse_subtoxicity(deltas, 1.0).tolist() == [3.0, -5.0, -6.0, -4.0]
    assert fuse_subtoxicity(deltas, 0.0).tolist() == [0.0] * 4
    # a tie (2 - 2 = 0) takes the majority of the vector's elected signs (here negative)
    tie = torch.tensor([[2.0, -1.0, -1.0], [-2.0, -3.0, -1.0]])
    assert fuse_subtoxicity(tie, 1.0).tolist() == [-2.0, -3.0, -1.0]
    # normmass: each vector's share of its squared norm: [.9, -.1] + [-.8, .2] -> both positive,
    # where the plain mass says [+, -]
    two = torch.tensor([[3.0, -1.0], [-1.0, 0.5]])
    assert fuse_subtoxicity(two, 1.0, sign="mass").tolist() == [3.0, -1.0]
    assert fuse_subtoxicity(two, 1.0, sign="normmass").tolist() == [3.0, 0.5]
    # leading dims are independent vectors; a zero vector (a missing negative) changes nothing
    g = torch.Generator().manual_seed(0)
    batch = torch.randn((3, 5, 2, 16), generator=g)
    fused = fuse_subtoxicity(batch, 0.5, sign="normmass")
    assert fused.shape == (5, 2, 16)
    for i in range(5):
        for j in range(2):
            assert torch.equal(fused[i, j], fuse_subtoxicity(batch[:, i, j], 0.5, sign="normmass"))
    padded = torch.cat([batch, torch.zeros((2, 5, 2, 16))])
    assert torch.equal(fuse_subtoxicity(padded, 0.5), fuse_subtoxicity(batch, 0.5))
    with pytest.raises(ValueError, match="keep_fraction"):
        fuse_subtoxicity(deltas, 50)


# --------------------------------------------------------------------------- steering, by hand


def _steer_by_hand(v, fused, lam_norm, lam_sim, reference, strength, renorm):
    """The steering formula one head at a time, in plain Python."""
    def norm(x):
        return math.sqrt(sum(a * a for a in x))

    out = []
    for h in range(len(v)):
        vh, dh = v[h], fused[h]
        eh = reference[h] if reference is not None else dh
        cos = sum(a * b for a, b in zip(eh, vh)) / (norm(eh) * norm(vh))
        scale = strength * (1 + norm(dh)) ** lam_norm * (1 + max(0.0, cos)) ** lam_sim
        out.append([a - scale * b for a, b in zip(vh, dh)])
    if renorm == "head":
        out = [[a * norm(v[h]) / norm(out[h]) for a in out[h]] for h in range(len(v))]
    elif renorm == "layer":
        old, new = norm([a for x in v for a in x]), norm([a for x in out for a in x])
        out = [[a * old / new for a in x] for x in out]
    return out


@pytest.mark.parametrize("renorm", ["head", "layer", "none"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_steering_is_the_formula_with_renormalisation(renorm: str, with_reference: bool) -> None:
    v = [[1.0, 2.0, -1.0], [0.5, -0.5, 2.0]]  # two heads of three
    fused = [[0.3, -0.2, 0.1], [-1.0, 0.0, 0.5]]  # head 0: cos(Δ, v) < 0 (ReLU -> 0); head 1: > 0
    reference = [[1.0, 1.0, 0.0], [0.0, -1.0, 1.0]] if with_reference else None
    want = _steer_by_hand(v, fused, 0.4, 0.6, reference, 2.0, renorm)
    got = steer_heads(torch.tensor([v]), torch.tensor([fused]), 0.4, 0.6, strength=2.0, renorm=renorm,
                      reference=None if reference is None else torch.tensor([reference]))
    torch.testing.assert_close(got[0], torch.tensor(want), rtol=1e-6, atol=1e-6)
    if renorm == "head":
        torch.testing.assert_close(got[0].norm(dim=-1), torch.tensor(v).norm(dim=-1))
    # no steering: v exactly, bit for bit
    x = torch.tensor([v])
    assert torch.equal(steer_heads(x, torch.zeros_like(x), 0.4, 0.6, renorm=renorm), x)
    assert torch.equal(steer_heads(x, torch.tensor([fused]), 0.4, 0.6, strength=0.0, renorm=renorm), x)


# --------------------------------------------------------------------------- self-diagnosis


def _answer_probability(model, tok, question: str, answer: str) -> float:
    """P(answer | question) the slow way: the whole text through the model, token by token."""
    q = tok(question, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([q + a])).logits[0].float().softmax(-1)
    return math.prod(float(probs[len(q) - 1 + i, t]) for i, t in enumerate(a))


def test_diagnosis_is_yes_against_no_per_attribute_and_deterministic() -> None:
    model, tok = _model("llama", scale=1.0), _tok()
    texts = ["hello there", "you are an awful person and I will hurt you", ""]
    scores = diagnose(model, tok, texts)
    assert scores.shape == (3, len(ATTRIBUTES)) == (3, 6) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert torch.equal(diagnose(model, tok, texts), scores)  # deterministic
    torch.testing.assert_close(diagnose(model, tok, texts, batch_size=1), scores, rtol=1e-5, atol=1e-6)  # padding
    assert len(set(scores.flatten().tolist())) > 3  # the attributes and the texts are told apart
    # by hand: whole answers (" Yes" is four byte tokens here, " No" three; the shared space cancels)
    for i, (name, description) in enumerate(ATTRIBUTES.items()):
        question = QUESTION.format(text=texts[1], description=description)
        p_yes, p_no = (_answer_probability(model, tok, question, a) for a in (" Yes", " No"))
        assert scores[1, i].item() == pytest.approx(p_yes / (p_yes + p_no), rel=1e-4)
    # one-token answers (after their shared space): the next-token route
    single = diagnose(model, tok, texts[:2], {"threat": ATTRIBUTES["threat"]}, answers=(" Y", " N"))
    question = QUESTION.format(text=texts[0], description=ATTRIBUTES["threat"])
    p_yes, p_no = (_answer_probability(model, tok, question, a) for a in (" Y", " N"))
    assert single.shape == (2, 1) and single[0, 0].item() == pytest.approx(p_yes / (p_yes + p_no), rel=1e-4)


def test_examples_and_prefixes() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.1, 0.5, 0.3],
                           [0.1, 0.8, 0.2, 0.1, 0.2, 0.1],
                           [0.5, 0.2, 0.7, 0.1, 0.6, 0.2],
                           [0.3, 0.3, 0.1, 0.6, 0.1, 0.2]])
    # least toxic by "toxicity"; most likely per attribute, each continuation once, in attribute order
    assert choose_examples(scores) == (1, [0, 1, 2, 3])
    assert choose_examples(scores[:, :1]) == (1, [0])
    tok = _tok()
    ids = prefix_ids(tok, "some example", NEGATIVE_INSTRUCTION)
    assert tok.decode(ids) == f"some example\n{NEGATIVE_INSTRUCTION}\n"
    assert prefixed([7, 8], [5, 6], bos_token_id=0) == [7, 8, 5, 6]
    assert prefixed([7, 8], [0, 5, 6], bos_token_id=0) == [0, 7, 8, 5, 6]  # after the prompt's BOS
    # self-generation is seeded per prompt and leaves the caller's RNG alone
    model = _model("llama")
    detox = FGDILP(model, tok, **SMALL)
    prompt = tok("Tell me a story.")["input_ids"]
    state = torch.get_rng_state()
    found = detox.instance_prefixes(prompt)
    assert torch.equal(torch.get_rng_state(), state)
    again = detox.instance_prefixes(prompt)
    assert found.continuations == again.continuations and torch.equal(found.scores, again.scores)
    assert len(found.continuations) == 2 and found.scores.shape == (2, 6)
    assert found.positive_prefix == prefix_ids(tok, found.continuations[found.positive], POSITIVE_INSTRUCTION)
    assert len(found.negative_prefixes) == len(found.negatives) >= 1
    other = FGDILP(model, tok, seed=1, **SMALL).instance_prefixes(prompt)
    assert other.continuations != found.continuations


# --------------------------------------------------------------------------- decoding


def _read_last(model, ids: list[int], attn_outs) -> torch.Tensor:
    """[layers, d] the attention output projections' inputs at the last position, no cache."""
    seen = []
    handles = []
    try:
        for module in attn_outs:
            handles.append(module.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1].float())))
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(seen)


def _by_hand(model, detox: FGDILP, prompt: list[int], steps: int, eos: int, suppress) -> list[int]:
    """FGDILP greedy decoding the slow way: at each step every sequence whole through the model (no
    cache); Δ* from the auxiliary sequences' last position; the raw sequence run with every position
    steered at every layer by the Δ* read when that position was the last one."""
    arch = resolve_arch(model)
    attn_outs = [get_module(layer, arch.attn_out) for layer in decoder_layers(model, arch)]
    bos, heads = _tok().bos_token_id, detox.heads
    found = detox.instance_prefixes(prompt)
    aux = [prefixed(found.positive_prefix, prompt, bos)] + [prefixed(n, prompt, bos) for n in found.negative_prefixes]
    reference = None
    if detox.similarity == "prefix":
        ends = torch.stack([_read_last(model, prefixed(n, [], bos), attn_outs) for n in found.negative_prefixes])
        reference = ends.mean(0).unflatten(-1, (heads, -1))
    seq, steer_at, new = list(prompt), {}, []
    for _ in range(steps):
        generated = seq[len(prompt):]
        reads = [_read_last(model, a + generated, attn_outs) for a in aux]
        deltas = torch.stack([r - reads[0] for r in reads[1:]])  # [n_neg, layers, d]
        fused = fuse_subtoxicity(deltas, detox.keep_fraction, sign=detox.sign)
        steer_at[len(seq) - 1] = fused.unflatten(-1, (heads, -1))

        def steer(layer, module, args):
            x = args[0].clone()
            for position, fused in steer_at.items():
                v = x[0, position].float().unflatten(-1, (heads, -1))
                x[0, position] = steer_heads(v, fused[layer], detox.lambda_norm, detox.lambda_sim,
                                             reference=None if reference is None else reference[layer],
                                             strength=detox.strength, renorm=detox.renorm).flatten()
            return (x, *args[1:])

        handles = []
        try:
            for i, module in enumerate(attn_outs):
                handles.append(module.register_forward_pre_hook(functools.partial(steer, i)))
            with torch.no_grad():
                scores = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        finally:
            for h in handles:
                h.remove()
        scores[list(suppress)] = float("-inf")
        token = int(scores.argmax())
        new.append(token)
        if token == eos:
            break
        seq.append(token)
    return new


@pytest.mark.parametrize("model_type,similarity", [("llama", "prefix"), ("gpt2", "direction")])
def test_decoding_is_the_method_recomputed_without_caches(model_type: str, similarity: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model(model_type), _tok()
    detox = FGDILP(model, tok, strength=2.0, similarity=similarity, sign="mass" if model_type == "llama" else "normmass",
                   renorm="head" if similarity == "prefix" else "layer", **SMALL)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:3]]
    args = dict(max_new_tokens=6, suppress_tokens=NO_SPECIALS)
    with detox.active(model):
        free = greedy_decode(model, prompts, eos_token_id=2, **args, detoxifier=detox)
    # an "end" token the longest prompt produces early: its row leaves the loop's batch
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = next(j for j in range(1, 6) if free[longest][j] not in free[longest][:j])
    eos = free[longest][stop]
    suppress = [t for t in NO_SPECIALS if t != eos]
    kept = []
    real_keep = FGDILP._keep
    monkeypatch.setattr(FGDILP, "_keep", lambda self, index: kept.append(len(index)) or real_keep(self, index))
    with detox.active(model):
        got = greedy_decode(model, prompts, max_new_tokens=6, eos_token_id=eos, suppress_tokens=suppress,
                            detoxifier=detox)
    assert len(got[longest]) == stop + 1 and any(len(g) == 6 for g in got)
    assert kept == [len(prompts) - 1]  # the row left the loop's batch, and the detoxifier's runs with it
    assert got == [_by_hand(model, detox, p, 6, eos, suppress) for p in prompts]
    plain = greedy_decode(model, prompts, max_new_tokens=6, eos_token_id=eos, suppress_tokens=suppress)
    assert got != plain  # the steering mattered
    assert hook_count(model) == 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_no_steering_is_plain_decoding_token_for_token(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model(model_type), _tok()
    opts = dict(max_new_tokens=8, batch_size=3, suppress_tokens=NO_SPECIALS)
    plain = editkit.generate(model, tok, TEXTS, **opts)
    spy = _Spy(model.forward)
    monkeypatch.setattr(model, "forward", spy)
    for settings in (dict(strength=0.0), dict(keep_fraction=0.0)):
        before = spy.calls
        assert editkit.generate(model, tok, TEXTS, detoxifier=FGDILP(model, tok, **SMALL, **settings), **opts) == plain
        assert spy.calls > before + 8 * len(TEXTS)  # self-generation, diagnosis, the auxiliary runs did run
    assert editkit.generate(model, tok, TEXTS, detoxifier=FGDILP(model, tok, strength=2.0, **SMALL), **opts) != plain
    assert hook_count(model) == 0


def test_through_model_generate_greedy_and_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model("llama"), _tok()
    opts = dict(max_new_tokens=6, batch_size=4, suppress_tokens=NO_SPECIALS)
    loop = editkit.generate(model, tok, TEXTS, detoxifier=FGDILP(model, tok, strength=2.0, **SMALL), **opts)
    monkeypatch.setattr(model.config, "model_type", "my_llama")  # not the loop's: model.generate, padded runs
    spy = _Spy(model.generate)
    monkeypatch.setattr(model, "generate", spy)
    arch = {"layers": "model.layers", "mlp_out": "mlp.down_proj", "attn_out": "self_attn.o_proj",
            "final_norm": "model.norm", "lm_head": "lm_head", "base": "model"}
    detox = FGDILP(model, tok, strength=2.0, arch=arch, **SMALL)
    assert editkit.generate(model, tok, TEXTS, detoxifier=detox, **opts) == loop
    assert spy.calls > 1
    # sampling: with no steering, the same samples as without the detoxifier for the same seed (its
    # self-generation is seeded on its own and gives the caller's RNG back)
    sampled = []
    for detoxifier in (None, FGDILP(model, tok, strength=0.0, arch=arch, **SMALL)):
        torch.manual_seed(0)
        sampled.append(editkit.generate(model, tok, TEXTS, max_new_tokens=6, do_sample=True, top_k=20,
                                        detoxifier=detoxifier))
    assert sampled[0] == sampled[1]
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- nothing left behind


@pytest.mark.parametrize("path", ["loop", "model.generate"])
def test_nothing_remains_after_generation_or_an_error(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model("llama"), _tok()
    arch = None
    if path == "model.generate":
        monkeypatch.setattr(model.config, "model_type", "my_llama")
        arch = {"layers": "model.layers", "mlp_out": "mlp.down_proj", "attn_out": "self_attn.o_proj",
                "final_norm": "model.norm", "lm_head": "lm_head", "base": "model"}
    config_before = model.generation_config.to_dict()
    detox = FGDILP(model, tok, strength=2.0, arch=arch, **SMALL)
    opts = dict(max_new_tokens=5, batch_size=4, suppress_tokens=NO_SPECIALS)
    spy = _Spy(model.forward)
    monkeypatch.setattr(model, "forward", spy)
    done = editkit.generate(model, tok, TEXTS, detoxifier=detox, **opts)
    assert hook_count(model) == 0 and detox._aux is None and detox._raw is None and not detox._installed
    # a failure in the middle of decoding (three forwards before the end): hooks and state gone
    spy.fail_at, spy.calls = spy.calls - 3, 0
    with pytest.raises(RuntimeError, match="injected failure"):
        editkit.generate(model, tok, TEXTS, detoxifier=detox, **opts)
    assert spy.calls == spy.fail_at
    assert hook_count(model) == 0 and detox._aux is None and detox._raw is None and detox._mode is None
    assert model.generation_config.to_dict() == config_before  # no processor stored on the model
    spy.fail_at = None
    assert editkit.generate(model, tok, TEXTS, detoxifier=detox, **opts) == done  # and it works again


def test_settings_options_and_refusals() -> None:
    model, tok = _model("llama"), _tok()
    detox = FGDILP.from_options(model, tok, k="3", sample_tokens="5", keep_fraction="0.3", lambda_norm="0.5",
                                lambda_sim="1", strength="0.5", similarity="direction", renorm="layer",
                                sign="normmass", seed="7", top_p="0.8")
    assert detox.settings() == {"kind": "fgdilp", "k": 3, "sample_tokens": 5, "top_p": 0.8, "keep_fraction": 0.3,
                                "lambda_norm": 0.5, "lambda_sim": 1.0, "strength": 0.5, "similarity": "direction",
                                "renorm": "layer", "sign": "normmass", "seed": 7, "attributes": list(ATTRIBUTES)}
    assert FGDILP.label == "fgdilp" and detox.heads == 4
    with pytest.raises(ValueError, match="unknown"):
        FGDILP.from_options(model, tok, alpha="1")
    with pytest.raises(ValueError, match="keep_fraction='half'"):
        FGDILP.from_options(model, tok, keep_fraction="half")
    with pytest.raises(ValueError, match="percentage"):
        FGDILP(model, tok, keep_fraction=50)
    with pytest.raises(ValueError, match="renorm"):
        FGDILP(model, tok, renorm="all")
    with pytest.raises(RuntimeError, match="active"):
        FGDILP(model, tok, **SMALL).start([[5, 6]])
    with pytest.raises(ValueError, match="another model"):
        with FGDILP(model, tok).active(_model("llama", seed=1)):
            pass
