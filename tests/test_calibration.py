"""Calibration-model fusion (editkit.decoding.calibration, calibration_train): the step against the
fusion h′ = α·N(h_cal·A) + (1−α)·h computed before the LM head by hand (N: rescaled to h's RMS,
layer-normalised, or nothing), a copy of the generator with the identity alignment as a no-op, the greedy loop against a
slow reference that hooks the generator's final norm (while rows leave the batch) and against
model.generate with the processor, α = 0 as plain decoding, InfoNCE training, the alignment's
save/load and its refusal of other models, and nothing left behind after a generation or an error."""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

import editkit
from editkit.arch import get_module, resolve_arch
from editkit.decoding.calibration import (Alignment, AlignmentError, CalibrationFusion, embedding_parameter,
                                          load_alignment)
from editkit.decoding.calibration_train import (info_nce, non_toxic_texts, shared_tokens, train_alignment,
                                                train_calibration_model)
from editkit.generation import incremental
from editkit.generation.greedy_loop import greedy_decode
from editkit.models import tiny_model, tiny_tokenizer
from helpers import peaked_model as _model, varied_prompts as _prompts, no_hooks as _no_hooks

PAD, EOS = 3, 2
NO_SPECIALS = [0, 1, 2, 3]
TEXTS = ["Hi", "What is the weather like today in Paris, and should I take an umbrella?", "x",
         "What is the weather like today in Paris, and should I stay home?", "Tell me a story."]


def _alignment(gen, cal, seed: int = 0) -> Alignment:
    """A random (untrained) alignment for the pair, both sharing the tiny tokenizer."""
    d_cal = cal.get_output_embeddings().weight.shape[1]
    d_gen = gen.get_output_embeddings().weight.shape[1]
    matrix = torch.randn(d_cal, d_gen, generator=torch.Generator().manual_seed(seed)) / d_cal ** 0.5
    tok = tiny_tokenizer()
    return Alignment.for_models(gen, cal, matrix, tokenizers=(tok, tok))


def _last_hidden(model, seq: list[int]) -> torch.Tensor:
    """[d] the post-norm last hidden state at the last position (the LM head's input), no cache."""
    base = get_module(model, resolve_arch(model).base)
    return base(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]


def _normed(mapped: torch.Tensor, h: torch.Tensor, norm: str) -> torch.Tensor:
    """N(h_cal·A) for the generator's own last hidden state ``h``, written out."""
    if norm == "rms":
        return mapped * (h.pow(2).mean().sqrt() / mapped.pow(2).mean().sqrt())
    if norm == "layer":
        return (mapped - mapped.mean()) / (mapped.var(unbiased=False) + 1e-5).sqrt()
    return mapped


def _fused_by_hand(gen, cal, matrix, seq, alpha: float, norm: str = "rms") -> torch.Tensor:
    """head(α·N(h_cal·A) + (1−α)·h) [vocab], every state from the whole sequence."""
    with torch.no_grad():
        h, h_cal = _last_hidden(gen, seq), _last_hidden(cal, seq)
        return gen.get_output_embeddings()(alpha * _normed(h_cal @ matrix, h, norm) + (1 - alpha) * h)


def _hooked_reference(gen, cal, matrix, prompt, steps: int, alpha: float, suppress=(), eos=None,
                      norm: str = "rms") -> list[int]:
    """Fusion greedy decoding as the method is described: a hook on the generator's final norm
    replaces the last position's hidden state h by h′ (the calibration model run over the whole
    sequence, no cache), then the generator's own LM head; argmax."""
    norm_module = get_module(gen, resolve_arch(gen).final_norm)
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            h_cal = _last_hidden(cal, seq)

            def replace(module, args, output):
                output = output.clone()
                h = output[0, -1]
                output[:, -1] = alpha * _normed(h_cal @ matrix, h, norm) + (1 - alpha) * h
                return output

            handle = norm_module.register_forward_hook(replace)
            try:
                z = gen(input_ids=torch.tensor([seq])).logits[0, -1].float()
            finally:
                handle.remove()
        z[list(suppress)] = float("-inf")
        seq.append(int(z.argmax()))
        if eos is not None and seq[-1] == eos:
            break
    return seq[len(prompt):]


