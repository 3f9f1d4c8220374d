"""MEND edit: one forward and backward pass on the instance, the editor maps the gradient's factors
to a delta for every target weight, and the deltas are returned as a Patch.

With ``archive`` set, the editor, the weights it edits and their learned rates come from a trained
archive, which must belong to the model (its weights' fingerprint is checked; another model is
refused). With ``archive: null`` the editor is untrained: identity-initialised, so the edit is the
plain gradient step ΔW = −lr · lr_scale · ∇W NLL(safe | attack ⊕ suffix) on the configured weights
(one step of gradient descent, FT-style, on the top layers' MLP weights by default).

A loaded editor is cached per model object and archive file (its path and modification time) in
this module, shared by every MEND object (a ``WeakKeyDictionary``: a model that is dropped takes its
editors with it), so scoring many records with ``editkit.edit`` reads and checks an archive once.
"""
from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap, resolve_arch
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.mend.archive import WEIGHTS_FILE, archive_folder, load_editor
from editkit.methods.mend.config import MENDConfig
from editkit.methods.mend.editor import MENDEditor
from editkit.methods.mend.examples import edit_pair, knowledge_pair
from editkit.methods.mend.factors import (answer_logits, deltas_added, frozen, gradient_factors, kl, nll,
                                          resolve_targets)
from editkit.patch import Patch
from editkit.result import EditResult
from editkit.text import encode_pairs

log = logging.getLogger(__name__)

# model -> {(archive path, mtime) or (None, lr, target names): (editor, archive metadata)}
_EDITORS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[MENDEditor, dict[str, Any]]]] = (
    weakref.WeakKeyDictionary())


class MEND(EditingMethod):
    name = "mend"
    scope = "instance"
    config_class = MENDConfig
    hparams: MENDConfig

    # -- the editor ------------------------------------------------------------------------------------
    def editor_for(self, model: nn.Module, arch: ArchMap) -> tuple[MENDEditor, dict[str, Any]]:
        """(editor, archive metadata) for ``model``: the archive's trained editor (checked against the
        model), or an untrained one on the configured weights when ``archive`` is null."""
        hp = self.hparams
        cache = _EDITORS.setdefault(model, {})
        if hp.archive is None:
            targets = resolve_targets(model, arch, hp.layers, hp.modules)
            key: tuple = (None, hp.lr, tuple(t.name for t in targets))
            if key not in cache:
                # U = 0 makes the MLP's output exactly zero whatever its size: build the smallest one
                editor = MENDEditor(targets, rank=1, n_hidden=0, lr=hp.lr, normalize=False)
                cache[key] = (editor.to(next(model.parameters()).device).eval(), {"archive": None})
            return cache[key]
        folder = archive_folder(hp.archive)
        key = (str(folder.resolve()), (folder / WEIGHTS_FILE).stat().st_mtime_ns)
        if key not in cache:
            cache[key] = load_editor(folder, model)
            configured = [t.name for t in resolve_targets(model, arch, hp.layers, hp.modules)]
            trained = [t.name for t in cache[key][0].targets]
            if configured != trained:
                log.warning("MEND archive %s edits %s; the layers/modules settings (%s) are ignored", folder,
                            trained, configured)
            was = cache[key][1].get("hparams", {})
            differ = [k for k in ("use_suffix", "suffix", "chat_template") if k in was and was[k] != getattr(hp, k)]
            if differ:
                log.warning("MEND archive %s was trained with other %s than this edit uses; its editor saw "
                            "prompts rendered differently", folder, differ)
        return cache[key]

    @staticmethod
    def load(path: str | Path, model: nn.Module) -> tuple[MENDEditor, dict[str, Any]]:
        """The trained editor of the archive at ``path`` and its metadata; refuses another model."""
        return load_editor(path, model)

    # -- the edit ----------------------------------------------------------------------------------------
    def edit(
        self,
        model: nn.Module,
        tokenizer: Any,
        instance: EditInstance,
        *,
        arch: ArchMap | dict | None = None,
        progress: bool = False,
        **unused: Any,
    ) -> EditResult:
        """The MEND patch for ``instance`` (towards ``instance.safe`` after the attack prompt ⊕ suffix).
        Other contract keywords (``constraint_pool``, ``layer``) are accepted and unused: the edited
        weights are the settings' (or the archive's)."""
        hp = self.hparams
        arch = resolve_arch(model, arch)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        editor, _ = self.editor_for(model, arch)
        timings["load"] = time.perf_counter() - start
        device = next(model.parameters()).device

        def encode(pair: tuple[str, str]) -> Any:
            return encode_pairs(tokenizer, [pair], chat_template=hp.chat_template, max_length=hp.max_length).to(device)

        edit_batch, knowledge = encode(edit_pair(instance, hp)), encode(knowledge_pair(instance, hp))
        with frozen(model):
            mark = time.perf_counter()
            factors, nll_before = gradient_factors(model, arch, editor.targets, edit_batch)  # the one pass
            with torch.no_grad():
                deltas = editor(factors, lr_scale=hp.lr_scale)
                bad = [name for name, d in deltas.items() if not torch.isfinite(d).all()]
                if bad:
                    raise FloatingPointError(f"MEND: the predicted delta of {bad[0]} holds NaN or inf "
                                             f"(edit NLL {float(nll_before):.4g}); the model is untouched")
                timings["edit"] = time.perf_counter() - mark
                mark = time.perf_counter()  # what follows only measures the edit (the trust check reads it)
                knowledge_before = answer_logits(model, arch, knowledge)
                with deltas_added(model, editor.targets, deltas):
                    nll_after = nll(answer_logits(model, arch, edit_batch), edit_batch)
                    knowledge_after = answer_logits(model, arch, knowledge)
                timings["measure"] = time.perf_counter() - mark
        reference = torch.log_softmax(knowledge_before, -1)
        metrics: dict[str, Any] = {
            "edit_nll_before": float(nll_before),
            "edit_nll_after": float(nll_after),
            "knowledge_nll_before": float(nll(knowledge_before, knowledge)),
            "knowledge_nll_after": float(nll(knowledge_after, knowledge)),
            "kl_after": float(kl(reference, knowledge_after)),
            "weights_edited": len(deltas),
            "gradient_tokens": int(next(iter(factors.values()))[0].shape[0]),
        }
        patch = Patch.from_deltas(model, deltas, method=self.name, hparams=hp.to_dict(), metrics=metrics)
        log.info("MEND edited %d weights in %.2fs: edit NLL %.3f -> %.3f", len(deltas), timings["edit"],
                 metrics["edit_nll_before"], metrics["edit_nll_after"])
        return EditResult(method=self.name, patch=patch, losses=[{"step": 0, "loss": metrics["edit_nll_before"]}],
                          metrics=metrics, timings=timings, hparams=hp.to_dict())

    # -- meta-training -------------------------------------------------------------------------------------
    def train(self, model: nn.Module, tokenizer: Any, train_records: Any, val_records: Any = (), *,
              out_dir: str | Path, **kwargs: Any) -> Any:
        """Meta-train an editor with these settings (see :func:`editkit.methods.mend.training.train`)."""
        from editkit.methods.mend.training import train

        return train(model, tokenizer, train_records, val_records, out_dir, hparams=self.hparams, **kwargs)
