"""DExperts with an anti-expert only, in logits space (Liu et al., ACL 2021: "DExperts:
Decoding-Time Controlled Text Generation with Experts and Anti-Experts")."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from editkit.decoding.nucleus import nucleus_mask
from editkit.generation.detoxifier import Detoxifier, FollowingRun
from editkit.generation.incremental import MIN_SHARED_PREFIX, open_batch


class DExperts(Detoxifier):
    """Steer away from an anti-expert: a causal LM sharing the generator's tokenizer that models the
    unwanted text (the base model with a toxic adapter, or a small model fine-tuned on toxic text).

    At every step, with ``z`` the generator's next-token scores and ``z⁻`` the anti-expert's
    next-token logits for the same sequence, the scores become::

        z̃ = z + α · (z − z⁻)          (= (1 + α) · z − α · z⁻)   for tokens in the generator's nucleus
        z̃ = −∞                                                    elsewhere

    This is the paper's ensemble ``z̃ = z + α (z⁺ − z⁻)`` (Eq. 1) with the base model standing in for
    the expert, which is how the authors run DExperts with an anti-expert only (their code re-uses
    the base model's logits as the expert's); the nucleus is the top-``top_p`` set of the generator's
    own distribution (§2.2; ``filter_p = 0.9`` in their detoxification runs, ``α = 2.0``). Tokens the
    anti-expert's vocabulary lacks keep ``z`` (inside the nucleus). With ``α = 0`` the scores inside
    the nucleus are the generator's own, so greedy decoding is unchanged (sampling is then nucleus
    sampling at ``top_p``; ``top_p=None`` turns the nucleus off).

    The anti-expert runs beside the generator with its own key/value cache, fed the same tokens, and
    drops the rows the generator's batch drops.
    """

    label = "dexperts"

    def __init__(self, anti_expert: Any, *, alpha: float = 2.0, top_p: float | None = 0.9,
                 min_shared_prefix: int = MIN_SHARED_PREFIX, anti_expert_patch: str | None = None) -> None:
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if not callable(getattr(anti_expert, "forward", None)):
            raise ValueError(f"anti_expert must be a causal LM (a module with forward), got {type(anti_expert).__name__}")
        self.anti_expert, self.alpha, self.top_p = anti_expert, float(alpha), top_p
        self.min_shared_prefix = min_shared_prefix
        self.anti_expert_patch = anti_expert_patch  # the patch folder added to the anti-expert, if any (recorded)
        self._run: FollowingRun | None = None  # the anti-expert's run, following the generator's rows

    @classmethod
    def from_options(cls, model: Any, tokenizer: Any, **options: str) -> DExperts:
        """From command-line strings: ``anti_expert=PATH`` (any model ``editkit.load_model`` reads,
        sharing the generator's tokenizer; required), ``alpha=``, ``top_p=`` (a number or ``none``),
        ``anti_expert_patch=PATH``: a saved patch added to the anti-expert's weights too.

        Steering an edited generator with an unedited anti-expert multiplies the edit's own change
        of the scores by ``1 + α`` (``z − z⁻`` holds it whole); with the generator's patch on the
        anti-expert as well (the anti-expert being a fine-tuned copy of the same base), the contrast
        holds only what the anti-expert learnt. The patch's base check is skipped for the
        anti-expert (its weights are the fine-tuned ones), its shapes are still checked."""
        import editkit
        from editkit.patch import load_patch

        unknown = sorted(set(options) - {"anti_expert", "alpha", "top_p", "anti_expert_patch"})
        if unknown or "anti_expert" not in options:
            raise ValueError(f"dexperts takes anti_expert=PATH (required), alpha=, top_p=, anti_expert_patch=PATH; "
                             f"got {sorted(options)}")
        patch = load_patch(options["anti_expert_patch"]) if "anti_expert_patch" in options else None
        device = next(model.parameters()).device
        anti, _ = editkit.load_model(options["anti_expert"], device=str(device))
        if patch is not None:
            patch.apply(anti, strict=False)
        top_p = options.get("top_p", "0.9")
        return cls(anti, alpha=float(options.get("alpha", 2.0)),
                   top_p=None if top_p.lower() == "none" else float(top_p),
                   anti_expert_patch=options.get("anti_expert_patch"))

    def settings(self) -> dict[str, Any]:
        config = getattr(self.anti_expert, "config", None)
        return {"kind": "dexperts", "alpha": self.alpha, "top_p": self.top_p,
                "anti_expert": getattr(config, "_name_or_path", None) or type(self.anti_expert).__name__,
                "anti_expert_type": getattr(config, "model_type", None),
                **({"anti_expert_patch": self.anti_expert_patch} if self.anti_expert_patch else {})}

    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None) -> None:
        self.finish()
        batch = open_batch(self.anti_expert, prompts, new_tokens=max_new_tokens,
                           min_shared_prefix=self.min_shared_prefix)
        self._run = FollowingRun(batch, batch.prefill(), len(prompts))

    @torch.no_grad()
    def step(self, scores: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("DExperts.step before start (or after finish)")
        return self.ensemble(scores, self._run.next(fed, rows).to(scores.device))

    def ensemble(self, scores: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
        """``z + α (z − z⁻)`` inside the nucleus of ``scores``, −∞ outside ([rows, vocab] each)."""
        n = min(scores.shape[-1], anti.shape[-1])
        steered = scores.clone()
        steered[:, :n] = scores[:, :n] + self.alpha * (scores[:, :n] - anti[:, :n].float())
        keep = nucleus_mask(scores, self.top_p)  # finite scores only: −∞ stays −∞ (no 0·∞ at α = 0)
        return steered.masked_fill(~keep, float("-inf"))

    def finish(self) -> None:
        self._run = None
