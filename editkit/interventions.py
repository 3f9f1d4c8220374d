"""Interventions: what an evaluation applies to a model around generation, behind one seam.

The SafeEdit runner (and later the probe command and the toxicity evaluation) take an
:class:`Intervention` and never ask which method is behind it:

* :class:`Vanilla` — nothing;
* :class:`PerInstanceEdit` — an instance-scope method edits the model for each case (``edit``),
  the case is scored with the patch applied, then the model is restored (or, ``sequential``, the
  edits accumulate and the model is restored when the run ends);
* :class:`FixedPatch` — one saved patch, applied for every case;
* :class:`Decoding` — a decoding-time detoxifier (``editkit.generate(..., detoxifier=...)``), alone or
  on top of any of the others (an edited model decoded with a detoxifier);
* :class:`CrossFitted` — a dataset-scope method (``fit``) trained on the records of the other folds
  and scored on this fold's, so no record is scored by a model trained on it (DESIGN §5); each
  fold's patch is saved under the run folder and reused when the run resumes (a fold whose fit was
  interrupted resumes its training from the checkpoints in ``fold-k-of-n/training``);
* :class:`CrossFittedEditor` — the same for an instance-scope method with a meta-trained editor
  (MEND): each fold's editor is trained on the other folds, then edits this fold's records one by one.

``intervention.suffix`` is what it prescribes after every prompt at inference time (DINM's suffix);
``settings()`` is recorded in the run's config.json, so a resumed run cannot mix settings. A case's
row may carry ``setup_seconds``: time the intervention spent on work shared by many cases (fitting
a fold), which the runner keeps out of that case's ``seconds``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from editkit.hparams import HParams
from editkit.instance import EditInstance, id_ranks
from editkit.patch import Patch, load_patch
from editkit.registry import get_method, load_hparams

log = logging.getLogger(__name__)


class Intervention:
    """Base: no change to the model (subclasses override what they need)."""

    label = "vanilla"
    suffix: str | None = None

    def settings(self) -> dict[str, Any]:
        """What identifies this intervention in a run folder (JSON-ready)."""
        return {"kind": type(self).__name__}

    def prepare(self, pool: Sequence[EditInstance], folder: Path | None = None, *, progress: bool = False) -> None:
        """Told once before the run: every record of the evaluation (all shards' records, not one
        shard's), the run folder where it may keep what it fits, and whether to show progress."""

    def generation_kwargs(self) -> dict[str, Any]:
        """Extra arguments for every ``editkit.generate`` call of the run (a decoding-time detoxifier)."""
        return {}

    @contextlib.contextmanager
    def around_run(self, model: Any) -> Iterator[None]:
        """Entered once around the whole run; leaves the model as it found it."""
        yield

    @contextlib.contextmanager
    def for_case(self, model: Any, tokenizer: Any, instance: EditInstance, *,
                 constraint_pool: Sequence[EditInstance] = ()) -> Iterator[dict[str, Any]]:
        """Entered around one case's generation and scoring; yields what to record in its row.
        ``constraint_pool``: other records a method may use as constraints (none that are scored
        for this case)."""
        yield {}


class Vanilla(Intervention):
    """The unedited model."""


class PerInstanceEdit(Intervention):
    """An instance-scope method's edit per case (``sequential``: the edits accumulate)."""

    def __init__(self, method: str, hparams: HParams | Any = None, *, sequential: bool = False, **edit_kwargs: Any) -> None:
        spec = get_method(method)
        if spec.scope != "instance":
            raise ValueError(f"{spec.name!r} is a {spec.scope}-scope method; evaluate it with CrossFitted or FixedPatch")
        self.method, self.hparams = spec.name, load_hparams(spec.name, hparams)
        self.sequential, self.edit_kwargs = sequential, edit_kwargs
        self.label, self.suffix = spec.name, self.hparams.eval_suffix
        self._originals: dict[str, torch.Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {"kind": "per-instance", "method": self.method, "sequential": self.sequential,
                "hparams": self.hparams.to_dict()}

    @contextlib.contextmanager
    def around_run(self, model: Any) -> Iterator[None]:
        self._originals = {}
        try:
            yield
        finally:  # sequential mode: give the model back as it came
            if self._originals:
                with torch.no_grad():
                    params = dict(model.named_parameters())
                    for name, value in self._originals.items():
                        params[name].copy_(value)
            self._originals = {}

    @contextlib.contextmanager
    def for_case(self, model: Any, tokenizer: Any, instance: EditInstance, *,
                 constraint_pool: Sequence[EditInstance] = ()) -> Iterator[dict[str, Any]]:
        from editkit.api import edit

        result = edit(model, instance, tokenizer=tokenizer, method=self.method, hparams=self.hparams,
                      constraint_pool=constraint_pool, **self.edit_kwargs)
        # every second the edit cost (localisation, a guard's self-answers, the steps), and the parts
        row = {"layer": result.layer, "edit_seconds": round(result.timings.get("total", 0.0), 3),
               "edit_timings": {k: round(v, 3) for k, v in result.timings.items()}, "edit_metrics": result.metrics}
        if self.sequential:
            for name, param in result.patch.check(model).items():
                self._originals.setdefault(name, param.detach().clone())
            result.patch.apply(model)
            yield row
        else:
            with result.patch.applied(model):
                yield row


class FixedPatch(Intervention):
    """One saved patch (a folder written by ``Patch.save``, or a Patch) applied for every case."""

    def __init__(self, patch: Patch | str | Path, *, suffix: str | None = None) -> None:
        self.source = str(patch) if not isinstance(patch, Patch) else None
        self.patch = patch if isinstance(patch, Patch) else load_patch(patch)
        self.label = f"{self.patch.method or 'patch'} (fixed patch)"
        self.suffix = suffix

    def settings(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for name in sorted(self.patch.deltas):
            digest.update(name.encode())
            digest.update(self.patch.deltas[name].numpy().tobytes())
            for part, tensor in sorted(self.patch.gates.get(name, {}).items()):  # a gated delta's gate
                digest.update(part.encode())
                digest.update(tensor.float().numpy().tobytes())
        return {"kind": "fixed-patch", "method": self.patch.method, "source": self.source,
                "deltas_sha256": digest.hexdigest(), "suffix": self.suffix}

    @contextlib.contextmanager
    def for_case(self, model: Any, tokenizer: Any, instance: EditInstance, *,
                 constraint_pool: Sequence[EditInstance] = ()) -> Iterator[dict[str, Any]]:
        with self.patch.applied(model):
            yield {}


def folds_by_id(instances: Sequence[EditInstance], k: int) -> dict[str, int]:
    """A fold in ``range(k)`` for every record id: records sorted by id (numerically where the ids
    are numbers) and dealt round-robin, so the folds do not depend on the order of a file."""
    return {record_id: n % k for record_id, n in id_ranks(inst.id for inst in instances).items()}


class CrossFitted(Intervention):
    """A dataset-scope method scored by k-fold cross-fitting by record id: the patch that scores a
    record was fitted on the records of the other folds only. The folds are drawn from the pool
    given to :meth:`prepare` (the runner's full pool, so every shard uses the same folds); the run
    folder keeps each fold's patch so a resumed run does not fit again."""

    def __init__(self, method: str, hparams: HParams | Any = None, *, folds: int = 2, **fit_kwargs: Any) -> None:
        spec = get_method(method)
        if spec.scope != "dataset":
            raise ValueError(f"{spec.name!r} is an {spec.scope}-scope method; evaluate it with PerInstanceEdit")
        if folds < 2:
            raise ValueError("cross-fitting needs at least 2 folds")
        self.method, self.hparams, self.folds = spec.name, load_hparams(spec.name, hparams), folds
        self.folder: Path | None = None
        self.fit_kwargs = fit_kwargs
        self.label, self.suffix = f"{spec.name} ({folds}-fold cross-fitted)", self.hparams.eval_suffix
        self.pool: list[EditInstance] = []
        self._fold_of: dict[str, int] = {}
        self._patches: dict[int, Patch] = {}
        self.fit_info: dict[int, dict[str, Any]] = {}

    def settings(self) -> dict[str, Any]:
        return {"kind": "cross-fitted", "method": self.method, "folds": self.folds, "hparams": self.hparams.to_dict()}

    def prepare(self, pool: Sequence[EditInstance], folder: Path | None = None, *, progress: bool = False) -> None:
        self.pool, self.folder = list(pool), Path(folder) if folder is not None else None
        self.fit_kwargs.setdefault("progress", progress)  # a fold's training is a long loop of its own
        self._fold_of = folds_by_id(self.pool, self.folds)
        self._patches.clear()

    def fold_of(self, instance: EditInstance) -> int:
        if instance.id not in self._fold_of:
            raise ValueError(f"record {instance.id!r} is not in the pool the folds were drawn from")
        return self._fold_of[instance.id]

    def patch_for(self, model: Any, tokenizer: Any, fold: int) -> Patch:
        """The patch fitted without fold ``fold`` (fitted now, or read from the run folder)."""
        if fold in self._patches:
            return self._patches[fold]
        fold_dir = self.folder / f"fold-{fold}-of-{self.folds}" if self.folder is not None else None
        saved = fold_dir / "patch" if fold_dir is not None else None
        if saved is not None and saved.is_dir():
            patch = load_patch(saved)
            log.info("cross-fitting: fold %d's patch read from %s", fold, saved)
        else:
            from editkit.api import fit

            train = [inst for inst in self.pool if self._fold_of[inst.id] != fold]
            log.info("cross-fitting: fitting %s on %d records (all but fold %d)", self.method, len(train), fold)
            checkpoints = {"output_dir": str(fold_dir / "training")} if fold_dir is not None else {}
            result = fit(model, train, tokenizer=tokenizer, method=self.method, hparams=self.hparams,
                         **checkpoints, **self.fit_kwargs)
            patch = result.patch
            patch.metrics = {**patch.metrics, "trained_on_ids": [inst.id for inst in train],
                             "timings": result.timings}
            self.fit_info[fold] = {"n_train": len(train), **result.timings}
            if saved is not None:
                patch.save(saved, overwrite=True)
        self._patches[fold] = patch
        return patch

    @contextlib.contextmanager
    def for_case(self, model: Any, tokenizer: Any, instance: EditInstance, *,
                 constraint_pool: Sequence[EditInstance] = ()) -> Iterator[dict[str, Any]]:
        fold = self.fold_of(instance)
        start = time.perf_counter()
        fitted_now = fold not in self._patches
        patch = self.patch_for(model, tokenizer, fold)
        info: dict[str, Any] = {"fold": fold}
        if fitted_now:  # the runner keeps this out of the case's own seconds
            info["setup_seconds"] = round(time.perf_counter() - start, 2)
        trained_on = set(patch.metrics.get("trained_on_ids", ()))
        if instance.id in trained_on:
            raise RuntimeError(f"record {instance.id} would be scored by a patch trained on it")
        with patch.applied(model):
            yield info


def has_trained_editor(spec: Any, hparams: Any) -> bool:
    """Whether an instance-scope method edits with a meta-trained editor (``train()`` and an
    ``archive`` setting, e.g. MEND)."""
    return spec.scope == "instance" and hasattr(spec.method_class, "train") and hasattr(hparams, "archive")


class CrossFittedEditor(Intervention):
    """An instance-scope method whose editor is meta-trained on records (MEND: its ``train`` writes
    an archive, its settings name it in ``archive``), scored by k-fold cross-fitting by record id:
    a record is edited, per instance, by an editor trained only on the other folds' records (a
    ``val_fraction`` of those held apart for validation and early stopping). Each fold's training
    runs in the run folder (``fold-k-of-n/training``: a rerun resumes or reuses it)."""

    def __init__(self, method: str, hparams: HParams | Any = None, *, folds: int = 2, val_fraction: float = 0.1,
                 **train_kwargs: Any) -> None:
        spec = get_method(method)
        self.hparams = load_hparams(spec.name, hparams)
        if not has_trained_editor(spec, self.hparams):
            raise ValueError(f"{spec.name!r} has no meta-trained editor to cross-fit (an instance-scope method with "
                             "train() and an 'archive' setting, e.g. mend)")
        if self.hparams.archive is not None:
            raise ValueError(f"{spec.name} settings name an archive ({self.hparams.archive}); cross-fitting trains "
                             "its own per fold: set archive to null, or score that archive with PerInstanceEdit")
        if folds < 2:
            raise ValueError("cross-fitting needs at least 2 folds")
        self.method, self.folds, self.val_fraction, self.train_kwargs = spec.name, folds, val_fraction, train_kwargs
        self.label, self.suffix = f"{spec.name} ({folds}-fold cross-fitted)", self.hparams.eval_suffix
        self.pool: list[EditInstance] = []
        self.folder: Path | None = None
        self._fold_of: dict[str, int] = {}
        self._editors: dict[int, tuple[PerInstanceEdit, set[str]]] = {}
        self.progress = False

    def settings(self) -> dict[str, Any]:
        return {"kind": "cross-fitted-editor", "method": self.method, "folds": self.folds,
                "val_fraction": self.val_fraction, "hparams": self.hparams.to_dict()}

    def prepare(self, pool: Sequence[EditInstance], folder: Path | None = None, *, progress: bool = False) -> None:
        self.pool, self.progress = list(pool), progress
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=f"editkit-{self.method}-"))
        self._fold_of = folds_by_id(self.pool, self.folds)
        self._editors.clear()

    def editor_for(self, model: Any, tokenizer: Any, fold: int) -> tuple[PerInstanceEdit, set[str]]:
        """(per-instance editing with fold ``fold``'s trained archive, the ids it was trained or
        validated on), training it now unless the run folder already holds it."""
        if fold not in self._editors:
            from editkit.methods.mend.training import hold_out

            others = [inst for inst in self.pool if self._fold_of[inst.id] != fold]
            train, val = hold_out(others, self.val_fraction)
            out = self.folder / f"fold-{fold}-of-{self.folds}" / "training"
            log.info("cross-fitting: meta-training %s on %d records, validating on %d (all but fold %d)",
                     self.method, len(train), len(val), fold)
            trainer = get_method(self.method).method_class(self.hparams)
            result = trainer.train(model, tokenizer, train, val, out_dir=out, progress=self.progress, **self.train_kwargs)
            editing = PerInstanceEdit(self.method, self.hparams.replace(archive=str(result.archive)))
            self._editors[fold] = (editing, {inst.id for inst in others})
        return self._editors[fold]

    @contextlib.contextmanager
    def for_case(self, model: Any, tokenizer: Any, instance: EditInstance, *,
                 constraint_pool: Sequence[EditInstance] = ()) -> Iterator[dict[str, Any]]:
        if instance.id not in self._fold_of:
            raise ValueError(f"record {instance.id!r} is not in the pool the folds were drawn from")
        fold = self._fold_of[instance.id]
        start = time.perf_counter()
        trained_now = fold not in self._editors
        editing, seen = self.editor_for(model, tokenizer, fold)
        if instance.id in seen:
            raise RuntimeError(f"record {instance.id} would be edited by an editor trained on it")
        info: dict[str, Any] = {"fold": fold}
        if trained_now:  # the runner keeps this out of the case's own seconds
            info["setup_seconds"] = round(time.perf_counter() - start, 2)
        with editing.for_case(model, tokenizer, instance, constraint_pool=constraint_pool) as row:
            yield {**row, **info}


class Decoding(Intervention):
    """A decoding-time detoxifier for every generation of the run, on top of ``base`` (default: the
    unedited model), so weight edits and decoding-time methods combine."""

    def __init__(self, detoxifier: Any, base: Intervention | None = None) -> None:
        self.detoxifier, self.base = detoxifier, base if base is not None else Vanilla()
        name = getattr(detoxifier, "label", type(detoxifier).__name__)
        self.label = name if isinstance(self.base, Vanilla) else f"{self.base.label} + {name}"
        self.suffix = self.base.suffix

    def settings(self) -> dict[str, Any]:
        described = getattr(self.detoxifier, "settings", None)
        return {**self.base.settings(), "decoding": described() if callable(described) else repr(self.detoxifier)}

    def generation_kwargs(self) -> dict[str, Any]:
        return {**self.base.generation_kwargs(), "detoxifier": self.detoxifier}

    def prepare(self, pool: Sequence[EditInstance], folder: Path | None = None, *, progress: bool = False) -> None:
        self.base.prepare(pool, folder, progress=progress)

    @contextlib.contextmanager
    def around_run(self, model: Any) -> Iterator[None]:
        with self.base.around_run(model):
            yield

    @contextlib.contextmanager
    def for_case(self, model: Any, tokenizer: Any, instance: EditInstance, *,
                 constraint_pool: Sequence[EditInstance] = ()) -> Iterator[dict[str, Any]]:
        with self.base.for_case(model, tokenizer, instance, constraint_pool=constraint_pool) as info:
            yield info
