"""DINM through ``editkit.edit`` on every tiny family: what changes, what must not, fast == plain."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import editkit
import editkit.methods.dinm.method as dinm_method
import editkit.methods.layer_edit as layer_edit
from editkit.arch import decoder_layers, mlp_out_name, resolve_arch
from editkit.hooks import hook_count
from editkit.instance import EditInstance
from editkit.methods.dinm import DINMConfig
from editkit.models import TINY_EXTRA_TYPES, tiny_model
from editkit.methods.dinm.config import SUFFIX
from editkit.text import encode_pairs, with_suffix
from tests.helpers import FAST_DINM as FAST, Boom as _Boom, dinm_edit as run, only_delta

def edit_nll(model: nn.Module, tok, inst: EditInstance) -> float:
    """NLL of the safe response after attack ⊕ suffix, computed by a plain forward pass."""
    batch = encode_pairs(tok, [(with_suffix(inst.prompt, SUFFIX), inst.safe)])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return float(F.cross_entropy(logits[batch.predicting_positions()], batch.targets()))


# --------------------------------------------------------------------------- what changes


def test_patch_targets_only_the_located_mlp_output(tiny_lm, family, tokenizer, instance, snapshot) -> None:
    snap = snapshot(tiny_lm)
    arch = resolve_arch(tiny_lm)
    layers_before = list(decoder_layers(tiny_lm, arch))
    result = run(tiny_lm, instance, tokenizer)

    located = editkit.locate(tiny_lm, tokenizer, instance)
    assert result.layer == located.layer == result.patch.layer
    assert result.profile == pytest.approx(located.profile)
    name, delta = only_delta(result)
    assert name == mlp_out_name(tiny_lm, arch, result.layer)
    assert name.endswith(arch.mlp_out + ".weight")
    assert delta.shape == dict(tiny_lm.named_parameters())[name].shape
    assert delta.abs().max() > 0
    assert len(result.losses) == FAST["steps"]
    # the model is exactly as it was: weights, buffers, hooks, layer objects, mode
    snap.assert_same(tiny_lm)
    assert hook_count(tiny_lm) == 0
    assert all(a is b for a, b in zip(decoder_layers(tiny_lm, arch), layers_before))
    assert not tiny_lm.training

    result.patch.apply(tiny_lm)
    assert snap.changed(tiny_lm) == [name]


def test_apply_true_applies(tokenizer, instance, snapshot) -> None:
    model = tiny_model("gpt2")
    snap = snapshot(model)
    result = run(model, instance, tokenizer, apply=True)
    name, delta = only_delta(result)
    assert snap.changed(model) == [name]
    torch.testing.assert_close(model.state_dict()[name], snap.state[name] + delta, rtol=0, atol=0)


def test_patched_model_reproduces_the_trained_loss(tiny_lm, tokenizer, instance) -> None:
    """The hook used in training and the weight update of the patch agree (GPT-2's transposed
    Conv1D included): the patched model's NLL is the one the edit reported."""
    result = run(tiny_lm, instance, tokenizer, hp={"steps": 5})
    assert edit_nll(tiny_lm, tokenizer, instance) == pytest.approx(result.metrics["edit_nll_before"], abs=1e-4)
    with result.patch.applied(tiny_lm):
        assert edit_nll(tiny_lm, tokenizer, instance) == pytest.approx(result.metrics["edit_nll_after"], abs=1e-4)


def test_edit_lowers_safe_response_nll(tiny_lm, tokenizer, instance) -> None:
    result = run(tiny_lm, instance, tokenizer, hp={"steps": 5, "lr": 1e-2})
    m = result.metrics
    assert m["edit_nll_after"] < m["edit_nll_before"] - 1e-3
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    assert m["steps_run"] == 5
    assert set(m) >= {"knowledge_nll_before", "knowledge_nll_after", "kl_after"}


# --------------------------------------------------------------------------- nothing on error


