"""MEND's editor network: gradient factors in, predicted weight deltas out.

For each edited weight W (a :class:`~editkit.methods.mend.factors.Target`) and each token t, the
gradient's rank-1 factors (u_t, δ_t) pass through an editor shared by all weights of the same shape:

    z_t   = ([u_t; δ_t] − μ) / σ                      normalised (running statistics of meta-training)
    r(z)  = Σ_i  step_i,   h_0 = z,  h_{i+1} = h_i + step_i,
            step_i = ReLU(U_i V_i h_i + c_i)  (hidden layers),  U_L V_L h_L + c_L  (the output layer)
    [ũ_t; δ̃_t] = [u_t; δ_t] + σ ⊙ (s_W ⊙ r(z_t) + b_W)   scale s_W and shift b_W per weight W
    ΔW    = −η_W · Σ_t δ̃_t ũ_tᵀ   (Σ_t ũ_t δ̃_tᵀ for Conv1D), with a learned rate η_W per weight

The residual MLP is identity-initialised as in MEND (every U_i starts at zero, so r ≡ 0), s_W at 1
and b_W at 0: an untrained editor returns the factors unchanged and ΔW = −η·∇W exactly, the plain
gradient step. The correction is computed in normalised units and mapped back to the factors' own
scale (the σ ⊙ …), so the untrained step does not depend on the statistics, and a zero scale and
shift gate the whole MLP off whatever its weights. (The reference MEND instead feeds its edit the
normalised factors themselves; there the untrained editor is not the gradient step.)

Statistics: per dimension of [u; δ], count, mean and sum of squared deviations, merged batch-wise
(Chan et al.'s parallel form of Welford's update) over every token meta-training sees; an edit
only reads them. Training updates them functionally (:meth:`MENDEditor.updated_stats`) and keeps
the result only when its step is applied, so a skipped step leaves no trace.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from editkit.methods.mend.factors import Factors, Target, weight_delta

# {shape key: (count [] float64, mean [D] float64, m2 [D] float64)}
Stats = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_REL_EPS = 1e-6  # a dimension's σ is at least this fraction of its side's mean σ (u and δ differ in scale)


class LowRankLayer(nn.Module):
    """h ↦ U·(V·h) + c on D features; U [D, r] starts at zero, V [r, D] ~ N(0, 1/D)."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [tokens, D] -> [tokens, D]
        return (h @ self.V.T) @ self.U.T + self.bias


