"""Big models: a model dispatched by accelerate with part of it offloaded (here to disk, on CPU) is
located, edited and patched like any other; the delta lives on the device where its weight runs."""
from __future__ import annotations

import pytest
import torch

import editkit
from editkit.devices import is_offloaded, real_values
from editkit.hooks import hook_count
from editkit.models import tiny_model

accelerate = pytest.importorskip("accelerate")

OFFLOADED = ("model.layers.2", "model.layers.3")


def _dispatched(seed: int, folder) -> torch.nn.Module:
    model = tiny_model("llama", seed=seed)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(folder))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(5, 40)[None]).logits


@pytest.mark.parametrize("layer", [3, 1])  # an offloaded layer, and a layer kept in memory
def test_offloaded_model_is_edited_and_patched_like_a_plain_one(layer, tokenizer, instance, tmp_path) -> None:
    plain = tiny_model("llama", seed=5)
    offloaded = _dispatched(5, tmp_path / "offload")
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    assert is_offloaded(offloaded.get_submodule(f"model.layers.{layer}.mlp.down_proj")) == (layer == 3)
    assert dict(offloaded.named_parameters())[name].is_meta == (layer == 3)
    before = _logits(offloaded)
    assert torch.allclose(before, _logits(plain), atol=1e-5)
    hooks = hook_count(offloaded)
    settings = {"lr": 1e-2, "steps": 3, "c_edit": 1.0}

    located = editkit.locate(offloaded, tokenizer, instance)
    assert located.profile == pytest.approx(editkit.locate(plain, tokenizer, instance).profile, abs=1e-4)

    want = editkit.edit(plain, instance, tokenizer=tokenizer, hparams=settings, layer=layer)
    got = editkit.edit(offloaded, instance, tokenizer=tokenizer, hparams=settings, layer=layer)
    assert list(got.patch.deltas) == [name]
    assert torch.allclose(got.patch.deltas[name], want.patch.deltas[name], atol=1e-5)
    assert [r["loss"] for r in got.losses] == pytest.approx([r["loss"] for r in want.losses], rel=1e-4)
    assert torch.equal(_logits(offloaded), before)  # the edit left the model as it was
    assert hook_count(offloaded) == hooks

    with want.patch.applied(plain):
        edited = _logits(plain)
    with got.patch.applied(offloaded):
        assert torch.allclose(_logits(offloaded), edited, atol=1e-5)
    assert torch.equal(_logits(offloaded), before) and hook_count(offloaded) == hooks

    got.patch.save(tmp_path / "patch")
    loaded = editkit.load_patch(tmp_path / "patch")
    stored = real_values(offloaded, name).clone()
    loaded.apply(offloaded)  # permanent
    assert torch.allclose(_logits(offloaded), edited, atol=1e-5)
    if layer == 3:  # the weight on disk is untouched: its module's hook adds the delta
        assert torch.equal(real_values(offloaded, name), stored)
    else:
        with pytest.raises(editkit.patch.PatchError, match="already applied"):
            loaded.apply(offloaded)


def test_patch_for_another_model_is_refused_when_offloaded(tokenizer, instance, tmp_path) -> None:
    other = tiny_model("llama", seed=6)
    name = "model.layers.3.mlp.down_proj.weight"
    patch = editkit.Patch.from_deltas(other, {name: torch.full((32, 64), 1e-2)})
    offloaded = _dispatched(5, tmp_path)
    with pytest.raises(editkit.patch.PatchError, match="differ from the base"):
        patch.apply(offloaded)
