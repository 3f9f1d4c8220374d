"""MEND on disk: the archive a meta-training produces, and the training state it resumes from.

An archive is a folder with ``editor.safetensors`` (the editor's parameters and normalisation
statistics) and ``mend.json`` (format, the edited weights and their layout, the editor's shape, the
fingerprint of the base weights it was trained on, the training settings, records and costs). It
belongs to one model: :func:`check_model` refuses any other (dtype rounding of the same weights is
accepted, see :func:`editkit.patch.fingerprint_matches`).

The training state (``<out>/checkpoint``: the editor, the best editor so far, Adam's state and the
loop's counters) is written the same way: safetensors for tensors, JSON for the rest, nothing
pickled. Both are written atomically (temporary folder + rename).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.devices import real_values
from editkit.methods.mend.editor import MENDEditor
from editkit.methods.mend.factors import Target
from editkit.patch import atomic_write_dir, fingerprint, fingerprint_matches, model_info

FORMAT = "editkit-mend-archive"
FORMAT_VERSION = 1
WEIGHTS_FILE = "editor.safetensors"
META_FILE = "mend.json"
ARCHIVE_DIR = "archive"  # inside a training run's output folder
STATE_DIR = "checkpoint"
STATE_WEIGHTS = "state.safetensors"
STATE_META = "state.json"


class ArchiveError(ValueError):
    """An archive that cannot be read, or that belongs to another model; nothing was changed."""


def base_fingerprint(model: nn.Module, targets: list[Target]) -> dict[str, Any]:
    """{parameter name: fingerprint} of the weights an editor edits."""
    return {t.name: fingerprint(real_values(model, t.name)) for t in targets}


def save_archive(path: str | Path, editor: MENDEditor, *, model: nn.Module, hparams: Mapping[str, Any],
                 training: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``editor`` as an archive for ``model`` (whose target weights are fingerprinted)."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "mend",
        "targets": [t.to_dict() for t in editor.targets],
        "editor": editor.config(),
        "model": model_info(model),
        "base_fingerprint": base_fingerprint(model, editor.targets),
        "hparams": dict(hparams),
        "training": dict(training),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(meta, indent=2, default=str)
    tensors = {k: v.detach().cpu().contiguous() for k, v in editor.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(text, encoding="utf-8")

    path = Path(path)
    atomic_write_dir(path, write, overwrite=overwrite)
    return path


def archive_folder(path: str | Path) -> Path:
    """The folder holding the archive files: ``path`` itself, or ``path/archive`` (a training run's
    output folder)."""
    path = Path(path)
    for folder in (path, path / ARCHIVE_DIR):
        if (folder / META_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    if not path.exists():
        raise FileNotFoundError(f"MEND archive not found: {path}")
    raise ArchiveError(f"{path} is not a MEND archive (needs {META_FILE} and {WEIGHTS_FILE}, "
                       f"in the folder or in its {ARCHIVE_DIR}/)")


def read_archive(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(editor tensors, metadata) of an archive."""
    from safetensors.torch import load_file

    folder = archive_folder(path)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"{folder}: unsupported archive format {meta.get('format')!r} "
                           f"v{meta.get('format_version')} (expected {FORMAT} v{FORMAT_VERSION})")
    return load_file(str(folder / WEIGHTS_FILE)), meta


def check_model(meta: Mapping[str, Any], model: nn.Module, source: str = "the archive") -> list[Target]:
    """The archive's targets, after checking that ``model`` is the model it was trained for: same
    parameter names and shapes, and weights matching the recorded fingerprint. Raises ArchiveError."""
    targets = [Target.from_dict(t) for t in meta["targets"]]
    trained_for = meta.get("model", {})
    what = trained_for.get("name_or_path") or trained_for.get("model_type") or "another model"
    params = dict(model.named_parameters())
    for target in targets:
        if target.name not in params:
            raise ArchiveError(f"{source} edits {target.name}, which {type(model).__name__} does not have; "
                               f"it was trained for {what} ({trained_for})")
        weight = real_values(model, target.name)
        recorded = meta["base_fingerprint"].get(target.name)
        if recorded is None or list(weight.shape) != list(recorded["shape"]):
            raise ArchiveError(f"{source}: {target.name} has shape {tuple(weight.shape)} here but "
                               f"{recorded and tuple(recorded['shape'])} in the model it was trained for ({what})")
        if not fingerprint_matches(weight, recorded):
            raise ArchiveError(f"{source} was trained for another model ({what}): the weights of {target.name} "
                               "differ from the ones it was trained on. A MEND editor only fits the model it was "
                               "meta-trained for; train one for this model with `editkit train mend`.")
    return targets


def load_editor(path: str | Path, model: nn.Module) -> tuple[MENDEditor, dict[str, Any]]:
    """The trained editor of the archive at ``path``, checked against ``model`` and placed on its device."""
    tensors, meta = read_archive(path)
    targets = check_model(meta, model, source=f"MEND archive {path}")
    config = meta["editor"]
    with torch.device("meta"):  # no random initialisation of weights that are loaded next
        editor = MENDEditor(targets, rank=int(config["rank"]), n_hidden=int(config["n_hidden"]), lr=1.0,
                            normalize=bool(config["normalize"]))
    try:
        editor.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        raise ArchiveError(f"{path}: the editor weights do not fit the archive's description: {err}") from None
    device = next(model.parameters()).device
    return editor.to(device).eval(), meta


# -- training state ----------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state as (tensors, JSON-ready rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                      rest: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_state(folder: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Replace the training state in ``folder`` (atomically: a crash keeps the previous one)."""
    from safetensors.torch import save_file

    text = json.dumps(dict(meta), indent=2, default=str)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_WEIGHTS))
        (tmp / STATE_META).write_text(text, encoding="utf-8")

    atomic_write_dir(folder, write, overwrite=True)


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The training state in ``folder``, or None when there is none."""
    from safetensors.torch import load_file

    if not (folder / STATE_META).is_file() or not (folder / STATE_WEIGHTS).is_file():
        return None
    return load_file(str(folder / STATE_WEIGHTS)), json.loads((folder / STATE_META).read_text(encoding="utf-8"))


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.`` with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}
