"""check_edit: non-finite deltas, deltas far larger than their weight and edits that made their own
objective worse are refused (or, with allow_untrusted, logged); real edits pass."""
from __future__ import annotations

import logging

import pytest
import torch

import editkit
from editkit.methods.dinm import DINM, DINMConfig
from editkit.models import tiny_model
from editkit.patch import Patch, PatchError
from editkit.result import EditResult
from editkit.validation import MAX_RELATIVE_NORM, UntrustedEditError, check_edit

TARGET = {"llama": "model.layers.1.mlp.down_proj.weight", "gpt2": "transformer.h.1.mlp.c_proj.weight"}
REASONABLE = {"lr": 1e-2, "steps": 5, "c_edit": 1.0}  # a quick real DINM edit on a tiny model


def weight(model, family: str = "llama") -> torch.Tensor:
    return dict(model.named_parameters())[TARGET[family]].detach()


def result_with(model, delta: torch.Tensor, family: str = "llama", **metrics: float) -> EditResult:
    patch = Patch.from_deltas(model, {TARGET[family]: delta}, method="test", layer=1, metrics=dict(metrics))
    return EditResult(method="test", patch=patch, layer=1, metrics=dict(metrics))


def raw_dinm(model, tokenizer, instance, **settings):
    """A DINM result straight from the method, before editkit.edit's own check."""
    return DINM(DINMConfig(**settings)).edit(model, tokenizer, instance)


# --------------------------------------------------------------------------- non-finite


def test_non_finite_delta_is_refused_on_every_path(snapshot) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    bad = torch.zeros_like(weight(model))
    bad[0, 0] = float("nan")
    with pytest.raises(PatchError, match="NaN or inf"):  # a patch cannot be built with it
        Patch.from_deltas(model, {TARGET["llama"]: bad})
    # a delta changed in place after the patch was built: check_edit refuses it, even when told
    # to accept untrusted edits (no model can carry a NaN), and so does applying
    result = result_with(model, torch.zeros_like(weight(model)))
    result.patch.deltas[TARGET["llama"]][2, 3] = float("inf")
    for allow in (False, True):
        with pytest.raises(UntrustedEditError, match="NaN or inf.*cannot be overridden"):
            check_edit(result, model, allow_untrusted=allow)
    with pytest.raises(PatchError, match="NaN or inf"):
        result.patch.apply(model)
    with pytest.raises(PatchError, match="NaN or inf"):
        with result.patch.applied(model):
            pass
    snap.assert_same(model)


# --------------------------------------------------------------------------- size


def test_absurdly_large_delta_is_refused(snapshot) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    result = result_with(model, weight(model) * 1e30)
    with pytest.raises(UntrustedEditError) as err:
        check_edit(result, model)
    message = str(err.value)
    assert TARGET["llama"] in message and "1e+30" in message and "max_relative_norm" in message
    assert "model is untouched" in message and "allow_untrusted=True" in message
    snap.assert_same(model)
    # a bare Patch is checked the same way
    with pytest.raises(UntrustedEditError):
        check_edit(result.patch, model)


def test_allow_untrusted_logs_and_returns_the_problems(caplog) -> None:
    model = tiny_model("gpt2")
    result = result_with(model, weight(model, "gpt2") * 1e30, "gpt2", edit_nll_before=2.6, edit_nll_after=10.8)
    with caplog.at_level(logging.WARNING, logger="editkit.validation"):
        problems = check_edit(result, model, allow_untrusted=True)
    assert len(problems) == 2
    assert TARGET["gpt2"] in problems[0] and "worse" in problems[1]
    warnings = [r for r in caplog.records if r.name == "editkit.validation" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "allow_untrusted" in warnings[0].getMessage()
    assert all(p in warnings[0].getMessage() for p in problems)


def test_relative_norm_threshold_and_overflow() -> None:
    model = tiny_model("llama")
    w = weight(model)
    assert check_edit(result_with(model, w * (0.9 * MAX_RELATIVE_NORM)), model) == []
    with pytest.raises(UntrustedEditError):
        check_edit(result_with(model, w * (1.1 * MAX_RELATIVE_NORM)), model)
    assert check_edit(result_with(model, w * 3), model, max_relative_norm=5) == []
    with pytest.raises(UntrustedEditError):
        check_edit(result_with(model, w * 3), model, max_relative_norm=2)
    # entries near the fp32 limit: the norm is computed without overflowing to inf
    with pytest.raises(UntrustedEditError, match=r"= [0-9.]+e\+38,"):
        check_edit(result_with(model, torch.full_like(w, 1e37)), model)
    with pytest.raises(ValueError, match="max_relative_norm"):
        check_edit(result_with(model, w), model, max_relative_norm=0)


def test_names_and_shapes_are_checked_against_the_model() -> None:
    model = tiny_model("llama")
    result = result_with(model, weight(model) * 0.01)
    with pytest.raises(PatchError, match="no parameter"):
        check_edit(result, tiny_model("gpt2"))


# --------------------------------------------------------------------------- the objective


def test_objective_that_got_worse_is_refused() -> None:
    model = tiny_model("llama")
    small = weight(model) * 0.01
    with pytest.raises(UntrustedEditError, match=r"objective worse: edit NLL 2\.6 -> 10\.8"):
        check_edit(result_with(model, small, edit_nll_before=2.6, edit_nll_after=10.8), model)
    with pytest.raises(UntrustedEditError, match="objective is nan"):
        check_edit(result_with(model, small, edit_nll_before=2.6, edit_nll_after=float("nan")), model)
    # better, unchanged, or worse only by float noise: fine; not reported: nothing to check
    for after in (1.0, 2.6, 2.6 + 1e-6):
        assert check_edit(result_with(model, small, edit_nll_before=2.6, edit_nll_after=after), model) == []
    assert check_edit(result_with(model, small, edit_nll_after=10.0), model) == []


# --------------------------------------------------------------------------- real DINM edits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_real_dinm_edit_passes(family: str, tokenizer, instance) -> None:
    model = tiny_model(family)
    result = editkit.edit(model, instance, tokenizer=tokenizer, method="dinm", hparams=REASONABLE)
    assert result.metrics["edit_nll_after"] < result.metrics["edit_nll_before"]
    assert check_edit(result, model) == []


def test_dinm_with_absurd_lr_fails(tokenizer, instance, snapshot) -> None:
    """The issue's case on a tiny model: lr 1e30 returns a finite patch that check_edit refuses."""
    model = tiny_model("llama")
    snap = snapshot(model)
    result = raw_dinm(model, tokenizer, instance, lr=1e30, steps=1, c_edit=1.0)
    (name, delta), = result.patch.deltas.items()
    assert torch.isfinite(delta).all() and delta.abs().max() > 1e29  # nothing else stops it
    with pytest.raises(UntrustedEditError, match="max_relative_norm") as err:
        check_edit(result, model)
    assert name in str(err.value)
    snap.assert_same(model)
