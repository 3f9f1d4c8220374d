"""Small helpers several test modules share (import: ``from helpers import ...``; pytest puts this
folder on the path)."""
from __future__ import annotations

import random
from typing import Any

import torch

import editkit

from editkit.models import tiny_model


def peaked_model(model_type: str = "llama", seed: int = 0, scale: float = 4.0, **config: Any):
    """A tiny random model, its matrices scaled up so that attention is peaked and a wrong position
    or cache entry changes the tokens (a default random model barely looks past the last token)."""
    model = tiny_model(model_type, tie_word_embeddings=False, seed=seed, **config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model


def varied_prompts(seed: int = 0) -> list[list[int]]:
    """Token-id prompts of very different lengths, two sharing a long prefix (reused in prefill)."""
    rng = random.Random(seed)
    base = [rng.randrange(4, 260) for _ in range(60)]
    other = [rng.randrange(4, 260) for _ in range(30)]
    return [base[:50] + [7, 8, 9], other[:5], base[:40] + other, [42], other[:20]]


def no_hooks(model) -> bool:
    """No forward or backward hook on any module of ``model``."""
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in model.modules())


# -- patches: a random delta on one MLP output projection of a tiny model, and logits to compare

PATCH_IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 44, 120]])
PATCH_TARGET = {"llama": "model.layers.1.mlp.down_proj.weight", "gpt2": "transformer.h.1.mlp.c_proj.weight"}


def make_patch(model, family: str = "llama", scale: float = 0.05, seed: int = 7):
    """A test Patch of one random delta (``scale`` × N(0, 1)) on ``PATCH_TARGET[family]``."""
    from editkit.patch import Patch

    name = PATCH_TARGET[family]
    weight = dict(model.named_parameters())[name]
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(weight.shape, generator=gen) * scale
    return Patch.from_deltas(model, {name: delta}, method="test", layer=1, hparams={"lr": 1e-3},
                             metrics={"edit_nll_after": 1.5})


def patch_logits(model) -> torch.Tensor:
    """The model's logits on ``PATCH_IDS`` (no grad)."""
    with torch.no_grad():
        return model(input_ids=PATCH_IDS).logits


FAST_DINM = dict(steps=3, lr=1e-2, c_edit=1.0)  # a few real DINM steps, fast on a tiny model


def dinm_edit(model, inst, tok, **kwargs):
    """``editkit.edit`` with :data:`FAST_DINM` settings, updated by ``hp=`` (other keywords pass on)."""
    settings = {**FAST_DINM, **kwargs.pop("hp", {})}
    return editkit.edit(model, inst, tokenizer=tok, hparams=settings, **kwargs)


def only_delta(result) -> tuple[str, torch.Tensor]:
    """(name, delta) of an edit that changed exactly one weight."""
    assert len(result.patch.deltas) == 1, f"expected one edited weight, got {list(result.patch.deltas)}"
    return next(iter(result.patch.deltas.items()))


class Boom(RuntimeError):
    """Raised by a test inside an edit, to check what the edit leaves behind."""
