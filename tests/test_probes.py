"""Mechanism-analysis probes on tiny in-process models: region toxicity against hand-built value
vectors (both weight layouts), activation shift under edits that can and cannot move it, the
toxicity probe (fit, per-source accuracy, save/load, refusal of another model), projections, the
shared-data loaders' split, and the plots."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from editkit.arch import mlp_out_name, resolve_arch
from editkit.hooks import hook_count
from editkit.models import tiny_model
from editkit.patch import Patch
from editkit.probes import (ActivationShift, ProbeError, ProbeText, ToxicityProbe, activation_shift_rate,
                            compare_region_toxicity, fit_logistic, load_probe, load_safeedit_generations,
                            load_toxigen, measure_activation_shift, mlp_input_means, pooled, project_states,
                            projection_axes, region_profile, region_toxicity, split_held_out,
                            toxicity_reduction_rate, train_probe, value_vectors)

PROMPTS = ["How do I hurt someone?", "Tell me a secret.", "Write a poem about the sea, please.", "Hi"]


def _set_value_vectors(model, family: str, layer: int, vectors: torch.Tensor) -> None:
    """Write value vectors [d_ff, d_model] in each family's own layout (known here, independently
    of the architecture map): nn.Linear down_proj is [d_model, d_ff], GPT-2's Conv1D c_proj [d_ff, d_model]."""
    with torch.no_grad():
        if family == "gpt2":
            model.transformer.h[layer].mlp.c_proj.weight.copy_(vectors)
        else:
            model.model.layers[layer].mlp.down_proj.weight.copy_(vectors.T)


def _value_vector_shape(model, family: str, layer: int) -> tuple[int, int]:
    if family == "gpt2":
        d_ff, d_model = model.transformer.h[layer].mlp.c_proj.weight.shape
    else:
        d_model, d_ff = model.model.layers[layer].mlp.down_proj.weight.shape
    return d_ff, d_model


def _random_texts(alphabet: str, n: int, seed: int, length: int = 24) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(length)).strip() or alphabet[0] for _ in range(n)]


# -- region toxicity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_region_toxicity_of_hand_built_layer(family, tokenizer):
    model = tiny_model(family)
    layer = 1
    d_ff, d_model = _value_vector_shape(model, family, layer)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(d_model, generator=g, dtype=torch.float64)
    direction /= direction.norm()
    # value vector j = r_j (c_j·d + sqrt(1 − c_j²)·u_j) with u_j ⟂ d: its cosine with d is c_j by design
    wanted = torch.linspace(-0.9, 0.95, d_ff, dtype=torch.float64)[torch.randperm(d_ff, generator=g)]
    vectors = torch.empty(d_ff, d_model, dtype=torch.float64)
    for j in range(d_ff):
        u = torch.randn(d_model, generator=g, dtype=torch.float64)
        u -= (u @ direction) * direction
        u /= u.norm()
        radius = 0.5 + 3.0 * (j % 7)  # different norms: a mean of dot products would not equal the mean cosine
        vectors[j] = radius * (wanted[j] * direction + (1 - wanted[j] ** 2).sqrt() * u)
    _set_value_vectors(model, family, layer, vectors.float())
    top = int(wanted.argmax())
    token = tokenizer.convert_tokens_to_ids("x")
    with torch.no_grad():  # the (tied) unembedding row of "x" points along the most toxic vector
        model.get_output_embeddings().weight[token] = 50 * vectors[top].float() / vectors[top].norm().float()
    probe = ToxicityProbe.from_weight(model, 7.0 * direction.float(), bias=0.3, layer=3)

    result = region_toxicity(model, probe, layer, top_k=5, tokenizer=tokenizer, top_tokens=3)

    assert result.layer == layer
    assert result.mean_cosine == pytest.approx(float(wanted.mean()), abs=1e-5)
    assert [v.index for v in result.top] == torch.argsort(wanted, descending=True)[:5].tolist()
    highest = torch.sort(wanted, descending=True).values[:5].tolist()
    assert [v.cosine for v in result.top] == pytest.approx(highest, abs=1e-5)
    assert result.top[0].tokens[0] == "x"
    assert len(result.top[1].tokens) == 3
    profile = region_profile(model, probe)
    assert sorted(profile) == [0, 1, 2, 3] and profile[layer] == pytest.approx(result.mean_cosine, abs=1e-6)
    assert json.loads(json.dumps(result.to_dict()))["top"][0]["index"] == top


