"""The compute floor of a DINM step, for ``bench/edit_speed.py`` (see its docstring): the least work
any exact step does on the batches an edit trains on — the edited layer's change Δ·K added to its
cached output, the layers above, the final norm and (optionally) the LM head at the loss positions,
forward and backward into Δ."""
from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from editkit.arch import decoder_layers, get_module, linear_delta, lm_head
from editkit.engine import ExactForwardHead
from editkit.hooks import Trace


class _Frozen:
    """Parameters do not require grad inside the block (restored after)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.params:
            p.requires_grad_(True)


@torch.no_grad()
def capture(model: Any, arch: Any, layer: int, batch: Any) -> dict[str, Any]:
    """One full no-grad forward: ``layer``'s output and the input of its MLP output projection (the
    keys), the args every layer above ``layer`` is called with, and the unedited logits at the loss
    positions. Also times the forward."""
    layers = decoder_layers(model, arch)
    calls: dict[int, tuple[tuple, dict]] = {}

    def keep(i: int):
        def hook(module, args, kwargs):
            calls[i] = (args, dict(kwargs))
        return hook

    with ExitStack() as stack:
        for i in range(layer + 1, len(layers)):
            stack.callback(layers[i].register_forward_pre_hook(keep(i), with_kwargs=True).remove)
        output = stack.enter_context(Trace(layers[layer], retain_output=True, detach=True))
        keys = stack.enter_context(Trace(get_module(layers[layer], arch.mlp_out), retain_input=True,
                                         retain_output=False, detach=True))
        start = time.perf_counter()
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        seconds = time.perf_counter() - start
    positions = batch.predicting_positions()
    return {"output": output.output, "keys": keys.input.float(), "calls": calls, "positions": positions,
            "targets": batch.targets(), "reference": F.log_softmax(out.logits[positions].float(), -1),
            "ref_seconds": seconds}


NLL_BATCHES = ("edit", "questions")  # the batches DINM scores by NLL; the others by KL to the unedited model


def floor_seconds(model: Any, arch: Any, layer: int, captured: dict[str, dict], steps: int,
                  head: bool, autocast: torch.dtype | None = None) -> tuple[float, dict[str, float]]:
    """T × (forward + backward of: the edited layer's change Δ·K added to its cached output,
    layers[layer + 1:] + final norm [+ LM head at the loss positions]) for every batch; at the top
    layer only the loss positions are computed. Also returns the first iteration's loss per batch
    (with the head: DINM's unedited NLL on "edit" and "questions", KL on the others). ``autocast``:
    the layers and the norm run under autocast to that dtype (as the edit's steps with
    ``step_dtype``), Δ·K and the head's logits in fp32 (its backward in that dtype, as the steps')."""
    amp = (lambda: torch.autocast(delta.device.type, dtype=autocast)) if autocast is not None else nullcontext
    layers = decoder_layers(model, arch)
    norm = get_module(model, arch.final_norm)
    out_proj = get_module(layers[layer], arch.mlp_out)
    delta = torch.zeros(out_proj.weight.shape, dtype=torch.float32, device=out_proj.weight.device, requires_grad=True)
    top = layer == len(layers) - 1
    lm = lm_head(model, arch)
    low_head = lm.weight.detach().to(autocast) if autocast is not None and head else None

    def step(c: dict[str, Any], name: str) -> torch.Tensor:
        if top:
            where = c["positions"]
            change = linear_delta(c["keys"][where], delta, arch.mlp_out_transposed)
            with amp():
                hidden = norm(c["output"][where] + change.to(c["output"].dtype))  # [n_targets, d_model]
        else:
            change = linear_delta(c["keys"], delta, arch.mlp_out_transposed)
            hidden = c["output"] + change.to(c["output"].dtype)  # [batch, seq, d_model]
            with amp():
                for i in range(layer + 1, len(layers)):
                    args, kwargs = c["calls"][i]
                    hidden = layers[i](hidden, *args[1:], **kwargs)
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                hidden = norm(hidden)[c["positions"]]  # [n_targets, d_model]
        hidden = hidden.to(lm.weight.dtype)
        if not head:
            return hidden.float().pow(2).mean()
        if low_head is not None:  # as the edit's steps: exact logits, the gradient into hidden in bf16
            logits = ExactForwardHead.apply(hidden, lm.weight, low_head).float()
        else:
            logits = lm(hidden).float()  # [n_targets, vocab]
        if name in NLL_BATCHES:
            return F.cross_entropy(logits, c["targets"])
        return F.kl_div(F.log_softmax(logits, -1), c["reference"], log_target=True, reduction="batchmean")

    with _Frozen(model):
        first: dict[str, float] = {}
        start = time.perf_counter()
        for _ in range(steps):
            for name, c in captured.items():
                loss = step(c, name)
                loss.backward(inputs=[delta])
                first.setdefault(name, loss.item())
        return time.perf_counter() - start, first