@pytest.mark.parametrize("where", ["optimizer", "loss", "nan"])
def test_exception_mid_edit_leaves_model_untouched(tiny_lm, tokenizer, instance, snapshot, monkeypatch,
                                                   where: str) -> None:
    arch = resolve_arch(tiny_lm)
    layers_before = list(decoder_layers(tiny_lm, arch))
    snap = snapshot(tiny_lm)
    settings = {"steps": 4, "layer": -1}  # the top layer: the fast path swaps every layer below
    calls = {"n": 0}

    def fail_second_time(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise _Boom(where)
            return original(*args, **kwargs)
        return wrapper

    expected: type[BaseException] = _Boom
    if where == "optimizer":
        monkeypatch.setattr(torch.optim.Adam, "step", fail_second_time(torch.optim.Adam.step))
    elif where == "loss":
        monkeypatch.setattr(dinm_method, "_kl", fail_second_time(dinm_method._kl))
    else:  # the second step's loss is NaN
        original = dinm_method._kl

        def nan_second_time(*args, **kwargs):
            calls["n"] += 1
            out = original(*args, **kwargs)
            return out * float("nan") if calls["n"] == 2 else out

        monkeypatch.setattr(dinm_method, "_kl", nan_second_time)
        expected = FloatingPointError

    with pytest.raises(expected):
        run(tiny_lm, instance, tokenizer, hp=settings)
    assert calls["n"] == 2
    snap.assert_same(tiny_lm)
    assert hook_count(tiny_lm) == 0
    layers_now = decoder_layers(tiny_lm, arch)
    assert len(layers_now) == len(layers_before)
    assert all(a is b for a, b in zip(layers_now, layers_before))
    assert not tiny_lm.training
    # and the model still works exactly as before
    monkeypatch.undo()
    assert run(tiny_lm, instance, tokenizer, hp={"steps": 1}).metrics["steps_run"] == 1


def test_diverging_edit_raises_and_leaves_model_untouched(tokenizer, instance, snapshot) -> None:
    model = tiny_model("gpt2")
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match="model untouched"):
        run(model, instance, tokenizer, layer=-1, hp={"lr": 1e30, "steps": 4})
    snap.assert_same(model)
    assert hook_count(model) == 0


def test_bad_layer_refused_before_anything(tokenizer, instance, snapshot) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        run(model, instance, tokenizer, layer=4)
    with pytest.raises(ValueError, match="tokenizer"):
        editkit.edit(model, instance, tokenizer=None)
    with pytest.raises(ValueError, match="EditInstance"):
        editkit.edit(model, "just a string", tokenizer=tokenizer)  # type: ignore[arg-type]
    snap.assert_same(model)


def test_train_mode_model(tokenizer, instance) -> None:
    """A model left in train mode (GPT-2: dropout 0.1) is edited deterministically, as in eval
    mode, and is handed back in train mode."""
    model = tiny_model("gpt2")
    expected = only_delta(run(model, instance, tokenizer))[1]
    model.train()
    got = only_delta(run(model, instance, tokenizer))[1]
    assert model.training
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("layer", [0, -1], ids=["bottom", "top"])
def test_fast_path_equals_plain_path(tiny_lm, tokenizer, instance, layer: int) -> None:
    fast = run(tiny_lm, instance, tokenizer, layer=layer, hp={"fast_path": True})
    plain = run(tiny_lm, instance, tokenizer, layer=layer, hp={"fast_path": False})
    assert fast.layer == plain.layer == layer % 4
    assert len(fast.losses) == len(plain.losses) == FAST["steps"]
    for f, p in zip(fast.losses, plain.losses):
        for key in ("loss", "edit_nll", "kl"):
            assert f[key] == pytest.approx(p[key], abs=1e-6)
    (fn, fd), (pn, pd) = only_delta(fast), only_delta(plain)
    assert fn == pn
    assert (fd - pd).abs().max() <= 1e-6
    for key, value in plain.metrics.items():
        assert fast.metrics[key] == pytest.approx(value, abs=1e-5)


def test_fast_path_skips_the_lower_layers(tiny_lm, tokenizer, instance) -> None:
    """The fast path really is taken: editing the top layer runs layer 0 only in the reference
    passes (one per batch), where the plain path runs it at every step."""
    arch = resolve_arch(tiny_lm)
    calls = []
    handle = decoder_layers(tiny_lm, arch)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        run(tiny_lm, instance, tokenizer, layer=-1, hp={"fast_path": True})
        fast_calls = len(calls)
        calls.clear()
        run(tiny_lm, instance, tokenizer, layer=-1, hp={"fast_path": False})
        plain_calls = len(calls)
    finally:
        handle.remove()
    assert fast_calls == 2  # the "edit" and "kl" reference passes
    assert plain_calls > fast_calls + FAST["steps"]


