"""DINM edit: locate, then train a delta on the located layer's MLP output projection with
loss = c_edit · NLL(safe | attack ⊕ suffix) + kl_weight · KL(p_before ‖ p_now) on benign answers
[+ benign_kl_weight · KL on benign requests answered by the unedited model, see ``constraints``]
[+ c_edit · question_weight · NLL(safe | bare harmful question ⊕ suffix) for other records' questions
and, when asked, the edited record's own], optionally with the delta confined to the null space of
benign keys (``nullspace``) and its norm bounded relative to the weight's. What does not depend on
the edited record (the guard's self-answers, the reference pass's benign rows) is reused across
edits of one model (``cache``, ``guard_cache``).

Unlike the reference implementation, the KL term carries gradient, the located layer lives in the
result (never in the shared hparams), pads are masked during localisation, and the model is
returned untouched with the edit in a saveable patch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from editkit.arch import ArchMap, mlp_out_name, resolve_arch
from editkit.devices import real_values
from editkit.engine import DeltaEditor
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.dinm import cache, gate, nullspace
from editkit.methods.dinm.config import DINMConfig
from editkit.methods.dinm.gate import normal_text as _normal
from editkit.methods.dinm.constraints import pick_requests, self_answered_pairs
from editkit.methods.layer_edit import choose_layer, layer_result, optimize_delta, weight_norm
from editkit.result import EditResult
from editkit.text import TokenBatch, encode_pairs, with_suffix

log = logging.getLogger(__name__)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _kl(reference_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_before ‖ p_now)."""
    return F.kl_div(F.log_softmax(logits, -1), reference_logprobs, log_target=True, reduction="batchmean")


def _part(batch: str) -> str:
    """The name a question batch's NLL goes by in the step records and metrics."""
    return {"questions": "question_nll", "own_question": "own_question_nll"}[batch]


def question_records(instance: EditInstance, pool: Sequence[EditInstance], k: int) -> list[EditInstance]:
    """The first ``k`` records of ``pool`` whose bare question may serve as an extra edit target.

    Skipped: records without a question, the edited record (same id), and records whose question is
    the edited record's own or appears in one of its generalization inputs: on SafeEdit several
    records share a question (their bare question is the edited record's DG_onlyQ test input), and
    other records' questions recur inside DG_otherQ / DG_otherAQ inputs.
    """
    own = _normal(instance.question) if instance.question.strip() else None
    tests = [_normal(text) for text in instance.generalization.values()]
    chosen: list[EditInstance] = []
    for other in pool:
        if len(chosen) == k:
            break
        question = _normal(other.question)
        if not question or other.id == instance.id or question == own or any(question in t for t in tests):
            continue
        chosen.append(other)
    return chosen


def question_pairs(instance: EditInstance, pool: Sequence[EditInstance], k: int,
                   suffix: str | None) -> list[tuple[str, str]]:
    """The (bare question ⊕ suffix, safe response) targets of :func:`question_records`."""
    return [(with_suffix(o.question, suffix), o.safe) for o in question_records(instance, pool, k)]


