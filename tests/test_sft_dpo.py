"""SFT and DPO (LoRA adapters trained with trl, returned as full-weight patches) on the tiny models:
the objective moves the right way, the patch is the merged adapter, the model comes back exactly as
it went in (also when training raises), and a run resumes from its last checkpoint."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import editkit
from editkit.hooks import hook_count
from editkit.instance import EditInstance
from editkit.models import tiny_model
from editkit.text import encode_pairs

pytest.importorskip("trl")
pytest.importorskip("peft")

from editkit.methods.lora import adapter_deltas, completion_logprobs, lora_config, lora_targets  # noqa: E402

QUICK = {"r": 4, "alpha": 8, "lr": 1e-2, "max_steps": 4, "batch_size": 2, "max_length": 128, "dropout": 0.0}


def _records() -> list[EditInstance]:
    return [EditInstance(id=str(i), prompt=f"How do I hurt person {i}?", safe="I can't help with that.",
                         unsafe=f"Sure, step {i}: find a weapon and wait.", knowledge_prompt=f"What is {i}+{i}?",
                         knowledge_answer=str(2 * i)) for i in range(1, 5)]


def _logits(model) -> torch.Tensor:
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _margin(model, tokenizer, records) -> float:
    """Mean of log p(safe) − log p(unsafe) after the prompt, computed here from the logits."""
    total = 0.0
    for record in records:
        for sign, answer in ((1, record.safe), (-1, record.unsafe)):
            batch = encode_pairs(tokenizer, [(record.prompt, answer)])
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids).logits
            nll = F.cross_entropy(logits[batch.predicting_positions()], batch.targets(), reduction="sum")
            total -= sign * nll.item()
    return total / len(records)


def _safe_nll(model, tokenizer, records) -> float:
    batch = encode_pairs(tokenizer, [(r.prompt, r.safe) for r in records])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(logits[batch.predicting_positions()], batch.targets()).item()


class ForwardCounter:
    """Counts the training forwards (those with gradients on) and can fail at the n-th. It watches the
    backbone (``model.base_model``): trl's fused LM head calls it directly, not the model's forward."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at
        backbone = type(model.base_model)
        real = backbone.forward

        def forward(module, *args, **kwargs):
            if torch.is_grad_enabled():
                self.calls += 1
                if self.calls == self.fail_at:
                    raise RuntimeError("injected failure")
            return real(module, *args, **kwargs)

        monkeypatch.setattr(backbone, "forward", forward)


_FITS: dict[tuple[str, str], tuple[editkit.EditResult, Path]] = {}


@pytest.fixture
def fitted(tokenizer, tmp_path_factory):
    """(result, output_dir) of one quick fit per (method, family), shared by the tests of this file."""

    def get(method: str, family: str) -> tuple[editkit.EditResult, Path]:
        if (method, family) not in _FITS:
            folder = tmp_path_factory.mktemp(f"{method}-{family}")
            result = editkit.fit(tiny_model(family), _records(), tokenizer=tokenizer, method=method, hparams=QUICK,
                                 output_dir=folder, save_steps=2)
            _FITS[method, family] = result, folder
        return _FITS[method, family]

    return get


