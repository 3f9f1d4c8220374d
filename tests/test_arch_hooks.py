"""Architecture maps, hooks (Trace / TraceDict) and toxic-layer localisation, on every tiny family."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import editkit
from editkit.arch import (
    ARCH_MAPS,
    ArchMap,
    check_layer,
    decoder_layers,
    get_module,
    linear_delta,
    lm_head,
    mlp_out_name,
    num_layers,
    resolve_arch,
)
from editkit.hooks import Trace, TraceDict, hook_count
from editkit.instance import EditInstance
from editkit.models import tiny_model
from editkit.text import encode_pairs, target_ids

IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 44]])


def _unknown_family(model: nn.Module) -> nn.Module:
    """The same weights, but a model_type editkit has no map for."""
    model.config.model_type = "mystery"
    return model


# --------------------------------------------------------------------------- arch


def test_every_family_resolves(tiny_lm: nn.Module, family: str) -> None:
    arch = resolve_arch(tiny_lm)
    assert arch is ARCH_MAPS[family]
    layers = decoder_layers(tiny_lm, arch)
    assert isinstance(layers, nn.ModuleList) and num_layers(tiny_lm, arch) == 4
    hidden = tiny_lm.config.hidden_size
    inner = 4 * hidden if family == "gpt2" else tiny_lm.config.intermediate_size
    for layer in layers:
        mlp_out = get_module(layer, arch.mlp_out)
        # d_ff -> d_model; Conv1D stores [in, out], nn.Linear [out, in]
        expected = (inner, hidden) if arch.mlp_out_transposed else (hidden, inner)
        assert tuple(mlp_out.weight.shape) == expected
    assert arch.mlp_out_transposed == (family == "gpt2")
    assert lm_head(tiny_lm, arch) is tiny_lm.get_output_embeddings()
    name = mlp_out_name(tiny_lm, arch, -1)
    assert name == f"{arch.layers}.3.{arch.mlp_out}.weight"
    assert name in dict(tiny_lm.named_parameters())


def test_unknown_model_type_error_tells_how_to_pass_names() -> None:
    model = _unknown_family(tiny_model("llama"))
    with pytest.raises(ValueError) as err:
        resolve_arch(model)
    message = str(err.value)
    assert "'mystery'" in message and "arch=" in message and "mlp_out" in message


def test_custom_arch_dict_for_unknown_family() -> None:
    model = _unknown_family(tiny_model("llama"))
    names = dict(layers="model.layers", mlp_out="mlp.down_proj", attn_out="self_attn.o_proj",
                 final_norm="model.norm", lm_head="lm_head", base="model")
    arch = resolve_arch(model, names)
    assert isinstance(arch, ArchMap) and arch.mlp_out == "mlp.down_proj"
    assert arch.fast_path is False  # not declared exact for an unknown family
    assert resolve_arch(model, {**names, "fast_path": True}).fast_path is True
    with pytest.raises(ValueError, match="missing \\['base', 'lm_head'\\]"):
        resolve_arch(model, {k: v for k, v in names.items() if k not in ("base", "lm_head")})
    with pytest.raises(ValueError, match="mlp_output"):
        resolve_arch(model, {**names, "mlp_output": "x"})
    with pytest.raises(ValueError, match="has no attribute 'down'"):
        resolve_arch(model, {**names, "mlp_out": "mlp.down"})
    with pytest.raises(ValueError, match="ModuleList"):
        resolve_arch(model, {**names, "layers": "model.norm"})


def test_custom_arch_overrides_known_family() -> None:
    model = tiny_model("llama")
    arch = resolve_arch(model, {"mlp_out": "mlp.up_proj"})
    assert arch.mlp_out == "mlp.up_proj" and arch.layers == "model.layers"
    assert resolve_arch(model, ArchMap(**{**ARCH_MAPS["llama"].__dict__, "fast_path": False})).fast_path is False


def test_check_layer() -> None:
    model = tiny_model("llama")
    arch = resolve_arch(model)
    assert check_layer(model, arch, 0) == 0
    assert check_layer(model, arch, -1) == 3
    assert check_layer(model, arch, -4) == 0
    for bad in (4, 17, -5):
        with pytest.raises(ValueError, match=f"layer {bad} is out of range: the model has 4 decoder layers"):
            check_layer(model, arch, bad)
    for bad in (True, 1.0, "2"):
        with pytest.raises(ValueError, match="integer"):
            check_layer(model, arch, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_linear_delta_matches_a_changed_weight(family: str) -> None:
    """linear_delta(x, Δ, transposed) is exactly the output change of the projection when its
    weight becomes W + Δ — for GPT-2's Conv1D ([in, out]) and for nn.Linear ([out, in])."""
    model = tiny_model(family)
    arch = resolve_arch(model)
    module = get_module(decoder_layers(model, arch)[1], arch.mlp_out)
    torch.manual_seed(1)
    d_in = module.weight.shape[0] if arch.mlp_out_transposed else module.weight.shape[1]
    x = torch.randn(2, 5, d_in)
    delta = torch.randn_like(module.weight) * 0.1
    with torch.no_grad():
        before = module(x)
        module.weight += delta
        after = module(x)
        module.weight -= delta
    expected = linear_delta(x, delta, arch.mlp_out_transposed)
    assert expected.shape == before.shape
    torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=1e-4)
    if family == "gpt2":  # Conv1D's weight is [in, out]: the Linear convention would be wrong
        assert arch.mlp_out_transposed
        with pytest.raises(RuntimeError):
            linear_delta(x, delta, False)


