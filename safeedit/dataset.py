"""Loading SafeEdit: local JSON/JSONL files in the SafeEdit schema, or the hub dataset."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit.instance import EditInstance, InstanceError, load_instances, read_records

log = logging.getLogger(__name__)
HUB_NAME = "zjunlp/SafeEdit"


def shared_data_dir() -> Path:
    """``$EDITKIT_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("EDITKIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def dev_records_path() -> Path:
    """The shared SafeEdit dev records (``safeedit/safeedit_dev.json`` under :func:`shared_data_dir`)."""
    return shared_data_dir() / "safeedit" / "safeedit_dev.json"


@dataclass
class SafeEditData:
    instances: list[EditInstance]
    skipped: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.instances)


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {spec!r}: need 0 <= i < n")
    return i, n


def load_safeedit(
    source: str | Path,
    *,
    split: str = "test",
    ids: Iterable[str | int] | None = None,
    limit: int | None = None,
    shard: str | tuple[int, int] | None = None,
    skip_invalid: bool = False,
    require_generalization: bool = True,
) -> SafeEditData:
    """SafeEdit cases from a local file (``.json`` list or ``.jsonl``) or, when ``source`` is the
    hub name ``zjunlp/SafeEdit`` and no such file exists, from the hub through ``datasets``.

    ``ids`` selects records, ``shard="i/n"`` keeps every n-th case starting at i (after ``ids``),
    ``limit`` caps the count (after sharding). Malformed records raise an error naming record and
    field, unless ``skip_invalid`` (then ``skipped`` counts them).
    """
    path = Path(source)
    if path.exists():
        records: Sequence[Any] = read_records(path)
    elif str(source).startswith(HUB_NAME):
        import datasets  # online only: the dataset is gated on the hub

        records = list(datasets.load_dataset(str(source), split=split))
    else:
        raise FileNotFoundError(f"SafeEdit data not found: {source} (a local JSON file, or {HUB_NAME!r} online)")
    wanted = None if ids is None else {str(i) for i in ids}
    instances: list[EditInstance] = []
    skipped = 0
    for record in records:
        if wanted is not None and str(record.get("id")) not in wanted:
            continue
        try:
            instances.append(EditInstance.from_record(record, require_generalization=require_generalization))
        except InstanceError:
            if not skip_invalid:
                raise
            skipped += 1
    if skipped:
        log.warning("skipped %d malformed record(s) of %s", skipped, source)
    if wanted is not None:
        missing = wanted - {inst.id for inst in instances}
        if missing and not skip_invalid:
            raise InstanceError(f"no record with id {', '.join(sorted(missing))} in {source}")
    shard_ = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    if shard_ is not None:
        instances = instances[shard_[0]:: shard_[1]]
    if limit is not None:
        instances = instances[:limit]
    return SafeEditData(instances, skipped, str(source))


__all__ = ["HUB_NAME", "SafeEditData", "load_instances", "load_safeedit", "parse_shard", "shared_data_dir"]
