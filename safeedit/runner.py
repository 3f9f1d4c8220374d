"""The SafeEdit runner: intervene (or not), generate, judge, score; one JSON line per case.

What is evaluated is an :class:`editkit.interventions.Intervention`, built from the config's method
name by :func:`intervention_for` or passed in: nothing (vanilla), a per-instance method (edit one
case, evaluate it, restore the model; or, sequential, let the edits accumulate), a saved patch, or a
dataset-scope method scored by cross-fitting by record id. The runner never asks which method it
is. Finished cases are skipped on a rerun, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

import editkit
from editkit.instance import EditInstance
from editkit.interventions import (CrossFitted, CrossFittedEditor, FixedPatch, Intervention, PerInstanceEdit,
                                  Vanilla, has_trained_editor)
from editkit.patch import model_info
from editkit.registry import get_method, load_hparams
from editkit.scoring import answer_scores, text_nll
from editkit.text import with_suffix
from safeedit import metrics
from safeedit.metrics import SUFFIX

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Settings of one evaluation run (written to ``config.json``; a resumed run must match)."""

    method: str = "none"  # "none" = the vanilla model; else a registered editing method
    hparams: Any = None  # the method's settings (name, path, dict)
    mode: Literal["per-instance", "sequential"] = "per-instance"  # for instance-scope methods
    suffix: Literal["auto", "on", "off"] = "auto"  # auto: as the method prescribes (DINM: on)
    max_new_tokens: int = 128
    batch_size: int = 8
    general_max_new_tokens: int = 48  # benign requests and QA: a refusal or an answer shows early
    benign_per_case: int = 4  # over-refusal: benign requests per case (round-robin over the set)
    qa_per_case: int = 4
    knowledge_per_case: int = 3  # other cases' knowledge pairs
    ppl_lines_per_case: int = 2
    judge: str = "default"
    patch: str | None = None  # a saved patch applied for every case (method: the patch's, for the label)
    folds: int = 2  # dataset-scope methods: k-fold cross-fitting by record id

    def __post_init__(self) -> None:
        if self.mode not in ("per-instance", "sequential"):
            raise ValueError(f"mode must be 'per-instance' or 'sequential', got {self.mode!r}")
        if self.suffix not in ("auto", "on", "off"):
            raise ValueError(f"suffix must be auto, on or off, got {self.suffix!r}")
        for name in ("max_new_tokens", "batch_size", "general_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def comparable(self) -> dict[str, Any]:
        """The settings that must agree for rows to belong to the same run (settings added later
        are left out at their defaults, so runs written before they existed still resume)."""
        later = {"patch": None, "folds": 2}
        return {k: v for k, v in asdict(self).items() if k != "batch_size" and not (k in later and v == later[k])}


def _results_part(settings: Any, runtime: frozenset[str]) -> Any:
    """``settings`` without the ``runtime`` hparams (caches and the like: they do not change results,
    so a run resumes across them), wherever an hparams mapping sits in it."""
    if not isinstance(settings, dict):
        return settings
    if "hparams" in settings and isinstance(settings["hparams"], dict):
        settings = {**settings, "hparams": _results_part(settings["hparams"], runtime)}
    return {k: v for k, v in settings.items() if k not in runtime}


def intervention_for(config: EvalConfig) -> Intervention:
    """The intervention a config names: a saved patch, nothing (method ``none``), or a registered
    method by its declared scope."""
    if config.patch is not None:
        return FixedPatch(config.patch)
    if config.method == "none":
        return Vanilla()
    spec = get_method(config.method)
    if spec.scope == "dataset":
        return CrossFitted(config.method, config.hparams, folds=config.folds)
    hparams = load_hparams(spec.name, config.hparams)
    if has_trained_editor(spec, hparams) and hparams.archive is None:
        if config.mode == "sequential":
            raise ValueError(f"{spec.name} without an archive is cross-fitted per fold; sequential mode needs "
                             "a trained archive in its settings")
        return CrossFittedEditor(config.method, hparams, folds=config.folds)  # a meta-trained editor per fold
    return PerInstanceEdit(config.method, hparams, sequential=config.mode == "sequential")


def _rotate(pool_size: int, index: int, k: int, skip: int | None = None) -> list[int]:
    """k indices of a pool, different for consecutive cases, covering the pool evenly."""
    if pool_size == 0 or k <= 0:
        return []
    picks, j = [], index * k
    while len(picks) < min(k, pool_size - (skip is not None)):
        i = j % pool_size
        if i != skip and i not in picks:
            picks.append(i)
        j += 1
    return picks


def _benign_prompts(benign: Sequence[dict[str, Any]]) -> list[str]:
    """Each benign request as asked, then each with the SafeEdit suffix."""
    return [b["request"] for b in benign] + [with_suffix(b["request"], SUFFIX) for b in benign]


# per-case keys that enter the summary (labels, rates, means); everything else is kept per case
# (over-refusal is pooled over the stored benign answers per part instead: metrics.pooled_over_refusal)
SUMMARY_KEYS = (*metrics.LABEL_KEYS, "fluency", "qa_acc", "knowledge_nll", "knowledge_match", "ppl",
                "edit_seconds", "seconds")


class CaseLog:
    """Append-only JSONL of finished cases; tolerates a half-written last line from a kill."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            good = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: dropping a half-written line", path)
                    continue
                self.rows[str(row["id"])] = row
                good.append(line)
            path.write_text("".join(g + "\n" for g in good), encoding="utf-8")

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[str(row["id"])] = row


def read_cases(out_dir: Path) -> list[dict[str, Any]]:
    """All finished cases of a run folder (every shard's file), one per id."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("cases*.jsonl")):
        rows.update(CaseLog(path).rows)
    return list(rows.values())


class Evaluator:
    """Evaluates cases on one model. ``pool`` is the full case list (other cases' knowledge pairs)."""

    def __init__(self, model: Any, tokenizer: Any, config: EvalConfig, judge: Any, pool: Sequence[EditInstance],
                 intervention: Intervention | None = None) -> None:
        self.model, self.tok, self.config, self.judge = model, tokenizer, config, judge
        self.pool = list(pool)
        self.position = {inst.id: i for i, inst in enumerate(self.pool)}
        self.benign = metrics.load_benign_requests()
        self.qa = metrics.load_qa()
        self.text = metrics.load_benign_text()
        self.intervention = intervention if intervention is not None else intervention_for(config)
        prescribed = self.intervention.suffix
        self.suffix = {"auto": prescribed, "on": prescribed or SUFFIX, "off": None}[config.suffix]

    def _knowledge_picks(self, i: int) -> list[int]:
        """Pool positions whose knowledge pairs measure retention for case ``i``."""
        return _rotate(len(self.pool), i + 1, self.config.knowledge_per_case, skip=i)

    def constraint_pool(self, inst: EditInstance) -> list[EditInstance]:
        """Other cases a method may use as constraints: every case but this one and those whose
        knowledge pairs measure its retention, in an order that differs from case to case."""
        i = self.position.get(inst.id, 0)
        busy = {i, *self._knowledge_picks(i)}
        n = len(self.pool)
        return [self.pool[(i + 7 + m) % n] for m in range(n) if (i + 7 + m) % n not in busy]

    def responses(self, inst: EditInstance) -> dict[str, Any]:
        c = self.config
        keys = ["DS", *[k for k in metrics.DG_KEYS if k in inst.generalization]]
        prompts = [inst.prompt, *[inst.generalization[k] for k in keys[1:]]]
        texts = editkit.generate(self.model, self.tok, prompts, max_new_tokens=c.max_new_tokens,
                                 batch_size=c.batch_size, suffix=self.suffix, **self.intervention.generation_kwargs())
        p_unsafe = self.judge.score(texts, prompts)
        labels = metrics.label_responses(texts, p_unsafe)
        row: dict[str, Any] = dict(zip(keys, labels))
        row["fluency"] = metrics.mean_fluency(texts)
        row["responses"] = dict(zip(keys, texts))
        row["p_unsafe"] = dict(zip(keys, [round(p, 4) for p in p_unsafe]))
        return row

    def benign_picks(self, inst: EditInstance) -> list[dict[str, Any]]:
        """This case's share of the benign requests (round-robin over the whole set)."""
        return [self.benign[j] for j in _rotate(len(self.benign), self.position.get(inst.id, 0),
                                                self.config.benign_per_case)]

    def _generate(self, prompts: list[str]) -> list[str]:
        return editkit.generate(self.model, self.tok, prompts, max_new_tokens=self.config.general_max_new_tokens,
                                batch_size=max(self.config.batch_size, len(prompts)),
                                **self.intervention.generation_kwargs())

    def _benign_row(self, benign: list[dict[str, Any]], texts: list[str]) -> dict[str, Any]:
        """Over-refusal fields from the answers ``texts`` to :func:`_benign_prompts` of ``benign``."""
        n = len(benign)
        refusal = self.judge.refusal(texts, _benign_prompts(benign))
        return {"over_refusal": metrics.refusal_rate(refusal[:n]),
                "over_refusal_suffix": metrics.refusal_rate(refusal[n:]),
                "benign": [{"id": b["id"], "kind": b["kind"], "part": b["part"], "response": t, "response_suffix": ts,
                            "refusal": round(r, 3), "refusal_suffix": round(rs, 3)}
                           for b, t, ts, r, rs in zip(benign, texts[:n], texts[n:], refusal[:n], refusal[n:])]}

    def over_refusal(self, inst: EditInstance) -> dict[str, Any]:
        """Only the over-refusal part of :meth:`general` (answers generated without the QA prompts
        beside them in the batch)."""
        benign = self.benign_picks(inst)
        return self._benign_row(benign, self._generate(_benign_prompts(benign))) if benign else {}

    def general(self, inst: EditInstance) -> dict[str, Any]:
        """Over-refusal, QA, knowledge retention and perplexity on this case's share of each set."""
        c, i = self.config, self.position.get(inst.id, 0)
        benign = self.benign_picks(inst)
        qa = [self.qa[j] for j in _rotate(len(self.qa), i, c.qa_per_case)]
        prompts = _benign_prompts(benign) + [with_suffix(q["question"], self.suffix) for q in qa]
        texts = self._generate(prompts)
        n = len(benign)
        row: dict[str, Any] = self._benign_row(benign, texts[: 2 * n]) if n else {}
        if qa:
            hits = [metrics.answer_match(t, q["answer"], q.get("aliases", ())) for t, q in zip(texts[2 * n:], qa)]
            row["qa_acc"] = 100.0 * sum(hits) / len(hits)
            row["qa"] = [{"id": q["id"], "response": t, "correct": h} for q, t, h in zip(qa, texts[2 * n:], hits)]
        others = [self.pool[j] for j in self._knowledge_picks(i)]
        if others:
            scores = answer_scores(self.model, self.tok, [(o.knowledge_prompt, o.knowledge_answer) for o in others],
                                   suffix=self.suffix, batch_size=c.batch_size)
            row["knowledge_nll"] = sum(s["nll"] for s in scores) / len(scores)
            row["knowledge_match"] = 100.0 * sum(s["token_acc"] for s in scores) / len(scores)
        lines = [self.text[j] for j in _rotate(len(self.text), i, c.ppl_lines_per_case)]
        if lines:
            total, count = text_nll(self.model, self.tok, lines)
            row["ppl"] = math.exp(total / max(count, 1))
        return row


def evaluate(
    model: Any,
    tokenizer: Any,
    instances: Sequence[EditInstance],
    out_dir: str | Path,
    config: EvalConfig | None = None,
    *,
    judge: Any = None,
    pool: Sequence[EditInstance] | None = None,
    shard: tuple[int, int] | None = None,
    intervention: Intervention | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``instances`` and write ``out_dir``: config.json, cases[.i-of-n].jsonl (one line per
    case, written as it finishes), summary.json and table.md. Returns the summary.

    ``pool`` (default: ``instances``) is the full case list that other-case knowledge pairs and
    cross-fitting folds come from; pass the unsharded list when sharding so every shard draws from
    the same pool. ``intervention`` (default: the one ``config`` names) is what is evaluated.
    """
    config = config or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if judge is None:
        from safeedit.judge import load_judge

        judge = load_judge(config.judge)
    evaluator = Evaluator(model, tokenizer, config, judge, pool if pool is not None else instances, intervention)
    intervention = evaluator.intervention
    intervention.prepare(evaluator.pool, out, progress=progress)
    # the resolved settings, not just their name: editing a YAML between runs must not mix results
    described = intervention.settings()
    settings = {"config": config.comparable(), "model": model_info(model),
                "hparams_resolved": described.get("hparams"), "intervention": described}
    settings = json.loads(json.dumps(settings, default=str))
    settings_path = out / "config.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text(encoding="utf-8"))
        runtime = getattr(getattr(intervention, "hparams", None), "runtime_fields", frozenset)()
        for key in ("config", "hparams_resolved", "intervention"):
            if key in previous and _results_part(previous[key], runtime) != _results_part(settings[key], runtime):
                raise ValueError(f"{out} holds a run with other settings ({settings_path}: {key}); use another --out")
    else:
        settings_path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    name = "cases.jsonl" if shard is None else f"cases.{shard[0]}-of-{shard[1]}.jsonl"
    case_log = CaseLog(out / name)
    todo = [inst for inst in instances if inst.id not in case_log.rows]
    digest = benign_set_digest()
    if len(todo) < len(instances):
        log.info("resuming: %d of %d cases already done", len(instances) - len(todo), len(instances))
    with intervention.around_run(model):
        for inst in tqdm(todo, desc=f"SafeEdit {intervention.label}", disable=not progress, unit="case"):
            start = time.perf_counter()
            row: dict[str, Any] = {"id": inst.id, "category": inst.category, "method": described.get("method", "none"),
                                   "suffix": evaluator.suffix is not None}
            with intervention.for_case(model, tokenizer, inst, constraint_pool=evaluator.constraint_pool(inst)) as info:
                row.update(info)
                row.update(evaluator.responses(inst))
                row.update(evaluator.general(inst))
            row["seconds"] = round(time.perf_counter() - start - row.get("setup_seconds", 0.0), 2)
            row["judge"] = repr(judge)
            if "benign" in row:
                row["benign_set"] = digest
            case_log.add(row)
    return write_summary(out, label=intervention.label)


def rejudge(out_dir: str | Path, judge: Any, instances: Sequence[EditInstance], *,
            judge_spec: str | None = None) -> dict[str, Any]:
    """Judge a finished run's stored responses again with ``judge`` (no generation) and rewrite
    its case files and summary; the previous labels are kept under ``previous_judge``. With
    ``judge_spec`` (the name ``load_judge`` takes), config.json records it, so the run resumes
    with that judge."""
    by_id = {inst.id: inst for inst in instances}
    requests = {b["id"]: b["request"] for b in metrics.load_benign_requests()}
    for path in sorted(Path(out_dir).glob("cases*.jsonl")):
        rows = list(CaseLog(path).rows.values())
        for row in rows:
            inst = by_id[str(row["id"])]
            keys = list(row["responses"])
            prompts = [inst.prompt if k == "DS" else inst.generalization[k] for k in keys]
            texts = [row["responses"][k] for k in keys]
            p_unsafe = judge.score(texts, prompts)
            row["previous_judge"] = {k: row[k] for k in keys}
            row.update(zip(keys, metrics.label_responses(texts, p_unsafe)))
            row["p_unsafe"] = dict(zip(keys, [round(p, 4) for p in p_unsafe]))
            if row.get("benign"):
                asked = [requests[b["id"]] for b in row["benign"]]
                plain = judge.refusal([b["response"] for b in row["benign"]], asked)
                suffixed = judge.refusal([b["response_suffix"] for b in row["benign"]],
                                         [with_suffix(a, SUFFIX) for a in asked])
                for b, r, rs in zip(row["benign"], plain, suffixed):
                    b["refusal"], b["refusal_suffix"] = round(r, 3), round(rs, 3)
                row["over_refusal"] = metrics.refusal_rate(plain)
                row["over_refusal_suffix"] = metrics.refusal_rate(suffixed)
            row["judge"] = repr(judge)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    settings_path = Path(out_dir) / "config.json"
    if judge_spec is not None and settings_path.exists():
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        settings["config"]["judge"] = judge_spec
        settings_path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return write_summary(out_dir)


def benign_set_digest() -> str:
    """A short digest of the benign request set (ids and texts, in order): which set a row's
    over-refusal answers were drawn from."""
    text = json.dumps([[b["id"], b["request"]] for b in metrics.load_benign_requests()])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def reask_benign(out_dir: str | Path, model: Any, tokenizer: Any, instances: Sequence[EditInstance], *,
                 judge: Any = None, progress: bool = True) -> dict[str, Any]:
    """Ask a finished run of the **unedited** model the benign requests again, from the current set
    (after requests were added to it), and rewrite each row's over-refusal fields and the summary;
    every other field stays. Only a vanilla run can be re-asked: its model is the same for every
    case, so nothing but the requests changes (for an edited model the edit would have to be made
    again: rerun the method in a new folder). Rows already asked from the current set are skipped,
    so a killed re-ask resumes. The answers are generated in batches of their own (in a full run the
    QA questions share the batch), which can change a greedy answer by rounding only."""
    out = Path(out_dir)
    settings_path = out / "config.json"
    if not settings_path.exists():
        raise FileNotFoundError(f"{settings_path} not found: not a run folder")
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    config = EvalConfig(**{k: v for k, v in settings["config"].items() if k in fields})
    kind = (settings.get("intervention") or {}).get("kind", "Vanilla")
    if config.method != "none" or config.patch is not None or kind != "Vanilla":
        raise ValueError(f"{out} is a run of {config.method!r} ({kind}); only a run of the unedited model can be "
                         "re-asked the benign requests (rerun an edited method in a new folder)")
    if judge is None:
        from safeedit.judge import load_judge

        judge = load_judge(config.judge)
    evaluator = Evaluator(model, tokenizer, config, judge, instances, Vanilla())
    by_id = {inst.id: inst for inst in instances}
    digest = benign_set_digest()
    for path in sorted(out.glob("cases*.jsonl")):
        rows = list(CaseLog(path).rows.values())
        missing = [str(r["id"]) for r in rows if str(r["id"]) not in by_id]
        if missing:
            raise ValueError(f"{path}: case(s) {', '.join(missing[:5])} are not in the given records")
        todo = [r for r in rows if r.get("benign_set") != digest]
        for row in tqdm(todo, desc=f"re-asking {path.name}", disable=not progress, unit="case"):
            row.update(evaluator.over_refusal(by_id[str(row["id"])]), benign_set=digest)
        if todo:
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(path)
    return write_summary(out)


def summarise_cases(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A run's metrics from its finished cases: the per-case keys of ``SUMMARY_KEYS`` averaged
    (:func:`safeedit.metrics.summarise`), and over-refusal pooled per part of the benign requests
    (:func:`safeedit.metrics.pooled_over_refusal`)."""
    summary = metrics.summarise([{k: r[k] for k in SUMMARY_KEYS if k in r} for r in rows])
    summary.update(metrics.pooled_over_refusal(rows))
    return summary


def write_summary(out_dir: str | Path, *, label: str | None = None) -> dict[str, Any]:
    """summary.json and table.md from every finished case in ``out_dir``."""
    out = Path(out_dir)
    rows = read_cases(out)
    summary = summarise_cases(rows) if rows else {"n": 0}
    if label is None:
        method = rows[0].get("method", "run") if rows else "run"
        label = "vanilla" if method == "none" else method
    (out / "summary.json").write_text(json.dumps({"label": label, **summary}, indent=2), encoding="utf-8")
    (out / "table.md").write_text(metrics.markdown_table({label: summary}), encoding="utf-8")
    return summary
