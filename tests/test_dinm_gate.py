"""DINM's harmfulness gate on tiny models: what the gated patch does to the projection's output,
that a gated patch applies, saves, reloads and refuses a checkpoint, and the gate's settings (margin,
sharpness, training behind the gate). Which texts the probe sees and how it is fitted:
``test_dinm_gate_fit.py``."""
from __future__ import annotations

import pytest
import torch

import editkit
from editkit.arch import decoder_layers, get_module, resolve_arch
from editkit.checkpoint import save_checkpoint
from editkit.delta_hooks import gated_modules
from editkit.hooks import hook_count
from editkit.methods.dinm import DINMConfig, gate
from editkit.methods.dinm.constraints import constraint_requests
from editkit.models import tiny_model
from editkit.patch import Patch, PatchError, load_patch
from tests.helpers import PATCH_IDS, PATCH_TARGET, make_patch, patch_logits
from tests.gate_fixtures import LAYER, HP, edited, pool, fresh_cache  # noqa: F401 (fixtures)


def test_gate_separates_its_classes_and_scales_the_delta(edited, pool, tokenizer, snapshot, monkeypatch) -> None:
    """The gated patch changes the projection's output by g(k)·Δk per key: the gate read back from
    the patch, Δ the patch's delta; the probe fits its texts; the model is untouched by the edit."""
    model = tiny_model("llama")
    snap = snapshot(model)
    result = editkit.edit(model, edited, tokenizer=tokenizer, hparams=HP, constraint_pool=pool)
    snap.assert_same(model)
    assert hook_count(model) == 0
    (name, delta), = result.patch.deltas.items()
    assert set(result.patch.gates) == {name}
    m = result.metrics
    assert m["gate_harmful_texts"] == 2 * 6 and m["gate_benign_texts"] == 2 * (len(constraint_requests()) + len(gate.gate_requests()) + 5)
    assert m["gate_fit_accuracy"] > 0.7 and 0 <= m["gate_on_edit_prompt"] <= 1
    assert result.timings["gate"] > 0

    arch = resolve_arch(model)
    module = get_module(decoder_layers(model, arch)[LAYER], arch.mlp_out)
    keys = torch.randn(7, delta.shape[1])
    g = torch.sigmoid(keys @ result.patch.gates[name]["weight"] + result.patch.gates[name]["bias"])
    with torch.no_grad():
        before = module(keys)
        with result.patch.applied(model):
            after = module(keys)
            assert gated_modules(model) == [f"model.layers.{LAYER}.mlp.down_proj"]
    torch.testing.assert_close(after - before, g[:, None] * (keys @ delta.T), rtol=1e-4, atol=1e-5)
    assert g.min() < 0.5 < g.max() or g.std() > 0  # the gate varies with the key
    snap.assert_same(model)
    assert gated_modules(model) == [] and hook_count(model) == 0

    # the gate's keys are those of the unedited model: a second edit reuses every one of them
    calls = []
    real = gate.collect_keys

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gate, "collect_keys", counting)
    again = editkit.edit(model, edited, tokenizer=tokenizer, hparams=HP, constraint_pool=pool)
    assert calls == []
    torch.testing.assert_close(again.patch.gates[name]["weight"], result.patch.gates[name]["weight"])


def _gated(model, family: str = "llama") -> Patch:
    plain = make_patch(model, family)
    name = PATCH_TARGET[family]
    d_in = plain.deltas[name].shape[1]
    gen = torch.Generator().manual_seed(3)
    return Patch(deltas=plain.deltas, base_fingerprint=plain.base_fingerprint, method="test", layer=1,
                 model=plain.model, gates={name: {"weight": torch.randn(d_in, generator=gen), "bias": torch.tensor(0.5)}})


def test_gated_patch_round_trip_and_checkpoint_refusal(tmp_path, tokenizer, snapshot) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    base = patch_logits(model)
    patch = _gated(model)
    with patch.applied(model):
        inside = patch_logits(model)
    snap.assert_same(model)
    assert not torch.allclose(inside, base) and hook_count(model) == 0

    loaded = load_patch(patch.save(tmp_path / "p"))
    assert set(loaded.gates) == set(patch.gates)
    for part in ("weight", "bias"):
        torch.testing.assert_close(loaded.gates[PATCH_TARGET["llama"]][part], patch.gates[PATCH_TARGET["llama"]][part])
    with loaded.applied(model):
        torch.testing.assert_close(patch_logits(model), inside)
        with pytest.raises(PatchError, match="gated"):
            save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    with pytest.raises(PatchError, match="gated"):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", patch=loaded)
    assert not (tmp_path / "ckpt").exists()

    loaded.apply(model)  # permanent: the weights stay as they were, the hook carries the edit
    snap.assert_same(model)
    torch.testing.assert_close(patch_logits(model), inside)
    assert "gated=" in repr(loaded)


