"""Extraction before subtraction: the pure tensor operation that combines an expert's and an
anti-expert's weight deltas (Hu et al., 2023, "Separate the Wheat from the Chaff").

Per output row i of a weight (a row of the [out, in] layout), with a = ΔW⁺ᵢ (expert) and
b = ΔW⁻ᵢ (anti-expert)::

    u       = norm(norm(a) + norm(b))      the direction the two adapters share
    common  = (b · u) u                    the anti-expert's part along it (general ability)
    ΔWᵢ     = a − λ (b − common)           subtract only what the anti-expert does on its own

``norm(v) = v / ‖v‖``, and a row with ‖v‖ ≤ :data:`EPS` is taken as the zero vector (a zero row
has no direction, so it stays zero instead of becoming NaN). Consequences worth knowing:

* λ = 0 gives the expert; b = c·a with c > 0 (the same direction) gives a whatever λ: all of b is
  common; b = 0 gives a; a = 0 gives u = norm(b), common = b, so the row stays 0;
* the subtraction never changes a row's component along u: (ΔWᵢ − a) · u = 0;
* when a, b ≠ 0, common = (‖b‖/2)(norm(a) + norm(b)) (because b·(â + b̂) = ‖b‖(1 + â·b̂) =
  ‖b‖‖â + b̂‖²/2), so ‖common‖ = ‖b‖ cos(θ/2), θ the angle between a and b: the nearer b is to a,
  the more of it is kept; for antiparallel rows (â + b̂ = 0) nothing is kept and ΔWᵢ = a − λb;
* the result is homogeneous of degree 1 in (a, b) jointly, so merging the LoRA scaling
  alpha/r before or after the combination (the reference code combines B·A unscaled) gives the
  same patch.

The reference implementation (HITsz-TMG/Ext-Sub, ``ext_sub.py``) normalises ``B·A`` along its last
axis, i.e. per output row of an ``nn.Linear`` weight, with no epsilon (a zero row gives NaN).
"""
from __future__ import annotations

import math

import torch

EPS = 1e-12  # rows (and sums of unit rows) with a norm at or below this have no direction


def unit_rows(rows: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Each row of ``rows`` ([n, d]) divided by its L2 norm; rows with norm ≤ ``eps`` become zero."""
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)  # [n, 1]
    return torch.where(norms > eps, rows / norms.clamp_min(eps), torch.zeros_like(rows))


def _as_rows(tensor: torch.Tensor, out_dim: int) -> torch.Tensor:
    """``tensor`` as [n_out, rest]: the output axis first, every other axis flattened."""
    moved = tensor.movedim(out_dim, 0)
    return moved.reshape(moved.shape[0], -1)


def _check(expert: torch.Tensor, anti: torch.Tensor, out_dim: int) -> int:
    if expert.shape != anti.shape:
        raise ValueError(f"expert and anti-expert deltas differ in shape: {tuple(expert.shape)} vs "
                         f"{tuple(anti.shape)}")
    if expert.dim() < 2:
        raise ValueError(f"extraction before subtraction works on weight matrices (2+ dims), got shape "
                         f"{tuple(expert.shape)}")
    if not -expert.dim() <= out_dim < expert.dim():
        raise ValueError(f"out_dim {out_dim} is out of range for a {expert.dim()}-dim tensor")
    return out_dim % expert.dim()


def common_part(expert: torch.Tensor, anti: torch.Tensor, *, out_dim: int = 0) -> torch.Tensor:
    """The part of ``anti`` that the two deltas share, per output row: (ΔW⁻ᵢ·u) u with
    u = norm(norm(ΔW⁺ᵢ) + norm(ΔW⁻ᵢ)). Same shape and layout as the inputs; computed in at least
    float32."""
    out_dim = _check(expert, anti, out_dim)
    dtype = torch.promote_types(torch.promote_types(expert.dtype, anti.dtype), torch.float32)
    a = _as_rows(expert.to(dtype), out_dim)  # [n_out, d]
    b = _as_rows(anti.to(dtype), out_dim)  # [n_out, d]
    u = unit_rows(unit_rows(a) + unit_rows(b))  # [n_out, d]
    common = (b * u).sum(-1, keepdim=True) * u  # [n_out, d]
    moved_shape = expert.movedim(out_dim, 0).shape
    return common.reshape(moved_shape).movedim(0, out_dim)


def extract_subtract(expert: torch.Tensor, anti: torch.Tensor, lam: float, *, out_dim: int = 0) -> torch.Tensor:
    """Ext-Sub's combined delta ΔW⁺ − λ(ΔW⁻ − common), rows taken along ``out_dim``.

    ``expert``/``anti``: the two merged adapter deltas of one weight, in the weight's own layout;
    ``out_dim``: the axis that indexes output rows (0 for ``nn.Linear``'s [out, in], 1 for GPT-2's
    ``Conv1D`` [in, out]); ``lam``: λ, the strength of the subtraction (0: the expert alone).
    Returns a tensor of the inputs' shape and layout (dtype: at least float32)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam!r}")
    common = common_part(expert, anti, out_dim=out_dim)
    return expert.to(common.dtype) - lam * (anti.to(common.dtype) - common)
