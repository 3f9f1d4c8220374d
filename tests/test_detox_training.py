"""Held-out folds for the decoding-time detoxifiers and ``editkit train detoxigen | anti-expert |
calibration``: the prompts of a fold and the texts left out of training are the same records and
sentences; each command trains on a tiny model, writes an artifact its detoxifier loads, and
records what it did."""
from __future__ import annotations

import json

import pytest
import torch

import editkit
from editkit.decoding import CalibrationFusion, DetoxiGen, DExperts
from editkit.decoding.calibration_train import non_toxic_texts
from editkit.decoding.detoxigen_train import load_toxic_texts
from editkit.instance import id_ranks
from editkit.models import tiny_model
from editkit.patch import Patch
from safeedit.toxicity_prompts import PromptSet, ToxicityPrompt, fold_texts, load_prompts, parse_fold, text_key


# --------------------------------------------------------------------------- folds
def test_parse_fold() -> None:
    assert parse_fold("1/3") == (1, 3) and parse_fold((0, 2)) == (0, 2)
    for bad in ("2/2", "0/1", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="fold"):
            parse_fold(bad)


def test_id_ranks_sort_numbers_as_numbers() -> None:
    assert id_ranks(["10", "9", "b", "a", "9"]) == {"9": 0, "10": 1, "a": 2, "b": 3}


def test_prompt_folds_partition_safeedit_and_toxigen(shared_data) -> None:
    for spec in ("safeedit", "toxigen:hate", "toxigen"):
        every = load_prompts(spec, shared_data=shared_data)
        halves = [load_prompts(spec, shared_data=shared_data, fold=f"{k}/2") for k in (0, 1)]
        ids = [{p.id for p in h.prompts} for h in halves]
        assert not ids[0] & ids[1] and ids[0] | ids[1] == {p.id for p in every.prompts}
        assert abs(len(ids[0]) - len(ids[1])) <= 0.2 * len(every)
        assert "fold 1/2" in halves[1].source
    safeedit = load_prompts("safeedit", shared_data=shared_data, fold="0/2")
    ranks = id_ranks(p.id for p in load_prompts("safeedit", shared_data=shared_data).prompts)
    assert all(ranks[p.id] % 2 == 0 for p in safeedit.prompts)
    # the fold is taken before the limit: the first 3 prompts of the fold
    assert [p.id for p in load_prompts("safeedit", shared_data=shared_data, fold="0/2", limit=3).prompts] == [
        p.id for p in safeedit.prompts[:3]]
    with pytest.raises(ValueError, match="no fold"):
        PromptSet([ToxicityPrompt("a", "hello")], "file.jsonl").fold(0, 2)


def test_excluded_fold_is_never_trained_on(shared_data) -> None:
    """Every fold-0 prompt comes from a text that training with exclude_fold=0/2 leaves out, and the
    other fold's texts are all still there."""
    held = fold_texts(0, 2, shared_data)
    for texts in (load_toxic_texts(shared_data, exclude_fold="0/2"), non_toxic_texts(shared_data, exclude_fold="0/2")):
        keys = {text_key(t) for t in texts}
        assert texts and not keys & held
    toxic = {text_key(t) for t in load_toxic_texts(shared_data, exclude_fold="0/2")}
    everything = {text_key(t) for t in load_toxic_texts(shared_data)}
    assert everything - toxic and everything - toxic <= held  # only fold-0 texts went
    assert {text_key(t) for t in load_toxic_texts(shared_data, exclude_fold="1/2")} | toxic == everything
    for prompt in load_prompts("toxigen:hate", shared_data=shared_data, fold="0/2").prompts:
        assert text_key(prompt.meta["sentence"]) in held and text_key(prompt.meta["sentence"]) not in toxic
    records = load_prompts("safeedit", shared_data=shared_data, fold="0/2").prompts
    assert all(text_key(p.text) in held for p in records)


# --------------------------------------------------------------------------- the commands
@pytest.fixture
def tiny_load(monkeypatch, tokenizer):
    model = tiny_model("llama")
    monkeypatch.setattr(editkit, "load_model", lambda name, device=None: (model, tokenizer))
    return model


def _train(args: list[str]) -> int:
    from editkit.cli import build_parser

    parsed = build_parser().parse_args(["train", *args])
    return parsed.func(parsed)


