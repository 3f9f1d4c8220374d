"""Full patched checkpoints: a Hugging Face folder any ``from_pretrained`` reloads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from editkit.patch import Patch, atomic_write_dir


def save_checkpoint(
    model: Any,
    tokenizer: Any | None,
    path: str | Path,
    *,
    patch: Patch | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (with ``patch`` applied for the duration of the save, if given) and its
    tokenizer as safetensors, atomically; refuses an existing ``path`` unless ``overwrite``.
    ``editkit.json`` in the folder records the patch's provenance."""
    path = Path(path)

    def write(tmp: Path) -> None:
        if patch is not None:
            with patch.applied(model):
                model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "editkit.json").write_text(json.dumps(patch.metadata(), indent=2, default=str), encoding="utf-8")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_write_dir(path, write, overwrite=overwrite)
    return path


def load_checkpoint(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder written by :func:`save_checkpoint` (or any HF folder)."""
    from editkit.models import load_model

    return load_model(str(path), **kwargs)
