"""Ext-Sub: the extraction-before-subtraction combination against a hand computation and its
invariants, the output-row layout of GPT-2's Conv1D, and fits on the tiny models (the patch is the
combination of the two trained adapters, the model comes back bit-identical, λ = 0 is SFT, a new λ
recombines finished runs without training)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import editkit
from editkit.instance import EditInstance
from editkit.methods.extsub.combine import EPS, common_part, extract_subtract, unit_rows
from editkit.models import tiny_model

QUICK = {"r": 4, "alpha": 8, "lr": 1e-2, "max_steps": 4, "batch_size": 2, "max_length": 128, "dropout": 0.0}


def _records() -> list[EditInstance]:
    return [EditInstance(id=str(i), prompt=f"How do I hurt person {i}?", safe="I can't help with that.",
                         unsafe=f"Sure, step {i}: find a weapon and wait.", knowledge_prompt=f"What is {i}+{i}?",
                         knowledge_answer=str(2 * i)) for i in range(1, 5)]


# -- the combination -----------------------------------------------------------------------------
EXPERT = torch.tensor([[1.0, 0.0, 0.0],
                       [0.0, 3.0, 4.0]])
ANTI = torch.tensor([[0.0, 2.0, 0.0],
                     [0.0, 0.0, -2.0]])
# λ = 0.5, by hand, row by row (a = ΔW⁺ᵢ, b = ΔW⁻ᵢ):
# row 0: a = (1,0,0), b = (0,2,0)
#   norm(a) = (1,0,0), norm(b) = (0,1,0); sum (1,1,0), ‖sum‖ = √2 -> u = (1,1,0)/√2
#   b·u = 2/√2 = √2 -> common = √2 · (1,1,0)/√2 = (1,1,0)
#   b − common = (−1,1,0) -> a − 0.5·(−1,1,0) = (1.5, −0.5, 0)
# row 1: a = (0,3,4), ‖a‖ = 5, b = (0,0,−2), ‖b‖ = 2
#   norm(a) = (0,0.6,0.8), norm(b) = (0,0,−1); sum s = (0,0.6,−0.2), ‖s‖² = 0.36 + 0.04 = 0.4
#   b·s = 0.4 -> common = (b·s/‖s‖²) s = s = (0,0.6,−0.2)
#   b − common = (0,−0.6,−1.8) -> a − 0.5·(0,−0.6,−1.8) = (0, 3.3, 4.9)
HAND_COMMON = torch.tensor([[1.0, 1.0, 0.0],
                            [0.0, 0.6, -0.2]])
HAND_RESULT = torch.tensor([[1.5, -0.5, 0.0],
                            [0.0, 3.3, 4.9]])


def test_combination_equals_the_hand_computation() -> None:
    assert torch.allclose(common_part(EXPERT, ANTI), HAND_COMMON, atol=1e-6)
    assert torch.allclose(extract_subtract(EXPERT, ANTI, 0.5), HAND_RESULT, atol=1e-6)
    # the same weight stored [in, out] (GPT-2's Conv1D): rows are columns, the result keeps that layout
    assert torch.allclose(extract_subtract(EXPERT.T, ANTI.T, 0.5, out_dim=1), HAND_RESULT.T, atol=1e-6)
    assert torch.allclose(extract_subtract(EXPERT.T, ANTI.T, 0.5, out_dim=-1), HAND_RESULT.T, atol=1e-6)
    # λ = 1: row 0 -> (1,0,0) − (−1,1,0) = (2,−1,0)
    assert torch.allclose(extract_subtract(EXPERT, ANTI, 1.0)[0], torch.tensor([2.0, -1.0, 0.0]), atol=1e-6)


def test_invariants_of_the_combination() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    lam = 0.7
    # λ = 0 is the expert, exactly
    assert torch.equal(extract_subtract(a, b, 0.0), a)
    out = extract_subtract(a, b, lam)
    # linear in λ: ΔW⁺ − λ·(ΔW⁻ − common)
    assert torch.allclose(out, a - lam * (b - common_part(a, b)), atol=1e-6)
    # the subtraction leaves each row's component along u unchanged: (out − a)·u = 0
    u = unit_rows(unit_rows(a) + unit_rows(b))
    assert torch.allclose(((out - a) * u).sum(-1), torch.zeros(6), atol=1e-5)
    # closed form for non-zero rows: common = ‖b‖/2 · (norm(a) + norm(b)); so ‖common‖ = ‖b‖·cos(θ/2)
    closed = b.norm(dim=-1, keepdim=True) / 2 * (unit_rows(a) + unit_rows(b))
    assert torch.allclose(common_part(a, b), closed, atol=1e-5)
    # homogeneous of degree 1: the LoRA scaling alpha/r may be merged before or after combining
    assert torch.allclose(extract_subtract(2.5 * a, 2.5 * b, lam), 2.5 * out, atol=1e-5)

    # special rows, λ = 2
    rows_a = torch.stack([a[0], a[1], a[2], torch.zeros(9), a[4], torch.zeros(9)])
    rows_b = torch.stack([a[0],          # ΔW⁻ᵢ = ΔW⁺ᵢ: u = norm(a), common = b = a -> the row is a
                          3.0 * a[1],    # same direction: still all common -> the row is a
                          -2.0 * a[2],   # antiparallel: norm(a) + norm(b) = 0, nothing common -> a − λb = 5·a
                          b[3],          # zero expert row: u = norm(b), common = b -> stays 0
                          torch.zeros(9),  # zero anti-expert row: nothing to subtract -> a
                          torch.zeros(9)])  # both zero: zero, not NaN
    got = extract_subtract(rows_a, rows_b, 2.0)
    assert torch.isfinite(got).all()
    for i in (0, 1, 4):
        assert torch.allclose(got[i], rows_a[i], atol=1e-5), i
    assert torch.allclose(got[2], 5.0 * a[2], atol=1e-5)
    assert torch.allclose(got[3], torch.zeros(9), atol=1e-5)
    assert torch.equal(got[5], torch.zeros(9))
    assert torch.equal(unit_rows(torch.full((1, 3), EPS / 10)), torch.zeros(1, 3))  # below EPS: no direction


def test_combination_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        extract_subtract(EXPERT, ANTI.T, 1.0)
    with pytest.raises(ValueError, match="2\\+ dims"):
        extract_subtract(EXPERT[0], ANTI[0], 1.0)
    with pytest.raises(ValueError, match="out_dim"):
        extract_subtract(EXPERT, ANTI, 1.0, out_dim=2)
    with pytest.raises(ValueError, match="finite"):
        extract_subtract(EXPERT, ANTI, float("nan"))
    with pytest.raises(ValueError, match="lam"):
        editkit.load_hparams("extsub", {"lam": -1})
    for preset in ("smollm2-135m", "llama-2-7b-chat", "mistral-7b"):
        settings = editkit.load_hparams("extsub", preset)
        assert (settings.r, settings.alpha, settings.lam) == (16, 32, 1.0)
    assert editkit.load_hparams("extsub").lam == 1.0


def test_output_rows_come_from_the_module_type() -> None:
    """GPT-2's Conv1D stores [in, out]: the method combines its columns, even for a square weight whose
    shape cannot tell (attn.c_proj is 32 x 32), and the result is the transposed llama computation."""
    from editkit.methods.extsub.method import combine, output_axis

    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    square = "transformer.h.0.attn.c_proj.weight"
    assert output_axis(gpt2, square) == 1 and output_axis(gpt2, "transformer.h.0.mlp.c_fc.weight") == 1
    assert output_axis(llama, "model.layers.0.self_attn.o_proj.weight") == 0
    with pytest.raises(ValueError, match="Embedding"):
        output_axis(llama, "model.embed_tokens.weight")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    expert, anti = {square: a.clone()}, {square: b.clone()}
    deltas, _ = combine(gpt2, expert, anti, 0.8)
    assert not expert and not anti  # consumed as it goes
    assert torch.allclose(deltas[square], extract_subtract(a.T, b.T, 0.8).T, atol=1e-6)
    assert not torch.allclose(deltas[square], extract_subtract(a, b, 0.8), atol=1e-3)


# -- fitting -------------------------------------------------------------------------------------
def _adapter_deltas(family: str, checkpoint: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    from editkit.methods.lora import adapter_deltas

    base = tiny_model(family)
    names = {id(m): n for n, m in base.named_modules()}
    return adapter_deltas(PeftModel.from_pretrained(base, checkpoint), names)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fit_patch_is_the_combination_of_the_trained_adapters(family: str, tokenizer, snapshot,
                                                               tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from transformers.pytorch_utils import Conv1D

    from editkit.methods.lora import lora_targets

    model = tiny_model(family)
    snap = snapshot(model)
    result = editkit.fit(model, _records(), tokenizer=tokenizer, method="extsub", hparams={**QUICK, "lam": 1.0},
                         output_dir=tmp_path, save_steps=2)
    snap.assert_same(model)
    assert set(result.patch.deltas) == {f"{t}.weight" for t in lora_targets(model)}

    expert = _adapter_deltas(family, tmp_path / "expert" / "checkpoint-4")
    anti = _adapter_deltas(family, tmp_path / "anti" / "checkpoint-4")
    modules = dict(model.named_modules())
    for name, delta in result.patch.deltas.items():
        axis = 1 if isinstance(modules[name.rpartition(".")[0]], Conv1D) else 0
        assert torch.allclose(delta, extract_subtract(expert[name], anti[name], 1.0, out_dim=axis),
                              atol=1e-6, rtol=1e-5), name

    m = result.metrics
    assert m["lam"] == 1.0 and m["n_records"] == 4 and m["expert_steps"] == m["anti_steps"] == 4
    assert m["expert_train_loss_last"] < m["expert_train_loss_first"]
    assert m["anti_train_loss_last"] < m["anti_train_loss_first"]
    assert m["edit_nll_after"] < m["edit_nll_before"] and m["edit_nll_after"] == m["safe_nll_after"]
    assert m["margin_after"] > m["margin_before"]
    assert m["peak_rss_mb"] > 0 and result.timings["train_expert"] > 0 and result.timings["train_anti"] > 0
    assert [e["step"] for e in result.losses] == [1, 2, 3, 4] and "anti_loss" in result.losses[0]
    assert result.patch.metrics is result.metrics and result.patch.method == "extsub"

    if family == "llama":  # a new λ recombines the finished runs: nothing is trained again
        zero = editkit.fit(model, _records(), tokenizer=tokenizer, method="extsub", hparams={**QUICK, "lam": 0.0},
                           output_dir=tmp_path, save_steps=2)
        assert zero.metrics["expert_resumed_from_step"] == 4 and zero.metrics["anti_resumed_from_step"] == 4
        for name, delta in zero.patch.deltas.items():
            assert torch.equal(delta, expert[name]), name  # λ = 0: the expert alone
        # subtracting the anti-expert's own part widens the safe-over-unsafe margin beyond the expert's
        assert m["margin_after"] > zero.metrics["margin_after"]
        assert m["unsafe_nll_after"] > zero.metrics["unsafe_nll_after"]
        # and the expert is exactly what SFT trains with the same settings
        sft = editkit.fit(model, _records(), tokenizer=tokenizer, method="sft", hparams=QUICK)
        for name, delta in sft.patch.deltas.items():
            assert torch.allclose(zero.patch.deltas[name], delta, atol=1e-7), name
        snap.assert_same(model)


def test_fit_on_one_record_is_the_per_instance_use(tokenizer, snapshot) -> None:
    pytest.importorskip("trl")
    model = tiny_model("llama")
    snap = snapshot(model)
    record = _records()[0]
    result = editkit.fit(model, [record], tokenizer=tokenizer, method="extsub", hparams={**QUICK, "max_steps": 2})
    snap.assert_same(model)
    assert result.metrics["n_records"] == 1 and result.metrics["expert_steps"] == 2
    with result.patch.applied(model):
        assert not torch.equal(model(input_ids=torch.arange(5, 20)[None]).logits,
                               tiny_model("llama")(input_ids=torch.arange(5, 20)[None]).logits)
    snap.assert_same(model)