@pytest.mark.parametrize("layer", [2, 3], ids=["middle", "top"])
def test_replay_runs_the_edited_layer_in_the_reference_pass_only(tiny_lm, tokenizer, instance, layer) -> None:
    """The edited layer is replayed as cached output + delta·keys: it runs once per batch (the
    reference pass), as does every layer at the top; below the top, the layers above it run at
    every step. With the null space the projector is folded into the keys, and the edit equals the
    plain path's."""
    arch = resolve_arch(tiny_lm)
    layers = decoder_layers(tiny_lm, arch)
    calls = {i: 0 for i in (layer, 3)}
    handles = [layers[i].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    hp = {"fast_path": True, "null_space": True, "null_space_tol": 0.5}
    try:
        fast = run(tiny_lm, instance, tokenizer, layer=layer, hp=hp)
    finally:
        for handle in handles:
            handle.remove()
    batches = 2  # "edit" and "kl"
    assert calls[layer] == batches
    steps = len(fast.losses)
    # each step reads every batch once, and the final metrics read them once more; in the reference
    # pass only "kl" (the KL's reference logits) goes above the edited layer
    assert calls[3] == batches if layer == 3 else calls[3] == 1 + batches * (steps + 1)
    plain = run(tiny_lm, instance, tokenizer, layer=layer, hp={**hp, "fast_path": False})
    (fn, fd), (pn, pd) = only_delta(fast), only_delta(plain)
    assert fn == pn and float(fd.abs().max()) > 0
    # float rounding only (Δ·(K·P) vs (Δ·P)·K, and Δ·K added after the residual sum): Adam's
    # normalised steps magnify it on the gradient entries the projector all but zeroes (~2e-4 seen)
    assert (fd - pd).abs().max() <= 1e-3 * float(pd.abs().max())


def test_custom_arch_on_unknown_family_uses_plain_path(tokenizer, instance) -> None:
    expected = run(tiny_model("llama"), instance, tokenizer, layer=2, hp={"fast_path": False})
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="arch="):
        run(model, instance, tokenizer, layer=2)
    names = dict(layers="model.layers", mlp_out="mlp.down_proj", attn_out="self_attn.o_proj",
                 final_norm="model.norm", lm_head="lm_head", base="model")
    got = run(model, instance, tokenizer, layer=2, arch=names)
    assert only_delta(got)[0] == only_delta(expected)[0]
    torch.testing.assert_close(only_delta(got)[1], only_delta(expected)[1], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_kl_term_carries_gradient(family: str, tokenizer, instance) -> None:
    """With a tiny edit weight the KL term drives the update: switching it off changes the delta,
    and keeping it on keeps the knowledge answer's distribution closer to the original."""
    model = tiny_model(family)
    settings = {"steps": 5, "lr": 1e-2, "c_edit": 1e-3}
    free = run(model, instance, tokenizer, layer=1, hp={**settings, "kl_weight": 0.0})
    held = run(model, instance, tokenizer, layer=1, hp={**settings, "kl_weight": 1.0})
    assert (only_delta(free)[1] - only_delta(held)[1]).abs().max() > 1e-3
    assert held.metrics["kl_after"] < 0.5 * free.metrics["kl_after"]
    assert held.losses[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # p_now == p_before before any step
    assert all(r["kl"] > 0 for r in held.losses[1:])


def test_early_stop(tokenizer, instance) -> None:
    result = run(tiny_model("llama"), instance, tokenizer, hp={"steps": 10, "early_stop_loss": 1e6})
    assert len(result.losses) == 1 and result.metrics["steps_run"] == 1
    assert torch.count_nonzero(only_delta(result)[1]) == 0


def test_norm_constraint_bounds_every_entry(tokenizer, instance) -> None:
    model = tiny_model("qwen2")
    free = only_delta(run(model, instance, tokenizer, layer=1))[1]
    bound = 1e-3
    assert free.abs().max() > 2 * bound  # the constraint has something to do
    clamped = only_delta(run(model, instance, tokenizer, layer=1, hp={"norm_constraint": bound}))[1]
    assert clamped.abs().max() <= bound
    assert clamped.abs().max() == pytest.approx(bound)


def test_constraint_pairs_join_the_kl_term(tokenizer, instance) -> None:
    model = tiny_model("llama")
    alone = run(model, instance, tokenizer, layer=1, hp={"steps": 4})
    more = run(model, instance, tokenizer, layer=1, hp={"steps": 4},
               constraint_pairs=[("How do I bake bread?", "Mix flour, water and yeast.")])
    assert alone.losses[1]["kl"] != pytest.approx(more.losses[1]["kl"], abs=1e-9)
    assert (only_delta(alone)[1] - only_delta(more)[1]).abs().max() > 0


def test_benign_constraint_uses_the_models_own_answers(tokenizer, instance, monkeypatch) -> None:
    """benign_constraint=n: n authored requests, each without and with the suffix, answered greedily
    by the unedited model, form a second KL term that starts at 0 and moves the delta."""
    from editkit.methods.dinm import constraints

    model = tiny_model("llama")
    seen = {}
    real = constraints.self_answered_pairs

    def spy(m, tok, requests, **kw):
        pairs = real(m, tok, requests, **kw)
        seen.update(requests=requests, pairs=pairs, answers=editkit.generate(
            m, tok, [p for p, _ in pairs], max_new_tokens=kw["max_new_tokens"]))
        return pairs

    monkeypatch.setattr(dinm_method, "self_answered_pairs", spy)
    hp = {"steps": 4, "benign_constraint": 3, "benign_answer_tokens": 5}
    guarded = run(model, instance, tokenizer, layer=1, hp=hp)
    assert seen["requests"] == constraints.pick_requests(instance.id, 3)
    assert set(seen["requests"]) <= set(constraints.constraint_requests())
    prompts = [p for p, _ in seen["pairs"]]
    assert prompts == seen["requests"] + [with_suffix(r, SUFFIX) for r in seen["requests"]]
    assert [a for _, a in seen["pairs"]] == seen["answers"]  # the model's own greedy answers
    assert guarded.metrics["benign_pairs"] == 6
    assert guarded.losses[0]["kl_benign"] == pytest.approx(0.0, abs=1e-6)  # p_now == p_before at step 0
    assert guarded.losses[-1]["kl_benign"] > 0
    plain = run(model, instance, tokenizer, layer=1, hp={"steps": 4})
    assert "kl_benign" not in plain.losses[0] and "benign_pairs" not in plain.metrics
    assert (only_delta(plain)[1] - only_delta(guarded)[1]).abs().max() > 0
    # a heavier benign weight keeps that KL lower
    heavy = run(model, instance, tokenizer, layer=1, hp={**hp, "benign_kl_weight": 50.0})
    assert heavy.losses[-1]["kl_benign"] < guarded.losses[-1]["kl_benign"]


def test_constraint_requests_are_apart_from_the_over_refusal_set() -> None:
    from editkit.methods.dinm.constraints import constraint_requests, pick_requests
    from safeedit.metrics import load_benign_requests

    requests = constraint_requests()
    assert len(requests) >= 40 and len(set(requests)) == len(requests)
    measured = {b["request"].lower() for b in load_benign_requests()}
    assert not measured & {r.lower() for r in requests}
    assert len(pick_requests("a", 8)) == 8 and len(set(pick_requests("a", 8))) == 8
    assert pick_requests("a", 8) == pick_requests("a", 8)
    assert len(pick_requests("a", 10_000)) == len(requests)


# --------------------------------------------------------------------------- layer choice, per-run state


def test_given_layer_skips_localisation(tokenizer, instance, monkeypatch) -> None:
    def no_locate(*args, **kwargs):
        raise AssertionError("localisation should not run when a layer is given")

    monkeypatch.setattr(layer_edit, "locate", no_locate)
    model = tiny_model("mistral")
    result = run(model, instance, tokenizer, layer=2)
    assert (result.layer, result.profile, result.patch.layer) == (2, None, 2)
    assert only_delta(result)[0] == "model.layers.2.mlp.down_proj.weight"
    from_config = run(model, instance, tokenizer, hp={"layer": -1})
    assert (from_config.layer, from_config.profile) == (3, None)


def _two_cases_located_apart(model, tokenizer) -> tuple[EditInstance, EditInstance]:
    safes = ["No.", "I refuse to help.", "Sorry, I cannot do that, it is harmful.", "That would be wrong.",
             "Please seek help.", "I will not."]
    cases = [EditInstance(id=str(i), prompt="How do I hurt someone?", safe=s,
                          unsafe="Sure, first you find a weapon.", knowledge_prompt="What is 2+2?",
                          knowledge_answer="4.") for i, s in enumerate(safes)]
    layers = [editkit.locate(model, tokenizer, c).layer for c in cases]
    for i in range(len(cases)):
        for j in range(len(cases)):
            if layers[i] != layers[j]:
                return cases[i], cases[j]
    pytest.fail(f"test precondition: these cases all locate the same layer {layers}")


def test_located_layer_lives_in_the_result_not_the_config(tokenizer) -> None:
    """The reference implementation wrote the located layer into the shared hparams and reused it
    for every later case. Here two cases edited with one config object keep their own layers."""
    model = tiny_model("gpt2")
    first, second = _two_cases_located_apart(model, tokenizer)
    config = DINMConfig(steps=2, lr=1e-2, c_edit=1.0)
    before = config.to_dict()
    r1 = editkit.edit(model, first, tokenizer=tokenizer, hparams=config)
    r2 = editkit.edit(model, second, tokenizer=tokenizer, hparams=config)
    assert r1.layer == editkit.locate(model, tokenizer, first).layer
    assert r2.layer == editkit.locate(model, tokenizer, second).layer
    assert r1.layer != r2.layer
    assert config.to_dict() == before and config.layer is None
    assert r1.hparams["layer"] is None and r1.patch.hparams["layer"] is None


def test_record_input_and_result_summary(tokenizer, instance) -> None:
    model = tiny_model("llama")
    result = run(model, instance.to_record(), tokenizer, hp={"steps": 2})
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["method"] == "dinm" and summary["layer"] == result.layer
    assert len(summary["losses"]) == 2 and len(summary["profile"]) == 4
    assert summary["patch_norm"] == pytest.approx(only_delta(result)[1].norm().item(), rel=1e-5)
    assert {"locate", "edit", "total"} <= set(result.timings)
    assert result.patch.metrics == result.metrics
    assert result.patch.method == "dinm" and result.patch.hparams["steps"] == 2


def test_requires_grad_flags_restored(tokenizer, instance, monkeypatch) -> None:
    """The editor freezes the model's parameters while it trains the delta (no weight-gradient
    graph, less memory) and hands each one back with its own flag, after an error too."""
    model = tiny_model("llama")
    frozen = {n for i, (n, _) in enumerate(model.named_parameters()) if i % 3 == 0}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    expected = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    original = dinm_method._nll

    def spy(*args, **kwargs):
        seen.append(any(p.requires_grad for p in model.parameters()))
        return original(*args, **kwargs)

    monkeypatch.setattr(dinm_method, "_nll", spy)
    for fast_path in (True, False):
        run(model, instance, tokenizer, layer=1, hp={"fast_path": fast_path})
        assert {n: p.requires_grad for n, p in model.named_parameters()} == expected
    assert seen and not any(seen)
    monkeypatch.setattr(torch.optim.Adam, "step", lambda *a, **k: (_ for _ in ()).throw(_Boom()))
    with pytest.raises(_Boom):
        run(model, instance, tokenizer, layer=1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == expected


@pytest.mark.parametrize("family", TINY_EXTRA_TYPES)
def test_every_other_mapped_family_edits_exactly(family, tokenizer, instance, snapshot):
    """The families with a map but no place in the main table: the map resolves, the fast path
    (or, for soft-capped logits, its fallback) equals the plain path, the model is untouched."""
    from editkit.arch import ARCH_MAPS, resolve_arch

    model = tiny_model(family)
    assert resolve_arch(model) is ARCH_MAPS[family]
    snap = snapshot(model)
    hp = {"steps": 3, "lr": 1e-2, "layer": 2}
    fast = editkit.edit(model, instance, tokenizer=tokenizer, hparams={**hp, "fast_path": True})
    plain = editkit.edit(model, instance, tokenizer=tokenizer, hparams={**hp, "fast_path": False})
    assert [r["loss"] for r in fast.losses] == pytest.approx([r["loss"] for r in plain.losses], abs=1e-6)
    (name, delta), = fast.patch.deltas.items()
    assert torch.allclose(delta, plain.patch.deltas[name], atol=1e-6)
    assert float(delta.abs().max()) > 0
    snap.assert_same(model)
