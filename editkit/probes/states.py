"""Reading a model's states over a set of texts: tokenising, batching, and means over real tokens.

Every probe reads the same way: texts are right-padded (absolute positions stay exact), hooks on
the modules named by the architecture map retain their outputs (decoder layers: the residual
stream, not ``hidden_states[-1]``, which many HF models return after the final norm) or their
inputs (the MLP output projection: the value-vector coefficients), and each text's vector is the
mean over its real tokens (pads masked). Batches are formed from texts of similar length so that
little compute goes to pads; results come back in the caller's order.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from editkit.arch import ArchMap, check_layer, num_layers, resolve_arch
from editkit.hooks import TraceDict
from editkit.text import ChatMode, pad_id, pad_right, prompt_ids, target_ids, uses_chat

log = logging.getLogger(__name__)

Read = Literal["output", "input"]


class Applicable(Protocol):
    """Anything applied temporarily around a measurement: an :class:`editkit.Patch`, or any
    object whose ``applied(model)`` is a context manager that restores the model on exit."""

    def applied(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]: ...


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the device of the input embedding (CPU if it is offloaded)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    """``texts`` as a list, or ValueError if it is empty or holds a non-string / blank entry."""
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"no {what} given")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what}[{i}] must be a non-empty string, got {text!r}")
    return texts


def encode_texts(tokenizer: Any, texts: Sequence[str], *, chat_template: ChatMode = "none",
                 max_length: int = 512) -> list[list[int]]:
    """Token ids per text: the raw text (``chat_template="none"``), or the text rendered as a user
    turn up to the assistant header, as generation sees a prompt (``"auto"`` with a chat template).
    Over-long texts keep their first ``max_length`` tokens."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    chat = uses_chat(tokenizer, chat_template)
    out = []
    for i, text in enumerate(texts):
        ids = prompt_ids(tokenizer, text, "auto") if chat else target_ids(tokenizer, text, "none")
        if not ids:
            raise ValueError(f"text {i} ({text[:40]!r}) has no tokens")
        out.append(ids[:max_length])
    return out


def layer_names(model: nn.Module, arch: ArchMap, layers: Sequence[int] | None, read: Read) -> dict[int, str]:
    """{layer index: dotted module name}: the decoder layer itself (``read="output"``) or its MLP
    output projection (``read="input"``)."""
    if layers is None:
        layers = range(num_layers(model, arch))
    chosen = sorted({check_layer(model, arch, layer) for layer in layers})
    if not chosen:
        raise ValueError("no layers given")
    suffix = "" if read == "output" else f".{arch.mlp_out}"
    return {i: f"{arch.layers}.{i}{suffix}" for i in chosen}


@torch.no_grad()
def pooled(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    read: Read = "output",
    chat_template: ChatMode = "none",
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    arch: ArchMap | Mapping[str, Any] | None = None,
    desc: str = "reading states",
) -> dict[int, torch.Tensor]:
    """{layer: [n_texts, dim] float32 on CPU}: per text, the mean over its real tokens of the decoder
    layer's output (``read="output"``, dim = d_model) or of its MLP output projection's input
    (``read="input"``, dim = d_ff). All layers are read in one forward pass per batch."""
    from tqdm.auto import tqdm

    if read not in ("output", "input"):
        raise ValueError(f"read must be 'output' or 'input', got {read!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    texts = check_texts(texts)
    arch = resolve_arch(model, arch)
    names = layer_names(model, arch, layers, read)
    seqs = encode_texts(tokenizer, texts, chat_template=chat_template, max_length=max_length)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    device = input_device(model)
    pad = pad_id(tokenizer)
    out: dict[int, torch.Tensor | None] = dict.fromkeys(names)
    was_training = model.training
    model.eval()  # dropout off, whatever mode the caller left the model in
    try:
        with TraceDict(model, names.values(), retain_input=read == "input", retain_output=read == "output",
                       detach=True) as traces:
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
                rows = order[start:start + batch_size]
                ids, mask = pad_right([seqs[i] for i in rows], pad)
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                for layer, name in names.items():
                    trace = traces[name]
                    h = (trace.input if read == "input" else trace.output).float()  # [batch, seq, dim]
                    w = mask.to(h.device, h.dtype).unsqueeze(-1)  # [batch, seq, 1]
                    means = ((h * w).sum(1) / w.sum(1)).cpu()  # [batch, dim]
                    if out[layer] is None:
                        out[layer] = torch.empty(len(texts), means.shape[-1])
                    out[layer][torch.tensor(rows)] = means  # type: ignore[index]
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