# --------------------------------------------------------------------------- hooks


def test_trace_dict_captures_layer_outputs(tiny_lm: nn.Module) -> None:
    arch = resolve_arch(tiny_lm)
    names = [f"{arch.layers}.{i}" for i in range(4)]
    # transformers installs its own (permanent) output-capturing hooks on the first call asking
    # for hidden states: count ours relative to that
    tiny_lm(input_ids=IDS, output_hidden_states=True)
    baseline = hook_count(tiny_lm)
    with TraceDict(tiny_lm, names, detach=True) as traces:
        out = tiny_lm(input_ids=IDS, output_hidden_states=True)
        assert hook_count(tiny_lm) == baseline + 4
    assert hook_count(tiny_lm) == baseline
    # hidden_states[i + 1] is layer i's output (the last entry is after the final norm in most models)
    for i in range(3):
        torch.testing.assert_close(traces[names[i]].output, out.hidden_states[i + 1])
    assert traces[names[3]].output.shape == (1, IDS.shape[1], tiny_lm.config.hidden_size)
    assert not traces[names[0]].output.requires_grad


def test_trace_input_and_output_edit(tiny_lm: nn.Module) -> None:
    arch = resolve_arch(tiny_lm)
    layer = decoder_layers(tiny_lm, arch)[2]
    clean = tiny_lm(input_ids=IDS).logits
    with Trace(layer, retain_input=True) as t:
        tiny_lm(input_ids=IDS)
    with Trace(decoder_layers(tiny_lm, arch)[1]) as below:
        tiny_lm(input_ids=IDS)
    torch.testing.assert_close(t.input, below.output)  # layer 2 reads what layer 1 wrote

    def zero(output, module):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    with Trace(layer, edit_output=zero):
        edited = tiny_lm(input_ids=IDS).logits
    assert not torch.allclose(edited, clean)
    torch.testing.assert_close(tiny_lm(input_ids=IDS).logits, clean)  # the edit ended with the block
    assert hook_count(tiny_lm) == 0


def test_no_hook_left_when_forward_raises(tiny_lm: nn.Module) -> None:
    arch = resolve_arch(tiny_lm)
    names = [f"{arch.layers}.{i}" for i in range(4)] + [arch.final_norm]

    def boom(output, module):
        raise RuntimeError("boom in hook")

    with pytest.raises(RuntimeError, match="boom in hook"):
        with TraceDict(tiny_lm, names, edit_output=boom):
            tiny_lm(input_ids=IDS)
    assert hook_count(tiny_lm) == 0

    with pytest.raises(IndexError):
        with Trace(decoder_layers(tiny_lm, arch)[0], retain_input=True):
            tiny_lm(input_ids=torch.tensor([[10 ** 6]]))  # not a token id: the forward itself fails
    assert hook_count(tiny_lm) == 0

    # a bad name half-way through registration leaves nothing behind either
    with pytest.raises(ValueError, match="no attribute"):
        with TraceDict(tiny_lm, names[:2] + ["model.nonexistent"]):
            pass
    assert hook_count(tiny_lm) == 0


# --------------------------------------------------------------------------- localisation


def _mean_states_alone(model: nn.Module, ids: list[int], select: slice) -> list[torch.Tensor]:
    """Per layer, the mean output over the ``select`` positions of one unpadded sequence."""
    arch = resolve_arch(model)
    names = [f"{arch.layers}.{i}" for i in range(num_layers(model, arch))]
    with torch.no_grad(), TraceDict(model, names, detach=True) as traces:
        model(input_ids=torch.tensor([ids]))
    return [traces[n].output[0, select].mean(0) for n in names]


