"""Full patched checkpoints: a Hugging Face folder any ``from_pretrained`` reloads."""
from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from editkit.delta_hooks import gated_modules, rounding_folded
from editkit.patch import Patch, PatchError, atomic_write_dir

log = logging.getLogger(__name__)


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
    ``editkit.json`` in the folder records the patch's provenance.

    A half-precision model carries the part of an edit its weights cannot hold in a forward hook
    (see :mod:`editkit.patch`); the saved weights hold what their dtype can, and a warning says what
    was lost (save from ``model.float()``, or ship the patch, to keep all of it)."""
    path = Path(path)
    gated = sorted(set(gated_modules(model)) | {n.rsplit(".", 1)[0] for n in (patch.gates if patch else ())})
    if gated:
        raise PatchError(f"{', '.join(gated)} carry a gated edit (DINM's harmfulness gate), which no weight of a plain "
                         "checkpoint can hold; save the patch (Patch.save / editkit edit --out) and apply it "
                         "to the base model instead")

    def write(tmp: Path) -> None:
        with ExitStack() as stack:
            if patch is not None:
                stack.enter_context(patch.applied(model))
            lost = stack.enter_context(rounding_folded(model))
            if lost:
                log.warning("the checkpoint's weights cannot hold the part of the edit below their rounding step "
                            "(norm lost per weight: %s). Save from model.float(), or save the patch beside the "
                            "checkpoint, to keep all of it.",
                            ", ".join(f"{name}: {norm:.3g}" for name, norm in lost.items()))
            model.save_pretrained(tmp, safe_serialization=True)
        if patch is not None:
            (tmp / "editkit.json").write_text(json.dumps(patch.metadata(), indent=2, default=str), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_write_dir(path, write, overwrite=overwrite)
    return path


def load_checkpoint(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder written by :func:`save_checkpoint` (or any HF folder)."""
    from editkit.models import load_model

    return load_model(str(path), **kwargs)
