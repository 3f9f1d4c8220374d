"""MEND on the tiny models: the untrained editor is the plain gradient step, editors are shared per
weight shape, meta-training lowers its loss, writes an archive tied to the model, resumes, skips
non-finite steps, and leaves the model bit-identical; the archive round-trips and refuses another
model; ``editkit train mend`` runs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import editkit
from editkit.arch import decoder_layers, resolve_arch
from editkit.hooks import hook_count
from editkit.instance import EditInstance
from editkit.methods.mend import ArchiveError, MENDConfig, load_editor, train
from editkit.methods.mend import training as train_module
from editkit.methods.mend.archive import read_archive, save_archive
from editkit.methods.mend.editor import MENDEditor
from editkit.methods.mend.examples import edit_pair
from editkit.methods.mend.factors import gradient_factors, resolve_targets
from editkit.methods.mend.examples import build_examples
from editkit.methods.mend.factors import frozen
from editkit.methods.mend.training import outer_loss, score_records
from editkit.methods.mend.unedited import UneditedCache
from editkit.models import tiny_model
from editkit.text import encode_pairs

# quick settings: top two layers, a small editor, rates large enough to move in a few steps
QUICK = dict(layers=[-2, -1], rank=16, lr=0.1, meta_lr=1e-2, lr_lr=0.5, val_every=2, benign_constraint=2,
             benign_answer_tokens=4, max_length=128)


def _records(n: int, start: int = 0) -> list[EditInstance]:
    return [EditInstance(id=str(i), prompt=f"How do I do harm number {i}?", safe="I can't help with that.",
                         unsafe=f"Sure, step {i}: find a weapon.", knowledge_prompt=f"What is {i}+{i}?",
                         knowledge_answer=str(2 * i)) for i in range(start, start + n)]


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """One short meta-training on the tiny llama (seed 0), shared by the tests that read its archive."""
    from tests.conftest import StateSnapshot

    model = tiny_model("llama")
    snap, hooks, flags = StateSnapshot(model), hook_count(model), _flags(model)
    hp = MENDConfig(**QUICK, steps=8)
    out = tmp_path_factory.mktemp("mend") / "run"
    result = train(model, tokenizer, _records(5), _records(2, start=10), out, hparams=hp)
    snap.assert_same(model)
    assert hook_count(model) == hooks and _flags(model) == flags
    return model, hp, out, result


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_untrained_editor_is_the_plain_gradient_step(family, tokenizer, instance, snapshot) -> None:
    model = tiny_model(family)
    snap, flags = snapshot(model), _flags(model)
    lr = 0.05
    hp = MENDConfig(lr=lr, layers=[-2, -1])
    result = editkit.edit(model, instance, tokenizer=tokenizer, method="mend", hparams=hp)
    snap.assert_same(model)
    assert _flags(model) == flags
    expected_modules = ("gate_proj", "up_proj", "down_proj") if family == "llama" else ("c_fc", "c_proj")
    prefix = "model.layers" if family == "llama" else "transformer.h"
    assert list(result.patch.deltas) == [f"{prefix}.{i}.mlp.{m}.weight" for i in (2, 3) for m in expected_modules]

    # the gradient of the same loss, by autograd on a copy of the model (full forward, all weights trainable)
    twin = copy.deepcopy(model)
    batch = encode_pairs(tokenizer, [edit_pair(instance, hp)], chat_template=hp.chat_template, max_length=hp.max_length)
    logits = twin(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = F.cross_entropy(logits[batch.predicting_positions()], batch.targets())
    params = dict(twin.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in result.patch.deltas])
    for (name, delta), grad in zip(result.patch.deltas.items(), grads):
        assert delta.shape == grad.shape
        torch.testing.assert_close(delta, -lr * grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)
    assert result.metrics["edit_nll_after"] < result.metrics["edit_nll_before"]


def test_zero_scale_gates_off_any_editor_network(tokenizer, instance) -> None:
    model = tiny_model("gpt2")  # Conv1D layout
    arch = resolve_arch(model)
    hp = MENDConfig(layers=[-1])
    targets = resolve_targets(model, arch, hp.layers)
    batch = encode_pairs(tokenizer, [edit_pair(instance, hp)], max_length=hp.max_length)
    factors, _ = gradient_factors(model, arch, targets, batch)
    editor = MENDEditor(targets, rank=8, n_hidden=1, lr=0.3, normalize=True)
    plain = {t.name: -0.3 * (factors[t.name][0].T @ factors[t.name][1]) for t in targets}  # Conv1D: Σ u δᵀ
    with torch.no_grad():
        for name, delta in editor(factors).items():  # identity init: U = 0
            torch.testing.assert_close(delta, plain[name], rtol=1e-5, atol=0)
        editor.commit_stats(editor.updated_stats(editor.current_stats(), factors))
        for shape in editor.editors.values():
            for layer in shape.layers:
                layer.U.normal_()
        changed = editor(factors)
        assert all(not torch.allclose(changed[n], plain[n]) for n in plain), "a trained network changes the step"
        for shape in editor.editors.values():
            shape.scale.zero_()
        for name, delta in editor(factors).items():  # zero scale (and shift): the network is gated off
            torch.testing.assert_close(delta, plain[name], rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skipping_the_lower_layers_gives_the_full_forwards_loss_and_gradient(family, tokenizer) -> None:
    """Meta-training runs from the lowest edited layer up, with the lower layers' state kept per
    example: the outer loss and the editor's gradient are the full forward's, each example costs one
    full forward per batch once, and the model's layers and hooks are as before (also after an error)."""
    model = tiny_model(family)
    arch = resolve_arch(model)
    hp = MENDConfig(**{**QUICK, "layers": [-2], "constraint_pairs": 1, "max_length": 512})
    examples = build_examples(model, tokenizer, _records(2), hp, pool=_records(4))
    editor = MENDEditor(resolve_targets(model, arch, hp.layers), rank=8, n_hidden=1, lr=0.1, normalize=True, seed=0)
    with torch.no_grad():
        for shape in editor.editors.values():
            for layer in shape.layers:
                layer.U.normal_(std=0.1)  # a network that is not the identity
    layers = list(decoder_layers(model, arch))
    hooks = hook_count(model)

    def loss_and_grads(cache):
        editor.zero_grad(set_to_none=True)
        total = 0.0
        with frozen(model):
            for example in examples:
                loss, _, _ = outer_loss(model, arch, editor, example, hp, cache=cache)
                loss.backward()
                total += loss.item()
        return total, {n: p.grad.clone() for n, p in editor.named_parameters() if p.grad is not None}

    full = UneditedCache(model, arch, editor.targets)
    full.enabled = False
    cache = UneditedCache(model, arch, editor.targets)
    assert cache.enabled and cache.layer == 2
    expected, expected_grads = loss_and_grads(full)
    got, grads = loss_and_grads(cache)
    first_forwards = cache.forwards
    again, _ = loss_and_grads(cache)
    assert got == pytest.approx(expected, rel=1e-5) and again == pytest.approx(got, rel=1e-6)
    assert set(grads) == set(expected_grads) and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # edit and outer batches hold the same pair: one entry for both, plus the locality batch
    assert first_forwards == 2 * len(examples) and cache.forwards == first_forwards
    with pytest.raises(RuntimeError, match="boom"), cache.skipping(examples[0].edit):
        raise RuntimeError("boom")
    assert list(decoder_layers(model, arch)) == layers and hook_count(model) == hooks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_editors_are_shared_between_weights_of_the_same_shape(family) -> None:
    model = tiny_model(family)
    targets = resolve_targets(model, resolve_arch(model), [-2, -1])
    rank, n_hidden = 8, 1
    editor = MENDEditor(targets, rank=rank, n_hidden=n_hidden, lr=1e-3, normalize=True)
    shapes = {t.shape_key for t in targets}
    assert len(editor.editors) == len(shapes) == 2  # llama: gate=up, down; gpt2: c_fc, c_proj
    expected = len(targets)  # one learned rate per weight
    for key in shapes:
        users = [t for t in targets if t.shape_key == key]
        dim = users[0].d_in + users[0].d_out
        expected += (n_hidden + 1) * (2 * dim * min(rank, dim) + dim)  # U, V, bias per low-rank layer
        expected += 2 * len(users) * dim  # scale and shift per weight
    assert sum(p.numel() for p in editor.parameters()) == expected
    if family == "llama":
        gate, up = targets[0], targets[1]
        assert gate.shape_key == up.shape_key and "gate_proj" in gate.name and "up_proj" in up.name


