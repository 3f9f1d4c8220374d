"""DPO: a LoRA adapter trained to prefer the safe response to the unsafe one after the attack prompt.

Each record gives one preference example (prompt, chosen=instance.safe, rejected=instance.unsafe),
in trl's conversational format when the tokenizer's chat template is used. trl's DPOTrainer
minimises −log σ(β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)))) with the sigmoid loss,
the reference being the same model with the adapter disabled (no second copy is loaded).
:mod:`editkit.methods.lora` turns the adapter into full-weight deltas.

Metrics, on the training records, before and with the patch applied: ``margin`` is the mean of
log p(safe) − log p(unsafe) (summed over response tokens), ``safe_nll``/``unsafe_nll`` the mean NLL
per token of each response; ``dpo_loss_after`` is the DPO loss of the patched model against the
base (log 2 before training, by definition). DPO may lower the safe response's likelihood while it
widens the margin, so no ``edit_nll`` is reported and the trust check looks at the delta norms only.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editkit.arch import ArchMap
from editkit.instance import EditInstance
from editkit.methods.base import EditingMethod
from editkit.methods.dpo.config import DPOConfig
from editkit.methods.lora import (completion_logprobs, fit_lora, fit_prompt, require_training_libraries,
                                  trl_answer, trl_prompt)
from editkit.result import EditResult


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean sigmoid DPO loss over pairs, from summed response log-probabilities ([pairs] each)."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits).mean()


class DPO(EditingMethod):
    name = "dpo"
    scope = "dataset"
    config_class = DPOConfig
    hparams: DPOConfig

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
        """Train on (prompt, safe ≻ unsafe) for every record of ``instances``; one patch for every
        later input. ``output_dir``/``save_steps``/``arch`` as for SFT; other contract keywords
        (``constraint_pool``) are accepted and unused."""
        require_training_libraries()
        import trl

        hp = self.hparams
        records = list(instances)
        if not records:
            raise ValueError("DPO needs at least one record")
        prompts = [fit_prompt(tokenizer, r.prompt, [r.safe, r.unsafe], hp) for r in records]
        rows = [{"prompt": trl_prompt(tokenizer, p, hp.chat_template),
                 "chosen": trl_answer(tokenizer, r.safe, hp.chat_template),
                 "rejected": trl_answer(tokenizer, r.unsafe, hp.chat_template)} for p, r in zip(prompts, records)]
        safe = [(p, r.safe) for p, r in zip(prompts, records)]
        unsafe = [(p, r.unsafe) for p, r in zip(prompts, records)]

        def measure(m: nn.Module) -> dict[str, Any]:
            kw = dict(chat_template=hp.chat_template, max_length=hp.max_length, batch_size=hp.batch_size)
            chosen, n_chosen = completion_logprobs(m, tokenizer, safe, **kw)
            rejected, n_rejected = completion_logprobs(m, tokenizer, unsafe, **kw)
            return {"chosen": chosen, "rejected": rejected, "safe_nll": float(-chosen.sum() / n_chosen.sum()),
                    "unsafe_nll": float(-rejected.sum() / n_rejected.sum())}

        def summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
            if not before:
                return {}
            return {
                "margin_before": float((before["chosen"] - before["rejected"]).mean()),
                "margin_after": float((after["chosen"] - after["rejected"]).mean()),
                "dpo_loss_after": float(dpo_loss(after["chosen"], after["rejected"], before["chosen"],
                                                 before["rejected"], hp.beta)),
                "safe_nll_before": before["safe_nll"], "safe_nll_after": after["safe_nll"],
                "unsafe_nll_before": before["unsafe_nll"], "unsafe_nll_after": after["unsafe_nll"],
            }

        return fit_lora(self, model, tokenizer, records, rows, trainer_class=trl.DPOTrainer,
                        config_class=trl.DPOConfig, config_kwargs={"beta": hp.beta, "loss_type": ["sigmoid"]},
                        measure=measure, summarize=summarize, output_dir=output_dir, save_steps=save_steps,
                        progress=progress, arch=arch)
