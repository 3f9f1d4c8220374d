"""Prompts for the toxicity evaluation (:mod:`safeedit.toxicity`), from one spec string.

* ``PATH`` — a JSONL file (or a JSON list) whose records carry ``"prompt"`` (a string, or
  RealToxicityPrompts' nested ``{"prompt": {"text": ...}}``) or ``"text"``; continuation prompts.
* ``safeedit`` / ``safeedit:PATH`` — the adversarial (attack) prompts of a SafeEdit file (default:
  the shared dev records); requests, so a chat model sees them through its chat template.
* ``toxigen`` / ``toxigen:hate|neutral|all`` / ``toxigen:LABEL:PATH`` — the ToxiGen
  demonstrations of the shared data as continuation prompts: the first half of each sentence by
  words (``len(words) // 2`` words, at least one), prompts that come out identical kept once.
* ``allenai/real-toxicity-prompts`` (``…:challenging`` for the challenging subset) — through
  ``datasets.load_dataset``, only when asked, so only online.

**Held-out folds.** The detoxifiers that learn from the shared data (DetoxiGen's soft prompt,
DExperts' anti-expert, the calibration model) must not be scored on prompts cut from the texts they
were trained on. SafeEdit and ToxiGen prompts therefore carry a ``rank`` (a SafeEdit record's place
among the file's ids in :func:`editkit.instance.id_ranks` order, as cross-fitting deals records; a
ToxiGen sentence's line) and fall in fold ``rank % n``: :meth:`PromptSet.fold` keeps one fold, and
:func:`fold_texts` lists every text of a fold, which training leaves out
(``editkit train detoxigen --exclude-fold 0/2``, then ``editkit detox-eval --fold 0/2``).

Continuation prompts are scored RealToxicityPrompts-style (raw text, the continuation judged
alone); requests go through the chat template and are judged with their prompt. Both are only
defaults of :func:`safeedit.toxicity.evaluate_toxicity`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

PromptKind = Literal["continuation", "request"]
RTP_NAME = "allenai/real-toxicity-prompts"
TOXIGEN_FILE = Path("toxigen") / "toxigen_demonstrations.jsonl"
SAFEEDIT_FILE = Path("safeedit") / "safeedit_dev.json"
TOXIGEN_LABELS = ("hate", "neutral", "all")
# record fields kept as prompt metadata when a JSONL record has them (scalars only)
_META_FIELDS = ("label", "group", "category", "challenging", "target_group")

__all__ = ["PromptSet", "ToxicityPrompt", "fold_texts", "load_prompts", "parse_fold", "prompts_from_records",
           "text_key", "toxigen_prompts"]


@dataclass(frozen=True)
class ToxicityPrompt:
    """One prompt: a stable ``id`` (seeds its samples and keys its row), the ``text``, metadata."""

    id: str
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PromptSet:
    """Prompts of one source. ``kind`` sets the defaults of chat template and scoring context;
    ``group_key`` names the metadata field the summary breaks results down by (or None);
    ``store_text`` False for prompts of the shared data: a run's rows keep their ids only, so that
    the texts stay in the shared data and out of any result folder that gets committed."""

    prompts: list[ToxicityPrompt]
    source: str
    kind: PromptKind = "continuation"
    group_key: str | None = None
    store_text: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("continuation", "request"):
            raise ValueError(f"kind must be 'continuation' or 'request', got {self.kind!r}")
        ids = [p.id for p in self.prompts]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{self.source}: prompt id {dup!r} occurs more than once")

    def __len__(self) -> int:
        return len(self.prompts)

    def limited(self, limit: int | None) -> PromptSet:
        """The first ``limit`` prompts (all when None)."""
        if limit is None:
            return self
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return replace(self, prompts=self.prompts[:limit])

    def fold(self, fold: int, folds: int) -> PromptSet:
        """The prompts of fold ``fold`` of ``folds`` (``rank % folds == fold``; see the module docstring).
        Only SafeEdit and ToxiGen prompts have folds."""
        fold, folds = parse_fold((fold, folds))
        unranked = [p.id for p in self.prompts if not isinstance(p.meta.get("rank"), int)]
        if unranked:
            raise ValueError(f"{self.source}: prompt {unranked[0]!r} has no fold; only the SafeEdit and ToxiGen "
                             "prompts of the shared data are dealt into folds")
        kept = [p for p in self.prompts if p.meta["rank"] % folds == fold]
        return replace(self, prompts=kept, source=f"{self.source} (fold {fold}/{folds})")


def parse_fold(spec: str | tuple[int, int]) -> tuple[int, int]:
    """(fold, folds) from ``"K/N"`` or a pair, checked: 0 <= K < N, N >= 2."""
    if isinstance(spec, str):
        head, sep, tail = spec.partition("/")
        try:
            fold, folds = int(head), int(tail)
        except ValueError:
            raise ValueError(f"a fold is K/N (e.g. 0/2), got {spec!r}") from None
        if not sep:
            raise ValueError(f"a fold is K/N (e.g. 0/2), got {spec!r}")
    else:
        fold, folds = spec
    if not (folds >= 2 and 0 <= fold < folds):
        raise ValueError(f"fold K/N needs N >= 2 and 0 <= K < N, got {fold}/{folds}")
    return int(fold), int(folds)


def text_key(text: str) -> str:
    """A text as :func:`fold_texts` lists it: words joined by one space, lower case."""
    return " ".join(text.split()).lower()


def fold_texts(fold: int, folds: int, shared_data: str | Path | None = None) -> set[str]:
    """Every text of fold ``fold``/``folds`` of the shared data, normalised (words joined by one space,
    lower case): the SafeEdit records' attack prompts, questions, generalization inputs and safe and
    unsafe generations, and the ToxiGen sentences of that fold. Training a detoxifier on texts outside
    this set (compared by :func:`text_key`) keeps it away from the fold's prompts."""
    from editkit.instance import id_ranks, load_instances
    from safeedit.dataset import shared_data_dir

    fold, folds = parse_fold((fold, folds))
    data = Path(shared_data) if shared_data is not None else shared_data_dir()
    instances = load_instances(data / SAFEEDIT_FILE)
    ranks = id_ranks(inst.id for inst in instances)
    out: set[str] = set()
    for inst in instances:
        if ranks[inst.id] % folds == fold:
            texts = [inst.prompt, inst.safe, inst.unsafe, inst.question, *inst.generalization.values()]
            out.update(text_key(t) for t in texts if isinstance(t, str) and t.strip())
    for i, record in enumerate(_read_json_records(data / TOXIGEN_FILE)):
        if i % folds == fold and isinstance(record, Mapping) and isinstance(record.get("text"), str):
            out.add(text_key(record["text"]))
    return out