def test_value_vectors_follow_the_map_not_the_shape():
    """A square projection cannot be oriented by its shape: the declared transposition flag decides.
    (The llama attention output projection, [32, 32], stands in for an MLP output projection here.)"""
    model = tiny_model("llama")
    weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.copy_(weight)
    as_linear = {"mlp_out": "self_attn.o_proj", "mlp_out_transposed": False}
    as_conv1d = {"mlp_out": "self_attn.o_proj", "mlp_out_transposed": True}
    torch.testing.assert_close(value_vectors(model, 0, arch=as_linear), weight.T)
    torch.testing.assert_close(value_vectors(model, 0, arch=as_conv1d), weight)
    column, row = weight[:, 5], weight[5]
    assert region_toxicity(model, column, 0, arch=as_linear).top[0].index == 5
    assert region_toxicity(model, row, 0, arch=as_conv1d).top[0].index == 5
    with pytest.raises(ValueError, match="layer"):
        region_toxicity(model, column)  # a bare direction needs its layer


# -- activation shift and edits ------------------------------------------------------------------------
def _strip_direction_delta(model, family: str, name: str, direction: torch.Tensor) -> torch.Tensor:
    """The delta that removes ``direction`` from every value vector of the projection ``name``."""
    weight = model.get_parameter(name).detach()
    outer = torch.outer(direction, direction)
    return -(weight @ outer) if family == "gpt2" else -(outer @ weight)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_projection_only_edit_leaves_its_input_and_below_unshifted(family, tokenizer, snapshot):
    model = tiny_model(family)
    layer = 2
    probe = ToxicityProbe.from_weight(model, torch.randn(32, generator=torch.Generator().manual_seed(1)), layer=3)
    name = mlp_out_name(model, resolve_arch(model), layer)
    patch = Patch.from_deltas(model, {name: _strip_direction_delta(model, family, name, probe.direction)})
    snap = snapshot(model)

    shift = measure_activation_shift(model, tokenizer, PROMPTS, patch, progress=False)
    comparison = compare_region_toxicity(model, probe, patch, layer=layer)

    assert shift.layers == [0, 1, 2, 3]
    for below in range(layer + 1):
        assert shift.rate(below) == 0.0
    assert shift.rate(layer + 1) > 0.0  # the edited layer's output feeds the next one
    assert comparison.before.mean_cosine != 0.0
    assert abs(comparison.after.mean_cosine) < 1e-5  # every value vector is now orthogonal to the direction
    # (before − 0) / |before|: +1 when the layer wrote along the toxic direction on average, −1 against it
    assert comparison.reduction_rate == pytest.approx(math.copysign(1.0, comparison.before.mean_cosine), abs=1e-3)
    assert comparison.reduction_rate == pytest.approx(
        (comparison.before.mean_cosine - comparison.after.mean_cosine) / abs(comparison.before.mean_cosine))
    assert json.loads(json.dumps(shift.to_dict()))["rates"][:layer + 1] == [0.0] * (layer + 1)
    assert json.loads(json.dumps(comparison.to_dict()))["layer"] == layer
    snap.assert_same(model)
    assert hook_count(model) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("where", ["mlp_in", "attention_out"])
def test_earlier_layer_edit_shifts_later_activations(family, where, tokenizer, snapshot):
    model = tiny_model(family)
    names = {("llama", "mlp_in"): "model.layers.0.mlp.up_proj.weight",
             ("llama", "attention_out"): "model.layers.0.self_attn.o_proj.weight",
             ("gpt2", "mlp_in"): "transformer.h.0.mlp.c_fc.weight",
             ("gpt2", "attention_out"): "transformer.h.0.attn.c_proj.weight"}
    name = names[family, where]
    rows, cols = model.get_parameter(name).shape
    g = torch.Generator().manual_seed(2)
    lora_like = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)  # rank 2, merged
    patch = Patch.from_deltas(model, {name: 0.5 * lora_like})
    probe = ToxicityProbe.from_weight(model, torch.randn(32, generator=g), layer=3)
    snap = snapshot(model)

    shift = measure_activation_shift(model, tokenizer, PROMPTS, patch, progress=False)
    region = compare_region_toxicity(model, probe, patch, layer=3)

    assert all(rate > 0.0 for rate in shift.rates)  # layer 0's projection input already moves, and all above
    assert region.after.mean_cosine == region.before.mean_cosine  # layer 3's weights were not touched
    assert region.reduction_rate == 0.0
    snap.assert_same(model)


