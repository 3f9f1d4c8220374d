"""FT-L: fine-tune one layer's MLP output projection on the safe response, with no constraint.

The SafeEdit paper's plain fine-tuning baseline: the same layer choice (given or located), the same
delta-through-a-hook engine and fast path as DINM, and loss = NLL(safe response | attack prompt)
alone — no KL term, no suffix. What it lacks is what DINM adds, so the two rows side by side show
what the constraint buys.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from editkit.arch import ArchMap, mlp_out_name, resolve_arch
from editkit.engine import DeltaEditor
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.ft.config import FTLConfig
from editkit.methods.layer_edit import choose_layer, layer_result, optimize_delta, weight_norm
from editkit.result import EditResult
from editkit.text import encode_pairs

log = logging.getLogger(__name__)


class FTL(EditingMethod):
    name = "ft-l"
    scope = "instance"
    config_class = FTLConfig
    hparams: FTLConfig

    def edit(
        self,
        model: Any,
        tokenizer: Any,
        instance: EditInstance,
        *,
        layer: int | None = None,
        arch: ArchMap | dict | None = None,
        progress: bool = False,
        **unused: Any,
    ) -> EditResult:
        """Fine-tune the layer's MLP output projection towards ``instance.safe`` after
        ``instance.prompt``. Other contract keywords (``constraint_pool``) are accepted and unused."""
        hp = self.hparams
        arch = resolve_arch(model, arch)
        timings: dict[str, float] = {}
        layer, found, timings["locate"] = choose_layer(
            model, tokenizer, instance, arch, layer if layer is not None else hp.layer, mode=hp.locate_mode,
            context=hp.locate_context, chat_template=hp.chat_template, max_length=hp.max_length)
        batches = {"edit": encode_pairs(tokenizer, [(instance.prompt, instance.safe)], chat_template=hp.chat_template,
                                        max_length=hp.max_length)}
        w_norm = weight_norm(model, mlp_out_name(model, arch, layer)) if hp.max_delta_ratio is not None else None
        start = time.perf_counter()
        with DeltaEditor(model, arch, layer, batches, fast_path=hp.fast_path, autocast=hp.autocast_dtype,
                         attention=hp.attention) as editor:
            targets = editor.batches["edit"].targets()
            metrics: dict[str, Any] = {"edit_nll_before": float(F.cross_entropy(editor.initial_logits["edit"], targets))}

            def objective() -> tuple[torch.Tensor, dict[str, float]]:
                nll = F.cross_entropy(editor.logits("edit"), targets)
                return nll, {"edit_nll": nll.item()}

            losses = optimize_delta(editor, objective, lr=hp.lr, steps=hp.steps, weight_decay=hp.weight_decay,
                                    norm_constraint=hp.norm_constraint, max_delta_ratio=hp.max_delta_ratio,
                                    weight_norm=w_norm, early_stop_loss=hp.early_stop_loss,
                                    desc=f"FT-L layer {layer}", progress=progress)
            with torch.no_grad():
                metrics.update(edit_nll_after=float(F.cross_entropy(editor.logits("edit"), targets)),
                               steps_run=len(losses))
            delta = editor.delta.detach().clone()
            param_name = editor.param_name
        timings["edit"] = time.perf_counter() - start
        return layer_result(model, self.name, hp, param_name=param_name, delta=delta, layer=layer,
                            localization=found, losses=losses, metrics=metrics, timings=timings)
