"""Patch (apply, apply temporarily, save, load, refuse) and full checkpoints."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import editkit
from editkit.hooks import hook_count
from editkit.models import tiny_model
from editkit.patch import DELTA_FILE, META_FILE, Patch, PatchError, fingerprint, fingerprint_matches, load_patch
from helpers import PATCH_TARGET as TARGET, make_patch, patch_logits as logits

class _Marker:
    """Unpickling it would create a file: proof that nothing unpickles what it finds."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------- applying


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_apply_changes_exactly_the_target_by_delta(family: str, snapshot) -> None:
    model = tiny_model(family)
    patch = make_patch(model, family)
    snap = snapshot(model)
    clean = logits(model)
    assert patch.apply(model) is model
    name = TARGET[family]
    assert snap.changed(model) == [name]
    torch.testing.assert_close(model.state_dict()[name], snap.state[name] + patch.deltas[name], rtol=0, atol=0)
    assert not torch.allclose(logits(model), clean)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_applied_restores_bit_exactly(family: str, snapshot) -> None:
    model = tiny_model(family)
    patch = make_patch(model, family)
    snap = snapshot(model)
    clean = logits(model)
    with patch.applied(model) as inside:
        assert inside is model
        assert snap.changed(model) == [TARGET[family]]
        edited = logits(model)
    snap.assert_same(model)
    assert torch.equal(logits(model), clean)
    patch.apply(model)
    torch.testing.assert_close(logits(model), edited, rtol=0, atol=0)


def test_applied_restores_when_the_block_raises(snapshot) -> None:
    model = tiny_model("llama")
    patch = make_patch(model)
    snap = snapshot(model)
    with pytest.raises(KeyError):
        with patch.applied(model):
            assert snap.changed(model)
            raise KeyError("inside")
    snap.assert_same(model)
    assert hook_count(model) == 0


def test_applied_in_half_precision_restores_bit_exactly(snapshot) -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    patch = make_patch(model)
    snap = snapshot(model)
    with patch.applied(model):
        assert snap.changed(model) == [TARGET["llama"]]
    snap.assert_same(model)


def test_refuses_a_different_base_model(snapshot) -> None:
    base = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=1)
    patch = make_patch(base)
    snap = snapshot(other)
    with pytest.raises(PatchError, match="differ from the base"):
        patch.apply(other)
    with pytest.raises(PatchError):
        with patch.applied(other):
            pass
    snap.assert_same(other)
    patch.apply(other, strict=False)  # the user may insist
    assert snap.changed(other) == [TARGET["llama"]]