def test_mlp_input_means_and_rates(tokenizer):
    model = tiny_model("llama")
    means = mlp_input_means(model, tokenizer, PROMPTS, [1, -1], chat_template="none", progress=False)
    assert sorted(means) == [1, 3] and means[1].shape == (64,)
    # the mean over prompts of each prompt's mean over its real tokens
    each = [mlp_input_means(model, tokenizer, [p], [1], chat_template="none", progress=False)[1] for p in PROMPTS]
    torch.testing.assert_close(means[1], torch.stack(each).mean(0), atol=1e-6, rtol=1e-5)
    before = torch.tensor([3.0, 4.0])
    assert activation_shift_rate(before, torch.tensor([3.0, 4.0])) == 0.0
    assert activation_shift_rate(before, torch.tensor([0.0, 4.0])) == pytest.approx(3.0 / 5.0)
    with pytest.raises(ValueError):
        activation_shift_rate(torch.zeros(2), before)
    with pytest.raises(ValueError):
        activation_shift_rate(before, torch.zeros(3))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pooling_masks_pads(family, tokenizer):
    """A text's pooled state does not depend on the longer texts padded into its batch."""
    model = tiny_model(family)
    texts = ["a", "a much longer sentence than the first one", "mid length"]
    alone = torch.cat([pooled(model, tokenizer, [t], [1, 3], progress=False)[3] for t in texts])
    batched = pooled(model, tokenizer, texts, [1, 3], batch_size=8, progress=False)[3]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        pooled(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        pooled(model, tokenizer, texts, [4], progress=False)


# -- the probe ----------------------------------------------------------------------------------------
def test_fit_logistic_separates_synthetic_features():
    g = torch.Generator().manual_seed(0)
    d = 16
    truth = torch.randn(d, generator=g)
    x = 2.0 * torch.randn(400, d, generator=g) + 5.0  # an offset: the bias must be mapped back right
    margin = (x - 5.0) @ truth / truth.norm()
    keep = margin.abs() > 0.5
    x, y = x[keep], (margin[keep] > 0).long()
    weight, bias = fit_logistic(x[:200], y[:200].tolist())
    predicted = ((x[200:] @ weight + bias) > 0).long()
    assert (predicted == y[200:]).float().mean() > 0.95
    assert float(torch.nn.functional.cosine_similarity(weight, truth, dim=0)) > 0.9
    # one global scale: the fitted direction does not depend on the activations' magnitude
    small, _ = fit_logistic(x[:200] * 1e-3, y[:200].tolist())
    assert float(torch.nn.functional.cosine_similarity(weight, small, dim=0)) > 0.9999
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(x[:10], [1] * 10)
    with pytest.raises(ValueError):
        fit_logistic(x[:10], [0, 1] * 4)


def _two_source_items() -> list[ProbeText]:
    items = []
    for source, toxic, benign in (("letters", "qxzjkv ", "aeiou "), ("symbols", "!?#%& ", "0123456789 ")):
        for i, text in enumerate(_random_texts(toxic, 20, seed=len(source))):
            items.append(ProbeText(text, 1, source, f"{source}:t{i}"))
        for i, text in enumerate(_random_texts(benign, 20, seed=len(source) + 1)):
            items.append(ProbeText(text, 0, source, f"{source}:b{i}"))
    return items


def test_probe_end_to_end_save_load_and_refusal(tokenizer, tmp_path):
    model = tiny_model("llama", seed=0)
    probe = train_probe(model, tokenizer, _two_source_items(), held_fraction=0.25, seed=0, progress=False)

    assert probe.layer == 3
    held = probe.metrics["held"]
    assert set(held) == {"all", "letters", "symbols"}
    assert held["letters"]["n"] + held["symbols"]["n"] == held["all"]["n"] == 20
    assert held["letters"]["accuracy"] >= 0.9 and held["symbols"]["accuracy"] >= 0.9
    assert float(probe.direction.norm()) == pytest.approx(1.0, abs=1e-6)

    new = _random_texts("qxzjkv ", 3, seed=99) + _random_texts("aeiou ", 3, seed=98)
    probs = probe.predict_proba(model, tokenizer, new, progress=False)
    assert probs.shape == (6,) and (probs[:3] > 0.5).all() and (probs[3:] < 0.5).all()
    probe.save(tmp_path / "probe")
    with pytest.raises(FileExistsError):
        probe.save(tmp_path / "probe")
    loaded = load_probe(tmp_path / "probe", model)
    assert np.array_equal(loaded.predict_proba(model, tokenizer, new, progress=False), probs)
    assert loaded.metrics == json.loads(json.dumps(probe.metrics))

    # an edited copy of the same base is what the probe is for: accepted
    name = mlp_out_name(model, resolve_arch(model), 3)
    patch = Patch.from_deltas(model, {name: 0.5 * torch.randn_like(model.get_parameter(name))})
    with patch.applied(model):
        loaded.predict_proba(model, tokenizer, new, progress=False)

    other = tiny_model("llama", seed=1)
    with pytest.raises(ProbeError, match="differ") as info:
        ToxicityProbe.load(tmp_path / "probe", other)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ProbeError):
        loaded.predict_proba(other, tokenizer, new, progress=False)
    with pytest.raises(ProbeError):
        region_toxicity(other, loaded)
    with pytest.raises(ProbeError, match="model_type"):
        loaded.check_model(tiny_model("gpt2"))


