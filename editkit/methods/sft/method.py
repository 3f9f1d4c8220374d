"""SFT: a LoRA adapter trained on the safe responses, the loss on the response tokens only.

Each record gives one prompt-completion example (instance.prompt → instance.safe), in trl's
conversational format when the tokenizer's chat template is used, so the prompt is rendered exactly
as :func:`editkit.text.prompt_ids` renders it at inference. trl's SFTTrainer trains the adapter with
``completion_only_loss``; :mod:`editkit.methods.lora` turns it into full-weight deltas.

Metrics: ``edit_nll_before``/``edit_nll_after`` are the mean NLL per token of the safe responses
(the training objective, as DINM and FT-L report it) on the base model and with the patch applied;
the trust check of ``editkit.fit`` refuses a patch that raised it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from editkit.arch import ArchMap
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.lora import (completion_logprobs, fit_lora, fit_prompt, require_training_libraries,
                                  trl_answer, trl_prompt)
from editkit.methods.sft.config import SFTConfig
from editkit.result import EditResult


class SFT(EditingMethod):
    name = "sft"
    scope = "dataset"
    config_class = SFTConfig
    hparams: SFTConfig

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
        """Train on (prompt → safe) for every record of ``instances``; one patch for every later
        input. ``output_dir`` keeps checkpoints (every ``save_steps`` steps, 25 by default) and a
        later call with the same settings and records resumes from the last one; ``arch`` names the modules when the model family has no architecture map. Other
        contract keywords (``constraint_pool``) are accepted and unused."""
        require_training_libraries()
        import trl

        hp = self.hparams
        records = list(instances)
        if not records:
            raise ValueError("SFT needs at least one record")
        prompts = [fit_prompt(tokenizer, r.prompt, [r.safe], hp) for r in records]
        rows = [{"prompt": trl_prompt(tokenizer, p, hp.chat_template),
                 "completion": trl_answer(tokenizer, r.safe, hp.chat_template)} for p, r in zip(prompts, records)]
        pairs = [(p, r.safe) for p, r in zip(prompts, records)]

        def measure(m: nn.Module) -> dict[str, Any]:
            logp, n = completion_logprobs(m, tokenizer, pairs, chat_template=hp.chat_template,
                                          max_length=hp.max_length, batch_size=hp.batch_size)
            return {"edit_nll": float(-logp.sum() / n.sum())}

        def summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
            if not before:
                return {}
            return {"edit_nll_before": before["edit_nll"], "edit_nll_after": after["edit_nll"]}

        return fit_lora(self, model, tokenizer, records, rows, trainer_class=trl.SFTTrainer,
                        config_class=trl.SFTConfig, config_kwargs={"completion_only_loss": True},
                        measure=measure, summarize=summarize, output_dir=output_dir, save_steps=save_steps,
                        progress=progress, arch=arch)