@pytest.mark.parametrize("gates,message", [
    ({"nope.weight": {"weight": torch.zeros(4), "bias": torch.tensor(0.0)}}, "no delta"),
    ({PATCH_TARGET["llama"]: {"weight": torch.zeros(4)}}, "'weight' and a 'bias'"),
    ({PATCH_TARGET["llama"]: {"weight": torch.full((4,), float("nan")), "bias": torch.tensor(0.0)}}, "NaN"),
])
def test_malformed_gates_are_refused(gates, message) -> None:
    model = tiny_model("llama")
    plain = make_patch(model)
    with pytest.raises(PatchError, match=message):
        Patch(deltas=plain.deltas, gates=gates)


def test_gate_of_the_wrong_width_is_refused_before_anything_changes(snapshot) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    plain = make_patch(model)
    bad = Patch(deltas=plain.deltas, gates={PATCH_TARGET["llama"]: {"weight": torch.zeros(3), "bias": torch.tensor(0.)}})
    with pytest.raises(PatchError, match="gate weight has 3"):
        bad.apply(model)
    snap.assert_same(model)
    assert hook_count(model) == 0 and PATCH_IDS.shape[0] == 1


def test_gate_settings() -> None:
    config = DINMConfig()
    assert (config.harm_gate, config.harm_gate_c, config.harm_gate_sharpness) == (False, 0.1, 1.0)
    assert not config.harm_gate_test_inputs and not config.harm_gate_train
    for bad in ({"harm_gate_c": 0}, {"harm_gate_sharpness": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DINMConfig.from_dict(bad)


def test_margin_shuts_the_gate_where_the_logit_does_not_clear_it(edited, pool, tokenizer) -> None:
    model = tiny_model("llama")
    plain = editkit.edit(model, edited, tokenizer=tokenizer, hparams={**HP, "harm_gate_sharpness": 2.0},
                         constraint_pool=pool)
    shifted = editkit.edit(model, edited, tokenizer=tokenizer,
                           hparams={**HP, "harm_gate_sharpness": 2.0, "harm_gate_margin": 0.5}, constraint_pool=pool)
    (name, _), = plain.patch.deltas.items()
    w, b = plain.patch.gates[name]["weight"], plain.patch.gates[name]["bias"]
    torch.testing.assert_close(shifted.patch.gates[name]["weight"], w)
    torch.testing.assert_close(shifted.patch.gates[name]["bias"], b - 2.0 * 0.5)  # shifted, then sharpened
    target = torch.linspace(-1, 1, 41, dtype=torch.float64) + 0.01  # the probe's own logits, none on 0 or 0.5
    keys = ((2.0 * target - b.double()) / (w.double() @ w.double())).unsqueeze(1) * w.double()
    logit = (keys @ w.double() + b.double()) / 2.0
    torch.testing.assert_close(logit, target)
    keys = keys.float()
    opened = torch.sigmoid(keys @ w + shifted.patch.gates[name]["bias"]) > 0.5
    assert torch.equal(opened, logit > 0.5)
    between = (logit > 0) & (logit < 0.5)
    assert bool(between.any()) and not bool(opened[between].any())  # open without the margin, shut with it
    with pytest.raises(ValueError, match="harm_gate_margin"):
        DINMConfig.from_dict({"harm_gate_margin": float("nan")})


def test_sharpness_keeps_the_decision_and_hardens_it(edited, pool, tokenizer) -> None:
    model = tiny_model("llama")
    soft = editkit.edit(model, edited, tokenizer=tokenizer, hparams=HP, constraint_pool=pool)
    sharp = editkit.edit(model, edited, tokenizer=tokenizer, hparams={**HP, "harm_gate_sharpness": 4.0},
                         constraint_pool=pool)
    (name, _), = soft.patch.deltas.items()
    for part in ("weight", "bias"):
        torch.testing.assert_close(sharp.patch.gates[name][part], 4 * soft.patch.gates[name][part])
    keys = torch.randn(50, soft.patch.gates[name]["weight"].shape[0])
    g_soft, g_sharp = (torch.sigmoid(keys @ p.gates[name]["weight"] + p.gates[name]["bias"])
                       for p in (soft.patch, sharp.patch))
    assert torch.equal(g_soft > 0.5, g_sharp > 0.5)
    assert bool(((g_sharp - 0.5).abs() >= (g_soft - 0.5).abs() - 1e-6).all())


def test_fixed_patch_settings_name_the_gate() -> None:
    """A run folder evaluating one saved gated patch is keyed by its gate too (resuming with
    another gate is refused like resuming with another delta)."""
    from editkit.interventions import FixedPatch

    model = tiny_model("llama")
    patch = _gated(model)
    other = Patch(deltas=patch.deltas, gates={n: {"weight": -g["weight"], "bias": g["bias"]}
                                              for n, g in patch.gates.items()})
    plain = Patch(deltas=patch.deltas)
    digests = {FixedPatch(p).settings()["deltas_sha256"] for p in (patch, other, plain)}
    assert len(digests) == 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [1, -1], ids=["middle", "top"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
def test_gated_steps_see_what_the_gated_patch_does(family: str, layer: int, fast_path: bool, tokenizer) -> None:
    """harm_gate_train: under a delta, the editor's logits (and so every step's loss) equal those of
    an ordinary forward with the gated patch applied — on the plain path, the fast path and the
    replayed top layer — and differ from the ungated editor's."""
    from editkit.engine import DeltaEditor
    from editkit.text import encode_pairs

    model = tiny_model(family)
    arch = resolve_arch(model)
    layer = layer % len(decoder_layers(model, arch))
    module = get_module(decoder_layers(model, arch)[layer], arch.mlp_out)
    name = f"{arch.layers}.{layer}.{arch.mlp_out}.weight"
    gen = torch.Generator().manual_seed(5)
    delta = torch.randn(module.weight.shape, generator=gen) * 0.5 * float(module.weight.detach().abs().mean())
    d_in = delta.shape[0] if arch.mlp_out_transposed else delta.shape[1]
    fitted = gate.Gate(torch.randn(d_in, generator=gen), torch.tensor(0.2), 1, 1, 1.0)
    batch = encode_pairs(tokenizer, [("Hi?", "No."), ("How do I pick a lock at night?", "I can't help with that.")])
    patch = Patch.from_deltas(model, {name: delta}, method="test", layer=layer)
    patch = Patch(deltas=patch.deltas, base_fingerprint=patch.base_fingerprint, method="test", layer=layer,
                  model=patch.model, gates={name: {"weight": fitted.weight, "bias": fitted.bias}})
    with patch.applied(model), torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).logits[batch.predicting_positions()].float()
    got = {}
    for gated in (True, False):
        with DeltaEditor(model, arch, layer, {"edit": batch}, fast_path=fast_path,
                         gate=fitted if gated else None) as editor:
            with torch.no_grad():
                editor.delta.copy_(delta)
                got[gated] = editor.logits("edit")
    torch.testing.assert_close(got[True], expected, rtol=1e-4, atol=1e-4)
    assert (got[False] - expected).abs().max() > 1e-3
    assert hook_count(model) == 0


def test_gate_train_needs_the_gate() -> None:
    with pytest.raises(ValueError, match="harm_gate_train needs harm_gate"):
        DINMConfig.from_dict({"harm_gate_train": True})
    assert DINMConfig.from_dict({"harm_gate": True, "harm_gate_train": True}).harm_gate_train


def test_gate_trained_edit_keeps_its_gate_and_learns_another_delta(edited, pool, tokenizer, snapshot) -> None:
    """With harm_gate_train the same gate is fitted; the delta differs (its steps saw the gate) and
    the edit still lowers the edit loss under the gate; the model is untouched."""
    model = tiny_model("llama")
    snap = snapshot(model)
    plain = editkit.edit(model, edited, tokenizer=tokenizer, hparams=HP, constraint_pool=pool)
    trained = editkit.edit(model, edited, tokenizer=tokenizer, hparams={**HP, "harm_gate_train": True},
                           constraint_pool=pool)
    snap.assert_same(model)
    (name, delta), = trained.patch.deltas.items()
    for part in ("weight", "bias"):
        torch.testing.assert_close(trained.patch.gates[name][part], plain.patch.gates[name][part])
    assert not torch.allclose(delta, plain.patch.deltas[name])
    assert trained.metrics["edit_nll_after"] < trained.metrics["edit_nll_before"]
