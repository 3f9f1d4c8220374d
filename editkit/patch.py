"""Patch: the weight deltas of an edit plus its provenance. Apply, apply temporarily, save, load.

A patch is saved as a folder holding ``delta.safetensors`` (one tensor per parameter name) and
``patch.json`` (which weights, a fingerprint of the base weights they were computed on, method,
hparams, metrics). A patch refuses a model whose targeted weights differ from that base.

Half precision. Deltas are trained and stored in fp32. Added to a bf16/fp16 weight and rounded
back, each entry loses what lies below the weight's rounding step (an entry under half a step, all
of it). Rounding errors are incoherent and an edit is coherent over the input dimension, so large
edits survive: on SmolLM2-135M in bf16, DINM with the committed settings (‖Δ‖/‖W‖ ≈ 0.1) loses
nothing measurable, but a small edit (‖Δ‖/‖W‖ ≈ 5e-4, edit NLL 1.78 → 1.74 in fp32) kept a fifth
of its effect (1.79 → 1.78). So on a parameter narrower than fp32 the delta is split: the weight
takes ``round(W + Δ)``, what its dtype holds (so it reads as patched to the fingerprint check and
to checkpoints), and the residual ``r = W + Δ − round(W + Δ)`` stays in fp32 (one fp32 copy of the
weight) and is added to the owning module's output by a forward hook, ``out + x·rᵀ`` in fp32: the
patched output is ``x·(W + Δ)`` up to the output's own rounding (the small edit above: 1.79 → 1.74,
as in fp32). The layout comes from the module's type, never from shapes:
``nn.Linear`` (weight [out, in]), transformers' ``Conv1D`` (GPT-2, [in, out]), their biases,
``nn.Embedding``; any other module's parameter is rounded in, with a warning of what was lost.

``applied()`` removes residuals and hooks in ``finally`` and restores weights bit-exactly. After
``apply()`` the hook stays with the module (it follows ``model.to(device)``; after ``model.float()``
weight plus residual is still the edit). Half-precision weights cannot store the residual:
:func:`rounding_folded` folds it into weights that can, and ``editkit.save_checkpoint`` warns
about what a half-precision checkpoint loses. ``exact=False`` rounds into the weight only, as a
merged half-precision checkpoint would. fp32 weights take ``W + Δ`` directly, bit-exactly as before.

Offloaded weights (a model dispatched by accelerate with CPU or disk offload) are reloaded from
their offload store for every forward, so a write into them would not last: fingerprints read their
real values (:mod:`editkit.devices`), and the whole delta rides on the same kind of hook, on the
weight's execution device. The hook machinery lives in :mod:`editkit.delta_hooks`.
"""
from __future__ import annotations

import json
import logging
import os
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

from editkit.delta_hooks import (_ROUNDING_ATTR, GATED_LAYOUTS, LOST_WARN_FRACTION, _drop_rounding, _is_narrow,
                                 _layout, _owners, _Rounding, _set_residual, add_gated, remove_gated)
from editkit.devices import execution_device, owner, real_values

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1 (digests of rounded weights) was never released
DELTA_FILE = "delta.safetensors"
META_FILE = "patch.json"
GATE_KEY = "@gate."  # a gate's tensors in DELTA_FILE: "<parameter>@gate.weight", "<parameter>@gate.bias"


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


# model_info keys that must agree between a model and an artifact made for it (probe, soft prompt)
IDENTITY_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size")


