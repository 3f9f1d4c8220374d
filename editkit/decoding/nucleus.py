"""The top-p nucleus of a distribution over next tokens (Holtzman et al., 2020), shared by the
detoxifiers that act only inside the generator's nucleus (DExperts, DetoxiGen)."""
from __future__ import annotations

import torch


def nucleus_mask(scores: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """[rows, vocab] bool: the smallest set of most probable tokens whose probability under
    ``softmax(scores)`` reaches ``top_p`` (the token that crosses it included, the most probable token
    always), never a token of score −∞. ``top_p`` None or ≥ 1: every token of finite score.

    Ties are ordered by token id, so the most probable token kept is the one ``argmax`` picks."""
    finite = torch.isfinite(scores)
    if top_p is None or top_p >= 1.0:
        return finite
    ordered, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop = cumulative > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
    drop[..., 0] = False
    keep = torch.empty_like(drop).scatter_(-1, order, ~drop)
    return keep & finite
