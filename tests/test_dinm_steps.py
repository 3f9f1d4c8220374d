"""DINM's steps in another precision or attention implementation (``step_dtype``,
``step_attention``) on tiny models: the edit follows the float32, model-attention one, the
LM head's logits stay exact, and the model is handed back as it was."""
from __future__ import annotations

import pytest
import torch

import editkit
import editkit.methods.dinm.method as dinm_method
from editkit.models import tiny_model
from tests.helpers import Boom, dinm_edit as run, only_delta


@pytest.mark.parametrize("layer", [1, -1], ids=["middle", "top"])
def test_bfloat16_steps_follow_the_float32_edit(tiny_lm, tokenizer, instance, layer: int) -> None:
    """step_dtype bfloat16: the layers above the edited one run under bf16 autocast during the
    steps, while the unedited reference, the delta and the LM head's logits stay fp32: the KL's
    reference is the fp32 edit's exactly (the edit NLL's before-value is the first step's, to bf16
    rounding), the step losses and the delta follow the fp32 ones to bf16 rounding, on the fast and
    the plain path; the model's weights stay fp32 and untouched."""
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    exact = run(tiny_lm, instance, tokenizer, layer=layer)
    for fast_path in (True, False):
        bf16 = run(tiny_lm, instance, tokenizer, layer=layer, hp={"step_dtype": "bfloat16", "fast_path": fast_path})
        # the plain path's reference is its own forward
        assert bf16.metrics["knowledge_nll_before"] == pytest.approx(exact.metrics["knowledge_nll_before"],
                                                                     abs=1e-6 if fast_path else 1e-4)
        assert bf16.metrics["edit_nll_before"] == pytest.approx(exact.metrics["edit_nll_before"], rel=0.02)
        assert bf16.losses[-1]["edit_nll"] < bf16.losses[0]["edit_nll"]
        for b, e in zip(bf16.losses, exact.losses):
            assert b["edit_nll"] == pytest.approx(e["edit_nll"], rel=0.05, abs=0.02)
        (name, d_bf16), (_, d_exact) = only_delta(bf16), only_delta(exact)
        assert d_bf16.dtype == torch.float32
        assert float((d_bf16 - d_exact).norm() / d_exact.norm()) < 0.1
    if layer == 1:  # below the top the steps really ran in bf16: the result differs from fp32's
        assert not torch.equal(d_bf16, d_exact)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in tiny_lm.state_dict().items())
    with pytest.raises(ValueError, match="step_dtype"):
        editkit.load_hparams("dinm", {"step_dtype": "float16"})


def test_exact_forward_head_takes_its_gradient_in_low_precision() -> None:
    """The LM head of autocast steps: logits exactly the fp32 product, the gradient into the hidden
    states from the bf16 weight (bf16 rounding off the fp32 one), none into the frozen weight."""
    from editkit.engine import ExactForwardHead

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=gen)
    hidden = torch.randn(5, 16, generator=gen, requires_grad=True)
    logits = ExactForwardHead.apply(hidden, weight, weight.to(torch.bfloat16))
    assert logits.dtype == torch.float32 and torch.equal(logits, hidden @ weight.t())
    upstream = torch.randn(5, 300, generator=gen)
    (grad,) = torch.autograd.grad(logits, hidden, upstream)
    exact = upstream @ weight
    assert grad.dtype == torch.float32 and not torch.equal(grad, exact)
    torch.testing.assert_close(grad, exact, rtol=0.03, atol=0.3)


def test_step_attention_runs_the_edit_eager_and_hands_the_model_back(tokenizer, instance, monkeypatch) -> None:
    """step_attention: eager: the editor runs the model with transformers' eager attention (the
    same edit to float noise, fast and plain path, in bf16 steps too), and the model has its own
    implementation back afterwards, after an error too."""
    model = tiny_model("llama")
    own = model.config._attn_implementation
    assert own != "eager"
    seen = []
    original = dinm_method._nll

    def spy(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        return original(*args, **kwargs)

    monkeypatch.setattr(dinm_method, "_nll", spy)
    for hp in ({}, {"fast_path": False}, {"step_dtype": "bfloat16"}):
        base = run(model, instance, tokenizer, layer=1, hp=hp)
        seen.clear()
        eager = run(model, instance, tokenizer, layer=1, hp={**hp, "step_attention": "eager"})
        assert seen and set(seen) == {"eager"} and model.config._attn_implementation == own
        tol = 2e-2 if hp.get("step_dtype") else 1e-4
        for b, e in zip(base.losses, eager.losses):
            assert e["edit_nll"] == pytest.approx(b["edit_nll"], rel=tol, abs=tol)
        torch.testing.assert_close(only_delta(eager)[1], only_delta(base)[1], rtol=0.1, atol=tol)
    monkeypatch.setattr(torch.optim.Adam, "step", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        run(model, instance, tokenizer, layer=1, hp={"step_attention": "eager"})
    assert model.config._attn_implementation == own
    with pytest.raises(ValueError, match="step_attention"):
        editkit.load_hparams("dinm", {"step_attention": "flash"})
