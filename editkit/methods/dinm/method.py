"""DINM edit: locate, then train a delta on the located layer's MLP output projection with
loss = c_edit · NLL(safe | attack ⊕ suffix) + kl_weight · KL(p_before ‖ p_now) on benign answers
[+ benign_kl_weight · KL on benign requests answered by the unedited model, see ``constraints``].

Unlike the reference implementation, the KL term carries gradient, the located layer lives in the
result (never in the shared hparams), pads are masked during localisation, and the model is
returned untouched with the edit in a saveable patch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from editkit.arch import ArchMap, resolve_arch
from editkit.engine import DeltaEditor
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.dinm.config import DINMConfig
from editkit.methods.dinm.constraints import pick_requests, self_answered_pairs
from editkit.methods.layer_edit import choose_layer, layer_result, optimize_delta
from editkit.result import EditResult
from editkit.text import encode_pairs, with_suffix

log = logging.getLogger(__name__)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _kl(reference_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_before ‖ p_now)."""
    return F.kl_div(F.log_softmax(logits, -1), reference_logprobs, log_target=True, reduction="batchmean")


class DINM(EditingMethod):
    name = "dinm"
    scope = "instance"
    config_class = DINMConfig
    hparams: DINMConfig

    def edit(
        self,
        model: Any,
        tokenizer: Any,
        instance: EditInstance,
        *,
        layer: int | None = None,
        arch: ArchMap | dict | None = None,
        constraint_pairs: Sequence[tuple[str, str]] | None = None,
        constraint_pool: Sequence[EditInstance] = (),
        benign_pairs: Sequence[tuple[str, str]] | None = None,
        progress: bool = False,
    ) -> EditResult:
        """Compute the DINM edit for ``instance``. ``constraint_pairs`` adds (prompt, answer) pairs
        to the KL constraint beside the instance's own knowledge pair (default: the knowledge pairs
        of the first ``hparams.constraint_pairs`` records of ``constraint_pool``). ``benign_pairs``
        replaces the self-answered benign requests that ``benign_constraint`` asks for (prompts as
        given, no suffix added)."""
        hp = self.hparams
        if constraint_pairs is None:
            constraint_pairs = [(o.knowledge_prompt, o.knowledge_answer) for o in constraint_pool[:hp.constraint_pairs]]
        arch = resolve_arch(model, arch)
        timings: dict[str, float] = {}
        layer, found, timings["locate"] = choose_layer(
            model, tokenizer, instance, arch, layer if layer is not None else hp.layer, mode=hp.locate_mode,
            context=hp.locate_context, chat_template=hp.chat_template, max_length=hp.max_length)

        if len(constraint_pairs) < hp.constraint_pairs:
            log.warning("hparams ask for %d extra constraint pairs but %d were given; the KL term uses "
                        "the knowledge pair plus those given", hp.constraint_pairs, len(constraint_pairs))
        suffix = hp.active_suffix
        kl_pairs = [(instance.knowledge_prompt, instance.knowledge_answer), *constraint_pairs]
        pairs = {"edit": [(with_suffix(instance.prompt, suffix), instance.safe)],
                 "kl": [(with_suffix(q, suffix), a) for q, a in kl_pairs]}
        t_guard = time.perf_counter()
        if benign_pairs is None and hp.benign_constraint:
            benign_pairs = self_answered_pairs(model, tokenizer, pick_requests(instance.id, hp.benign_constraint),
                                               suffix=suffix, max_new_tokens=hp.benign_answer_tokens,
                                               chat_template=hp.chat_template)
        if benign_pairs:
            pairs["benign"] = list(benign_pairs)
        batches = {name: encode_pairs(tokenizer, p, chat_template=hp.chat_template, max_length=hp.max_length)
                   for name, p in pairs.items()}
        weights = {"kl": hp.kl_weight, "benign": hp.benign_kl_weight}
        timings["guard"] = time.perf_counter() - t_guard  # the unedited model's own answers, and encoding
        t1 = time.perf_counter()
        with DeltaEditor(model, arch, layer, batches, fast_path=hp.fast_path) as editor:
            edit_targets = editor.batches["edit"].targets()
            kl_targets = editor.batches["kl"].targets()
            kl_names = [name for name in ("kl", "benign") if name in batches]
            reference = {name: F.log_softmax(editor.initial_logits[name], -1) for name in kl_names}
            metrics = {
                "edit_nll_before": float(_nll(editor.initial_logits["edit"], edit_targets)),
                "knowledge_nll_before": float(_nll(editor.initial_logits["kl"], kl_targets)),
            }

            def objective() -> tuple[torch.Tensor, dict[str, float]]:
                nll = _nll(editor.logits("edit"), edit_targets)
                kls = {name: _kl(reference[name], editor.logits(name)) for name in kl_names}
                loss = hp.c_edit * nll + sum(weights[name] * kl for name, kl in kls.items())
                return loss, {"edit_nll": nll.item(),
                              **{"kl" if name == "kl" else f"kl_{name}": kl.item() for name, kl in kls.items()}}

            losses = optimize_delta(editor, objective, lr=hp.lr, steps=hp.steps, weight_decay=hp.weight_decay,
                                    norm_constraint=hp.norm_constraint, early_stop_loss=hp.early_stop_loss,
                                    desc=f"DINM layer {layer}", progress=progress)
            with torch.no_grad():
                kl_logits = editor.logits("kl")
                metrics.update(
                    edit_nll_after=float(_nll(editor.logits("edit"), edit_targets)),
                    knowledge_nll_after=float(_nll(kl_logits, kl_targets)),
                    kl_after=float(_kl(reference["kl"], kl_logits)),
                    steps_run=len(losses),
                )
                if "benign" in reference:
                    metrics.update(benign_pairs=len(pairs["benign"]),
                                   benign_kl_after=float(_kl(reference["benign"], editor.logits("benign"))))
            delta = editor.delta.detach().clone()
            param_name = editor.param_name
        timings["edit"] = time.perf_counter() - t1
        return layer_result(model, self.name, hp, param_name=param_name, delta=delta, layer=layer,
                            localization=found, losses=losses, metrics=metrics, timings=timings)
