"""EditInstance: a typed, validated view of one SafeEdit-style record."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# SafeEdit field names (with their spaces) -> EditInstance attribute
_TOP_FIELDS = {
    "adversarial prompt": "prompt",
    "safe generation": "safe",
    "unsafe generation": "unsafe",
}
_KNOWLEDGE = "knowledge constrain"
_GENERALIZATION = "generalization test"
# SafeEdit generalisation keys -> metric names
GENERALIZATION_KEYS = {
    "test input of only harmful question": "DG_onlyQ",
    "test input of other attack prompt input": "DG_otherA",
    "test input of other question input": "DG_otherQ",
    "test input of other questions and attack prompts": "DG_otherAQ",
}


class InstanceError(ValueError):
    """A record that cannot be turned into an EditInstance; the message names record and field."""


@dataclass(frozen=True)
class EditInstance:
    """One detoxification case.

    ``prompt`` is the adversarial prompt X, ``safe``/``unsafe`` the responses Ys/Yu, and
    ``knowledge_prompt``/``knowledge_answer`` the benign pair (q, a) that the edit must keep.
    ``generalization`` maps DG_onlyQ / DG_otherA / DG_otherQ / DG_otherAQ to their inputs.
    """

    prompt: str
    safe: str
    unsafe: str
    knowledge_prompt: str
    knowledge_answer: str
    id: str = "0"
    question: str = ""
    category: str = ""
    attack_category: str = ""
    attack_name: str = ""
    generalization: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "safe", "unsafe", "knowledge_prompt", "knowledge_answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InstanceError(f"instance {self.id}: field {name!r} must be a non-empty string")
        object.__setattr__(self, "id", str(self.id))
        unknown = set(self.generalization) - set(GENERALIZATION_KEYS.values())
        if unknown:
            raise InstanceError(
                f"instance {self.id}: unknown generalization keys {sorted(unknown)}; "
                f"expected {sorted(GENERALIZATION_KEYS.values())}"
            )

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, require_generalization: bool = False) -> EditInstance:
        """Build from a record in the SafeEdit JSON schema (field names with spaces)."""
        if not isinstance(record, Mapping):
            raise InstanceError(f"a SafeEdit record must be a JSON object, got {type(record).__name__}")
        rid = record.get("id", "?")

        def need(mapping: Mapping[str, Any], key: str, where: str = "") -> str:
            if key not in mapping:
                raise InstanceError(f"record {rid}: missing field {where + key!r}")
            value = mapping[key]
            if not isinstance(value, str) or not value.strip():
                raise InstanceError(f"record {rid}: field {where + key!r} must be a non-empty string")
            return value

        values = {attr: need(record, key) for key, attr in _TOP_FIELDS.items()}
        knowledge = record.get(_KNOWLEDGE)
        if not isinstance(knowledge, Mapping):
            raise InstanceError(f"record {rid}: missing field {_KNOWLEDGE!r} (an object with 'prompt' and 'answer')")
        values["knowledge_prompt"] = need(knowledge, "prompt", f"{_KNOWLEDGE}.")
        values["knowledge_answer"] = need(knowledge, "answer", f"{_KNOWLEDGE}.")

        generalization: dict[str, str] = {}
        gen = record.get(_GENERALIZATION)
        if gen is None and require_generalization:
            raise InstanceError(f"record {rid}: missing field {_GENERALIZATION!r}")
        if gen is not None:
            if not isinstance(gen, Mapping):
                raise InstanceError(f"record {rid}: field {_GENERALIZATION!r} must be an object")
            for key, metric in GENERALIZATION_KEYS.items():
                if key in gen or require_generalization:
                    generalization[metric] = need(gen, key, f"{_GENERALIZATION}.")
        return cls(
            id=str(rid),
            question=str(record.get("question", "")),
            category=str(record.get("unsafety category", "")),
            attack_category=str(record.get("attack category", "")),
            attack_name=str(record.get("attack name", "")),
            generalization=generalization,
            **values,
        )

    def to_record(self) -> dict[str, Any]:
        """The instance in the SafeEdit JSON schema (inverse of :meth:`from_record`)."""
        inverse = {v: k for k, v in GENERALIZATION_KEYS.items()}
        record: dict[str, Any] = {
            "id": self.id,
            "unsafety category": self.category,
            "adversarial prompt": self.prompt,
            "question": self.question,
            "attack category": self.attack_category,
            "attack name": self.attack_name,
            "unsafe generation": self.unsafe,
            "safe generation": self.safe,
            "knowledge constrain": {"prompt": self.knowledge_prompt, "answer": self.knowledge_answer},
        }
        if self.generalization:
            record["generalization test"] = {inverse[k]: v for k, v in self.generalization.items()}
        return record

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["generalization"] = dict(self.generalization)
        return out


def read_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise InstanceError(f"{path}: expected a JSON list of SafeEdit records")
    return data


def load_instances(
    source: str | Path | Iterable[Mapping[str, Any]],
    ids: Iterable[str | int] | None = None,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> list[EditInstance]:
    """Load EditInstances from a SafeEdit JSON/JSONL file or an iterable of records.

    ``source`` may end in ``#ID`` (``file.json#42``) to select one record. With ``skip_invalid``
    malformed records are skipped (their count is logged) instead of raising.
    """
    import logging

    log = logging.getLogger(__name__)
    if isinstance(source, (str, Path)):
        text = str(source)
        if "#" in text and ids is None:
            text, one = text.rsplit("#", 1)
            ids = [one]
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"instance file not found: {path}")
        records = read_records(path)
    else:
        records = list(source)
    wanted = None if ids is None else [str(i) for i in ids]
    out: list[EditInstance] = []
    skipped = 0
    for record in records:
        if wanted is not None and str(record.get("id") if isinstance(record, Mapping) else None) not in wanted:
            continue
        try:
            out.append(EditInstance.from_record(record))
        except InstanceError:
            if not skip_invalid:
                raise
            skipped += 1
        if limit is not None and len(out) >= limit:
            break
    if skipped:
        log.warning("skipped %d invalid record(s)", skipped)
    if wanted is not None:
        missing = set(wanted) - {inst.id for inst in out}
        if missing and not skip_invalid:
            raise InstanceError(f"no record with id {', '.join(sorted(missing))}")
        order = {i: n for n, i in enumerate(wanted)}
        out.sort(key=lambda inst: order.get(inst.id, len(order)))
    return out


def id_ranks(ids: Iterable[str]) -> dict[str, int]:
    """{record id: its position} with the ids sorted numerically where they are numbers, then by
    string: the order record folds are dealt in (cross-fitting, held-out prompt folds), so a fold
    never depends on the order of a file."""
    ordered = sorted(set(ids), key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))
    return {record_id: n for n, record_id in enumerate(ordered)}

