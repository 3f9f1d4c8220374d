"""The method contract, checked for every registered method on the tiny models (PEFT's TEST_CASES
style): a method gets these tests by registering. For each method and family: the model is
untouched after edit/fit, an exception in the middle leaves it bit-identical, ``Patch.applied``
restores exactly, save -> load -> apply equals the in-memory patch, no hook is left behind, and the
patch changes the model's output."""
from __future__ import annotations

import pytest
import torch

import editkit
from editkit.hooks import hook_count
from editkit.instance import EditInstance
from editkit.models import tiny_model
from editkit.registry import get_method, list_methods

# Settings that keep each method quick on a tiny model (a method missing here runs on its defaults).
FAST = {
    "dinm": {"lr": 1e-2, "steps": 3, "c_edit": 1.0},
    "ft-l": {"lr": 1e-2, "steps": 3},
    "sft": {"r": 4, "alpha": 8, "lr": 1e-2, "max_steps": 2, "batch_size": 3, "max_length": 128},
    "dpo": {"r": 4, "alpha": 8, "lr": 1e-2, "max_steps": 2, "batch_size": 3, "max_length": 128},
    "extsub": {"r": 4, "alpha": 8, "lr": 1e-2, "max_steps": 2, "batch_size": 3, "max_length": 128},
    "mend": {"lr": 1e-1, "layers": [-2, -1]},  # no archive: the untrained editor's plain gradient step
}
FAMILIES = ("llama", "gpt2")


def _records() -> list[EditInstance]:
    return [EditInstance(id=str(i), prompt=f"How do I do harm number {i}?", safe="I can't help with that.",
                         unsafe=f"Sure, step {i}: find a weapon and wait.", knowledge_prompt=f"What is {i}+{i}?",
                         knowledge_answer=str(2 * i)) for i in range(1, 4)]


def _run(method: str, model, tokenizer, **kwargs) -> editkit.EditResult:
    records = _records()
    if get_method(method).scope == "dataset":
        return editkit.fit(model, records, tokenizer=tokenizer, method=method, hparams=FAST.get(method), **kwargs)
    return editkit.edit(model, records[0], tokenizer=tokenizer, method=method, hparams=FAST.get(method), **kwargs)


def _logits(model) -> torch.Tensor:
    ids = torch.arange(5, 30)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [(m, f) for m in list_methods() for f in FAMILIES]


@pytest.fixture(params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request) -> tuple[str, str]:
    return request.param


def test_edit_leaves_model_untouched_and_patch_round_trips(case, tokenizer, snapshot, tmp_path) -> None:
    method, family = case
    model = tiny_model(family)
    before_logits = _logits(model)  # also installs transformers' own permanent hooks, if any
    hooks = hook_count(model)
    snap = snapshot(model)
    result = _run(method, model, tokenizer)
    snap.assert_same(model)
    assert hook_count(model) == hooks
    assert result.method == method and result.patch.deltas
    with result.patch.applied(model):
        edited = _logits(model)
        assert not torch.equal(edited, before_logits), "the patch changes nothing"
    snap.assert_same(model)  # restored bit-exactly
    result.patch.save(tmp_path / "patch")
    loaded = editkit.load_patch(tmp_path / "patch")
    assert loaded.method == method and set(loaded.deltas) == set(result.patch.deltas)
    fresh = tiny_model(family)
    loaded.apply(fresh)
    assert torch.equal(_logits(fresh), edited)
    assert hook_count(model) == hooks


def test_exception_mid_edit_leaves_model_bit_identical(case, tokenizer, snapshot) -> None:
    from editkit.arch import decoder_layers, get_module, resolve_arch

    method, family = case
    model = tiny_model(family)
    _logits(model)
    hooks = hook_count(model)
    snap = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {"n": 0}

    def fail_third_time(module, args):  # every method runs the final norm; its third call raises
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")

    top = decoder_layers(model, resolve_arch(model))[-1]
    handle = get_module(model, resolve_arch(model).final_norm).register_forward_pre_hook(fail_third_time)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            _run(method, model, tokenizer)
    finally:
        handle.remove()
    assert calls["n"] == 3
    snap.assert_same(model)
    assert hook_count(model) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert type(top).forward is type(decoder_layers(model, resolve_arch(model))[-1]).forward  # layers are back


@pytest.mark.parametrize("method", list_methods())
def test_untrusted_result_is_refused_before_anything_is_applied(method: str, tokenizer, snapshot) -> None:
    from editkit.validation import UntrustedEditError

    model = tiny_model("llama")
    snap = snapshot(model)
    settings = {**FAST.get(method, {}), "lr": 1e30}
    records = _records()
    with pytest.raises((UntrustedEditError, FloatingPointError)):
        if get_method(method).scope == "dataset":
            editkit.fit(model, records, tokenizer=tokenizer, method=method, hparams=settings, apply=True)
        else:
            editkit.edit(model, records[0], tokenizer=tokenizer, method=method, hparams=settings, apply=True)
    snap.assert_same(model)


def test_registry_scopes_and_duplicates() -> None:
    from editkit.methods.base import EditingMethod
    from editkit.methods.dinm import DINM, DINMConfig
    from editkit.registry import register_method

    assert {"dinm", "ft-l"} <= set(list_methods("instance"))
    assert not set(list_methods("instance")) & set(list_methods("dataset"))
    assert set(list_methods("instance")) | set(list_methods("dataset")) == set(list_methods())
    register_method("dinm", DINMConfig, DINM)  # the same classes again (a module reload): a no-op

    class Other(EditingMethod):
        scope = "instance"

        def edit(self, model, tokenizer, instance, **kwargs):
            raise NotImplementedError

    with pytest.raises(ValueError, match="already registered"):
        register_method("dinm", DINMConfig, Other)
    assert get_method("dinm").method_class is DINM

    class NoFit(EditingMethod):
        scope = "dataset"

    with pytest.raises(TypeError, match="fit"):
        register_method("no-fit", DINMConfig, NoFit)

    class BadScope:
        scope = "corpus"

        def edit(self, *args):
            pass

    with pytest.raises(TypeError, match="scope"):
        register_method("bad-scope", DINMConfig, BadScope)


def test_wrong_entry_point_is_explained(tokenizer) -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="instance-scope method: use editkit.edit"):
        editkit.fit(model, _records(), tokenizer=tokenizer, method="dinm")
