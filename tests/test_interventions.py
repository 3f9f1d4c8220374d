"""The runner's one seam: every intervention (vanilla, per-instance edit, fixed patch, cross-fitted
dataset method) through the same calls, and cross-fitting that never scores a record with a patch
trained on it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import editkit
from editkit.hparams import HParams, hp
from editkit.interventions import CrossFitted, FixedPatch, PerInstanceEdit, Vanilla, folds_by_id
from editkit.methods.base import EditingMethod
from editkit.models import tiny_model
from editkit.patch import Patch
from editkit.registry import _REGISTRY, register_method
from safeedit.dataset import load_safeedit
from safeedit.judge import KeywordJudge
from safeedit.runner import EvalConfig, evaluate, intervention_for, read_cases

FAST = dict(max_new_tokens=4, general_max_new_tokens=3, benign_per_case=1, qa_per_case=1,
            knowledge_per_case=1, ppl_lines_per_case=1, judge="keyword")


@dataclass
class _ShiftConfig(HParams):
    method: ClassVar[str] = "shift-test"
    scale: float = hp(0.002, "size of the delta")


class _Shift(EditingMethod):
    """A dataset-scope method for tests: a delta on one weight that depends on which records it saw."""

    name = "shift-test"
    scope = "dataset"
    config_class = _ShiftConfig
    fitted: ClassVar[list[list[str]]] = []

    def fit(self, model, tokenizer, instances, **kwargs):
        ids = [inst.id for inst in instances]
        self.fitted.append(ids)
        name = "model.layers.1.mlp.down_proj.weight"
        weight = dict(model.named_parameters())[name]
        delta = torch.full_like(weight, self.hparams.scale * (1 + sum(map(int, ids)) % 7))
        return editkit.EditResult(method=self.name, patch=Patch.from_deltas(model, {name: delta}, method=self.name))


@pytest.fixture
def shift_method():
    register_method("shift-test", _ShiftConfig, _Shift)
    _Shift.fitted.clear()
    yield "shift-test"
    _REGISTRY.pop("shift-test", None)


@pytest.fixture(scope="module")
def cases(safeedit_dev):
    return load_safeedit(safeedit_dev, limit=6).instances


def test_folds_by_id_are_balanced_and_order_free(cases) -> None:
    folds = folds_by_id(cases, 2)
    assert sorted(folds) == sorted(c.id for c in cases)
    assert sorted(folds.values()).count(0) == 3
    assert folds_by_id(list(reversed(cases)), 2) == folds


def test_config_names_its_intervention(shift_method, tmp_path) -> None:
    assert isinstance(intervention_for(EvalConfig(method="none")), Vanilla)
    assert isinstance(intervention_for(EvalConfig(method="dinm")), PerInstanceEdit)
    assert isinstance(intervention_for(EvalConfig(method="ft-l")), PerInstanceEdit)
    assert isinstance(intervention_for(EvalConfig(method=shift_method)), CrossFitted)
    assert intervention_for(EvalConfig(method="dinm")).suffix  # DINM prescribes its suffix
    assert intervention_for(EvalConfig(method="ft-l")).suffix is None
    with pytest.raises(ValueError, match="dataset-scope"):
        PerInstanceEdit(shift_method)
    with pytest.raises(ValueError, match="instance-scope"):
        CrossFitted("dinm")


def test_cross_fitting_scores_each_record_with_the_other_fold(shift_method, tokenizer, cases, tmp_path) -> None:
    model = tiny_model("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = EvalConfig(method=shift_method, **FAST)
    evaluate(model, tokenizer, cases, tmp_path, config, judge=KeywordJudge(), progress=False)
    folds = folds_by_id(cases, 2)
    assert len(_Shift.fitted) == 2  # one fit per fold, not per case
    for trained in _Shift.fitted:
        assert len({folds[i] for i in trained}) == 1  # trained on exactly one fold
    rows = read_cases(tmp_path)
    assert len(rows) == len(cases)
    assert sum("setup_seconds" in row for row in rows) == 2  # the fit is charged once per fold, apart
    for row in rows:
        assert row["fold"] == folds[row["id"]]
        patch = editkit.load_patch(tmp_path / f"fold-{row['fold']}-of-2" / "patch")
        assert row["id"] not in patch.metrics["trained_on_ids"]
        assert len(patch.metrics["trained_on_ids"]) == len(cases) // 2
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # model given back
    # a rerun (resume) reads the saved fold patches instead of fitting again
    (tmp_path / "cases.jsonl").write_text("")
    evaluate(model, tokenizer, cases, tmp_path, config, judge=KeywordJudge(), progress=False)
    assert len(_Shift.fitted) == 2


def test_sharded_cross_fitting_uses_the_whole_pool(shift_method, tokenizer, cases, tmp_path) -> None:
    model = tiny_model("llama")
    config = EvalConfig(method=shift_method, **FAST)
    evaluate(model, tokenizer, cases[0::2], tmp_path, config, judge=KeywordJudge(), pool=cases, shard=(0, 2),
             progress=False)
    folds = folds_by_id(cases, 2)
    for trained in _Shift.fitted:  # folds drawn from all six records, not the shard's three
        assert len(trained) == 3 and len({folds[i] for i in trained}) == 1


def test_fixed_patch_equals_applying_it_by_hand(tokenizer, cases, tmp_path) -> None:
    model = tiny_model("llama")
    name = "model.layers.2.mlp.down_proj.weight"
    delta = 0.2 * torch.randn_like(dict(model.named_parameters())[name], generator=torch.Generator().manual_seed(0))
    patch = Patch.from_deltas(model, {name: delta}, method="by-hand")
    patch.save(tmp_path / "patch")
    evaluate(model, tokenizer, cases[:2], tmp_path / "fixed", EvalConfig(patch=str(tmp_path / "patch"), **FAST),
             judge=KeywordJudge(), progress=False)
    with patch.applied(model):
        evaluate(model, tokenizer, cases[:2], tmp_path / "by-hand", EvalConfig(**FAST), judge=KeywordJudge(),
                 progress=False)
    fixed = {r["id"]: r["responses"] for r in read_cases(tmp_path / "fixed")}
    by_hand = {r["id"]: r["responses"] for r in read_cases(tmp_path / "by-hand")}
    assert fixed == by_hand
    assert FixedPatch(tmp_path / "patch").settings()["deltas_sha256"] == FixedPatch(patch).settings()["deltas_sha256"]


def test_per_instance_method_gets_a_constraint_pool_without_scored_records(tokenizer, cases, tmp_path,
                                                                             monkeypatch) -> None:
    from editkit.methods.ft import FTL

    seen = {}
    real = FTL.edit

    def spy(self, model, tok, instance, **kwargs):
        seen[instance.id] = [o.id for o in kwargs.get("constraint_pool", ())]
        return real(self, model, tok, instance, **kwargs)

    monkeypatch.setattr(FTL, "edit", spy)
    model = tiny_model("llama")
    evaluate(model, tokenizer, cases[:3], tmp_path, EvalConfig(method="ft-l", hparams={"steps": 1}, **FAST),
             judge=KeywordJudge(), progress=False)
    rows = {r["id"]: r for r in read_cases(tmp_path)}
    assert set(seen) == set(rows)
    for case_id, pool in seen.items():
        assert case_id not in pool and len(pool) == len(cases[:3]) - 1 - FAST["knowledge_per_case"]
        assert rows[case_id]["layer"] is not None


def test_eval_cli_scores_one_fold_per_process(shift_method, tokenizer, safeedit_dev, tmp_path, monkeypatch) -> None:
    import editkit
    from editkit.cli import build_parser

    monkeypatch.setattr(editkit, "load_model", lambda *a, **k: (tiny_model("llama"), tokenizer))
    pool = load_safeedit(safeedit_dev).instances
    folds = folds_by_id(pool, 2)
    for fold in (0, 1):
        args = build_parser().parse_args(["eval", "--method", shift_method, "--data", str(safeedit_dev), "--out",
                                          str(tmp_path), "--fold", str(fold), "--limit", "2", "--judge", "keyword",
                                          "--max-new-tokens", "2"])
        assert args.func(args) == 0
        rows = [json.loads(line) for line in (tmp_path / f"cases.{fold}-of-2.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(folds[r["id"]] == fold == r["fold"] for r in rows)
    assert len(_Shift.fitted) == 2  # each process fitted only the model its fold needs
    with pytest.raises(ValueError, match="--fold"):
        bad = build_parser().parse_args(["eval", "--method", shift_method, "--out", str(tmp_path), "--fold", "2"])
        bad.func(bad)


def test_edit_seconds_count_every_part_of_the_edit(tokenizer, cases, tmp_path) -> None:
    model = tiny_model("llama")
    settings = {"steps": 2, "lr": 1e-2, "c_edit": 1.0, "benign_constraint": 2, "benign_answer_tokens": 2}
    evaluate(model, tokenizer, cases[:1], tmp_path, EvalConfig(method="dinm", hparams=settings, **FAST),
             judge=KeywordJudge(), progress=False)
    row = read_cases(tmp_path)[0]
    parts = row["edit_timings"]
    assert {"locate", "guard", "edit", "total"} <= set(parts) and parts["guard"] > 0
    assert row["edit_seconds"] == parts["total"] >= parts["locate"] + parts["guard"] + parts["edit"] - 1e-3


def test_parallel_processes_share_the_cores(monkeypatch) -> None:
    from safeedit import cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    assert [cli.cpu_share(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]


def test_a_detoxifier_joins_any_intervention(tokenizer, cases, tmp_path) -> None:
    """Decoding(detoxifier, base): every generation of the run goes through the detoxifier, on top of
    the base intervention (here a fixed patch), and the row/label/settings say so."""
    from editkit.generation.detoxifier import Detoxifier
    from editkit.interventions import Decoding

    class OnlyToken(Detoxifier):
        """Forces one token: every response is that token repeated."""

        label = "only-x"

        def step(self, scores, fed, rows):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, tokenizer.convert_tokens_to_ids("x")] = 0.0
            return forced

        def settings(self):
            return {"kind": "only-x"}

    model = tiny_model("llama")
    name = "model.layers.2.mlp.down_proj.weight"
    patch = Patch.from_deltas(model, {name: torch.full_like(dict(model.named_parameters())[name], 1e-3)}, method="p")
    both = Decoding(OnlyToken(), FixedPatch(patch))
    assert both.label == "p (fixed patch) + only-x" and both.settings()["decoding"] == {"kind": "only-x"}
    evaluate(model, tokenizer, cases[:2], tmp_path, EvalConfig(**FAST), judge=KeywordJudge(), intervention=both,
             progress=False)
    rows = read_cases(tmp_path)
    assert all(set(text) == {"x"} for r in rows for text in r["responses"].values())
    assert all(set(b["response"]) == {"x"} for r in rows for b in r["benign"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["intervention"]["decoding"] == {"kind": "only-x"} and config["intervention"]["kind"] == "fixed-patch"


def test_eval_cli_takes_a_detoxifier_by_name(tokenizer, safeedit_dev, tmp_path, monkeypatch) -> None:
    import editkit
    from editkit.cli import build_parser

    loaded = []
    monkeypatch.setattr(editkit, "load_model", lambda name, **k: loaded.append(name) or (tiny_model("llama"), tokenizer))
    args = build_parser().parse_args(["eval", "--data", str(safeedit_dev), "--out", str(tmp_path), "--limit", "1",
                                      "--judge", "keyword", "--max-new-tokens", "2", "--detoxifier", "dexperts",
                                      "--detoxifier-opt", "anti_expert=anti", "--detoxifier-opt", "alpha=0"])
    assert args.func(args) == 0 and loaded == ["default", "anti"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["intervention"]["decoding"]["kind"] == "dexperts"
    assert read_cases(tmp_path)[0]["method"] == "none"


def test_meta_trained_editor_is_cross_fitted_per_fold(tokenizer, cases, tmp_path) -> None:
    """MEND without an archive: each fold's editor is meta-trained on the other fold's records in the
    run folder, then edits this fold's records one by one; a rerun reuses the trained folds."""
    from editkit.interventions import CrossFittedEditor
    from editkit.methods.mend.archive import read_archive

    quick = dict(layers=[-1], rank=8, lr=0.1, meta_lr=1e-2, val_every=1, benign_constraint=1,
                 benign_answer_tokens=2, constraint_pairs=0, max_length=96, steps=2, batch_records=2)
    assert isinstance(intervention_for(EvalConfig(method="mend")), CrossFittedEditor)
    assert isinstance(intervention_for(EvalConfig(method="mend", hparams={**quick, "archive": str(tmp_path)})),
                      PerInstanceEdit)  # an archive of one's own is used as it is
    with pytest.raises(ValueError, match="no meta-trained editor"):
        CrossFittedEditor("dinm")
    model = tiny_model("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = EvalConfig(method="mend", hparams=quick, **FAST)
    evaluate(model, tokenizer, cases, tmp_path, config, judge=KeywordJudge(), progress=False)
    folds = folds_by_id(cases, 2)
    rows = read_cases(tmp_path)
    assert len(rows) == len(cases) and sum("setup_seconds" in row for row in rows) == 2
    for row in rows:
        assert row["fold"] == folds[row["id"]] and row["edit_seconds"] > 0
        _, meta = read_archive(tmp_path / f"fold-{row['fold']}-of-2" / "training" / "archive")
        seen = meta["training"]["train_records"] + meta["training"]["val_records"]
        assert row["id"] not in seen and {folds[i] for i in seen} == {1 - row["fold"]}
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # model given back
    (tmp_path / "cases.jsonl").write_text("")
    evaluate(model, tokenizer, cases, tmp_path, config, judge=KeywordJudge(), progress=False)
    _, meta = read_archive(tmp_path / "fold-0-of-2" / "training" / "archive")
    assert meta["training"]["resumed_from_step"] == 2  # the finished training was reused, not redone
