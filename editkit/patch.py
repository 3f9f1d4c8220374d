"""Patch: the weight deltas of an edit plus its provenance. Apply, apply temporarily, save, load.

A patch is saved as a folder holding ``delta.safetensors`` (one tensor per parameter name) and
``patch.json`` (which weights, a fingerprint of the base weights they were computed on, method,
hparams, metrics). A patch refuses a model whose targeted weights differ from that base.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 2  # 1 (digests of rounded weights) was never released
DELTA_FILE = "delta.safetensors"
META_FILE = "patch.json"


class PatchError(ValueError):
    """A patch that cannot be applied, saved or loaded; nothing was changed."""


SAMPLE_SIZE = 64  # weight entries a fingerprint records (at fixed positions, plus where the delta is largest)
MATCH_RTOL = 1e-2  # well above bf16 rounding (0.4 %), well below the change a retrained or quantised base makes


def fingerprint(tensor: torch.Tensor, delta: torch.Tensor | None = None) -> dict[str, Any]:
    """A dtype-tolerant sketch of a weight: its shape and a sample of its values, compared with a
    tolerance by :func:`fingerprint_matches`.

    A hash of rounded values is not dtype-tolerant: fp32 → fp16 → bf16 rounds differently from
    fp32 → bf16, and fp32 arithmetic error flips entries that sit on a rounding boundary. The
    sample holds entries at fixed pseudo-random positions and, when ``delta`` is given, the entries
    it changes most, so that a weight carrying the delta is recognised as "already applied". The
    same base in fp32, fp16 or bf16 matches; another checkpoint, another quantisation or an edited
    copy does not (a delta below ~1 % of the weights it touches cannot be told from rounding).
    """
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    k = min(n, SAMPLE_SIZE)
    index = torch.randint(n, (k,), generator=torch.Generator().manual_seed(n))
    if delta is not None:
        index = torch.cat([index, delta.detach().reshape(-1).abs().float().cpu().topk(k).indices])
    index = torch.unique(index)  # sorted
    values = flat[index.to(flat.device)].float().cpu()
    return {"shape": list(tensor.shape), "index": index.tolist(), "values": values.tolist()}


def fingerprint_matches(
    tensor: torch.Tensor, recorded: Mapping[str, Any], *, removed: torch.Tensor | None = None
) -> bool:
    """Whether ``tensor`` is the weight ``recorded`` by :func:`fingerprint`, up to dtype rounding.
    ``removed``: a delta subtracted from a rounded weight to get ``tensor`` (its rounding is allowed for)."""
    if list(tensor.shape) != list(recorded["shape"]):
        return False
    index = torch.tensor(recorded["index"], dtype=torch.long)
    expected = torch.tensor(recorded["values"], dtype=torch.float32)
    got = tensor.detach().reshape(-1)[index.to(tensor.device)].float().cpu()
    scale = float(expected.pow(2).mean().sqrt()) if expected.numel() else 0.0
    allowed = MATCH_RTOL * expected.abs() + 1e-3 * scale + 1e-12
    if removed is not None:
        allowed = allowed + MATCH_RTOL * removed.detach().reshape(-1)[index.to(removed.device)].float().cpu().abs()
    return bool(((got - expected).abs() <= allowed).all())


def model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__}
    for key in ("model_type", "_name_or_path", "hidden_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer"):
        value = getattr(config, key, None)
        if value is not None:
            info[key.lstrip("_")] = value
    return info


def _parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


@dataclass
class Patch:
    """``deltas``: {parameter name: delta tensor with the parameter's shape}."""

    deltas: dict[str, torch.Tensor]
    base_fingerprint: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    layer: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if not self.deltas:
            raise PatchError("a patch needs at least one delta")
        for name, delta in self.deltas.items():
            if not isinstance(delta, torch.Tensor):
                raise PatchError(f"delta for {name!r} is not a tensor")
            if not torch.isfinite(delta).all():
                raise PatchError(f"delta for {name!r} contains NaN or inf; refusing it")
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @classmethod
    def from_deltas(cls, model: nn.Module, deltas: Mapping[str, torch.Tensor], **meta: Any) -> Patch:
        """A patch for ``model``'s current weights (their fingerprint is recorded as the base)."""
        params = _parameters(model)
        missing = [n for n in deltas if n not in params]
        if missing:
            raise PatchError(f"model has no parameter(s) {missing}")
        stored = {n: d.detach().to("cpu", torch.float32).clone() for n, d in deltas.items()}
        base = {n: fingerprint(params[n], stored[n]) for n in deltas}
        return cls(deltas=stored, base_fingerprint=base, model=model_info(model), **meta)

    # -- checks --------------------------------------------------------------------------------
    def check(self, model: nn.Module, *, strict: bool = True) -> dict[str, nn.Parameter]:
        """The targeted parameters of ``model``, after checking names, shapes and the base
        fingerprint (``strict=False`` skips the fingerprint). Raises PatchError, changes nothing."""
        params = _parameters(model)
        targets = {}
        for name, delta in self.deltas.items():
            if name not in params:
                raise PatchError(f"model has no parameter {name!r}; this patch is for {self.model or 'another model'}")
            if tuple(params[name].shape) != tuple(delta.shape):
                raise PatchError(
                    f"{name}: patch delta has shape {tuple(delta.shape)}, model weight {tuple(params[name].shape)}"
                )
            recorded = self.base_fingerprint.get(name)
            if strict and recorded is not None and not fingerprint_matches(params[name], recorded):
                unapplied = params[name].detach().float() - delta.to(params[name].device)
                if fingerprint_matches(unapplied, recorded, removed=delta):
                    raise PatchError(f"{name}: this patch is already applied to the model")
                raise PatchError(
                    f"{name}: the model's weights differ from the base this patch was made for "
                    f"({self.model.get('name_or_path', '?')}); pass strict=False to apply anyway"
                )
            targets[name] = params[name]
        return targets

    # -- applying ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module, *, strict: bool = True, scale: float = 1.0) -> nn.Module:
        """Add the deltas to ``model``'s weights in place (permanent). Returns the model."""
        targets = self.check(model, strict=strict)
        for name, param in targets.items():
            delta = self.deltas[name].to(param.device, torch.float32)
            param.copy_((param.float() + scale * delta).to(param.dtype))
        return model

    @contextmanager
    def applied(self, model: nn.Module, *, strict: bool = True, scale: float = 1.0) -> Iterator[nn.Module]:
        """Within the block the model carries the edit; on exit (even by exception) the
        original weights are restored bit-exactly."""
        targets = self.check(model, strict=strict)
        originals = {name: p.detach().clone() for name, p in targets.items()}
        try:
            with torch.no_grad():
                for name, param in targets.items():
                    delta = self.deltas[name].to(param.device, torch.float32)
                    param.copy_((param.float() + scale * delta).to(param.dtype))
            yield model
        finally:
            with torch.no_grad():
                for name, param in targets.items():
                    param.copy_(originals[name])

    # -- persistence ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": "editkit-patch",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "layer": self.layer,
            "parameters": {n: list(d.shape) for n, d in self.deltas.items()},
            "base_fingerprint": self.base_fingerprint,
            "model": self.model,
            "hparams": self.hparams,
            "metrics": self.metrics,
            "created": self.created,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path/delta.safetensors`` and ``path/patch.json`` atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = json.dumps(self.metadata(), indent=2, default=str)

        def write(tmp: Path) -> None:
            save_file({n: d.contiguous() for n, d in self.deltas.items()}, str(tmp / DELTA_FILE),
                      metadata={"format": "editkit-patch"})
            (tmp / META_FILE).write_text(meta, encoding="utf-8")

        atomic_write_dir(path, write, overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / DELTA_FILE).is_file():
            raise PatchError(f"{path} is not an editkit patch (needs {META_FILE} and {DELTA_FILE})")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != "editkit-patch" or meta.get("format_version") != FORMAT_VERSION:
            raise PatchError(f"{path}: unsupported patch format {meta.get('format')!r} v{meta.get('format_version')}")
        deltas = load_file(str(path / DELTA_FILE))
        if set(deltas) != set(meta.get("parameters", {})):
            raise PatchError(f"{path}: {DELTA_FILE} and {META_FILE} name different parameters")
        return cls(
            deltas=deltas,
            base_fingerprint=meta.get("base_fingerprint", {}),
            method=meta.get("method", ""),
            layer=meta.get("layer"),
            hparams=meta.get("hparams", {}),
            metrics=meta.get("metrics", {}),
            model=meta.get("model", {}),
            created=meta.get("created", ""),
        )

    def norm(self) -> float:
        return float(sum(d.float().pow(2).sum() for d in self.deltas.values()) ** 0.5)

    def __repr__(self) -> str:
        names = ", ".join(self.deltas)
        return f"Patch(method={self.method!r}, layer={self.layer}, params=[{names}], norm={self.norm():.4g})"


def load_patch(path: str | Path) -> Patch:
    """Read a patch saved by :meth:`Patch.save`."""
    return Patch.load(path)


def atomic_write_dir(path: Path, write: Any, *, overwrite: bool = False) -> None:
    """Run ``write(tmp_dir)`` then move the folder to ``path`` in one rename. An existing ``path``
    is refused unless ``overwrite``; it is replaced only after the new folder is complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            old.rmdir()
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
