"""Architecture maps: where the decoder layers, MLP output projection, attention output projection,
final norm and LM head sit in each model family, keyed by ``config.model_type``.

The transposition of the MLP output projection is declared, never guessed from shapes: GPT-2's
``Conv1D`` stores its weight as [in, out] where ``nn.Linear`` stores [out, in].
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ArchMap:
    """Dotted module paths (relative to the ``*ForCausalLM`` model, or to one layer for ``mlp_out``
    and ``attn_out``)."""

    layers: str
    mlp_out: str
    attn_out: str
    final_norm: str
    lm_head: str
    base: str
    mlp_out_transposed: bool = False
    attn_out_transposed: bool = False
    # the base model's last hidden state -> lm_head gives the logits exactly (no soft-capping or
    # scaling between them), so the fast path may apply the head itself at a few positions
    fast_path: bool = True
    # a decoder layer's output is its MLP output projection's output plus terms that do not depend on
    # it (no norm after the MLP), and the base model's last hidden state is final_norm(the last layer's
    # output): the fast path may replay the edited layer as cached output + Δ·(cached key)
    mlp_out_residual: bool = True


_LLAMA_LIKE = ArchMap(
    layers="model.layers",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    base="model",
)

ARCH_MAPS: dict[str, ArchMap] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    # OLMo-2 normalises the MLP's output before the residual add: the edited layer must run
    "olmo2": replace(_LLAMA_LIKE, mlp_out_residual=False),
    "gemma": _LLAMA_LIKE,
    # Gemma-2/3 soft-cap the final logits and normalise the MLP's output: no fast path.
    "gemma2": replace(_LLAMA_LIKE, fast_path=False, mlp_out_residual=False),
    "gpt2": ArchMap(
        layers="transformer.h",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        base="transformer",
        mlp_out_transposed=True,
        attn_out_transposed=True,
    ),
    "gpt_neox": ArchMap(
        layers="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
        base="gpt_neox",
    ),
    "gptj": ArchMap(
        layers="transformer.h",
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        base="transformer",
    ),
}

_HINT = (
    "pass the module names yourself, e.g. arch={'layers': 'model.layers', 'mlp_out': 'mlp.down_proj', "
    "'attn_out': 'self_attn.o_proj', 'final_norm': 'model.norm', 'lm_head': 'lm_head', 'base': 'model', "
    "'mlp_out_transposed': False}"
)


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """``root.a.b.0.c`` from ``"a.b.0.c"``, with an error naming the missing part."""
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise ValueError(f"module path {dotted!r}: {type(module).__name__} has no attribute {part!r}")
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module path {dotted!r} is a {type(module).__name__}, not a module")
    return module


def resolve_arch(model: nn.Module, arch: ArchMap | Mapping[str, Any] | None = None) -> ArchMap:
    """The architecture map of ``model``: ``arch`` if given (an ArchMap or a dict of its fields),
    else the table entry for ``model.config.model_type``. Checks that the paths exist."""
    if isinstance(arch, ArchMap):
        found = arch
    elif isinstance(arch, Mapping):
        names = {f.name for f in fields(ArchMap)}
        unknown = sorted(set(arch) - names)
        if unknown:
            raise ValueError(f"unknown architecture-map key(s) {unknown}; valid: {sorted(names)}")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        base = ARCH_MAPS.get(model_type) if model_type else None
        if base is not None:
            found = replace(base, **arch)
        else:
            missing = sorted({"layers", "mlp_out", "attn_out", "final_norm", "lm_head", "base"} - set(arch))
            if missing:
                raise ValueError(f"architecture map is missing {missing}; {_HINT}")
            # an unknown family: the fast path is off unless the user declares it exact
            found = ArchMap(**{"fast_path": False, "mlp_out_residual": False, **arch})
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCH_MAPS:
            raise ValueError(
                f"no architecture map for model_type {model_type!r} (known: {sorted(ARCH_MAPS)}); {_HINT}"
            )
        found = ARCH_MAPS[model_type]
    layers = get_module(model, found.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{found.layers!r} is not a non-empty ModuleList of decoder layers; {_HINT}")
    get_module(layers[0], found.mlp_out)
    get_module(layers[0], found.attn_out)
    get_module(model, found.final_norm)
    get_module(model, found.base)
    if model.get_output_embeddings() is None:
        get_module(model, found.lm_head)
    return found


def decoder_layers(model: nn.Module, arch: ArchMap) -> nn.ModuleList:
    return get_module(model, arch.layers)  # type: ignore[return-value]


def num_layers(model: nn.Module, arch: ArchMap) -> int:
    return len(decoder_layers(model, arch))


def check_layer(model: nn.Module, arch: ArchMap, layer: int) -> int:
    """A valid non-negative layer index (negative counts from the top), or ValueError."""
    n = num_layers(model, arch)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an integer, got {layer!r}")
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
    return layer % n


def mlp_out_name(model: nn.Module, arch: ArchMap, layer: int) -> str:
    """Full parameter name of the MLP output projection's weight in ``layer``."""
    return f"{arch.layers}.{check_layer(model, arch, layer)}.{arch.mlp_out}.weight"


def embedding_name(model: nn.Module) -> str:
    """The parameter name of ``model``'s input embedding weight (what artifacts tied to a base
    model, such as probes and soft prompts, fingerprint)."""
    weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is weight:
            return name
    raise ValueError(f"{type(model).__name__}: its input embedding weight is not among its parameters")


def lm_head(model: nn.Module, arch: ArchMap) -> nn.Module:
    head = model.get_output_embeddings()
    return head if head is not None else get_module(model, arch.lm_head)


def linear_delta(x: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The change ``delta`` makes to a projection's output for input ``x``.

    ``nn.Linear`` computes x·Wᵀ (weight [out, in]); GPT-2's ``Conv1D`` computes x·W (weight [in, out]).
    """
    return x @ delta if transposed else torch.nn.functional.linear(x, delta)