@pytest.fixture
def uneven() -> EditInstance:
    """One response far longer than the other, so the batch carries many pads."""
    return EditInstance(
        prompt="Tell me how to pick a lock.",
        safe="No.",
        unsafe="Sure! Take a tension wrench and a pick, insert the wrench, rake the pins one by one "
               "until each sets, keep steady pressure and turn the plug when the last pin clicks.",
        knowledge_prompt="Name a primary colour.",
        knowledge_answer="Blue.",
    )


def test_locate_profile_ignores_pads(tiny_lm: nn.Module, tokenizer, uneven: EditInstance) -> None:
    found = editkit.locate(tiny_lm, tokenizer, uneven)
    assert len(found.profile) == 4 and found.mode == "mean"
    assert found.layer == max(range(4), key=lambda i: found.profile[i])
    safe = _mean_states_alone(tiny_lm, target_ids(tokenizer, uneven.safe, "none"), slice(None))
    unsafe = _mean_states_alone(tiny_lm, target_ids(tokenizer, uneven.unsafe, "none"), slice(None))
    alone = [float(torch.linalg.norm(a - b)) for a, b in zip(safe, unsafe)]
    assert found.profile == pytest.approx(alone, abs=1e-4)
    assert hook_count(tiny_lm) == 0


def test_locate_with_prompt_context_counts_response_tokens_only(tiny_lm: nn.Module, tokenizer,
                                                                uneven: EditInstance) -> None:
    found = editkit.locate(tiny_lm, tokenizer, uneven, context="prompt")
    means = []
    for response in (uneven.safe, uneven.unsafe):
        batch = encode_pairs(tokenizer, [(uneven.prompt, response)])
        start = int(batch.target_mask[0].nonzero()[0])
        means.append(_mean_states_alone(tiny_lm, batch.input_ids[0].tolist(), slice(start, None)))
    alone = [float(torch.linalg.norm(a - b)) for a, b in zip(*means)]
    assert found.profile == pytest.approx(alone, abs=1e-4)
    assert found.context == "prompt"


def test_locate_reference_mode_and_errors(tiny_lm: nn.Module, tokenizer, uneven: EditInstance) -> None:
    ref = editkit.locate(tiny_lm, tokenizer, uneven, mode="reference")
    assert ref.mode == "reference" and len(ref.profile) == 4
    assert all(torch.isfinite(torch.tensor(ref.profile)))
    assert ref.layer == max(range(4), key=lambda i: ref.profile[i])
    with pytest.raises(ValueError, match="locate mode"):
        editkit.locate(tiny_lm, tokenizer, uneven, mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="locate context"):
        editkit.locate(tiny_lm, tokenizer, uneven, context="both")  # type: ignore[arg-type]
    assert hook_count(tiny_lm) == 0


def test_locate_is_deterministic_in_train_mode(tokenizer, uneven: EditInstance) -> None:
    """Localisation reads the frozen model: a model left in train mode (dropout on) gives the same
    profile, and stays in train mode."""
    model = tiny_model("gpt2")  # GPT-2 configs carry dropout 0.1
    expected = editkit.locate(model, tokenizer, uneven).profile
    model.train()
    assert editkit.locate(model, tokenizer, uneven).profile == pytest.approx(expected, abs=1e-6)
    assert model.training


def test_localization_plot(tmp_path, tokenizer, uneven: EditInstance) -> None:
    pytest.importorskip("matplotlib")
    found = editkit.locate(tiny_model("llama"), tokenizer, uneven)
    found.plot(tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 1000
    assert found.to_dict()["profile"] == found.profile


def test_scaled_localisation_divides_by_the_state_norm(tiny_lm: nn.Module, tokenizer, uneven: EditInstance) -> None:
    """mode='scaled' = the mean-mode distance / the mean norm of the two mean states, per layer (by hand)."""
    raw = editkit.locate(tiny_lm, tokenizer, uneven)
    scaled = editkit.locate(tiny_lm, tokenizer, uneven, mode="scaled")
    arch = resolve_arch(tiny_lm)
    names = [f"{arch.layers}.{i}" for i in range(4)]
    norms = []
    for text in (uneven.safe, uneven.unsafe):
        ids = torch.tensor([target_ids(tokenizer, text, "none")])
        with TraceDict(tiny_lm, names, retain_output=True, detach=True) as traces:
            tiny_lm(input_ids=ids)
        norms.append([float(traces[n].output.float()[0].mean(0).norm()) for n in names])
    want = [d / ((a + b) / 2) for d, a, b in zip(raw.profile, *norms)]
    assert scaled.profile == pytest.approx(want, rel=1e-4)
    assert scaled.layer == max(range(4), key=lambda i: want[i]) and scaled.mode == "scaled"