class ShapeEditor(nn.Module):
    """The editor of every weight with inputs of size ``d_in`` and outputs of size ``d_out``: a
    residual low-rank MLP on the normalised [u; δ], statistics, and per-weight scale and shift."""

    def __init__(self, d_in: int, d_out: int, n_weights: int, *, rank: int, n_hidden: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.layers = nn.ModuleList(LowRankLayer(dim, rank, generator) for _ in range(n_hidden + 1))
        self.scale = nn.Parameter(torch.ones(n_weights, dim))  # s_W, one row per weight of this shape
        self.shift = nn.Parameter(torch.zeros(n_weights, dim))  # b_W
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def correction(self, z: torch.Tensor) -> torch.Tensor:
        """r(z): what the residual MLP adds to its input (exactly zero while every U is zero)."""
        h, total = z, torch.zeros_like(z)
        for i, layer in enumerate(self.layers):
            step = layer(h)
            if i < len(self.layers) - 1:
                step = torch.relu(step)
            h, total = h + step, total + step
        return total

    def moments(self, stats: tuple[torch.Tensor, ...] | None, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) in fp32; (0, 1) when normalisation is off or fewer than two tokens were seen."""
        count, mean, m2 = stats if stats is not None else (self.count, self.mean, self.m2)
        dim = self.d_in + self.d_out
        if not normalize or float(count) < 2:
            return torch.zeros(dim, device=mean.device), torch.ones(dim, device=mean.device)
        std = (m2 / (count - 1)).sqrt()
        floors = [std[:self.d_in].mean(), std[self.d_in:].mean()]
        floor = torch.cat([f.clamp_min(1e-30).expand(n) for f, n in zip(floors, (self.d_in, self.d_out))])
        return mean.float(), torch.maximum(std, _REL_EPS * floor).float()

    def forward(self, u: torch.Tensor, delta: torch.Tensor, index: int, *, normalize: bool,
                stats: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ, δ̃) for weight ``index`` of this shape: [tokens, d_in], [tokens, d_out]."""
        x = torch.cat([u, delta], dim=-1)  # [tokens, D]
        mu, sigma = self.moments(stats, normalize)
        r = self.correction((x - mu) / sigma)
        out = x + sigma * (self.scale[index] * r + self.shift[index])
        return out[:, :self.d_in], out[:, self.d_in:]


def merge_stats(stats: tuple[torch.Tensor, ...], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, m2) after also seeing the rows of ``x`` [tokens, D] (Chan et al.'s merge)."""
    count, mean, m2 = stats
    x = x.detach().double()
    n_b = x.shape[0]
    if n_b == 0:
        return count, mean, m2
    mean_b = x.mean(0)
    m2_b = ((x - mean_b) ** 2).sum(0)
    total = count + n_b
    diff = mean_b - mean
    return total, mean + diff * (n_b / total), m2 + m2_b + diff ** 2 * (count * n_b / total)


class MENDEditor(nn.Module):
    """The editors of all target weights (one :class:`ShapeEditor` per weight shape) and the learned
    edit rates η_W. ``editor(factors)`` maps gradient factors to {parameter name: ΔW}."""

    def __init__(self, targets: Sequence[Target], *, rank: int, n_hidden: int, lr: float, normalize: bool,
                 seed: int = 0) -> None:
        super().__init__()
        if not targets:
            raise ValueError("MEND needs at least one weight to edit")
        self.targets = list(targets)
        self.rank, self.n_hidden, self.normalize = rank, n_hidden, normalize
        groups: dict[str, list[Target]] = {}
        for target in self.targets:
            groups.setdefault(target.shape_key, []).append(target)
        self.index = {t.name: groups[t.shape_key].index(t) for t in self.targets}  # row of s_W, b_W
        generator = torch.Generator().manual_seed(seed)
        self.editors = nn.ModuleDict({
            key: ShapeEditor(group[0].d_in, group[0].d_out, len(group), rank=rank, n_hidden=n_hidden,
                             generator=generator)
            for key, group in groups.items()})
        self.lrs = nn.Parameter(torch.full((len(self.targets),), float(lr)))  # η_W, in target order

    def config(self) -> dict[str, object]:
        """What rebuilds this editor (with its targets): stored in an archive."""
        return {"rank": self.rank, "n_hidden": self.n_hidden, "normalize": self.normalize}

    def forward(self, factors: Factors, *, stats: Stats | None = None,
                lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """{parameter name: ΔW} (fp32, the weight's layout) for every target weight."""
        deltas = {}
        for i, target in enumerate(self.targets):
            u, d = factors[target.name]
            editor = self.editors[target.shape_key]
            u_t, d_t = editor(u, d, self.index[target.name], normalize=self.normalize,
                              stats=None if stats is None else stats[target.shape_key])
            deltas[target.name] = -(self.lrs[i] * lr_scale) * weight_delta(target, u_t, d_t)
        return deltas

    # -- normalisation statistics -------------------------------------------------------------------
    def current_stats(self) -> Stats:
        return {key: (e.count.clone(), e.mean.clone(), e.m2.clone()) for key, e in self.editors.items()}

    def updated_stats(self, stats: Stats, factors: Factors) -> Stats:
        """``stats`` after also seeing every token of ``factors`` (the editor itself is unchanged)."""
        out = dict(stats)
        for target in self.targets:
            u, d = factors[target.name]
            out[target.shape_key] = merge_stats(out[target.shape_key], torch.cat([u, d], dim=-1))
        return out

    @torch.no_grad()
    def commit_stats(self, stats: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
        for key, (count, mean, m2) in stats.items():
            editor = self.editors[key]
            editor.count.copy_(count)
            editor.mean.copy_(mean)
            editor.m2.copy_(m2)