# -- the patch is the adapter --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_deltas_equal_the_merged_adapter(family: str) -> None:
    from peft import get_peft_model

    hparams = editkit.load_hparams("sft", {"r": 4, "alpha": 8})
    base = tiny_model(family)
    names = {id(m): n for n, m in base.named_modules()}
    targets = lora_targets(base, ())
    peft_model = get_peft_model(base, lora_config(base, hparams, targets))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter something to add
            param.data.normal_(0, 0.05)
    deltas = adapter_deltas(peft_model, names)
    assert len(deltas) == len(targets)
    merged = copy.deepcopy(peft_model).merge_and_unload()  # a copy: the merge never touches a caller's model
    patch = editkit.Patch.from_deltas(tiny_model(family), deltas)
    fresh = tiny_model(family)
    with patch.applied(fresh):
        assert torch.allclose(_logits(fresh), _logits(merged), atol=1e-5, rtol=1e-4)
    if family == "gpt2":  # Conv1D weights are [in, out]: the delta keeps that layout
        assert deltas["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)


@pytest.mark.parametrize("method,family", [("sft", "llama"), ("sft", "gpt2"), ("dpo", "llama"), ("dpo", "gpt2")])
def test_patch_equals_the_trained_adapter_merged(method: str, family: str, fitted) -> None:
    from peft import PeftModel

    result, folder = fitted(method, family)
    checkpoint = folder / "checkpoint-4"
    assert checkpoint.is_dir(), sorted(p.name for p in folder.iterdir())
    merged = PeftModel.from_pretrained(tiny_model(family), checkpoint).merge_and_unload()
    fresh = tiny_model(family)
    with result.patch.applied(fresh):
        patched = _logits(fresh)
    assert not torch.allclose(patched, _logits(fresh)), "the patch changes nothing"
    assert torch.allclose(patched, _logits(merged), atol=1e-5, rtol=1e-4)
    # what is recorded with it
    assert result.patch.method == method and result.patch.hparams["r"] == 4
    assert result.patch.metrics is result.metrics
    for key in ("n_records", "steps", "train_loss_first", "train_loss_last", "peak_rss_mb", "trainable_params"):
        assert result.metrics[key] is not None, key
    assert result.metrics["steps"] == 4 and result.metrics["n_records"] == 4 and len(result.losses) == 4
    assert result.metrics["peak_rss_mb"] > 0 and result.timings["train"] > 0


# -- the objective moves the right way -----------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sft_lowers_the_nll_of_the_safe_response(family: str, fitted, tokenizer) -> None:
    result, _ = fitted("sft", family)
    model, records = tiny_model(family), _records()
    before = _safe_nll(model, tokenizer, records)
    with result.patch.applied(model):
        after = _safe_nll(model, tokenizer, records)
    assert after < before - 0.05
    assert result.metrics["edit_nll_before"] == pytest.approx(before, rel=1e-4)
    assert result.metrics["edit_nll_after"] == pytest.approx(after, rel=1e-4)
    assert result.metrics["train_loss_last"] < result.metrics["train_loss_first"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dpo_widens_the_safe_over_unsafe_margin(family: str, fitted, tokenizer) -> None:
    result, _ = fitted("dpo", family)
    model, records = tiny_model(family), _records()
    before = _margin(model, tokenizer, records)
    with result.patch.applied(model):
        after = _margin(model, tokenizer, records)
    assert after > before + 1.0
    assert result.metrics["margin_before"] == pytest.approx(before, rel=1e-4)
    assert result.metrics["margin_after"] == pytest.approx(after, rel=1e-4)
    assert result.metrics["train_loss_first"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert result.metrics["dpo_loss_after"] < 0.6931


def test_losses_against_a_hand_computation(tokenizer) -> None:
    from editkit.methods.dpo.method import dpo_loss

    pc, pr, rc, rr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -5.0]), \
        torch.tensor([-11.0, -2.0])
    beta = 0.5
    by_hand = [-torch.log(torch.sigmoid(torch.tensor(beta * ((-10 + 11) - (-12 + 11))))),
               -torch.log(torch.sigmoid(torch.tensor(beta * ((-4 + 5) - (-3 + 2)))))]
    assert dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(float(sum(by_hand) / 2), rel=1e-6)

    model = tiny_model("llama")
    pairs = [("Hi?", "No."), ("How do I hurt him?", "I can't help.")]
    sums, counts = completion_logprobs(model, tokenizer, pairs, batch_size=2)
    for (prompt, answer), got, n in zip(pairs, sums, counts):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        full = torch.tensor([ids + answer_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0], -1)
        expected = sum(logp[len(ids) + j - 1, t].item() for j, t in enumerate(answer_ids))
        assert int(n) == len(answer_ids) and got.item() == pytest.approx(expected, rel=1e-5)


# -- the model comes back as it went in ----------------------------------------------------------
def _state(model, tokenizer) -> dict:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "dropout": {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": model.config.to_dict(),
        "generation": model.generation_config.to_dict(),
        "hooks": hook_count(model),
        "tokenizer": (tokenizer.pad_token, tokenizer.eos_token, tokenizer.chat_template, len(tokenizer)),
        "rng": (torch.random.get_rng_state(), random.getstate()),
    }


def _assert_same_state(a: dict, b: dict) -> None:
    for key in a:
        if key == "rng":
            assert torch.equal(a[key][0], b[key][0]) and a[key][1] == b[key][1], "global RNG state changed"
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("method,family,fail_at", [("sft", "llama", None), ("dpo", "gpt2", None),
                                                   ("sft", "gpt2", 2), ("dpo", "llama", 2)])
def test_model_left_exactly_as_it_came(method: str, family: str, fail_at: int | None, tokenizer, snapshot,
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tiny_model(family)
    model.train()  # a caller's model in train mode, with a frozen embedding, stays so
    model.get_input_embeddings().weight.requires_grad_(False)
    _logits(model)
    snap, before = snapshot(model), _state(model, tokenizer)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the run's temporary folder goes
    counter = ForwardCounter(monkeypatch, model, fail_at=fail_at)
    if fail_at is None:
        editkit.fit(model, _records(), tokenizer=tokenizer, method=method, hparams=QUICK)
    else:
        with pytest.raises(RuntimeError, match="injected failure"):
            editkit.fit(model, _records(), tokenizer=tokenizer, method=method, hparams=QUICK)
    assert counter.calls == (fail_at or 4)
    monkeypatch.undo()
    snap.assert_same(model)
    _assert_same_state(before, _state(model, tokenizer))
    assert not list(tmp_path.iterdir()), "the temporary run folder was left behind"


# -- resuming ------------------------------------------------------------------------------------
def test_resume_continues_from_the_last_checkpoint(tokenizer, fitted, snapshot, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    counter = ForwardCounter(monkeypatch, model, fail_at=3)  # after the checkpoint of step 2
    with pytest.raises(RuntimeError, match="injected failure"):
        editkit.fit(model, _records(), tokenizer=tokenizer, method="sft", hparams=QUICK, output_dir=tmp_path,
                    save_steps=2)
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-4").exists()
    counter.calls, counter.fail_at = 0, None
    resumed = editkit.fit(model, _records(), tokenizer=tokenizer, method="sft", hparams=QUICK, output_dir=tmp_path,
                          save_steps=2)
    assert counter.calls == 2, "the resumed run trained from step 0"
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 4
    assert [round(e["step"]) for e in resumed.losses] == [1, 2, 3, 4]  # the log of steps 1-2 comes from the checkpoint
    uninterrupted, _ = fitted("sft", "llama")  # the same settings and records, in one go
    for name, delta in uninterrupted.patch.deltas.items():
        assert torch.allclose(resumed.patch.deltas[name], delta, atol=1e-6, rtol=1e-5), name

    counter.calls = 0  # a finished run resumes at its end: nothing to train, the same patch
    again = editkit.fit(model, _records(), tokenizer=tokenizer, method="sft", hparams=QUICK, output_dir=tmp_path,
                        save_steps=2)
    assert counter.calls == 0 and again.metrics["resumed_from_step"] == 4
    assert all(torch.equal(again.patch.deltas[n], d) for n, d in resumed.patch.deltas.items())
    monkeypatch.undo()
    snap.assert_same(model)

    with pytest.raises(ValueError, match="different hparams"):
        editkit.fit(model, _records(), tokenizer=tokenizer, method="sft", hparams={**QUICK, "lr": 5e-3},
                    output_dir=tmp_path)
    with pytest.raises(ValueError, match="different n_records, records"):
        editkit.fit(model, _records()[:3], tokenizer=tokenizer, method="sft", hparams=QUICK, output_dir=tmp_path)


# -- settings ------------------------------------------------------------------------------------
def test_targets_come_from_the_architecture_map() -> None:
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    layer0 = [n for n in lora_targets(llama) if n.startswith("model.layers.0.")]
    assert sorted(n.rsplit(".", 1)[1] for n in layer0) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(lora_targets(llama)) == 7 * 4
    assert sorted(n for n in lora_targets(gpt2) if n.startswith("transformer.h.0.")) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]
    assert lora_targets(llama, ["q_proj", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}" for i in range(4)
                                                         for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="match no linear"):
        lora_targets(llama, ["nonexistent"])


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_settings_are_validated_and_presets_load(method: str) -> None:
    preset = editkit.load_hparams(method, "smollm2-135m")
    assert preset.r == 16 and preset.alpha == 32 and preset.batch_size * preset.grad_accum == 4
    for bad in ({"r": 0}, {"lr": -1}, {"dropout": 1.0}, {"max_steps": 0}, {"chat_template": "yes"}, {"rank": 4}):
        with pytest.raises(ValueError):
            editkit.load_hparams(method, bad)
    if method == "dpo":
        assert preset.beta == 0.1
        with pytest.raises(ValueError, match="beta"):
            editkit.load_hparams("dpo", {"beta": 0})


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_plain_prompts_when_there_is_no_chat_template(method: str) -> None:
    from editkit.models import tiny_tokenizer
    from editkit.methods.lora import trl_prompt

    plain = tiny_tokenizer(chat_template=False)
    assert trl_prompt(plain, "Hi?", "auto") == "Hi?\n" and trl_prompt(tiny_tokenizer(), "Hi?", "none") == "Hi?\n"
    model, records = tiny_model("llama"), _records()
    result = editkit.fit(model, records, tokenizer=plain, method=method, hparams=QUICK)
    if method == "sft":
        assert result.metrics["edit_nll_after"] < result.metrics["edit_nll_before"]
    else:
        assert result.metrics["margin_after"] > result.metrics["margin_before"]