def base_mismatch(model: nn.Module, recorded_info: Mapping[str, Any],
                  base_fingerprint: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why ``model`` is not the model an artifact recorded (its ``model_info`` and the fingerprints
    of some of its weights), or None when it is: the wording is the caller's to complete."""
    from editkit.devices import real_values

    info = model_info(model)
    for key in IDENTITY_KEYS:
        if key in recorded_info and key in info and recorded_info[key] != info[key]:
            return f"a model with {key}={recorded_info[key]!r} (this model: {info[key]!r})"
    params = _parameters(model)
    for name, recorded in base_fingerprint.items():
        if name not in params:
            return f"a model with a parameter {name!r}, which this model lacks"
        if not fingerprint_matches(real_values(model, name), recorded):
            return f"a model with other weights ({name} differs)"
    return None


def _parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


@dataclass
class Patch:
    """``deltas``: {parameter name: delta tensor with the parameter's shape}. ``gates`` (optional):
    {name of a delta of a linear or Conv1D weight: {"weight": [d_in], "bias": []}}; such a delta is
    not added to the weight but carried on the module's output behind sigmoid(x·weight + bias), x the
    module's input (:func:`editkit.delta_hooks.add_gated`; DINM's harmfulness gate). A gated patch
    is applied, saved and loaded like any other; it cannot be folded into a plain checkpoint."""

    deltas: dict[str, torch.Tensor]
    base_fingerprint: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    layer: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    gates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.deltas:
            raise PatchError("a patch needs at least one delta")
        for name, delta in self.deltas.items():
            if not isinstance(delta, torch.Tensor):
                raise PatchError(f"delta for {name!r} is not a tensor")
            if not torch.isfinite(delta).all():
                raise PatchError(f"delta for {name!r} contains NaN or inf; refusing it")
        for name, gate in self.gates.items():
            if name not in self.deltas:
                raise PatchError(f"gate for {name!r}, which has no delta")
            if set(gate) != {"weight", "bias"} or any(not isinstance(t, torch.Tensor) for t in gate.values()):
                raise PatchError(f"gate for {name!r} needs a 'weight' and a 'bias' tensor")
            if gate["weight"].dim() != 1 or gate["bias"].numel() != 1:
                raise PatchError(f"gate for {name!r}: weight must be [d_in] and bias one number")
            if not all(torch.isfinite(t).all() for t in gate.values()):
                raise PatchError(f"gate for {name!r} contains NaN or inf; refusing it")
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @classmethod
    def from_deltas(cls, model: nn.Module, deltas: Mapping[str, torch.Tensor], **meta: Any) -> Patch:
        """A patch for ``model``'s current weights (their fingerprint is recorded as the base)."""
        params = _parameters(model)
        missing = [n for n in deltas if n not in params]
        if missing:
            raise PatchError(f"model has no parameter(s) {missing}")
        stored = {n: d.detach().to("cpu", torch.float32).clone() for n, d in deltas.items()}
        base = {n: fingerprint(real_values(model, n), stored[n]) for n in deltas}
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
            if not torch.isfinite(delta).all():  # changed in place after the patch was built
                raise PatchError(f"delta for {name!r} contains NaN or inf; refusing it")
            recorded = self.base_fingerprint.get(name)
            values = real_values(model, name) if params[name].is_meta else params[name]  # offloaded: read it
            if strict and recorded is not None and not fingerprint_matches(values, recorded):
                unapplied = values.detach().float() - delta.to(values.device)
                if fingerprint_matches(unapplied, recorded, removed=delta):
                    raise PatchError(f"{name}: this patch is already applied to the model")
                raise PatchError(
                    f"{name}: the model's weights differ from the base this patch was made for "
                    f"({self.model.get('name_or_path', '?')}); pass strict=False to apply anyway"
                )
            if name in self.gates:
                module, attr = owner(model, name)
                layout = _layout(module, attr)
                if layout not in GATED_LAYOUTS:
                    raise PatchError(f"{name}: a gated delta needs a linear or Conv1D weight")
                d_in = delta.shape[1] if layout == "linear" else delta.shape[0]
                if self.gates[name]["weight"].shape[0] != d_in:
                    raise PatchError(f"{name}: gate weight has {self.gates[name]['weight'].shape[0]} entries, "
                                     f"the module's input {d_in}")
            targets[name] = params[name]
        return targets

    # -- applying ------------------------------------------------------------------------------
    def _plan(self, model: nn.Module, targets: dict[str, nn.Parameter],
              exact: bool) -> dict[str, list[tuple[nn.Module, str, str]] | None]:
        """Per target: the (module, attribute, layout) owners whose hook carries the rounding
        residual, or None for plain ``round(W + Δ)`` (fp32 weights, ``exact=False``, unknown owner)."""
        plan: dict[str, list[tuple[nn.Module, str, str]] | None] = {}
        for name, param in targets.items():
            plan[name] = None
            if param.is_meta:  # offloaded by accelerate: the whole delta rides on the hook
                # by name: reading an offloaded weight (the fingerprint check) replaced its Parameter
                module, attr = owner(model, name)
                owners = [(module, attr, _layout(module, attr))]
                if not owners or any(layout is None for _, _, layout in owners):
                    raise PatchError(f"{name} is offloaded and its module type has no known layout for "
                                     f"carrying the delta; load the model without offloading that module")
                plan[name] = owners  # type: ignore[assignment]
                continue
            if not (exact and _is_narrow(param.dtype)):
                continue
            owners = [(m, attr, _layout(m, attr)) for m, attr in _owners(model, param)]
            if owners and all(layout is not None for _, _, layout in owners):
                plan[name] = owners  # type: ignore[assignment]
            else:
                log.warning("%s: its module type %s has no known layout for carrying a rounding residual; "
                            "the delta is rounded into the %s weight", name,
                            sorted({type(m).__name__ for m, _, _ in owners}), param.dtype)
        return plan

    def _add(self, targets: dict[str, nn.Parameter], plan: dict[str, Any], scale: float, exact: bool) -> None:
        for name, param in targets.items():
            owners = plan[name]
            delta = self.deltas[name].to(param.device, torch.float32) if not param.is_meta else None
            if owners is None:
                new = (param.float() + scale * delta).to(param.dtype)
                if _is_narrow(param.dtype):  # say what rounding lost (asked for, with exact=False)
                    lost = float((param.float() + scale * delta - new.float()).norm())
                    wanted = abs(scale) * float(delta.norm())
                    if wanted > 0 and lost > LOST_WARN_FRACTION * wanted:
                        log.log(logging.WARNING if exact else logging.INFO, "%s: rounding to %s lost %.1f%% of "
                                "the delta's norm", name, param.dtype, 100 * lost / wanted)
                param.copy_(new)
                continue
            module, attr, _ = owners[0]
            state: _Rounding | None = getattr(module, _ROUNDING_ATTR, None)
            prior = state.residuals.get(attr) if state is not None else None
            if param.is_meta:  # offloaded: the weight is reloaded for every forward, the hook carries Δ
                device = execution_device(module, attr)
                carried = scale * self.deltas[name].to(device, torch.float32)
                carried = carried + prior.to(device) if prior is not None else carried
                for module, attr, layout in owners:
                    _set_residual(module, attr, layout, carried)
                continue
            target = param.float() + scale * delta
            if prior is not None:  # an earlier patch's residual joins in, so |residual| stays below a step
                target = target + prior.to(param.device)
            rounded = target.to(param.dtype)
            residual = target - rounded.float()
            param.copy_(rounded)
            if prior is None and not residual.any():
                continue  # the weight's dtype holds all of it
            for module, attr, layout in owners:
                _set_residual(module, attr, layout, residual)

    @torch.no_grad()
    def apply(self, model: nn.Module, *, strict: bool = True, scale: float = 1.0, exact: bool = True) -> nn.Module:
        """Add the deltas to ``model``'s weights in place (permanent). Returns the model.

        On half-precision weights the part of a delta the dtype cannot hold is added by a forward
        hook that stays with the model (module docstring); ``exact=False`` rounds it away instead."""
        targets = self.check(model, strict=strict)
        plain = {n: p for n, p in targets.items() if n not in self.gates}
        self._add(plain, self._plan(model, plain, exact), scale, exact)
        self._add_gated(model, scale)
        return model

    def _add_gated(self, model: nn.Module, scale: float) -> list[tuple[nn.Module, int]]:
        """Hook the gated deltas onto their modules; returns (module, token) for each."""
        added = []
        try:
            for name, gate in self.gates.items():
                module, attr = owner(model, name)
                added.append((module, add_gated(module, _layout(module, attr), scale * self.deltas[name].float(),
                                                gate["weight"].reshape(-1), gate["bias"].reshape(()))))
        except BaseException:
            for module, token in added:
                remove_gated(module, token)
            raise
        return added

    @contextmanager
    def applied(
        self, model: nn.Module, *, strict: bool = True, scale: float = 1.0, exact: bool = True
    ) -> Iterator[nn.Module]:
        """Within the block the model carries the edit (``exact`` as in :meth:`apply`); on exit,
        even by exception, the weights are restored bit-exactly and no hook of the patch remains."""
        targets = {n: p for n, p in self.check(model, strict=strict).items() if n not in self.gates}
        plan = self._plan(model, targets, exact)
        originals = {name: p.detach().clone() for name, p in targets.items() if not p.is_meta}
        modules = {id(m): m for owners in plan.values() for m, _, _ in (owners or ())}
        before: dict[int, tuple[dict, dict] | None] = {}
        for key, module in modules.items():
            state: _Rounding | None = getattr(module, _ROUNDING_ATTR, None)
            before[key] = None if state is None else (state.residuals, state.layouts)
        gated: list[tuple[nn.Module, int]] = []
        try:
            with torch.no_grad():
                self._add(targets, plan, scale, exact)
            gated = self._add_gated(model, scale)
            yield model
        finally:
            for module, token in gated:
                remove_gated(module, token)
            with torch.no_grad():
                for name, param in targets.items():
                    if not param.is_meta:  # an offloaded weight was never written
                        param.copy_(originals[name])
            for key, module in modules.items():
                state, saved = getattr(module, _ROUNDING_ATTR, None), before[key]
                if saved is None:
                    _drop_rounding(module)
                elif state is not None:  # an earlier apply()'s residuals, its hook kept in place
                    state.residuals, state.layouts = saved
                else:
                    for attr in saved[0]:
                        _set_residual(module, attr, saved[1][attr], saved[0][attr])

    # -- persistence ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": "editkit-patch",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "layer": self.layer,
            "parameters": {n: list(d.shape) for n, d in self.deltas.items()},
            "gates": sorted(self.gates),
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
            tensors = {n: d.contiguous() for n, d in self.deltas.items()}
            tensors.update({f"{n}{GATE_KEY}{part}": t.reshape(-1).float().contiguous()
                            for n, gate in self.gates.items() for part, t in gate.items()})
            save_file(tensors, str(tmp / DELTA_FILE), metadata={"format": "editkit-patch"})
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
        gates: dict[str, dict[str, torch.Tensor]] = {}
        for key in [k for k in deltas if GATE_KEY in k]:
            name, part = key.split(GATE_KEY, 1)
            gates.setdefault(name, {})[part] = deltas.pop(key).reshape(-1 if part == "weight" else ())
        if set(deltas) != set(meta.get("parameters", {})) or set(gates) != set(meta.get("gates", [])):
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
            gates=gates,
        )

    def norm(self) -> float:
        return float(sum(d.float().pow(2).sum() for d in self.deltas.values()) ** 0.5)

    def __repr__(self) -> str:
        names = ", ".join(self.deltas)
        gated = f", gated=[{', '.join(self.gates)}]" if self.gates else ""
        return f"Patch(method={self.method!r}, layer={self.layer}, params=[{names}]{gated}, norm={self.norm():.4g})"


def load_patch(path: str | Path) -> Patch:
    """Read a patch saved by :meth:`Patch.save`."""
    return Patch.load(path)


def _plain_permissions(folder: Path) -> None:
    """The modes a plain ``mkdir``/``open`` would have given under the current umask: ``mkdtemp``
    (and some writers) create owner-only folders and files, which a colleague could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [folder, *folder.rglob("*")]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


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
        _plain_permissions(tmp)
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