def test_train_detoxigen_command(tiny_load, tokenizer, shared_data, tmp_path, snapshot) -> None:
    snap = snapshot(tiny_load)
    out = tmp_path / "detoxigen"
    common = ["--data-dir", str(shared_data), "--exclude-fold", "0/2", "--limit", "8", "--max-length", "24",
              "--batch-size", "4", "--n-virtual-tokens", "3", "--out", str(out)]
    assert _train(["detoxigen", "--steps", "3", *common]) == 0
    snap.assert_same(tiny_load)
    report = json.loads((out / "train.json").read_text())
    assert report["data"]["exclude_fold"] == "0/2" and report["data"]["texts"] == 8
    assert report["metrics"]["steps"] == 3 and len(report["train_losses"]) == 3
    detoxifier = DetoxiGen.from_options(tiny_load, tokenizer, prompt=str(out / "prompt"))
    assert detoxifier.prompt.n_virtual_tokens == 3
    first = DetoxiGen.from_options(tiny_load, tokenizer, prompt=str(out / "prompt")).prompt.embeddings
    with pytest.raises(FileExistsError, match="overwrite"):
        _train(["detoxigen", "--steps", "3", *common])
    # the same command again with --overwrite: the run folder's last checkpoint is the end, nothing is retrained
    assert _train(["detoxigen", "--steps", "3", "--overwrite", *common]) == 0
    assert json.loads((out / "train.json").read_text())["metrics"]["resumed_from_step"] == 3
    again = DetoxiGen.from_options(tiny_load, tokenizer, prompt=str(out / "prompt")).prompt.embeddings
    assert torch.equal(again, first)
    with pytest.raises(ValueError, match="different"):  # other settings never resume another run's checkpoints
        _train(["detoxigen", "--steps", "4", "--overwrite", *common])


def test_train_anti_expert_and_calibration_commands(tiny_load, tokenizer, shared_data, tmp_path, snapshot,
                                                    monkeypatch) -> None:
    snap = snapshot(tiny_load)
    common = ["--data-dir", str(shared_data), "--exclude-fold", "1/2", "--limit", "6", "--max-length", "24",
              "--batch-size", "2", "--steps", "2", "--lr", "1e-3"]
    assert _train(["anti-expert", *common, "--out", str(tmp_path / "anti")]) == 0
    assert _train(["calibration", *common, "--alignment-steps", "3", "--out", str(tmp_path / "cal")]) == 0
    snap.assert_same(tiny_load)  # both trained copies
    anti = json.loads((tmp_path / "anti" / "train.json").read_text())
    cal = json.loads((tmp_path / "cal" / "train.json").read_text())
    assert anti["data"]["kind"] == "toxic" and cal["data"]["kind"] == "non-toxic"
    assert anti["metrics"]["steps"] == 2 and cal["metrics"]["alignment_seconds"] >= 0
    monkeypatch.undo()  # the detoxifiers read the saved artifacts with the real loader
    dexperts = DExperts.from_options(tiny_load, tokenizer, anti_expert=str(tmp_path / "anti" / "model"))
    trained = dict(dexperts.anti_expert.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in tiny_load.named_parameters())  # fine-tuned, not a copy
    # the generator's patch on the anti-expert too (made for the base, added to the fine-tuned copy)
    name = "model.layers.1.mlp.down_proj.weight"
    delta = torch.randn_like(dict(tiny_load.named_parameters())[name])
    Patch.from_deltas(tiny_load, {name: delta}).save(tmp_path / "patch")
    patched = DExperts.from_options(tiny_load, tokenizer, anti_expert=str(tmp_path / "anti" / "model"),
                                    anti_expert_patch=str(tmp_path / "patch"))
    torch.testing.assert_close(dict(patched.anti_expert.named_parameters())[name], trained[name] + delta)
    assert patched.settings()["anti_expert_patch"] == str(tmp_path / "patch")
    assert "anti_expert_patch" not in dexperts.settings()
    snap.assert_same(tiny_load)  # the generator itself is not patched
    fusion = CalibrationFusion.from_options(tiny_load, tokenizer, calibration=str(tmp_path / "cal" / "model"),
                                            alignment=str(tmp_path / "cal" / "alignment"))
    assert fusion.alpha == 0.5


def test_train_refuses_bad_input_before_loading(monkeypatch, tmp_path) -> None:
    loaded = []
    monkeypatch.setattr(editkit, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match="fold"):
        _train(["detoxigen", "--exclude-fold", "2/2", "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="shared data"):
        _train(["anti-expert", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="source"):
        _train(["calibration", "--sources", "reddit", "--out", str(tmp_path / "z")])
    assert loaded == []