def encode_batches(tokenizer: Any, pairs: Mapping[str, Sequence[tuple[str, str]]],
                   hp: DINMConfig) -> dict[str, TokenBatch]:
    """The token batches of a DINM edit's (prompt, target) pairs, by name; the other records' question
    targets (``questions``) cut to their opening ``question_target_tokens``."""
    return {name: encode_pairs(tokenizer, p, chat_template=hp.chat_template, max_length=hp.max_length,
                               max_target_tokens=hp.question_target_tokens if name == "questions" else None)
            for name, p in pairs.items()}


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
        given, no suffix added). ``hparams.question_targets`` takes bare questions from
        ``constraint_pool`` too (see :func:`question_records`)."""
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
        digest = None  # of the model's weights as the edit found them, when the caches may serve it
        if hp.guard_cache:
            blocker = cache.cache_blocker(model)
            if blocker is None:
                digest = cache.weights_digest(model)
            else:
                log.info("DINM caches not used for this edit: %s", blocker)
        if benign_pairs is None and hp.benign_constraint:
            benign_pairs = self_answered_pairs(model, tokenizer, pick_requests(instance.id, hp.benign_constraint),
                                               suffix=suffix, max_new_tokens=hp.benign_answer_tokens,
                                               chat_template=hp.chat_template, digest=digest,
                                               disk=hp.disk_cache)
        if benign_pairs:
            pairs["benign"] = list(benign_pairs)
        extra: dict[str, Any] = {}  # metrics known before training
        if hp.question_targets:
            chosen = question_pairs(instance, constraint_pool, hp.question_targets, suffix)
            if len(chosen) < hp.question_targets:
                log.warning("hparams ask for %d question targets but constraint_pool offers %d usable records "
                            "(with a question, other than the edited record and its test inputs)",
                            hp.question_targets, len(chosen))
            extra["question_pairs"] = len(chosen)
            if chosen:
                pairs["questions"] = chosen
        if hp.own_question_target:
            if instance.question.strip():
                log.warning("own_question_target: instance %s trains on its own bare question, which on SafeEdit "
                            "is the DG_onlyQ test input; its DG_onlyQ score is not a generalisation score",
                            instance.id)
                pairs["own_question"] = [(with_suffix(instance.question, suffix), instance.safe)]
                extra["trains_on_test_inputs"] = ["DG_onlyQ"]
            else:
                log.warning("own_question_target: instance %s has no question; no target added", instance.id)
        batches = encode_batches(tokenizer, pairs, hp)
        weights = {"kl": hp.kl_weight, "benign": hp.benign_kl_weight}
        timings["guard"] = time.perf_counter() - t_guard  # the unedited model's own answers, and encoding

        projector = space = None
        if hp.null_space:
            t_null = time.perf_counter()
            space, cached = nullspace.key_space(model, tokenizer, arch, layer, suffix=suffix,
                                                chat_template=hp.chat_template, max_length=hp.max_length,
                                                disk=hp.disk_cache)
            projector = space.projector(hp.null_space_tol)
            null_dim = int(space.null_mask(hp.null_space_tol).sum())
            extra.update(null_space_dim=null_dim, null_space_keys=space.n_keys)
            timings["null_space"] = time.perf_counter() - t_null
            log.info("null space of layer %d: %d of %d input directions at tol %g (%d keys%s)", layer, null_dim,
                     projector.shape[0], hp.null_space_tol, space.n_keys, ", cached" if cached else "")
            if null_dim == 0:
                log.warning("null space of layer %d is empty at null_space_tol=%g: the edit cannot change anything",
                            layer, hp.null_space_tol)
        gate_tensors = fitted = None
        if hp.harm_gate:  # fitted on the unedited model's keys, like the null space
            t_gate = time.perf_counter()
            fitted = gate.layer_gate(model, tokenizer, arch, layer, instance, constraint_pool, suffix=suffix,
                                     chat_template=hp.chat_template, max_length=hp.max_length, c=hp.harm_gate_c,
                                     test_inputs=hp.harm_gate_test_inputs, figurative=hp.harm_gate_figurative,
                                     everyday=hp.harm_gate_everyday, opening=hp.harm_gate_opening,
                                     answers=hp.harm_gate_answers, disk=hp.disk_cache)
            own = gate.last_keys(model, tokenizer, arch, layer, [pairs["edit"][0][0]], chat_template=hp.chat_template,
                                 max_length=hp.max_length, disk=hp.disk_cache)
            fitted = fitted.shifted(hp.harm_gate_margin).sharpened(hp.harm_gate_sharpness)
            gate_tensors = {"weight": fitted.weight, "bias": fitted.bias}
            extra.update(gate_fit_accuracy=fitted.accuracy, gate_harmful_texts=fitted.n_harmful,
                         gate_benign_texts=fitted.n_benign, gate_on_edit_prompt=float(fitted(own)[0]))
            timings["gate"] = time.perf_counter() - t_gate
        param = mlp_out_name(model, arch, layer)
        w_norm = weight_norm(model, param) if hp.max_delta_ratio is not None else None
        question_names = [name for name in ("questions", "own_question") if name in batches]

        t1 = time.perf_counter()
        rows = cache.reference_rows(model, digest, disk=hp.disk_cache) if digest is not None else None
        kl_names = [name for name in ("kl", "benign") if name in batches]
        with DeltaEditor(model, arch, layer, batches, fast_path=hp.fast_path, projector=projector, rows=rows,
                         gate=fitted if hp.harm_gate_train else None, autocast=hp.autocast_dtype,
                         attention=hp.attention, reference_logits=kl_names) as editor:
            timings["reference"] = editor.reference_seconds  # inside "edit" until now; split out below
            if rows is not None:
                log.info("reference pass: %(reused)d sequence(s) reused, %(computed)d computed", editor.row_stats)
            edit_targets = editor.batches["edit"].targets()
            kl_targets = editor.batches["kl"].targets()
            targets = {name: editor.batches[name].targets() for name in question_names}
            reference = {name: F.log_softmax(editor.initial_logits[name], -1) for name in kl_names}
            metrics = {"knowledge_nll_before": float(_nll(editor.initial_logits["kl"], kl_targets)), **extra}

            def objective() -> tuple[torch.Tensor, dict[str, float]]:
                nll = _nll(editor.logits("edit"), edit_targets)
                kls = {name: _kl(reference[name], editor.logits(name)) for name in kl_names}
                questions = {name: _nll(editor.logits(name), targets[name]) for name in question_names}
                loss = hp.c_edit * nll + sum(weights[name] * kl for name, kl in kls.items())
                if questions:
                    loss = loss + hp.c_edit * hp.question_weight * sum(questions.values())
                return loss, {"edit_nll": nll.item(),
                              **{"kl" if name == "kl" else f"kl_{name}": kl.item() for name, kl in kls.items()},
                              **{_part(name): q.item() for name, q in questions.items()}}

            losses = optimize_delta(editor, objective, lr=hp.lr, steps=hp.steps, weight_decay=hp.weight_decay,
                                    norm_constraint=hp.norm_constraint, max_delta_ratio=hp.max_delta_ratio,
                                    weight_norm=w_norm, early_stop_loss=hp.early_stop_loss,
                                    desc=f"DINM layer {layer}", progress=progress)
            # the NLL targets' unedited values are the first step's (the delta starts at zero), read in
            # the steps' precision: their reference pass stopped at the edited layer
            metrics.update(edit_nll_before=losses[0]["edit_nll"],
                           **{f"{_part(name)}_before": losses[0][_part(name)] for name in question_names})
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
                for name in question_names:
                    metrics[f"{_part(name)}_after"] = float(_nll(editor.logits(name), targets[name]))
            delta = editor.effective_delta().detach().clone()
            param_name = editor.param_name
        timings["edit"] = time.perf_counter() - t1 - timings["reference"]
        if hp.max_delta_ratio is not None:
            metrics["delta_ratio"] = float(delta.norm()) / w_norm
        if space is not None:  # ‖ΔK‖/‖WK‖ on the guard prompts' keys: ~0 is the constraint held
            metrics["null_space_key_change"] = space.output_change(delta, real_values(model, param_name),
                                                                   arch.mlp_out_transposed)
        return layer_result(model, self.name, hp, param_name=param_name, delta=delta, layer=layer,
                            localization=found, losses=losses, metrics=metrics, timings=timings, gate=gate_tensors)