def _text_of(record: Any, where: str) -> str:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get("prompt", record.get("text"))
    if isinstance(value, Mapping):  # RealToxicityPrompts: {"prompt": {"text": ..., "toxicity": ...}}
        value = value.get("text")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: needs a non-empty string 'prompt', 'prompt.text' or 'text' field")
    return value


def prompts_from_records(records: Sequence[Any], source: str, *, kind: PromptKind = "continuation") -> PromptSet:
    """Prompts from JSON records (``"id"`` or RTP's ``"filename"`` as id, else the position)."""
    prompts = []
    for i, record in enumerate(records):
        text = _text_of(record, f"{source}: record {i}")
        rid = record.get("id", record.get("filename"))
        meta = {k: record[k] for k in _META_FIELDS if isinstance(record.get(k), (str, int, float, bool))}
        prompts.append(ToxicityPrompt(str(rid) if rid is not None else str(i), text, meta))
    group = next((k for k in _META_FIELDS if prompts and all(k in p.meta for p in prompts)), None)
    return PromptSet(prompts, source, kind, group)


def _read_json_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or a .jsonl file)")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {n} is not JSON ({err.msg})") from None
    return records


def toxigen_prompts(path: str | Path, label: str = "all") -> PromptSet:
    """ToxiGen sentences as continuation prompts: the first ``len(words) // 2`` words (at least
    one) of each sentence with the given ``label`` (hate, neutral or all); a prompt text that
    occurs twice is kept once (the first). Metadata: label, group and the whole sentence."""
    if label not in TOXIGEN_LABELS:
        raise ValueError(f"toxigen label must be one of {TOXIGEN_LABELS}, got {label!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ToxiGen file not found: {path}")
    prompts, seen = [], set()
    for i, record in enumerate(_read_json_records(path)):
        if not isinstance(record, Mapping) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}: record {i} lacks a string 'text' field")
        if label != "all" and record.get("label") != label:
            continue
        words = record["text"].split()
        text = " ".join(words[: max(1, len(words) // 2)])
        if not text or text in seen:
            continue
        seen.add(text)
        meta = {"label": record.get("label"), "group": record.get("group"), "sentence": record["text"], "rank": i}
        prompts.append(ToxicityPrompt(f"toxigen-{i}", text, meta))
    return PromptSet(prompts, f"toxigen:{label}", "continuation", "label", store_text=False)


def _real_toxicity_prompts(spec: str, limit: int | None) -> PromptSet:
    challenging = spec.endswith(":challenging")
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"{RTP_NAME} is read with the 'datasets' package, which is not installed") from err
    split = "train" if challenging or limit is None else f"train[:{limit}]"
    try:
        rows = datasets.load_dataset(RTP_NAME, split=split)
    except Exception as err:  # offline, blocked or renamed: every cause gets the same advice
        raise ValueError(f"could not load {RTP_NAME} from the Hugging Face hub ({type(err).__name__}: {err}); "
                         "it needs network access: offline, pass a local JSONL copy of its records") from err
    records = [r for r in rows if not challenging or r.get("challenging")]
    return prompts_from_records(records, spec, kind="continuation")


def load_prompts(spec: str | Path, *, limit: int | None = None, shared_data: str | Path | None = None,
                 fold: str | tuple[int, int] | None = None) -> PromptSet:
    """Prompts named by ``spec`` (see the module docstring): those of ``fold`` (``"K/N"``; SafeEdit and
    ToxiGen only), then the first ``limit`` of them. ``shared_data`` (default:
    :func:`safeedit.dataset.shared_data_dir`) holds the SafeEdit and ToxiGen files the short specs
    refer to."""
    if fold is not None:
        k, n = parse_fold(fold)
        return load_prompts(spec, shared_data=shared_data).fold(k, n).limited(limit)
    from safeedit.dataset import load_safeedit, shared_data_dir

    text = str(spec)
    data = Path(shared_data) if shared_data is not None else shared_data_dir()
    name, _, rest = text.partition(":")
    if name == "safeedit" and not Path(text).is_file():
        source = rest or data / "safeedit" / "safeedit_dev.json"
        from editkit.instance import id_ranks

        instances = load_safeedit(source, require_generalization=False).instances
        ranks = id_ranks(inst.id for inst in instances)  # over the whole file, so a fold ignores limit
        prompts = [ToxicityPrompt(inst.id, inst.prompt, {"category": inst.category, "rank": ranks[inst.id]})
                   for inst in instances]
        return PromptSet(prompts, f"safeedit:{source}", "request", "category", store_text=False).limited(limit)
    if name == "toxigen" and not Path(text).is_file():
        label, _, path = rest.partition(":")
        return toxigen_prompts(path or data / TOXIGEN_FILE, label or "all").limited(limit)
    if text == RTP_NAME or text == RTP_NAME + ":challenging":
        return _real_toxicity_prompts(text, limit).limited(limit)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts {text!r}: no such file; give a JSONL file, 'safeedit[:PATH]', "
            f"'toxigen[:hate|neutral|all[:PATH]]' or '{RTP_NAME}[:challenging]'"
        )
    return prompts_from_records(_read_json_records(path), str(path)).limited(limit)