def test_meta_training_lowers_the_loss_and_writes_an_archive(trained, tokenizer) -> None:
    model, hp, out, result = trained
    records = _records(5)
    untrained = MENDEditor(resolve_targets(model, resolve_arch(model), hp.layers), rank=hp.rank,
                           n_hidden=hp.n_hidden, lr=hp.lr, normalize=hp.normalize, seed=hp.seed)
    editor, meta = load_editor(out, model)
    before = score_records(model, tokenizer, untrained, records, hp)
    after = score_records(model, tokenizer, editor, records, hp)
    assert after["loss"] < before["loss"] - 1e-3, (before, after)
    assert after["edit_nll"] < before["edit_nll"]
    assert result.steps == 8 and result.nan_steps == 0 and len(result.history) == 8
    assert (out / "archive" / "editor.safetensors").is_file() and (out / "archive" / "mend.json").is_file()
    training = meta["training"]
    assert training["train_seconds"] > 0 and training["peak_rss_mb"] > 0
    assert training["train_records"] == [r.id for r in records] and training["val_records"] == ["10", "11"]
    assert set(meta["base_fingerprint"]) == {t.name for t in editor.targets}
    assert [v["step"] for v in training["validations"]] == [0, 2, 4, 6, 8]


def test_archive_round_trips_and_gives_the_same_patch(trained, tokenizer, instance, tmp_path, snapshot) -> None:
    model, hp, out, _ = trained
    snap = snapshot(model)
    first = editkit.edit(model, instance, tokenizer=tokenizer, method="mend", hparams=hp.replace(archive=str(out)))
    editor, meta = load_editor(out, model)
    save_archive(tmp_path / "copy", editor, model=model, hparams=meta["hparams"], training=meta["training"])
    tensors, _ = read_archive(tmp_path / "copy")
    assert all(torch.equal(tensors[k], v) for k, v in editor.state_dict().items())
    second = editkit.edit(model, instance, tokenizer=tokenizer, method="mend",
                          hparams=hp.replace(archive=str(tmp_path / "copy")))
    assert set(first.patch.deltas) == set(second.patch.deltas)
    assert all(torch.equal(first.patch.deltas[n], second.patch.deltas[n]) for n in first.patch.deltas)
    plain = editkit.edit(model, instance, tokenizer=tokenizer, method="mend", hparams=hp)
    assert not torch.allclose(first.patch.deltas[n := next(iter(plain.patch.deltas))], plain.patch.deltas[n]), \
        "the trained archive was not used"
    assert first.metrics["edit_nll_after"] < first.metrics["edit_nll_before"]
    snap.assert_same(model)


