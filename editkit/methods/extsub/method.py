"""Ext-Sub: an expert LoRA on the safe responses, an anti-expert LoRA on the unsafe ones, merged to
full-weight deltas and combined per output row by extraction before subtraction
(:mod:`editkit.methods.extsub.combine`); the result is one Patch.

Both adapters are trained as SFT trains its one (trl's SFTTrainer, loss on the response tokens
only, :func:`editkit.methods.lora.train_lora`) on the same prompts, with the same LoRA targets and
settings: the expert on (prompt → instance.safe), the anti-expert on (prompt → instance.unsafe).
Each run leaves the model exactly as it came; the patch holds ΔW⁺ − λ(ΔW⁻ − common) for every
adapted weight, in the weight's own layout. Which axis holds a weight's output rows comes from its
module type (``nn.Linear`` [out, in]: rows; GPT-2's ``Conv1D`` [in, out]: columns), never from
shapes.

Per instance: Ext-Sub is a dataset-scope method; its per-instance use is ``fit`` on a dataset of
one record (that record's safe/unsafe pair), which works the same way.

Metrics, on the training records, before and with the combined patch applied: ``safe_nll`` and
``unsafe_nll`` (mean NLL per response token) and ``margin`` (mean log p(safe) − log p(unsafe),
summed over response tokens). ``edit_nll_before``/``edit_nll_after`` repeat the safe-response NLL,
so the trust check of ``editkit.fit`` refuses a combination that made the safe responses less
likely than the base model. Per adapter: steps, resumed step, first/last train loss, train seconds.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap
from editkit.delta_hooks import _layout
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.extsub.combine import extract_subtract, unit_rows
from editkit.methods.extsub.config import ExtSubConfig
from editkit.methods.lora import (LoRARun, completion_logprobs, fit_prompt, require_training_libraries, train_lora,
                                  trl_answer, trl_prompt)
from editkit.patch import Patch
from editkit.result import EditResult

log = logging.getLogger(__name__)

ADAPTERS = ("expert", "anti")  # also the sub-folders of output_dir
_OUTPUT_AXIS = {"linear": 0, "conv1d": 1}  # which axis of the stored weight indexes output rows


def output_axis(model: nn.Module, name: str) -> int:
    """The axis of parameter ``name`` that indexes the module's output rows, from the module type."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    layout = _layout(module, attr)
    if layout not in _OUTPUT_AXIS:
        raise ValueError(f"{name}: Ext-Sub combines the weights of nn.Linear and transformers' Conv1D, not of "
                         f"{type(module).__name__}")
    return _OUTPUT_AXIS[layout]


def combine(model: nn.Module, expert: dict[str, torch.Tensor], anti: dict[str, torch.Tensor],
            lam: float) -> tuple[dict[str, torch.Tensor], float]:
    """{parameter name: ΔW⁺ − λ(ΔW⁻ − common)} for the weights both adapters changed, and the mean
    over every output row of cos(ΔW⁺ᵢ, ΔW⁻ᵢ) (how much the adapters share: of a row of ΔW⁻, the
    fraction cos(θ/2) is kept as common). Empties ``expert`` and ``anti`` as it goes, so that a
    large model holds two sets of full-weight deltas at a time, not three."""
    if set(expert) != set(anti):
        raise RuntimeError(f"the expert and anti-expert adapted different weights: "
                           f"{sorted(set(expert) ^ set(anti))[:4]}")
    combined: dict[str, torch.Tensor] = {}
    cosine_sum, rows = 0.0, 0
    for name in list(expert):
        a, b = expert.pop(name), anti.pop(name)
        axis = output_axis(model, name)
        combined[name] = extract_subtract(a, b, lam, out_dim=axis)
        ua = unit_rows(a.movedim(axis, 0).reshape(a.shape[axis], -1))  # [n_out, n_in]
        ub = unit_rows(b.movedim(axis, 0).reshape(a.shape[axis], -1))
        cosine_sum += float((ua * ub).sum())
        rows += ua.shape[0]
    return combined, cosine_sum / max(rows, 1)


def _losses(runs: dict[str, LoRARun]) -> list[dict[str, float]]:
    """One dict per optimiser step: ``expert_loss``, ``anti_loss``, ... (trl's logged values, prefixed)."""
    steps: dict[int, dict[str, float]] = {}
    for adapter, run in runs.items():
        for entry in run.losses():
            step = round(entry["step"])
            row = steps.setdefault(step, {"step": float(step)})
            row.update({f"{adapter}_{k}": v for k, v in entry.items() if k != "step"})
    return [steps[k] for k in sorted(steps)]