def test_probe_file_errors(tmp_path, tokenizer):
    model = tiny_model("llama")
    probe = ToxicityProbe.from_weight(model, torch.ones(32), layer=-1)
    assert probe.layer == 3
    with pytest.raises(ProbeError):
        ToxicityProbe.from_weight(model, torch.ones(31))
    with pytest.raises(ProbeError):
        ToxicityProbe.from_weight(model, torch.zeros(32))
    with pytest.raises(ValueError, match="out of range"):
        ToxicityProbe.from_weight(model, torch.ones(32), layer=4)
    with pytest.raises(ProbeError, match="not an editkit probe"):
        load_probe(tmp_path)
    path = probe.save(tmp_path / "p")
    meta = json.loads((path / "probe.json").read_text())
    meta["format_version"] = 99
    (path / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbeError, match="unsupported"):
        load_probe(path)


def test_split_and_text_validation(tmp_path):
    items = _two_source_items()
    train, held = split_held_out(items, 0.25, seed=4)
    assert {it.group for it in train}.isdisjoint({it.group for it in held})
    assert {it.source for it in held} == {"letters", "symbols"}
    assert split_held_out(items, 0.25, seed=4) == (train, held)
    assert split_held_out(list(reversed(items)), 0.25, seed=4)[1] == [it for it in reversed(items) if it in held]
    assert split_held_out(items, 0.0)[1] == []
    with pytest.raises(ValueError):
        split_held_out(items, 1.0)
    with pytest.raises(ValueError):
        ProbeText("text", 2, "s", "g")
    bad = tmp_path / "toxigen.jsonl"
    bad.write_text('{"text": "fine", "label": "neutral"}\n{"text": "x", "label": "toxic"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_toxigen(bad)


def test_shared_data_loaders_split_by_record(shared_data):
    toxigen = load_toxigen(shared_data)
    safeedit = load_safeedit_generations(shared_data)
    records = json.loads((shared_data / "safeedit" / "safeedit_dev.json").read_text(encoding="utf-8"))
    lines = (shared_data / "toxigen" / "toxigen_demonstrations.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert len(toxigen) == len(rows) and len(safeedit) == 2 * len(records)
    assert sum(it.label for it in toxigen) == sum(r["label"] == "hate" for r in rows)
    by_text = {it.text: it.label for it in safeedit}
    assert all(by_text[r["unsafe generation"].strip()] == 1 for r in records)
    assert {it.source for it in toxigen} == {"toxigen"} and {it.source for it in safeedit} == {"safeedit"}

    train, held = split_held_out(toxigen + safeedit, 0.25, seed=3)
    train_groups, held_groups = {it.group for it in train}, {it.group for it in held}
    assert train_groups.isdisjoint(held_groups)
    assert {" ".join(it.text.lower().split()) for it in held}.isdisjoint(
        {" ".join(it.text.lower().split()) for it in train})
    held_records = {g for g in held_groups if g.startswith("safeedit:")}
    assert 20 <= len(held_records) <= 25  # a quarter of 100 records (minus any held only by duplicates)
    assert {it.source for it in held} == {"toxigen", "safeedit"}
    other_seed = {it.group for it in split_held_out(toxigen + safeedit, 0.25, seed=4)[1]}
    assert other_seed != held_groups


# -- projections ----------------------------------------------------------------------------------------
def test_projection_axes_on_synthetic_states():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(8)
    shift[2] = 4.0
    safe, unsafe = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g) + shift
    axes = projection_axes(safe, unsafe)
    assert float(axes.mean_shift[2]) > 0.95
    assert float(axes.pc1.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(axes.pc1 @ (unsafe.mean(0) - safe.mean(0))) > 0
    assert 0 < axes.pc1_explained <= 1
    with pytest.raises(ValueError):
        projection_axes(safe, safe.clone())


def test_project_states_before_and_after(tokenizer):
    model = tiny_model("llama")
    safe, unsafe = _random_texts("aeiou ", 6, seed=1), _random_texts("qxzjkv ", 6, seed=2)
    above = Patch.from_deltas(model, {"model.layers.3.mlp.down_proj.weight": torch.ones(32, 64)})
    below = Patch.from_deltas(model, {"model.layers.0.mlp.down_proj.weight": torch.ones(32, 64)})

    same = project_states(model, tokenizer, safe, unsafe, edit=above, progress=False)
    moved = project_states(model, tokenizer, safe, unsafe, edit=below, progress=False)

    assert same.layer == 2 and same.before.safe.shape == (6, 2) and same.before.unsafe.shape == (6, 2)
    assert same.before.separation > 0
    assert np.array_equal(same.after.safe, same.before.safe) and np.array_equal(same.after.unsafe, same.before.unsafe)
    assert np.array_equal(moved.before.safe, same.before.safe)
    assert not np.allclose(moved.after.safe, moved.before.safe)
    data = json.loads(json.dumps(moved.to_dict()))
    assert data["axes"] == ["mean shift", "PC1"] and len(data["after"]["unsafe"]) == 6


# -- rates and plots -------------------------------------------------------------------------------------
def test_reduction_rate():
    assert toxicity_reduction_rate(0.2, 0.05) == pytest.approx(0.75)
    assert toxicity_reduction_rate(-0.2, -0.3) == pytest.approx(0.5)  # less toxic also when negative
    with pytest.raises(ValueError):
        toxicity_reduction_rate(0.0, 0.1)


def test_plots_write_png(tmp_path, tokenizer):
    pytest.importorskip("matplotlib")
    from editkit.probes import plot_projection, plot_rates, plot_shift_curves

    model = tiny_model("gpt2")
    edit = Patch.from_deltas(model, {"transformer.h.0.mlp.c_proj.weight": torch.ones(128, 32)})
    projection = project_states(model, tokenizer, ["aaa", "eee"], ["zzz", "qqx"], edit=edit, progress=False)
    shift = ActivationShift(layers=[0, 1, 2], rates=[0.0, 0.1, 0.3], before_norms=[1.0, 1.0, 1.0])
    figures = {
        "rates.png": plot_rates({"DINM": {"toxicity reduction": 0.4, "activation shift": 0.0},
                                 "SFT": {"activation shift": 0.2}}, tmp_path / "rates.png"),
        "single.png": plot_rates({"DINM": 0.4, "DPO": -0.1}, tmp_path / "single.png"),
        "shift.png": plot_shift_curves({"DINM": shift, "SFT": [0.1, 0.2, 0.3]}, tmp_path / "shift.png", mark_layer=1),
        "projection.png": plot_projection(projection, tmp_path / "sub" / "projection.png"),
    }
    for name, fig in figures.items():
        path = tmp_path / ("sub" if name == "projection.png" else "") / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert fig.axes
    assert len(figures["projection.png"].axes) == 2  # before and after
    with pytest.raises(ValueError):
        plot_rates({})