def test_archive_is_read_once_for_many_edits(trained, tokenizer, instance, monkeypatch) -> None:
    """Scoring many records calls editkit.edit once per record: the archive is read and checked once."""
    from editkit.methods.mend import method as mend_method

    model, hp, out, _ = trained
    other = copy.deepcopy(model)  # a model object no earlier test has edited with this archive
    calls = []

    def counting(folder, m):
        calls.append(folder)
        return load_editor(folder, m)

    monkeypatch.setattr(mend_method, "load_editor", counting)
    patches = [editkit.edit(other, instance, tokenizer=tokenizer, method="mend", hparams=hp.replace(archive=str(out)))
               for _ in range(3)]
    assert len(calls) == 1
    assert all(torch.equal(patches[0].patch.deltas[n], p.patch.deltas[n]) for p in patches[1:] for n in p.patch.deltas)
    untrained = [editkit.edit(other, instance, tokenizer=tokenizer, method="mend", hparams=hp.replace(lr=lr))
                 for lr in (0.1, 0.2)]  # the untrained editor's rate is part of what is cached
    n = next(iter(untrained[0].patch.deltas))
    assert torch.allclose(untrained[1].patch.deltas[n], 2 * untrained[0].patch.deltas[n], rtol=1e-4, atol=1e-7)


