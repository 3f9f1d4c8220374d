"""DetoxiGen (editkit.decoding.detoxigen): the step's combination against a distribution written by
hand, α = 0 against plain greedy decoding on both generation paths, the detoxifier's own cache
against a no-cache computation while rows leave, prompt tuning that lowers the loss and leaves the
model bit-identical (also after an error, and resumed), save/load and refusal of another model,
and nothing left behind after a generation or an error."""
from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch

import editkit
from editkit.decoding import detoxigen_train
from editkit.decoding.detoxigen import (DetoxiGen, SoftPrompt, SoftPromptBatch, SoftPromptError, contrastive_scores,
                                        soft_prompt_logits)
from editkit.decoding.detoxigen_train import load_toxic_texts, soft_prompt_loss, train_detoxigen_prompt
from editkit.generation import incremental
from editkit.generation.greedy_loop import greedy_decode
from editkit.models import tiny_model, tiny_tokenizer
from helpers import peaked_model as _model, varied_prompts as _prompts, no_hooks as _no_hooks

EOS = 2
NO_SPECIALS = [0, 1, 2, 3]  # random models favour the specials; keep them out of most tests
TEXTS = ["Hi", "What is the weather like today in Paris, and should I take an umbrella?", "x",
         "What is the weather like today in Paris, and should I stay home?", "Tell me a story."]
TOXIC = ["you people are all worthless and should leave", "i hate every one of them, they ruin everything",
         "shut up, nobody wants to hear from your kind", "they are vermin and deserve what they get",
         "go back where you came from, you filth", "all of them are liars and thieves"]


def _prompt(model, tokens=(40, 51, 62, 73, 84)) -> SoftPrompt:
    """A soft prompt for ``model``: the embeddings of a few vocabulary tokens (a real prefix, so the
    detoxifier's distribution differs from the generator's)."""
    return SoftPrompt.from_embeddings(model, model.get_input_embeddings().weight[list(tokens)].detach().clone())


class _Spy:
    """Counts calls of a bound method."""

    def __init__(self, method) -> None:
        self.calls, self.real = 0, method
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@torch.no_grad()
def _by_hand(model, prompt: SoftPrompt, ids: list[int], steps: int, alpha: float, eos: int, suppress=()) -> list[int]:
    """DetoxiGen greedy decoding the slow way (top_p None): at every step the whole sequence through the
    model without and with the soft prompt (no cache), the argmax of (1+α)·P_gen − α·P_det over the
    tokens not suppressed (clipping and renormalising do not move the argmax of a positive maximum)."""
    seq = list(ids)
    for _ in range(steps):
        z = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        z[list(suppress)] = float("-inf")
        p_det = soft_prompt_logits(model, prompt, seq)[-1].float().softmax(-1)
        mixed = (1 + alpha) * z.softmax(-1) - alpha * p_det
        mixed[list(suppress)] = float("-inf")
        seq.append(int(mixed.argmax()))
        if seq[-1] == eos:
            break
    return seq[len(ids):]


# --------------------------------------------------------------------------- the formula by hand