def _hf_generate(model, ids, max_new_tokens, eos, suppress, detoxifier=None) -> list[int]:
    x = torch.tensor([ids])
    extra = {"logits_processor": [detoxifier.as_logits_processor(max_new_tokens=max_new_tokens)]} if detoxifier else {}
    with detoxifier.active(model) if detoxifier is not None else contextlib.nullcontext():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, suppress_tokens=suppress,
                             max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos, **extra)
    return out[0, len(ids):].tolist()


class _Spy:
    """Counts calls of a bound method (``model.generate`` or ``model.forward``)."""

    def __init__(self, method) -> None:
        self.calls, self.real = 0, method
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


# --------------------------------------------------------------------------- the fusion


@pytest.mark.parametrize("gen_type, cal_type, norm", [("llama", "gpt2", "rms"), ("gpt2", "llama", "layer"),
                                                      ("qwen2", "gpt_neox", "none"), ("llama", "gpt2", "layer")])
def test_step_is_the_fusion_before_the_head(gen_type: str, cal_type: str, norm: str) -> None:
    gen = _model(gen_type, scale=1.0)
    cal = _model(cal_type, seed=5, scale=1.0, hidden_size=48)  # another family, another width
    alignment = _alignment(gen, cal)
    fusion = CalibrationFusion(gen, cal, alignment, alpha=0.3, norm=norm)
    prompts = _prompts()[:3]
    rows = torch.arange(3)
    seqs = [prompts[0] + [11], prompts[2] + [13]]  # one token later (and a row gone)
    want = [torch.stack([_fused_by_hand(gen, cal, alignment.matrix, p, 0.3, norm) for p in prompts]),
            torch.stack([_fused_by_hand(gen, cal, alignment.matrix, s, 0.3, norm) for s in seqs])]
    with torch.no_grad(), fusion.active(gen):
        z = torch.stack([gen(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
        fusion.start(prompts, max_new_tokens=3)
        torch.testing.assert_close(fusion.step(z, None, rows), want[0], rtol=1e-4, atol=1e-4)
        # the calibration model's cache took the fed tokens in
        z1 = torch.stack([gen(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs])
        got = fusion.step(z1, torch.tensor([11, 13]), torch.tensor([0, 2]))
        torch.testing.assert_close(got, want[1], rtol=1e-4, atol=1e-4)
    fusion.finish()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_loop_equals_the_hooked_reference_while_rows_leave(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen, cal = _model(model_type, seed=3), _model("llama", seed=8, hidden_size=48)
    alignment = _alignment(gen, cal, seed=2)
    fusion = CalibrationFusion(gen, cal, alignment, alpha=0.5)
    prompts = _prompts(seed=1)
    args = dict(max_new_tokens=10, suppress_tokens=NO_SPECIALS)
    with fusion.active(gen):  # greedy_decode leaves the detoxifier's hooks to its caller
        free = greedy_decode(gen, prompts, eos_token_id=EOS, detoxifier=fusion, **args)
    assert free != greedy_decode(gen, prompts, eos_token_id=EOS, **args)
    # an "end" token the longest prompt produces early: rows stop at different steps (or never)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_at = next(j for j in range(1, 10) if free[longest][j] not in free[longest][:j])
    eos = free[longest][stop_at]
    suppress = [t for t in NO_SPECIALS if t != eos]
    kept = []
    real_keep = incremental.SlabBatch.keep
    monkeypatch.setattr(incremental.SlabBatch, "keep",
                        lambda self, index: kept.append((self.rows, len(index))) or real_keep(self, index))
    with fusion.active(gen):
        got = greedy_decode(gen, prompts, max_new_tokens=10, eos_token_id=eos, suppress_tokens=suppress,
                            detoxifier=fusion)
    assert kept and kept[0::2] == kept[1::2]  # the calibration batch dropped the generator's rows
    assert len(got[longest]) == stop_at + 1 and any(len(g) == 10 for g in got)
    assert got == [_hooked_reference(gen, cal, alignment.matrix, p, 10, 0.5, suppress, eos) for p in prompts]
    assert got == [_hf_generate(gen, p, 10, eos, suppress, detoxifier=fusion) for p in prompts]
    # a calibration model the loop does not know runs padded, with the same hidden states
    monkeypatch.setattr(cal.config, "model_type", "my_llama")
    with fusion.active(gen):
        assert greedy_decode(gen, prompts, max_new_tokens=10, eos_token_id=eos, suppress_tokens=suppress,
                             detoxifier=fusion) == got


# --------------------------------------------------------------------------- alpha = 0


def test_alpha_zero_is_plain_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, cal, tok = _model("llama"), _model("gpt2", seed=4), tiny_tokenizer()
    fusion = CalibrationFusion(gen, cal, _alignment(gen, cal), alpha=0.0)
    scores = torch.randn(2, 260)
    scores[:, :2] = float("-inf")
    assert torch.equal(fusion.fuse(scores, torch.randn(2, 32), torch.randn(2, 32)), scores)  # bit for bit
    cal_forward = _Spy(cal.forward)
    monkeypatch.setattr(cal, "forward", cal_forward)
    prompts = _prompts()
    plain = greedy_decode(gen, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS)
    with fusion.active(gen):
        assert greedy_decode(gen, prompts, max_new_tokens=8, eos_token_id=EOS, suppress_tokens=NO_SPECIALS,
                             detoxifier=fusion) == plain
    assert cal_forward.calls > len(prompts)  # the calibration model did run, every step
    greedy = dict(max_new_tokens=6, batch_size=3, suppress_tokens=NO_SPECIALS)
    spy = _Spy(gen.generate)
    monkeypatch.setattr(gen, "generate", spy)
    texts = editkit.generate(gen, tok, TEXTS, **greedy)
    assert editkit.generate(gen, tok, TEXTS, detoxifier=fusion, **greedy) == texts and spy.calls == 0
    # model.generate with the processor (a family the loop does not know), greedy and sampled
    monkeypatch.setattr(gen.config, "model_type", "my_llama")
    texts = editkit.generate(gen, tok, TEXTS, **greedy)
    assert editkit.generate(gen, tok, TEXTS, detoxifier=fusion, **greedy) == texts
    assert spy.calls >= 4 and len(set(texts)) > 1
    sampled = []
    for detoxifier in (None, fusion):
        torch.manual_seed(0)
        sampled.append(editkit.generate(gen, tok, TEXTS, max_new_tokens=6, do_sample=True, top_k=20,
                                        detoxifier=detoxifier))
    assert sampled[0] == sampled[1]


def test_a_copy_of_the_generator_changes_nothing_unless_layer_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    # The generator fused with a copy of itself through the identity must sample what it samples alone
    # (both decoding paths). The parameter-free layer norm does not: it puts the calibrated part on
    # the unit scale, not the generator's, which flattens the fused distribution (on SmolLM2 sampled
    # text turned to nonsense that way).
    gen, tok = _model("llama", scale=3.0), tiny_tokenizer()
    with torch.no_grad():
        gen.model.norm.weight.fill_(2.5)  # head inputs of RMS 2.5, as trained final norms make them
    copy_ = copy.deepcopy(gen)
    identity = Alignment.for_models(gen, copy_, torch.eye(32), tokenizers=(tok, tok))
    sample = dict(max_new_tokens=8, do_sample=True, top_k=0, top_p=0.9, temperature=1.0)

    def texts(detoxifier) -> list[str]:
        torch.manual_seed(0)
        return editkit.generate(gen, tok, TEXTS * 2, detoxifier=detoxifier, **sample)

    fusions = {norm: CalibrationFusion(gen, copy_, identity, alpha=0.5, norm=norm) for norm in ("rms", "none", "layer")}
    for family in ("llama", "my_llama"):  # the greedy loop, then model.generate with the processor
        monkeypatch.setattr(gen.config, "model_type", family)
        plain = texts(None)
        assert len(set(plain)) > 3
        for norm in ("rms", "none"):
            assert texts(fusions[norm]) == plain, (family, norm)
        assert texts(fusions["layer"]) != plain
    # the scale comes from the generator's own head input, so the fusion must be active while it runs
    fusion = fusions["rms"]
    fusion.start([[5, 6, 7]], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="active"):
        fusion.step(torch.zeros(1, 260), None, torch.arange(1))
    fusion.finish()


# --------------------------------------------------------------------------- the alignment


def _linear_image(gen, seed: int = 1, hidden_size: int = 48, permutation: list[int] | None = None):
    """A calibration model whose LM-head rows are the generator's times a fixed random matrix (row
    ``permutation[i]`` holding the generator's row ``i``): an alignment exists, InfoNCE must find it."""
    cal = tiny_model("gpt2", tie_word_embeddings=False, seed=seed, hidden_size=hidden_size)
    mixing = torch.randn(gen.config.hidden_size, hidden_size, generator=torch.Generator().manual_seed(seed))
    rows = gen.get_output_embeddings().weight.detach() @ mixing
    with torch.no_grad():
        head = cal.get_output_embeddings().weight
        head[torch.tensor(permutation) if permutation else slice(None)] = rows
    return cal


def _weights(gen, cal) -> dict[str, torch.Tensor]:
    return {**{f"gen.{k}": v for k, v in gen.state_dict().items()},
            **{f"cal.{k}": v for k, v in cal.state_dict().items()}}


def _tokenizer_reversed():
    """A byte-level tokenizer like the tiny one, its byte tokens numbered in the reverse order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>")


def test_info_nce_lowers_its_loss_and_pairs_tokens_by_string() -> None:
    gen, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    cal = _linear_image(gen)
    before = {k: v.clone() for k, v in _weights(gen, cal).items()}
    alignment = train_alignment(gen, cal, tok, tok, steps=150, lr=1e-2, temperature=0.1, batch_size=128, seed=0,
                                init="random")
    m = alignment.metrics
    assert m["loss_last"] < 0.5 * m["loss_first"] and m["top1_after"] > 0.9 > m["top1_before"]
    assert alignment.same_vocabulary and m["shared_tokens"] == 260 and tuple(alignment.matrix.shape) == (48, 32)
    after = _weights(gen, cal)
    assert all(torch.equal(before[k], after[k]) for k in before)  # only copies of the embeddings were read
    # the same seed, the same matrix
    again = train_alignment(gen, cal, tok, tok, steps=150, lr=1e-2, temperature=0.1, batch_size=128, seed=0,
                            init="random")
    assert torch.equal(again.matrix, alignment.matrix)
    # the loss itself: a perfect map scores near 0 at a low temperature, a shuffled one does not
    x = torch.randn(8, 5)
    assert float(info_nce(x, x, 0.01)) < 1e-3 < float(info_nce(x, x[torch.randperm(8)], 0.01))

    # two tokenizers that number the bytes differently: tokens are paired by their string
    other = _tokenizer_reversed()
    ids_t, ids_c = shared_tokens(tok, other)
    assert len(ids_t) == 260 and not torch.equal(ids_t, ids_c)
    permuted = _linear_image(gen, seed=2, permutation=_order(ids_t, ids_c))
    crossed = train_alignment(gen, permuted, tok, other, steps=150, lr=1e-2, temperature=0.1, batch_size=128,
                              init="random")
    assert crossed.metrics["top1_after"] > 0.9 and not crossed.same_vocabulary
    with pytest.raises(AlignmentError, match="one tokenizer"):
        CalibrationFusion(gen, permuted, crossed)


def test_procrustes_start_maps_a_model_onto_itself_and_a_rotation_back() -> None:
    # The default start is the orthogonal map closest to carrying the calibration embeddings onto the
    # target's: the identity for a model against itself, the inverse rotation for a rotated copy. A
    # random start retrieves tokens as well after training yet scatters every hidden dimension over all
    # the others (on the default model that fused into nonsense text).
    gen, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    same = train_alignment(gen, gen, tok, tok)  # the default: the closed-form map, no InfoNCE step
    assert same.settings["init"] == "procrustes" and same.settings["steps"] == 0 and same.metrics["top1_before"] > 0.99
    assert torch.allclose(same.matrix, torch.eye(32), atol=1e-5) and same.metrics["loss_last"] is None
    stepped = train_alignment(gen, gen, tok, tok, steps=1, lr=1e-6)
    assert torch.allclose(stepped.matrix, torch.eye(32), atol=1e-3) and stepped.metrics["loss_last"] is not None
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    rotated = copy.deepcopy(gen)
    with torch.no_grad():
        weights = {id(m.weight): m.weight for m in (rotated.get_input_embeddings(), rotated.get_output_embeddings())}
        for weight in weights.values():  # once each: tied models share one
            weight.copy_(weight @ rotation)
    back = train_alignment(gen, rotated, tok, tok, steps=1, lr=1e-6)
    assert torch.allclose(back.matrix, rotation.T, atol=1e-3)
    randomly = train_alignment(gen, gen, tok, tok, steps=1, lr=1e-6, init="random")
    assert (randomly.matrix - torch.eye(32)).norm() > 1.0
    with pytest.raises(ValueError, match="init"):
        train_alignment(gen, gen, tok, tok, steps=1, init="zeros")
    with pytest.raises(ValueError, match="random start needs"):
        train_alignment(gen, gen, tok, tok, init="random")


def _order(ids_t: torch.Tensor, ids_c: torch.Tensor) -> list[int]:
    """permutation[i] = the calibration id of the token the generator numbers i."""
    out = [0] * len(ids_t)
    for t, c in zip(ids_t.tolist(), ids_c.tolist()):
        out[t] = c
    return out


def test_alignment_save_load_and_refusals(tmp_path) -> None:
    gen, cal = _model("llama"), _model("gpt2", seed=4, hidden_size=48)
    alignment = _alignment(gen, cal)
    alignment.metrics = {"loss_last": 0.5}
    path = alignment.save(tmp_path / "a")
    loaded = load_alignment(path, gen, cal)
    assert torch.equal(loaded.matrix, alignment.matrix) and loaded.metrics == {"loss_last": 0.5}
    assert loaded.same_vocabulary and loaded.embedding == "output"
    with pytest.raises(FileExistsError):
        alignment.save(path)
    alignment.save(path, overwrite=True)
    # another generator or calibration model of the same shapes: refused by the fingerprints
    with pytest.raises(AlignmentError, match="target model's weights differ"):
        load_alignment(path, _model("llama", seed=1), cal)
    with pytest.raises(AlignmentError, match="calibration model's weights differ"):
        CalibrationFusion(gen, _model("gpt2", seed=9, hidden_size=48), loaded)
    with pytest.raises(AlignmentError):
        load_alignment(path, cal, gen)  # swapped
    # an edited generator (a decoder layer changed, the LM head kept) is still the same base
    edited = _model("llama")
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.add_(0.5)
    CalibrationFusion(edited, cal, loaded)
    # bad files
    with pytest.raises(AlignmentError, match="not an editkit alignment"):
        load_alignment(tmp_path)
    meta = (path / "alignment.json").read_text()
    (path / "alignment.json").write_text(meta.replace('"shape": [\n    48,', '"shape": [\n    47,'))
    with pytest.raises(AlignmentError, match="does not hold"):
        load_alignment(path)
    with pytest.raises(AlignmentError, match="NaN"):
        Alignment(matrix=torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="alpha"):
        CalibrationFusion(gen, cal, alignment, alpha=1.5)
    with pytest.raises(ValueError, match="norm"):
        CalibrationFusion(gen, cal, alignment, norm="target")
    with pytest.raises(ValueError, match="another model"):
        CalibrationFusion(gen, gen, Alignment.for_models(gen, gen, torch.eye(32), tokenizers=(tiny_tokenizer(),) * 2))
    with pytest.raises(ValueError, match="input"):
        embedding_parameter(gen, "middle")


# --------------------------------------------------------------------------- nothing left behind


def test_nothing_remains_after_generation_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gen, cal, tok = _model("llama"), _model("llama", seed=4), tiny_tokenizer()
    config_before = gen.generation_config.to_dict()
    fusion = CalibrationFusion(gen, cal, _alignment(gen, cal), alpha=0.5)
    editkit.generate(gen, tok, TEXTS, max_new_tokens=4, batch_size=2, detoxifier=fusion)
    assert fusion._follow is None and _no_hooks(gen) and _no_hooks(cal)
    calls = {"n": 0}
    real = cal.forward

    @functools.wraps(real)
    def forward(*args, **kwargs):  # fails at its third one-token forward: in the middle of decoding
        calls["n"] += kwargs["input_ids"].shape[1] == 1
        if calls["n"] == 3:
            raise RuntimeError("calibration failure")
        return real(*args, **kwargs)

    for generic in (False, True):  # the loop, then model.generate with the processor
        calls["n"] = 0
        with monkeypatch.context() as patch:
            patch.setattr(cal, "forward", forward)
            if generic:
                patch.setattr(gen.config, "model_type", "my_llama")
            with pytest.raises(RuntimeError, match="calibration failure"):
                editkit.generate(gen, tok, TEXTS, max_new_tokens=5, batch_size=5, detoxifier=fusion)
        assert fusion._follow is None
        assert _no_hooks(gen) and _no_hooks(cal)
    assert gen.generation_config.to_dict() == config_before
    assert len(editkit.generate(gen, tok, TEXTS, max_new_tokens=3, detoxifier=fusion)) == len(TEXTS)
    with pytest.raises(ValueError, match="another generator"):
        editkit.generate(_model("llama", seed=1), tok, TEXTS[:1], max_new_tokens=2, detoxifier=fusion)


# --------------------------------------------------------------------------- options and training


def test_from_options(tmp_path) -> None:
    gen, cal, tok = _model("llama"), _model("gpt2", seed=4, hidden_size=48), tiny_tokenizer()
    cal.save_pretrained(tmp_path / "cal")
    tok.save_pretrained(tmp_path / "cal")
    _alignment(gen, cal).save(tmp_path / "align")
    fusion = CalibrationFusion.from_options(gen, tok, calibration=str(tmp_path / "cal"),
                                            alignment=str(tmp_path / "align"), alpha="0.25", norm="layer")
    assert fusion.alpha == 0.25 and fusion.norm == "layer" and fusion.label == "calibration"
    settings = fusion.settings()
    assert settings["kind"] == "calibration" and settings["calibration_type"] == "gpt2"
    assert len(editkit.generate(gen, tok, TEXTS[:2], max_new_tokens=3, detoxifier=fusion)) == 2
    for bad in ({"calibration": str(tmp_path / "cal")}, {"alignment": str(tmp_path / "align")},
                {"calibration": "x", "alignment": "y", "beta": "1"}):
        with pytest.raises(ValueError, match="calibration=PATH"):
            CalibrationFusion.from_options(gen, tok, **bad)
    with pytest.raises(AlignmentError, match="vocabulary"):
        CalibrationFusion.from_options(gen, _tokenizer_reversed(), calibration=str(tmp_path / "cal"),
                                       alignment=str(tmp_path / "align"))


def test_train_calibration_model_leaves_the_model_as_it_came() -> None:
    model, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter stays frozen in the copy
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["The weather is nice today.", "Thank you for your help!", "I like reading books."] * 3
    run = train_calibration_model(model, tok, texts, steps=12, lr=3e-3, batch_size=4, max_length=32, seed=0)
    assert sum(run.losses[-3:]) < sum(run.losses[:3]) and len(run.losses) == 12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    assert run.model is not model and not run.model.training
    assert [p.requires_grad for p in run.model.parameters()] == flags
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    with pytest.raises(ValueError, match="texts"):
        train_calibration_model(model, tok, ["", "  "])


def test_non_toxic_texts_are_the_safe_and_neutral_ones(shared_data) -> None:
    texts = non_toxic_texts(shared_data)
    from editkit.probes.probe import load_probe_texts

    items = load_probe_texts(shared_data)
    toxic = {i.text for i in items if i.label == 1}
    assert texts and len(texts) == len(set(texts)) and not (set(texts) & toxic)
    assert {i.text for i in items if i.label == 0} == set(texts)
