"""Toxic-layer localisation: the decoder layer whose residual stream separates the safe response
from the unsafe one the most."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from editkit.arch import ArchMap, decoder_layers, resolve_arch
from editkit.hooks import TraceDict
from editkit.instance import EditInstance
from editkit.text import ChatMode, encode_pairs, pad_id, pad_left, pad_right, prompt_ids, target_ids

LocateMode = Literal["mean", "scaled", "reference"]
LocateContext = Literal["none", "prompt"]


@dataclass(frozen=True)
class Localization:
    """The located layer and the distance between safe and unsafe states at every layer."""

    layer: int
    profile: list[float]
    mode: str
    context: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self, path: str | Path | None = None, title: str = "safe vs unsafe distance per layer") -> Any:
        """A bar chart of the profile with the located layer highlighted (PNG if ``path``)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        colors = ["#d62728" if i == self.layer else "#1f77b4" for i in range(len(self.profile))]
        ax.bar(range(len(self.profile)), self.profile, color=colors)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel({"mean": "L2 distance", "scaled": "L2 distance / state norm"}.get(self.mode, "Frobenius distance"))
        ax.set_title(f"{title} (located: {self.layer})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _response_batch(tokenizer: Any, instance: EditInstance, context: str, chat_template: ChatMode, max_length: int):
    responses = [instance.safe, instance.unsafe]
    if context == "prompt":
        batch = encode_pairs(tokenizer, [(instance.prompt, r) for r in responses], chat_template=chat_template,
                             max_length=max_length)
        return batch.input_ids, batch.attention_mask, batch.target_mask
    seqs = [target_ids(tokenizer, r, "none")[:max_length] for r in responses]
    ids, mask = pad_right(seqs, pad_id(tokenizer))
    return ids, mask, mask.bool()


@torch.no_grad()
def locate(
    model: Any,
    tokenizer: Any,
    instance: EditInstance,
    *,
    mode: LocateMode = "mean",
    context: LocateContext = "none",
    chat_template: ChatMode = "auto",
    max_length: int = 1024,
    arch: ArchMap | dict | None = None,
) -> Localization:
    """Find the toxic layer of ``model`` for ``instance``.

    ``mode="mean"`` (default): for every decoder layer, the L2 distance between the safe and the
    unsafe response's mean residual-stream output over their real tokens (pads masked; with
    ``context="prompt"`` the adversarial prompt precedes each response and only response tokens
    count). Both responses run in one batched forward pass. ``mode="scaled"`` divides that distance
    by the mean norm of the two mean states, ‖m_s − m_u‖ / ½(‖m_s‖ + ‖m_u‖): hidden-state norms grow
    with depth, so the raw distance favours the top layers whatever separates the responses; the
    scaled one compares how far apart the two are relative to the states' size. ``mode="reference"`` reproduces the
    reference implementation for comparison: left-padded responses, Frobenius norm of the
    difference of the whole padded matrices.
    """
    if mode not in ("mean", "scaled", "reference"):
        raise ValueError(f"locate mode must be 'mean', 'scaled' or 'reference', got {mode!r}")
    if context not in ("none", "prompt"):
        raise ValueError(f"locate context must be 'none' or 'prompt', got {context!r}")
    arch = resolve_arch(model, arch)
    n = len(decoder_layers(model, arch))
    names = [f"{arch.layers}.{i}" for i in range(n)]
    device = next(model.parameters()).device
    if mode == "reference":
        seqs = [target_ids(tokenizer, r, "none")[:max_length] for r in (instance.safe, instance.unsafe)]
        if context == "prompt":
            p = prompt_ids(tokenizer, instance.prompt, chat_template)
            seqs = [p + s for s in seqs]
        ids, mask = pad_left(seqs, pad_id(tokenizer))
        select = None
    else:
        ids, mask, select = _response_batch(tokenizer, instance, context, chat_template, max_length)
    was_training = model.training
    model.eval()  # the frozen model: no dropout, whatever mode the caller left it in
    try:
        with TraceDict(model, names, retain_output=True, detach=True) as traces:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        model.train(was_training)
    profile = []
    for name in names:
        h = traces[name].output.float()  # [2, seq, d_model]
        if select is None:
            profile.append(float(torch.linalg.norm(h[0] - h[1])))
        else:
            w = select.to(h.device).unsqueeze(-1).float()  # [2, seq, 1]
            means = (h * w).sum(1) / w.sum(1)  # [2, d_model]
            distance = float(torch.linalg.norm(means[0] - means[1]))
            if mode == "scaled":
                distance /= max(float(means.norm(dim=-1).mean()), 1e-12)
            profile.append(distance)
    layer = int(torch.tensor(profile).argmax())
    return Localization(layer=layer, profile=profile, mode=mode, context=context)