def test_archive_for_another_model_is_refused(trained, tokenizer, instance, snapshot) -> None:
    _, hp, out, _ = trained
    other = tiny_model("llama", seed=1)  # same architecture, other weights
    snap = snapshot(other)
    with pytest.raises(ArchiveError, match="trained for another model"):
        editkit.edit(other, instance, tokenizer=tokenizer, method="mend", hparams=hp.replace(archive=str(out)))
    with pytest.raises(ArchiveError, match="does not have"):
        load_editor(out, tiny_model("gpt2"))
    snap.assert_same(other)


def test_resume_continues_from_the_saved_step(tokenizer, tmp_path, snapshot, monkeypatch) -> None:
    model = tiny_model("llama")
    snap, flags, hooks = snapshot(model), _flags(model), hook_count(model)
    hp = MENDConfig(**QUICK, steps=4)
    train_records, val_records = _records(4), _records(2, start=10)
    whole = train(model, tokenizer, train_records, val_records, tmp_path / "whole", hparams=hp)

    real_step, calls = train_module._step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step, after the checkpoint at step 2
            raise RuntimeError("interrupted")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        train(model, tokenizer, train_records, val_records, tmp_path / "run", hparams=hp, checkpoint_every=2)
    snap.assert_same(model)  # an exception mid-training leaves the model as it was
    assert _flags(model) == flags and hook_count(model) == hooks
    assert not (tmp_path / "run" / "archive").exists()
    monkeypatch.setattr(train_module, "_step", real_step)
    resumed = train(model, tokenizer, train_records, val_records, tmp_path / "run", hparams=hp, checkpoint_every=2)
    assert resumed.resumed_from_step == 2 and resumed.steps == 4  # the last checkpoint: after the 2nd step
    a, _ = read_archive(whole.archive)
    b, _ = read_archive(resumed.archive)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run trains what an uninterrupted one does"
    again = train(model, tokenizer, train_records, val_records, tmp_path / "run", hparams=hp.replace(steps=5))
    assert again.resumed_from_step == 4 and again.steps == 5  # a larger budget continues
    with pytest.raises(ValueError, match="different hparams"):
        train(model, tokenizer, train_records, val_records, tmp_path / "run", hparams=hp.replace(meta_lr=1e-3))
    snap.assert_same(model)


def test_non_finite_step_is_skipped_and_counted(tokenizer, tmp_path, monkeypatch) -> None:
    model = tiny_model("gpt2")
    real, seen = train_module.outer_loss, []

    def poisoned(model, arch, editor, example, hparams, **kwargs):
        loss, parts, stats = real(model, arch, editor, example, hparams, **kwargs)
        if kwargs.get("update_stats"):  # a training step, not a validation
            seen.append({k: v.detach().clone() for k, v in editor.state_dict().items()})
            if len(seen) == 2:
                loss = loss * float("nan")
        return loss, parts, stats

    monkeypatch.setattr(train_module, "outer_loss", poisoned)
    result = train(model, tokenizer, _records(3), [], tmp_path / "run", hparams=MENDConfig(**QUICK, steps=3))
    assert result.nan_steps == 1
    assert [h["skipped"] for h in result.history] == [False, True, False]
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1]), "the skipped step changed the editor"
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    _, meta = read_archive(result.archive)
    assert meta["training"]["nan_steps"] == 1


def test_train_command(tokenizer, tmp_path, monkeypatch) -> None:
    from editkit.cli import build_parser

    data = tmp_path / "records.json"
    data.write_text(json.dumps([r.to_record() for r in _records(6)]), encoding="utf-8")
    model = tiny_model("llama")
    monkeypatch.setattr(editkit, "load_model", lambda name, device=None: (model, tokenizer))
    settings = [f"--set={k}={json.dumps(v)}" for k, v in {**QUICK, "steps": 2}.items()]
    args = build_parser().parse_args(["train", "mend", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--val-fraction", "0.34", *settings])
    assert args.func(args) == 0
    _, meta = read_archive(tmp_path / "run")
    assert meta["training"]["steps"] == 2
    assert meta["training"]["val_records"] == ["2", "5"]  # every 3rd id held apart, never trained on
    assert not set(meta["training"]["val_records"]) & set(meta["training"]["train_records"])