def test_refuses_an_already_applied_patch(snapshot) -> None:
    model = tiny_model("llama")
    patch = make_patch(model)
    patch.apply(model)
    snap = snapshot(model)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(model)
    with pytest.raises(PatchError, match="already applied"):
        with patch.applied(model):
            pass
    snap.assert_same(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fingerprint_is_dtype_tolerant_but_tells_models_apart(family: str) -> None:
    a, b = tiny_model(family, seed=0), tiny_model(family, seed=1)
    w = dict(a.named_parameters())[TARGET[family]]
    recorded = fingerprint(w)
    json.dumps(recorded)  # stored in patch.json
    for same in (w, w.half(), w.bfloat16(), w.half().bfloat16(), w.double()):
        assert fingerprint_matches(same, recorded)
    assert not fingerprint_matches(dict(b.named_parameters())[TARGET[family]], recorded)
    assert not fingerprint_matches(w * 1.05, recorded)
    assert not fingerprint_matches(w.reshape(-1)[:-1], recorded)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_made_in_fp32_applies_to_a_half_precision_copy(dtype: torch.dtype, snapshot) -> None:
    patch = make_patch(tiny_model("llama"))
    half = tiny_model("llama").to(dtype)
    patch.apply(half)
    snap = snapshot(half)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(half)
    snap.assert_same(half)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_delta_refused_at_construction(bad: float) -> None:
    model = tiny_model("llama")
    delta = torch.zeros_like(dict(model.named_parameters())[TARGET["llama"]])
    delta[3, 5] = bad
    with pytest.raises(PatchError, match="NaN or inf"):
        Patch(deltas={TARGET["llama"]: delta})
    with pytest.raises(PatchError, match="NaN or inf"):
        Patch.from_deltas(model, {TARGET["llama"]: delta})


def test_shape_mismatch_and_unknown_names_refused(snapshot) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    wrong = Patch(deltas={TARGET["llama"]: torch.zeros(3, 3)})
    with pytest.raises(PatchError, match="shape"):
        wrong.apply(model)
    nowhere = Patch(deltas={"model.layers.9.mlp.down_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(PatchError, match="no parameter"):
        nowhere.apply(model)
    with pytest.raises(PatchError, match="no parameter"):
        Patch.from_deltas(model, {"nope.weight": torch.zeros(1)})
    with pytest.raises(PatchError):
        Patch(deltas={})
    # a two-weight patch with one bad weight changes neither
    good = make_patch(model).deltas[TARGET["llama"]]
    mixed = Patch(deltas={TARGET["llama"]: good, "model.layers.2.mlp.down_proj.weight": torch.zeros(2)})
    with pytest.raises(PatchError, match="shape"):
        mixed.apply(model)
    snap.assert_same(model)


# --------------------------------------------------------------------------- saving and loading


def test_save_load_apply_round_trip(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    patch = make_patch(model, "gpt2")
    folder = patch.save(tmp_path / "patch")
    assert sorted(os.listdir(folder)) == sorted([DELTA_FILE, META_FILE])
    assert sorted(os.listdir(tmp_path)) == ["patch"]  # no temp folders left behind
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["format"] == "editkit-patch" and meta["layer"] == 1 and meta["method"] == "test"
    assert meta["parameters"] == {TARGET["gpt2"]: list(patch.deltas[TARGET["gpt2"]].shape)}
    assert meta["base_fingerprint"] == patch.base_fingerprint
    assert meta["hparams"] == {"lr": 1e-3} and meta["metrics"] == {"edit_nll_after": 1.5}

    loaded = load_patch(folder)
    assert torch.equal(loaded.deltas[TARGET["gpt2"]], patch.deltas[TARGET["gpt2"]])
    assert (loaded.layer, loaded.method, loaded.created) == (1, "test", patch.created)
    fresh = tiny_model("gpt2")  # another copy of the same base
    with patch.applied(model):
        expected = logits(model)
    loaded.apply(fresh)
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)


def test_edit_result_patch_round_trip(tmp_path: Path, tokenizer, instance) -> None:
    model = tiny_model("llama")
    result = editkit.edit(model, instance, tokenizer=tokenizer, hparams={"steps": 2, "lr": 1e-2})
    result.patch.save(tmp_path / "p")
    with result.applied(model):
        expected = logits(model)
    fresh = tiny_model("llama")
    editkit.load_patch(tmp_path / "p").apply(fresh)
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)
    with pytest.raises(PatchError):
        editkit.load_patch(tmp_path / "p").apply(tiny_model("llama", seed=3))


def test_save_refuses_existing_folder_unless_overwrite(tmp_path: Path) -> None:
    model = tiny_model("llama")
    first, second = make_patch(model, seed=1), make_patch(model, seed=2)
    target = tmp_path / "p"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        first.save(target)
    assert os.listdir(target) == ["notes.txt"]
    first.save(target, overwrite=True)
    assert sorted(os.listdir(target)) == sorted([DELTA_FILE, META_FILE])
    with pytest.raises(FileExistsError):
        second.save(target)
    assert torch.equal(load_patch(target).deltas[TARGET["llama"]], first.deltas[TARGET["llama"]])
    second.save(target, overwrite=True)
    assert torch.equal(load_patch(target).deltas[TARGET["llama"]], second.deltas[TARGET["llama"]])
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_load_reads_safetensors_only(tmp_path: Path) -> None:
    model = tiny_model("llama")
    folder = make_patch(model).save(tmp_path / "p")
    marker = tmp_path / "unpickled"
    # a pickle beside the patch is never read
    (folder / "delta.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    assert TARGET["llama"] in load_patch(folder).deltas
    # a pickle in place of the safetensors file is refused, not unpickled
    (folder / DELTA_FILE).write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(Exception):
        load_patch(folder)
    # a folder holding only a pickled delta is not a patch
    (folder / DELTA_FILE).unlink()
    with pytest.raises(PatchError, match=DELTA_FILE):
        load_patch(folder)
    assert not marker.exists()


def test_load_refuses_tampered_patches(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_model("llama")
    folder = make_patch(model).save(tmp_path / "p")
    with pytest.raises(PatchError, match="not an editkit patch"):
        load_patch(tmp_path)
    meta = json.loads((folder / META_FILE).read_text())
    # NaN smuggled into the file
    bad = torch.zeros(meta["parameters"][TARGET["llama"]])
    bad[0, 0] = float("nan")
    save_file({TARGET["llama"]: bad}, str(folder / DELTA_FILE))
    with pytest.raises(PatchError, match="NaN"):
        load_patch(folder)
    # metadata naming other weights than the file holds
    save_file({"other.weight": torch.zeros(2)}, str(folder / DELTA_FILE))
    with pytest.raises(PatchError, match="different parameters"):
        load_patch(folder)
    # a future format
    (folder / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(PatchError, match="unsupported"):
        load_patch(folder)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoint_reloads_with_the_patch_applied(family: str, tmp_path: Path, tokenizer, snapshot) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model(family)
    patch = make_patch(model, family)
    snap = snapshot(model)
    path = editkit.save_checkpoint(model, tokenizer, tmp_path / "ckpt", patch=patch)
    snap.assert_same(model)  # saving with a patch leaves the model as it was
    files = set(os.listdir(path))
    assert {"config.json", "editkit.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert json.loads((path / "editkit.json").read_text())["parameters"] == {
        TARGET[family]: list(patch.deltas[TARGET[family]].shape)}

    reloaded = AutoModelForCausalLM.from_pretrained(path)
    with patch.applied(model):
        expected = logits(model)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(path).encode("hello") == tokenizer.encode("hello")
    # the reloaded checkpoint is the patched base: the patch refuses it as already applied
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(reloaded)


def test_checkpoint_without_patch_and_load_checkpoint(tmp_path: Path, tokenizer) -> None:
    model = tiny_model("llama")
    editkit.save_checkpoint(model, tokenizer, tmp_path / "plain")
    assert not (tmp_path / "plain" / "editkit.json").exists()
    again, tok = editkit.load_checkpoint(tmp_path / "plain", device="cpu")
    torch.testing.assert_close(logits(again), logits(model), atol=1e-6, rtol=0)
    assert tok.pad_token is not None


def test_checkpoint_refuses_existing_path_unless_overwrite(tmp_path: Path, tokenizer) -> None:
    model = tiny_model("llama")
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "old.txt").write_text("old contents")
    with pytest.raises(FileExistsError, match="overwrite"):
        editkit.save_checkpoint(model, tokenizer, path)
    assert os.listdir(path) == ["old.txt"]

    editkit.save_checkpoint(model, tokenizer, path, patch=make_patch(model), overwrite=True)
    files = set(os.listdir(path))
    assert "old.txt" not in files  # replaced, not merged
    assert {"config.json", "editkit.json", "tokenizer_config.json"} <= files
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp or old folders left


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path: Path, tokenizer, monkeypatch) -> None:
    model = tiny_model("llama")
    path = editkit.save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)  # fails after the model was written
    with pytest.raises(OSError, match="disk full"):
        editkit.save_checkpoint(model, tokenizer, path, patch=make_patch(model), overwrite=True)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_saved_folders_are_readable_like_any_other(tmp_path: Path) -> None:
    """An atomic write goes through a private temp folder; the result gets the modes a plain mkdir
    and open would give under the umask, not owner-only ones."""
    import os
    import stat

    from editkit.patch import atomic_write_dir

    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "a.bin").write_bytes(b"x")
        os.chmod(folder / "sub" / "a.bin", 0o600)

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "f").write_bytes(b"x")
    atomic_write_dir(tmp_path / "out", write)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == mode(tmp_path / "plain")
    assert mode(tmp_path / "out" / "sub" / "a.bin") == mode(tmp_path / "plain" / "f")

