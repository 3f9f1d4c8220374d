"""MEND meta-training: learn the editor on SafeEdit-style records, validate on held-apart ones, save
the archive.

One step, per record (``batch_records`` of them, gradients averaged):

(Every pass runs from the lowest edited layer up: the layers below give the same state at every step,
kept once per example with the unedited locality log-probs; :mod:`editkit.methods.mend.unedited`.)

1. inner pass — NLL(safe | attack ⊕ suffix) through the unedited model, one forward and backward,
   gives each target weight's factors (u_t, δ_t) (:func:`~editkit.methods.mend.factors.gradient_factors`);
2. the editor maps them to ΔW for every target (normalisation statistics updated with these tokens);
3. outer pass — the edited model is the unedited one plus forward hooks adding x·ΔWᵀ, so the
   model's weights are never written and gradients flow to the editor:
   loss = c_edit · NLL(safe | attack ⊕ suffix [, generalisation inputs]) + c_loc · KL(p_unedited ‖
   p_edited) on the locality pairs (knowledge pairs, benign requests answered by the unedited model);
4. gradient clipping and an Adam step on the editor (``meta_lr``) and the learned edit rates
   (``lr_lr``). A step whose factors, loss or gradient norm is not finite is skipped — nothing is
   applied, the statistics are not updated — and counted.

Every ``val_every`` steps (and before the first) the validation records are scored with the same
loss; the best editor is kept and training stops after ``patience`` scores without improvement.
The run folder holds ``checkpoint/`` (editor, best editor, Adam state, counters; a second call with
the same settings, records and model resumes from it) and ``archive/`` (the result).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.arch import ArchMap, resolve_arch
from editkit.devices import real_values
from editkit.instance import EditInstance, id_ranks
from editkit.methods.lora import _peak_rss_mb, records_digest
from editkit.methods.mend.archive import (ARCHIVE_DIR, STATE_DIR, base_fingerprint, load_state, optimizer_state,
                                          restore_optimizer, save_archive, save_state, split_prefix, with_prefix)
from editkit.methods.mend.config import MENDConfig
from editkit.methods.mend.editor import MENDEditor, Stats
from editkit.methods.mend.examples import Example, benign_answers, build_examples
from editkit.methods.mend.factors import deltas_added, frozen, gradient_factors, kl, nll, resolve_targets
from editkit.methods.mend.unedited import UneditedCache
from editkit.patch import fingerprint_matches, model_info

log = logging.getLogger(__name__)

# settings that do not change what a training computes step by step: the edit-time ones, and the
# budget (a finished run resumed with a larger `steps` continues where it stopped)
NOT_IDENTITY = ("archive", "lr_scale", "steps")
DEFAULT_CHECKPOINT_EVERY = 50


@dataclass
class TrainResult:
    """What a meta-training produced: the archive folder and how the run went."""

    archive: Path
    steps: int  # optimiser steps taken in total (skipped ones included)
    resumed_from_step: int
    nan_steps: int  # steps skipped because a loss, factor or gradient was not finite
    stopped_early: bool
    best_val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step
    validations: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_rss_mb: float | None = None


def outer_loss(
    model: nn.Module, arch: ArchMap, editor: MENDEditor, example: Example, hparams: MENDConfig, *,
    stats: Stats | None = None, update_stats: bool = False, cache: UneditedCache | None = None,
) -> tuple[torch.Tensor, dict[str, float], Stats | None]:
    """MEND's meta-training loss for one record, with gradient to the editor: (loss, its parts,
    the statistics it used). ``update_stats``: first merge this record's factors into ``stats``
    (default: the editor's own), as training does; the editor itself is not changed. ``cache``: what
    the unedited model gives that no step changes, kept across calls (default: a new one, used once)."""
    cache = cache if cache is not None else UneditedCache(model, arch, editor.targets)
    with cache.skipping(example.edit):
        factors, nll_before = gradient_factors(model, arch, editor.targets, example.edit)
    parts = {"edit_nll_before": float(nll_before)}
    if not all(bool(torch.isfinite(u).all() and torch.isfinite(d).all()) for u, d in factors.values()):
        return torch.tensor(math.nan), parts, stats
    if update_stats:
        stats = editor.updated_stats(stats if stats is not None else editor.current_stats(), factors)
    reference = cache.reference(example.locality)  # the unedited model
    deltas = editor(factors, stats=stats)
    with deltas_added(model, editor.targets, deltas):
        edit_nll = nll(cache.logits(example.outer), example.outer)
        locality = kl(reference, cache.logits(example.locality))
    loss = hparams.c_edit * edit_nll + hparams.c_loc * locality
    parts.update(edit_nll=edit_nll.item(), kl=locality.item())
    return loss, parts, stats


def evaluate(model: nn.Module, arch: ArchMap, editor: MENDEditor, examples: Sequence[Example],
             hparams: MENDConfig, *, cache: UneditedCache | None = None) -> dict[str, float]:
    """Mean outer loss and its parts over ``examples`` (no statistics updated, no gradient kept);
    a non-finite loss counts as inf."""
    totals: dict[str, float] = {}
    cache = cache if cache is not None else UneditedCache(model, arch, editor.targets)
    for example in examples:
        with torch.no_grad():
            loss, parts, _ = outer_loss(model, arch, editor, example, hparams, cache=cache)
        value = loss.item()
        for key, v in {"loss": value if math.isfinite(value) else math.inf, **parts}.items():
            totals[key] = totals.get(key, 0.0) + v / len(examples)
    return totals


def score_records(model: nn.Module, tokenizer: Any, editor: MENDEditor, records: Sequence[EditInstance],
                  hparams: MENDConfig, *, arch: ArchMap | dict | None = None) -> dict[str, float]:
    """:func:`evaluate` on ``records`` (their examples built as training builds them)."""
    arch = resolve_arch(model, arch)
    with frozen(model):
        return evaluate(model, arch, editor, build_examples(model, tokenizer, records, hparams, pool=records), hparams)


def hold_out(records: Sequence[EditInstance], fraction: float) -> tuple[list[EditInstance], list[EditInstance]]:
    """(train, validation): every k-th record by sorted id (k = round(1 / fraction)) is held apart."""
    if fraction <= 0:
        return list(records), []
    if fraction >= 1:
        raise ValueError(f"the validation fraction must be below 1, got {fraction}")
    k = max(2, round(1 / fraction))
    held = {record_id for record_id, n in id_ranks(r.id for r in records).items() if n % k == k - 1}
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]


class RecordOrder:
    """The records of optimiser step s: a fresh permutation per epoch from ``seed`` (so a resumed run
    draws exactly what an uninterrupted one would)."""

    def __init__(self, n: int, per_step: int, seed: int) -> None:
        self.n, self.per_step, self.seed = n, per_step, seed
        self._epochs: dict[int, list[int]] = {}

    def at(self, step: int) -> list[int]:
        out = []
        for position in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, i = divmod(position, self.n)
            if epoch not in self._epochs:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epochs[epoch] = torch.randperm(self.n, generator=generator).tolist()
            out.append(self._epochs[epoch][i])
        return out


def _identity(hparams: MENDConfig, model: nn.Module, targets: list, train: Sequence[EditInstance],
              val: Sequence[EditInstance]) -> dict[str, Any]:
    """What decides a training (a resume must match it); JSON-normalised."""
    identity = {"hparams": {k: v for k, v in hparams.to_dict().items() if k not in NOT_IDENTITY},
                "train_records": records_digest(train), "val_records": records_digest(val),
                "targets": [t.name for t in targets],
                "model": {k: v for k, v in model_info(model).items() if k != "name_or_path"}}
    return json.loads(json.dumps(identity, default=str))


def _check_resume(folder: Path, saved: dict[str, Any], identity: dict[str, Any], model: nn.Module) -> None:
    differ = sorted(k for k in identity if saved.get("identity", {}).get(k) != identity[k])
    params = dict(model.named_parameters())
    prints = saved.get("base_fingerprint", {})
    if any(name not in params or not fingerprint_matches(real_values(model, name), fp) for name, fp in prints.items()):
        differ.append("base model weights")
    if differ:
        raise ValueError(f"{folder} holds the checkpoint of a MEND training with different {', '.join(differ)}; "
                         "resuming would mix two trainings. Use another output folder, or delete this one.")


def train(
    model: nn.Module,
    tokenizer: Any,
    train_records: Sequence[EditInstance],
    val_records: Sequence[EditInstance],
    out_dir: str | Path,
    *,
    hparams: MENDConfig | None = None,
    arch: ArchMap | dict | None = None,
    progress: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    overwrite: bool = False,
) -> TrainResult:
    """Meta-train a MEND editor for ``model`` and write ``out_dir/archive`` (use it with the setting
    ``archive: <out_dir>``). Resumes from ``out_dir/checkpoint`` when a training with the same
    settings, records and model was interrupted there, or stopped at a smaller ``steps`` budget.
    ``val_records`` (held apart from the training records) drive early stopping and pick the
    archived editor; without them the last one is kept. ``checkpoint_every``: steps between
    checkpoints. The model is left bit-identical, also when training raises."""
    hp = hparams if hparams is not None else MENDConfig()
    train_records, val_records = list(train_records), list(val_records)
    if not train_records:
        raise ValueError("MEND meta-training needs at least one training record")
    shared = sorted({r.id for r in train_records} & {r.id for r in val_records})
    if shared:
        raise ValueError(f"validation records must be held apart from the training records; shared ids: {shared[:10]}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    arch = resolve_arch(model, arch)
    targets = resolve_targets(model, arch, hp.layers, hp.modules)
    out = Path(out_dir)
    state_dir, archive_dir = out / STATE_DIR, out / ARCHIVE_DIR
    identity = _identity(hp, model, targets, train_records, val_records)
    saved = load_state(state_dir)
    if saved is not None:
        _check_resume(state_dir, saved[1], identity, model)
    elif archive_dir.exists() and not overwrite:
        raise FileExistsError(f"{archive_dir} exists and no checkpoint of its training is left; pass overwrite=True "
                              "to train a new editor there")

    device = next(model.parameters()).device
    editor = MENDEditor(targets, rank=hp.rank, n_hidden=hp.n_hidden, lr=hp.lr, normalize=hp.normalize,
                        seed=hp.seed).to(device)
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in editor.named_parameters() if n != "lrs"], "lr": hp.meta_lr},
        {"params": [editor.lrs], "lr": hp.lr_lr}])
    run: dict[str, Any] = {"step": 0, "best_val": None, "bad": 0, "nan_steps": 0, "stopped": False, "history": [],
                           "validations": [], "train_seconds": 0.0, "guard_seconds": 0.0}
    best_state: dict[str, torch.Tensor] | None = None
    if saved is not None:
        tensors, meta = saved
        editor.load_state_dict(split_prefix(tensors, "editor"))
        restore_optimizer(optimizer, split_prefix(tensors, "optim"), meta["optimizer"])
        best_state = split_prefix(tensors, "best") or None
        run.update({k: meta[k] for k in run})
        log.info("MEND: resuming %s from step %d", state_dir, run["step"])
    resumed_from = run["step"]
    prints = base_fingerprint(model, targets)

    def checkpoint() -> None:
        optim_tensors, optim_rest = optimizer_state(optimizer)
        tensors = {**with_prefix(editor.state_dict(), "editor"), **with_prefix(optim_tensors, "optim")}
        if best_state is not None:
            tensors.update(with_prefix(best_state, "best"))
        save_state(state_dir, tensors, {**run, "identity": identity, "base_fingerprint": prints,
                                        "optimizer": optim_rest})

    def validate(examples: list[Example]) -> None:
        nonlocal best_state
        scores = evaluate(model, arch, editor, examples, hp, cache=cache)
        run["validations"].append({"step": run["step"], **scores})
        if run["best_val"] is None or scores["loss"] < run["best_val"]:
            run["best_val"], run["bad"] = scores["loss"], 0
            best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}
        else:
            run["bad"] += 1
            run["stopped"] = bool(hp.patience) and run["bad"] >= hp.patience

    order = RecordOrder(len(train_records), hp.batch_records, hp.seed)
    cache = UneditedCache(model, arch, targets)  # lower-layer states and references, once per example
    with frozen(model):
        start = time.perf_counter()
        answers = benign_answers(model, tokenizer, train_records + val_records, hp)
        train_examples = build_examples(model, tokenizer, train_records, hp, pool=train_records, answers=answers)
        val_examples = build_examples(model, tokenizer, val_records, hp, pool=train_records, answers=answers)
        if saved is None:
            run["guard_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        if val_examples and not run["validations"]:
            validate(val_examples)  # the untrained editor (the plain gradient step) is the first to beat
        bar = tqdm(total=hp.steps, initial=run["step"], desc="MEND meta-training", disable=not progress)
        try:
            while run["step"] < hp.steps and not run["stopped"]:
                record = _step(model, arch, editor, optimizer, [train_examples[i] for i in order.at(run["step"])], hp,
                               cache)
                record["step"] = run["step"]
                run["history"].append(record)
                run["nan_steps"] += int(record["skipped"])
                run["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", nan=run["nan_steps"],
                                val=f"{run['best_val']:.4f}" if run["best_val"] is not None else "-")
                if val_examples and run["step"] % hp.val_every == 0:
                    validate(val_examples)
                if run["step"] % checkpoint_every == 0:
                    run["train_seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    checkpoint()
            if val_examples and run["validations"][-1]["step"] != run["step"]:
                validate(val_examples)  # the last editor competes too
        finally:
            bar.close()
        run["train_seconds"] += time.perf_counter() - start
        checkpoint()

    if best_state is not None:
        editor.load_state_dict(best_state)
    losses = [h["loss"] for h in run["history"] if not h["skipped"]]
    training = {
        "steps": run["step"], "resumed_from_step": resumed_from, "nan_steps": run["nan_steps"],
        "stopped_early": run["stopped"], "best_val_loss": run["best_val"], "validations": run["validations"],
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "train_records": [r.id for r in train_records], "val_records": [r.id for r in val_records],
        "train_seconds": round(run["train_seconds"], 3), "guard_seconds": round(run["guard_seconds"], 3),
        "peak_rss_mb": _peak_rss_mb(), "torch_threads": torch.get_num_threads(),
    }
    path = save_archive(archive_dir, editor, model=model, hparams=hp.to_dict(), training=training, overwrite=True)
    log.info("MEND: %d steps (%d now, %d skipped) in %.1fs; best validation loss %s; archive %s", run["step"],
             run["step"] - resumed_from, run["nan_steps"], run["train_seconds"], run["best_val"], path)
    return TrainResult(archive=path, steps=run["step"], resumed_from_step=resumed_from, nan_steps=run["nan_steps"],
                       stopped_early=run["stopped"], best_val_loss=run["best_val"], history=run["history"],
                       validations=run["validations"], train_seconds=run["train_seconds"],
                       peak_rss_mb=training["peak_rss_mb"])


def _step(model: nn.Module, arch: ArchMap, editor: MENDEditor, optimizer: torch.optim.Optimizer,
          examples: list[Example], hp: MENDConfig, cache: UneditedCache) -> dict[str, Any]:
    """One optimiser step over ``examples``; skipped (nothing applied) when anything is not finite."""
    optimizer.zero_grad(set_to_none=True)
    stats = editor.current_stats()
    totals: dict[str, float] = {}
    applied = True
    for example in examples:
        loss, parts, stats = outer_loss(model, arch, editor, example, hp, stats=stats, update_stats=True, cache=cache)
        value = loss.item()
        for key, v in {"loss": value, **parts}.items():
            totals[key] = totals.get(key, 0.0) + v / len(examples)
        if not math.isfinite(value):
            applied = False
            break
        (loss / len(examples)).backward()
    grad_norm = math.nan
    if applied:
        limit = hp.grad_clip if hp.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(editor.parameters()), limit))
        applied = math.isfinite(grad_norm)
    if applied:
        optimizer.step()
        editor.commit_stats(stats)
    else:
        optimizer.zero_grad(set_to_none=True)
        log.warning("MEND meta-training: a step with a non-finite loss or gradient was skipped (loss %s)",
                    totals.get("loss"))
    return {**totals, "grad_norm": grad_norm, "skipped": not applied}