class ExtSub(EditingMethod):
    name = "extsub"
    scope = "dataset"
    config_class = ExtSubConfig
    hparams: ExtSubConfig

    def fit(
        self,
        model: Any,
        tokenizer: Any,
        instances: Sequence[EditInstance],
        *,
        progress: bool = False,
        output_dir: str | Path | None = None,
        save_steps: int | None = None,
        arch: ArchMap | dict | None = None,
        **unused: Any,
    ) -> EditResult:
        """Train the expert on (prompt → safe) and the anti-expert on (prompt → unsafe) for every
        record of ``instances`` (one record: the per-instance use), combine them, return one patch.
        ``output_dir`` keeps each run's checkpoints in ``output_dir/expert`` and ``output_dir/anti``
        (every ``save_steps`` steps, 25 by default); a later call with the same training settings and
        records resumes both, whatever its λ. ``arch`` names the modules when the model family has
        no architecture map. Other contract keywords (``constraint_pool``) are accepted and unused."""
        require_training_libraries()
        import trl

        hp = self.hparams
        records = list(instances)
        if not records:
            raise ValueError("Ext-Sub needs at least one record")
        start = time.perf_counter()
        prompts = [fit_prompt(tokenizer, r.prompt, [r.safe, r.unsafe], hp) for r in records]
        targets = {"expert": [r.safe for r in records], "anti": [r.unsafe for r in records]}

        before = self._measure(model, tokenizer, prompts, targets) if hp.measure else {}
        measured = time.perf_counter() - start

        runs: dict[str, LoRARun] = {}
        for adapter in ADAPTERS:
            rows = [{"prompt": trl_prompt(tokenizer, p, hp.chat_template),
                     "completion": trl_answer(tokenizer, answer, hp.chat_template)}
                    for p, answer in zip(prompts, targets[adapter])]
            folder = None if output_dir is None else Path(output_dir) / adapter
            runs[adapter] = train_lora(f"{self.name}-{adapter}", model, tokenizer, records, rows,
                                       hp.training_settings(), trainer_class=trl.SFTTrainer,
                                       config_class=trl.SFTConfig, config_kwargs={"completion_only_loss": True},
                                       output_dir=folder, save_steps=save_steps, progress=progress, arch=arch)

        mark = time.perf_counter()
        deltas, cosine = combine(model, runs["expert"].deltas, runs["anti"].deltas, hp.lam)
        combine_seconds = time.perf_counter() - mark
        patch = Patch.from_deltas(model, deltas, method=self.name, hparams=hp.to_dict())
        n_weights = len(deltas)
        del deltas  # the patch holds its own copy

        after: dict[str, Any] = {}
        if hp.measure:
            mark = time.perf_counter()
            with patch.applied(model):
                after = self._measure(model, tokenizer, prompts, targets)
            measured += time.perf_counter() - mark

        metrics: dict[str, Any] = {"lam": hp.lam, **self._summarize(before, after), "n_records": len(records),
                                   "adapted_weights": n_weights, "row_cosine_mean": cosine,
                                   "trainable_params": runs["expert"].trainable_params}
        for adapter, run in runs.items():
            losses = run.losses()
            metrics.update({
                f"{adapter}_steps": run.steps,
                f"{adapter}_resumed_from_step": run.resumed_from_step,
                f"{adapter}_train_loss_first": losses[0]["loss"] if losses else None,
                f"{adapter}_train_loss_last": losses[-1]["loss"] if losses else None,
                f"{adapter}_train_seconds": round(run.train_seconds, 3),
            })
        metrics["train_seconds"] = round(sum(run.train_seconds for run in runs.values()), 3)
        metrics["combine_seconds"] = round(combine_seconds, 3)
        peaks = [run.peak_rss_mb for run in runs.values() if run.peak_rss_mb is not None]
        metrics["peak_rss_mb"] = round(max(peaks), 1) if peaks else None
        patch.metrics = metrics
        timings = {**{f"train_{a}": runs[a].train_seconds for a in ADAPTERS}, "combine": combine_seconds,
                   "measure": measured, "fit": time.perf_counter() - start}
        log.info("extsub: λ=%g, %d weights combined, mean row cosine(ΔW⁺, ΔW⁻) %.3f", hp.lam, n_weights, cosine)
        return EditResult(method=self.name, patch=patch, losses=_losses(runs), metrics=metrics, timings=timings,
                          hparams=hp.to_dict())

    def _measure(self, model: nn.Module, tokenizer: Any, prompts: list[str],
                 targets: dict[str, list[str]]) -> dict[str, Any]:
        """Summed log-probabilities and mean per-token NLL of the safe and the unsafe responses."""
        hp = self.hparams
        kw = dict(chat_template=hp.chat_template, max_length=hp.max_length, batch_size=hp.batch_size)
        safe, n_safe = completion_logprobs(model, tokenizer, list(zip(prompts, targets["expert"])), **kw)
        unsafe, n_unsafe = completion_logprobs(model, tokenizer, list(zip(prompts, targets["anti"])), **kw)
        return {"safe": safe, "unsafe": unsafe, "safe_nll": float(-safe.sum() / n_safe.sum()),
                "unsafe_nll": float(-unsafe.sum() / n_unsafe.sum())}

    @staticmethod
    def _summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        if not before:
            return {}
        return {
            "edit_nll_before": before["safe_nll"], "edit_nll_after": after["safe_nll"],
            "safe_nll_before": before["safe_nll"], "safe_nll_after": after["safe_nll"],
            "unsafe_nll_before": before["unsafe_nll"], "unsafe_nll_after": after["unsafe_nll"],
            "margin_before": float((before["safe"] - before["unsafe"]).mean()),
            "margin_after": float((after["safe"] - after["unsafe"]).mean()),
        }