def test_the_step_is_the_formula_on_a_hand_made_distribution() -> None:
    # five tokens; P_gen and P_det written by hand (scores are their logs), α = 1, top_p = 0.8
    p_gen = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05]])
    p_det = torch.tensor([[0.10, 0.70, 0.05, 0.05, 0.10]])
    # nucleus of P_gen: 0.40, 0.40 + 0.30 = 0.70 < 0.8, + 0.15 = 0.85 crosses 0.8 -> tokens {0, 1, 2}
    # (1+α)P_gen − αP_det = 2·P_gen − P_det:
    #   token 0: 0.80 − 0.10 = 0.70
    #   token 1: 0.60 − 0.70 = −0.10 -> clipped to 0 (the detoxifier likes it more than the generator)
    #   token 2: 0.30 − 0.05 = 0.25
    #   token 3: 0.20 − 0.05 = 0.15, but outside the nucleus -> 0
    #   token 4: 0.10 − 0.10 = 0.00, outside the nucleus -> 0
    # renormalised over 0.70 + 0.25 = 0.95: P = [0.70/0.95, 0, 0.25/0.95, 0, 0]
    want = torch.tensor([[0.70 / 0.95, 0.0, 0.25 / 0.95, 0.0, 0.0]])
    got = contrastive_scores(p_gen.log(), p_det.log(), alpha=1.0, top_p=0.8)
    torch.testing.assert_close(got.exp(), want, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(got[0, [1, 3, 4]]).all()  # log P = −∞ where P = 0
    torch.testing.assert_close(got[0, [0, 2]], want[0, [0, 2]].log(), rtol=1e-5, atol=1e-6)
    # the same through a detoxifier's combine
    detox = DetoxiGen(tiny_model("llama"), _prompt(tiny_model("llama")), alpha=1.0, top_p=0.8)
    torch.testing.assert_close(detox.combine(p_gen.log(), p_det.log()), got)

    # α = 0: P_gen renormalised over its nucleus, [0.40, 0.30, 0.15] / 0.85
    zero = contrastive_scores(p_gen.log(), p_det.log(), alpha=0.0, top_p=0.8)
    torch.testing.assert_close(zero.exp(), torch.tensor([[0.40 / 0.85, 0.30 / 0.85, 0.15 / 0.85, 0.0, 0.0]]),
                               rtol=1e-5, atol=1e-6)
    # no nucleus (top_p None), α = 1: 2·P_gen − P_det = [0.70, −0.10, 0.25, 0.15, 0.00] -> clip, / 1.10
    torch.testing.assert_close(contrastive_scores(p_gen.log(), p_det.log(), alpha=1.0, top_p=None).exp(),
                               torch.tensor([[0.70 / 1.10, 0.0, 0.25 / 1.10, 0.15 / 1.10, 0.0]]), rtol=1e-5, atol=1e-6)

    # every nucleus token clipped: P_gen = [0.50, 0.35, 0.10, 0.03, 0.02], top_p 0.8 -> nucleus {0, 1};
    # α = 9: 10·P_gen − 9·P_det with P_det = [0.58, 0.40, 0.01, 0.005, 0.005]:
    #   token 0: 5.0 − 5.22 = −0.22, token 1: 3.5 − 3.6 = −0.10 -> both negative;
    # the row falls back to the nucleus token of largest value, token 1 (−0.10): P = [0, 1, 0, 0, 0]
    p_gen = torch.tensor([[0.50, 0.35, 0.10, 0.03, 0.02]])
    p_det = torch.tensor([[0.58, 0.40, 0.01, 0.005, 0.005]])
    got = contrastive_scores(p_gen.log(), p_det.log(), alpha=9.0, top_p=0.8)
    assert got[0, 1] == 0.0 and torch.isneginf(got[0, [0, 2, 3, 4]]).all()


def test_suppressed_tokens_and_a_smaller_detoxifier_vocabulary() -> None:
    scores = torch.tensor([[2.0, float("-inf"), 1.0, 0.5]])  # token 1 suppressed by the generator
    det = torch.tensor([[0.0, 5.0, 0.0]])  # the detoxifier knows three tokens: P_det(3) = 0
    got = contrastive_scores(scores, det, alpha=1.0, top_p=None)
    p_gen, p_det = scores.softmax(-1)[0], det.softmax(-1)[0]
    raw = torch.stack([2 * p_gen[0] - p_det[0], torch.tensor(0.0), 2 * p_gen[2] - p_det[2], 2 * p_gen[3]])
    raw = raw.clamp(min=0)
    torch.testing.assert_close(got.exp()[0], raw / raw.sum())
    assert torch.isneginf(got[0, 1])


# --------------------------------------------------------------------------- alpha = 0


def test_alpha_zero_is_plain_greedy_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, tok = _model(), tiny_tokenizer()
    prefills = _Spy(SoftPromptBatch.prefill)
    advances = _Spy(SoftPromptBatch.advance)
    monkeypatch.setattr(SoftPromptBatch, "prefill", lambda self: prefills(self))
    monkeypatch.setattr(SoftPromptBatch, "advance", lambda self, tokens: advances(self, tokens))
    generate = _Spy(gen.generate)
    monkeypatch.setattr(gen, "generate", generate)
    greedy = dict(max_new_tokens=8, batch_size=3, suppress_tokens=NO_SPECIALS)
    plain = editkit.generate(gen, tok, TEXTS, **greedy)
    assert len(set(plain)) > 1
    # the fast loop (model.generate never called); the detoxifier did run at every step
    assert editkit.generate(gen, tok, TEXTS, detoxifier=DetoxiGen(gen, _prompt(gen), alpha=0.0), **greedy) == plain
    assert generate.calls == 0 and prefills.calls == 2 and advances.calls >= 7
    # model.generate on padded batches (repetition_penalty is an option the loop does not take; at 1.0
    # it adds no processor), the detoxifier as a logits processor
    fallback = editkit.generate(gen, tok, TEXTS, repetition_penalty=1.0, **greedy)
    assert generate.calls >= 2 and fallback == plain
    assert editkit.generate(gen, tok, TEXTS, repetition_penalty=1.0, detoxifier=DetoxiGen(gen, _prompt(gen), alpha=0.0),
                            **greedy) == plain
    assert prefills.calls >= 4
    # and token ids, straight through the loop
    prompts = _prompts()
    assert greedy_decode(gen, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         detoxifier=DetoxiGen(gen, _prompt(gen), alpha=0.0, top_p=None)) == \
        greedy_decode(gen, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)


# --------------------------------------------------------------------------- the detoxifier's own cache


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_the_detoxifier_cache_follows_the_rows_against_a_no_cache_reference(model_type: str) -> None:
    gen = _model(model_type, scale=1.0)
    prompt = _prompt(gen)
    prompts = _prompts()
    detox = DetoxiGen(gen, prompt, alpha=1.5, top_p=None)
    seen: list[torch.Tensor] = []
    real_combine = detox.combine
    detox.combine = lambda scores, logits: seen.append(logits.clone()) or real_combine(scores, logits)
    scores = torch.zeros((len(prompts), 260))
    with torch.no_grad():
        detox.start(prompts, max_new_tokens=4)
        detox.step(scores, None, torch.arange(5))
        # rows 1 and 4 leave; the others were fed one token each
        fed1 = torch.tensor([11, 12, 13])
        detox.step(scores[:3], fed1, torch.tensor([0, 2, 3]))
        # row 0 leaves too
        fed2 = torch.tensor([21, 22])
        detox.step(scores[:2], fed2, torch.tensor([2, 3]))
        # the reference: each row's whole sequence behind the soft prompt, in one forward, no cache
        want = [torch.stack([soft_prompt_logits(gen, prompt, p)[-1] for p in prompts]),
                torch.stack([soft_prompt_logits(gen, prompt, prompts[r] + [t])[-1]
                             for r, t in zip([0, 2, 3], fed1.tolist())]),
                torch.stack([soft_prompt_logits(gen, prompt, prompts[r] + [f, t])[-1]
                             for r, f, t in zip([2, 3], [12, 13], fed2.tolist())])]
    detox.finish()
    assert len(seen) == 3
    for got, expected in zip(seen, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the detoxifier is not the generator: the soft prompt changes the logits
    with torch.no_grad():
        plain = gen(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert not torch.allclose(plain, want[0][0], atol=1e-2)


def test_rows_stopping_at_different_steps_decode_as_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _model(seed=3)
    prompt = _prompt(gen)
    prompts = _prompts(seed=1)
    detox = DetoxiGen(gen, prompt, alpha=1.0, top_p=None)
    free = greedy_decode(gen, prompts, max_new_tokens=10, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                         detoxifier=detox)
    # an "end" token the longest prompt produces early: rows stop at different steps (or never)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_at = next(j for j in range(1, 10) if free[longest][j] not in free[longest][:j])
    eos = free[longest][stop_at]
    suppress = [t for t in NO_SPECIALS if t != eos]
    kept = []  # (batch, rows before, rows after) each time a batch drops rows
    real_slab, real_padded = incremental.SlabBatch.keep, incremental.PaddedBatch.keep
    monkeypatch.setattr(incremental.SlabBatch, "keep",
                        lambda self, index: kept.append(("gen", self.rows, len(index))) or real_slab(self, index))
    monkeypatch.setattr(incremental.PaddedBatch, "keep", lambda self, index: kept.append(
        ("det", int(self.mask.shape[0]), len(index))) or real_padded(self, index))
    got = greedy_decode(gen, prompts, max_new_tokens=10, eos_token_id=eos, suppress_tokens=suppress, detoxifier=detox)
    # the generator's batch and the detoxifier's dropped the same rows at the same steps
    assert kept and [k[1:] for k in kept[0::2]] == [k[1:] for k in kept[1::2]]
    assert {k[0] for k in kept[0::2]} == {"gen"} and {k[0] for k in kept[1::2]} == {"det"}
    assert len(got[longest]) == stop_at + 1 and any(len(g) == 10 for g in got)
    assert got == [_by_hand(gen, prompt, p, 10, 1.0, eos, suppress) for p in prompts]
    assert got != greedy_decode(gen, prompts, max_new_tokens=10, eos_token_id=eos, suppress_tokens=suppress)


def test_loop_equals_model_generate_with_the_same_model_as_detoxifier() -> None:
    gen, tok = _model(seed=2), tiny_tokenizer()
    prompt = _prompt(gen)
    opts = dict(max_new_tokens=8, batch_size=5, suppress_tokens=NO_SPECIALS)
    loop = editkit.generate(gen, tok, TEXTS, detoxifier=DetoxiGen(gen, prompt, alpha=2.0, top_p=0.9), **opts)
    assert loop != editkit.generate(gen, tok, TEXTS, **opts)  # the detoxifier mattered
    # model.generate keeps its own cache while the detoxifier runs the same model with another one
    assert editkit.generate(gen, tok, TEXTS, repetition_penalty=1.0,
                            detoxifier=DetoxiGen(gen, prompt, alpha=2.0, top_p=0.9), **opts) == loop
    # a copy of the model as the detoxifier's base (the soft prompt fits it) steers the same way
    twin = DetoxiGen(copy.deepcopy(gen), prompt, alpha=2.0)
    assert editkit.generate(gen, tok, TEXTS, detoxifier=twin, **opts) == loop


# --------------------------------------------------------------------------- prompt tuning


def _snapshot(model) -> dict:
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "modes": [(n, m.training) for n, m in model.named_modules()],
            "attrs": [(n, sorted(vars(m))) for n, m in model.named_modules()],
            "config": model.config.to_dict(), "generation": model.generation_config.to_dict()}


def _same(model, snapshot: dict) -> bool:
    now = _snapshot(model)
    weights = now.pop("weights")
    before = dict(snapshot)
    return (set(weights) == set(before.pop("weights")) and all(torch.equal(weights[k], snapshot["weights"][k])
                                                                for k in weights)
            and now == before and _no_hooks(model))


def test_prompt_tuning_lowers_the_loss_and_leaves_the_model_as_it_came(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model(), tiny_tokenizer()
    model.model.layers[1].train()  # an odd mode, to be given back as it was
    snapshot = _snapshot(model)
    prompt = train_detoxigen_prompt(model, tok, TOXIC, n_virtual_tokens=4, lr=0.1, max_steps=12, batch_size=3,
                                    max_length=48, seed=0)
    assert _same(model, snapshot)
    assert "forward" not in vars(model)
    assert prompt.embeddings.shape == (4, 32) and prompt.fits(model)
    metrics = prompt.metrics
    assert metrics["steps"] == 12 and len(metrics["train_losses"]) == 12
    assert metrics["loss_after"] < metrics["loss_before"] - 0.1
    assert metrics["loss_after"] == pytest.approx(soft_prompt_loss(model, tok, prompt, TOXIC, max_length=48))
    assert metrics["peak_rss_mb"] is None or metrics["peak_rss_mb"] > 0
    json.dumps(prompt.to_dict())
    # the same seed gives the same soft prompt; text initialisation starts from the text's embeddings
    again = train_detoxigen_prompt(model, tok, TOXIC, n_virtual_tokens=4, lr=0.1, max_steps=12, batch_size=3,
                                   max_length=48, seed=0, measure=False)
    assert torch.equal(again.embeddings, prompt.embeddings)
    texted = train_detoxigen_prompt(model, tok, TOXIC, n_virtual_tokens=5, init="text", init_text="hate",
                                    lr=1e-6, max_steps=1, batch_size=3, measure=False)
    ids = tok("hatehate", add_special_tokens=False)["input_ids"][:5]
    torch.testing.assert_close(texted.embeddings, model.get_input_embeddings().weight[ids].detach(), atol=1e-5,
                               rtol=0)
    # an error half-way: the model is still as it came
    real_step = detoxigen_train._train_step
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(detoxigen_train, "_train_step", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        train_detoxigen_prompt(model, tok, TOXIC, n_virtual_tokens=4, lr=0.1, max_steps=6, batch_size=3)
    assert _same(model, snapshot)


def test_an_interrupted_run_resumes_to_the_same_soft_prompt(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model(), tiny_tokenizer()
    args = dict(n_virtual_tokens=3, lr=0.1, max_steps=7, batch_size=2, max_length=32, seed=1, measure=False,
                save_steps=2)
    whole = train_detoxigen_prompt(model, tok, TOXIC, **args)
    real_step = detoxigen_train._train_step
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("interrupted")
        return real_step(*a, **k)

    monkeypatch.setattr(detoxigen_train, "_train_step", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_detoxigen_prompt(model, tok, TOXIC, output_dir=tmp_path / "run", **args)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(detoxigen_train, "_train_step", real_step)
    resumed = train_detoxigen_prompt(model, tok, TOXIC, output_dir=tmp_path / "run", **args)
    assert resumed.metrics["resumed_from_step"] == 4 and len(resumed.metrics["train_losses"]) == 7
    torch.testing.assert_close(resumed.embeddings, whole.embeddings, rtol=1e-6, atol=1e-7)
    # a finished run resumes at its end; other settings in the same folder are refused
    done = train_detoxigen_prompt(model, tok, TOXIC, output_dir=tmp_path / "run", **args)
    assert done.metrics["resumed_from_step"] == 7 and torch.equal(done.embeddings, resumed.embeddings)
    with pytest.raises(ValueError, match="different settings"):
        train_detoxigen_prompt(model, tok, TOXIC, output_dir=tmp_path / "run", **{**args, "lr": 0.2})


# --------------------------------------------------------------------------- the artifact


def test_save_load_round_trip_and_options(tmp_path) -> None:
    gen, tok = _model(seed=5), tiny_tokenizer()
    prompt = train_detoxigen_prompt(gen, tok, TOXIC, n_virtual_tokens=4, lr=0.3, max_steps=4, batch_size=3,
                                    max_length=32, measure=False)
    path = prompt.save(tmp_path / "prompt")
    assert sorted(p.name for p in path.iterdir()) == ["soft_prompt.json", "soft_prompt.safetensors"]
    with pytest.raises(FileExistsError):
        prompt.save(path)
    loaded = SoftPrompt.load(path, gen)
    assert torch.equal(loaded.embeddings, prompt.embeddings) and loaded.settings == prompt.settings
    opts = dict(max_new_tokens=8, batch_size=5, suppress_tokens=NO_SPECIALS)
    want = editkit.generate(gen, tok, TEXTS, detoxifier=DetoxiGen(gen, prompt, alpha=3.0, top_p=None), **opts)
    assert want != editkit.generate(gen, tok, TEXTS, **opts)
    for source in (loaded, str(path)):  # a SoftPrompt, or the folder it was saved in
        detox = DetoxiGen(gen, source, alpha=3.0, top_p=None)
        assert editkit.generate(gen, tok, TEXTS, detoxifier=detox, **opts) == want
    # from command-line strings
    detox = DetoxiGen.from_options(gen, tok, prompt=str(path), alpha="3", top_p="none")
    assert (detox.alpha, detox.top_p, detox.label) == (3.0, None, "detoxigen")
    assert editkit.generate(gen, tok, TEXTS, detoxifier=detox, **opts) == want
    settings = json.loads(json.dumps(detox.settings()))
    assert settings["kind"] == "detoxigen" and settings["prompt"]["path"] == str(path)
    assert settings["prompt"]["digest"] == prompt.digest() and settings["prompt"]["n_virtual_tokens"] == 4
    assert DetoxiGen.from_options(gen, tok, prompt=str(path)).settings()["alpha"] == 2.0
    with pytest.raises(ValueError, match="prompt=PATH"):
        DetoxiGen.from_options(gen, tok, alpha="1")
    with pytest.raises(ValueError, match="unknown detoxigen option"):
        DetoxiGen.from_options(gen, tok, prompt=str(path), beta="1")
    with pytest.raises(ValueError, match="not a number"):
        DetoxiGen.from_options(gen, tok, prompt=str(path), alpha="much")
    with pytest.raises(SoftPromptError, match="not an editkit soft prompt"):
        DetoxiGen.from_options(gen, tok, prompt=str(tmp_path))


def test_a_soft_prompt_for_another_model_is_refused(tmp_path) -> None:
    gen = _model(seed=0)
    path = _prompt(gen).save(tmp_path / "prompt")
    other = _model(seed=1)  # same architecture, other weights
    assert issubclass(SoftPromptError, ValueError)
    with pytest.raises(SoftPromptError, match="differ from those this soft prompt was trained for"):
        SoftPrompt.load(path, other)
    with pytest.raises(SoftPromptError, match="differ"):
        DetoxiGen(other, SoftPrompt.load(path))
    with pytest.raises(SoftPromptError, match="differ"):
        DetoxiGen.from_options(other, None, prompt=str(path))
    with pytest.raises(SoftPromptError, match="model_type"):
        DetoxiGen(_model("gpt2"), SoftPrompt.load(path))
    assert SoftPrompt.load(path).fits(gen) and not SoftPrompt.load(path).fits(other)
    with pytest.raises(SoftPromptError, match="d_model|32"):
        SoftPrompt.from_embeddings(gen, torch.zeros(3, 16))
    with pytest.raises(SoftPromptError, match="NaN"):
        SoftPrompt(embeddings=torch.full((2, 32), math.nan))
    with pytest.raises(ValueError, match="alpha"):
        DetoxiGen(gen, path, alpha=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        DetoxiGen(gen, path, top_p=0.0)


def test_load_toxic_texts(shared_data) -> None:
    texts = load_toxic_texts(shared_data)
    hate = [json.loads(line) for line in (shared_data / "toxigen" / "toxigen_demonstrations.jsonl").open()]
    neutral = {" ".join(r["text"].split()).lower() for r in hate if r["label"] == "neutral"}
    assert len(texts) > 300 and not {" ".join(t.split()).lower() for t in texts} & neutral
    assert len(set(texts)) == len(texts)
    first = load_toxic_texts(shared_data, limit=6)
    assert first == texts[:6]
    assert any(len(t) > 200 for t in first) and any(len(t) < 200 for t in first)  # SafeEdit and ToxiGen alternate
    toxigen = load_toxic_texts(shared_data, sources=["toxigen"], limit=3)
    assert len(toxigen) == 3 and all(t in texts and len(t) < 200 for t in toxigen)
    with pytest.raises(ValueError, match="unknown toxic text source"):
        load_toxic_texts(shared_data, sources=["reddit"])


# --------------------------------------------------------------------------- nothing left behind


@pytest.mark.parametrize("path", ["loop", "model.generate"])
def test_nothing_remains_after_generation_or_an_error(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen, tok = _model(), tiny_tokenizer()
    extra = {"repetition_penalty": 1.0} if path == "model.generate" else {}
    opts = dict(max_new_tokens=5, batch_size=5, suppress_tokens=NO_SPECIALS, **extra)
    config_before = gen.generation_config.to_dict()
    attrs_before = sorted(vars(gen))
    detox = DetoxiGen(gen, _prompt(gen), alpha=1.0)
    want = editkit.generate(gen, tok, TEXTS, detoxifier=detox, **opts)
    assert _no_hooks(gen) and detox._run is None
    # the detoxifier's runner fails mid-way: the generation raises, its state is dropped, nothing stays
    real_advance = SoftPromptBatch.advance
    calls = {"n": 0}

    def failing(self, tokens):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("detoxifier failure")
        return real_advance(self, tokens)

    monkeypatch.setattr(SoftPromptBatch, "advance", failing)
    with pytest.raises(RuntimeError, match="detoxifier failure"):
        editkit.generate(gen, tok, TEXTS, detoxifier=detox, **opts)
    assert calls["n"] == 2 and detox._run is None
    assert _no_hooks(gen) and gen.generation_config.to_dict() == config_before and sorted(vars(gen)) == attrs_before
    # the combination itself fails
    monkeypatch.setattr(SoftPromptBatch, "advance", real_advance)
    monkeypatch.setattr(detox, "combine", lambda scores, logits: (_ for _ in ()).throw(RuntimeError("step failure")))
    with pytest.raises(RuntimeError, match="step failure"):
        editkit.generate(gen, tok, TEXTS, detoxifier=detox, **opts)
    assert detox._run is None and _no_hooks(gen) and gen.generation_config.to_dict() == config_before
    monkeypatch.undo()
    # and it works again afterwards, as before
    assert editkit.generate(gen, tok, TEXTS, detoxifier=detox, **opts) == want
