"""FGDILP (Yi et al., 2024: "Fine-Grained Detoxification via Instance-Level Prefixes for Large
Language Models"): the raw prompt's attention-head outputs steered away from fused subtoxicity vectors
read from the same model behind instance-level negative and positive prefixes.

* :func:`fuse_subtoxicity` — masking, sign election (symbolization) and alignment of the Δⱼ;
* :func:`steer_heads` — v ← v − (1+‖Δ*ₕ‖)^λnorm · (1+ReLU(cos(eₕ, vₕ)))^λsim · Δ*ₕ, renormalised;
* :class:`FGDILP` — the decoding-time detoxifier;
* :mod:`editkit.decoding.fgdilp_prefixes` — self-generation, self-diagnosis and the prefixes.

Where the paper leaves a choice open, the defaults follow the authors' code (github.com/xinykou/FGDILP)
unless DESIGN §7 says otherwise: top-50% masking per layer over all heads, alignment by the max,
λnorm = 0.4, λsim = 0.6, eₕ = the negative prefixes' head output at their last token
(``similarity="prefix"``; ``"direction"`` uses Δ*ₕ). DESIGN's choices where the code differs: sign
election by plain mass (``sign="normmass"`` is the code's), renormalisation per head
(``renorm="layer"`` is the code's: all heads of a layer together), and the six attributes of
Self-Diagnosis (severe toxicity where the code has insult).
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from editkit.arch import ArchMap, decoder_layers, get_module, resolve_arch
from editkit.decoding.fgdilp_prefixes import ATTRIBUTES, InstancePrefixes, build_prefixes, prefixed
from editkit.generation.detoxifier import Detoxifier, follow_rows
from editkit.generation.incremental import MIN_SHARED_PREFIX, open_batch
from editkit.hooks import Trace

SIGNS = ("mass", "normmass")
RENORMS = ("head", "layer", "none")
SIMILARITIES = ("prefix", "direction")
_TINY = 1e-12  # floor of a norm in a denominator (a zero vector gives cos = 0, not NaN)


def fuse_subtoxicity(deltas: torch.Tensor, keep_fraction: float, *, sign: str = "mass") -> torch.Tensor:
    """Fuse subtoxicity vectors ``deltas`` [n_neg, ..., d] into one [..., d] (TIES-style, with a max):

    1. masking: in each vector (each negative, each leading index) the ⌊keep_fraction · d⌋ entries of
       largest magnitude stay, the others become 0;
    2. symbolization: per entry, the sign with the larger mass over the negatives — ``"mass"``: the
       sign of Σⱼ Δⱼ (the sign whose summed magnitude is larger); ``"normmass"``: of Σⱼ sign(Δⱼ)·Δⱼ²/‖Δⱼ‖²
       (each vector's share of its own squared norm, the authors' code's default). An exact tie takes
       the majority of the vector's elected signs;
    3. alignment: per entry, the largest magnitude among the negatives whose entry has the elected
       sign, carrying that sign (0 where none has).

    An all-zero Δⱼ (a row's missing negative) changes nothing."""
    if deltas.dim() < 2:
        raise ValueError(f"deltas must be [n_neg, ..., d], got shape {tuple(deltas.shape)}")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction!r}")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    d = deltas.shape[-1]
    keep = int(math.floor(d * keep_fraction + 1e-9))
    masked = deltas
    if keep < d:
        masked = torch.zeros_like(deltas)
        if keep > 0:
            top = deltas.abs().topk(keep, dim=-1).indices
            masked.scatter_(-1, top, deltas.gather(-1, top))
    if sign == "mass":
        mass = masked
    else:
        share = masked.square() / masked.square().sum(-1, keepdim=True).clamp_min(_TINY)
        mass = masked.sign() * share
    elected = mass.sum(0).sign()  # [..., d]
    majority = elected.sum(-1, keepdim=True).sign().expand_as(elected)
    elected = torch.where(elected == 0, majority, elected)
    agrees = torch.where(elected > 0, masked > 0, masked < 0)  # [n_neg, ..., d]
    return (masked.abs() * agrees).amax(0) * elected


def steer_heads(v: torch.Tensor, fused: torch.Tensor, lambda_norm: float, lambda_sim: float, *,
                reference: torch.Tensor | None = None, strength: float = 1.0, renorm: str = "head") -> torch.Tensor:
    """Head outputs ``v`` [..., heads, head_dim] steered away from ``fused`` (Δ*, same shape), per head h::

        vₕ' = vₕ − strength · (1 + ‖Δ*ₕ‖)^λnorm · (1 + ReLU(cos(eₕ, vₕ)))^λsim · Δ*ₕ

    with eₕ = ``reference``'s head h (default: Δ*ₕ itself), then renormalised to the old norm:
    ``"head"`` each head to its own, ``"layer"`` all heads together (the authors' code), ``"none"``.
    With Δ* = 0 or ``strength`` = 0 the result is ``v`` exactly."""
    if renorm not in RENORMS:
        raise ValueError(f"renorm must be one of {RENORMS}, got {renorm!r}")
    e = fused if reference is None else reference
    cos = (e * v).sum(-1, keepdim=True) / (e.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)).clamp_min(_TINY)
    scale = strength * (1 + fused.norm(dim=-1, keepdim=True)) ** lambda_norm * (1 + cos.clamp_min(0)) ** lambda_sim
    out = v - scale * fused
    if renorm == "none":
        return out
    dims = (-1,) if renorm == "head" else (-2, -1)
    old = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    new = torch.linalg.vector_norm(out, dim=dims, keepdim=True)
    return torch.where(new > 0, out * (old / new.clamp_min(_TINY)), out)


class FGDILP(Detoxifier):
    """Fine-grained detoxification via instance-level prefixes, on the generator ``model`` itself.

    Per prompt (:meth:`start`), the model samples ``k`` continuations of ``sample_tokens`` tokens and
    diagnoses them; up to six negative prefixes (the most likely continuation per attribute, with a
    toxic instruction) and one positive prefix (the least toxic, with a kind instruction) go before
    the prompt (:mod:`~editkit.decoding.fgdilp_prefixes`). These 1 + n_neg auxiliary sequences per
    row then run beside the generation with their own key/value cache, fed the same tokens. At every
    position and layer, the input of the attention output projection (the concatenated per-head
    outputs) is read at the last position: Δⱼ = a(negⱼ) − a(pos), fused by :func:`fuse_subtoxicity`
    (per layer, over all heads), and the raw sequence's last-position head outputs are steered by
    :func:`steer_heads` in the same layer (``similarity="prefix"``: eₕ is the head output at the end of
    the negative prefixes, averaged over them, as the authors' code has it; ``"direction"``: eₕ = Δ*ₕ).

    Order, for one batch (``start``, then ``step`` once per new token)::

        start(prompts):  prefixes per distinct prompt (self-generation, diagnosis) -> [similarity="prefix"]
                         the negative prefixes alone, e read at their last token -> the auxiliary
                         sequences prefilled, a read at the prompts' last token -> Δ* per row and layer
                         -> the prompts prefilled by the detoxifier's own run of the model, each layer's
                         last-position head outputs steered with that Δ* -> logits kept
        step(z, None):   those steered logits
        step(z, fed):    rows that left dropped from both runs -> the auxiliary sequences fed ``fed``
                         (each its row's token), read -> Δ* at this position -> the steered run fed
                         ``fed``, steered with it -> its logits

    so the vectors that steer a position are read at that same position (the paper's two passes per
    token). The steered pass is the detoxifier's own run of the model, not the generator's forward:
    ``step`` comes after the generator's forward of ``fed``, and in the greedy loop rows leave between
    a ``step`` and the next forward, so the generator's own forward could only be steered one token
    late, and not at all once rows leave. The returned scores are the steered run's logits with the
    generator's −∞ entries kept (suppressed tokens); finite adjustments of processors that ran before
    this one (a repetition penalty) are not carried over. Cost per token: the (1 + n_neg) auxiliary
    rows and one steered row per generated row, beside the generator's own (unused) forward.

    With ``strength=0`` or ``keep_fraction=0`` (Δ* = 0) the steering is the identity and decoding is
    the plain model's, token for token. The hooks (a pre-hook on every layer's attention output
    projection, passive outside the detoxifier's own forwards) live only inside ``active(model)``.
    Paper defaults (authors' code): k = 25, 20 tokens, top-p 0.9, top-50% masking, λnorm = 0.4,
    λsim = 0.6, renormalisation.
    """

    label = "fgdilp"

    def __init__(self, model: Any, tokenizer: Any, *, k: int = 25, sample_tokens: int = 20, top_p: float = 0.9,
                 keep_fraction: float = 0.5, lambda_norm: float = 0.4, lambda_sim: float = 0.6, strength: float = 1.0,
                 similarity: str = "prefix", renorm: str = "head", sign: str = "mass", seed: int = 0,
                 attributes: Mapping[str, str] | None = None, arch: ArchMap | Mapping[str, Any] | None = None,
                 diagnosis_batch_size: int = 32, min_shared_prefix: int = MIN_SHARED_PREFIX) -> None:
        if k < 1 or sample_tokens < 1 or diagnosis_batch_size < 1:
            raise ValueError(f"k, sample_tokens and diagnosis_batch_size must be >= 1, got {k}, {sample_tokens}, "
                             f"{diagnosis_batch_size}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1] (a fraction, not a percentage), got {keep_fraction!r}")
        if not all(math.isfinite(x) for x in (lambda_norm, lambda_sim, strength)):
            raise ValueError(f"lambda_norm, lambda_sim and strength must be finite, got {lambda_norm}, {lambda_sim}, "
                             f"{strength}")
        for name, value, choices in (("similarity", similarity, SIMILARITIES), ("renorm", renorm, RENORMS),
                                     ("sign", sign, SIGNS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.arch = resolve_arch(model, arch)
        config = getattr(model, "config", None)
        self.heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
        if self.heads < 1:
            raise ValueError(f"{type(model).__name__}: its config names no number of attention heads")
        self.k, self.sample_tokens, self.top_p, self.seed = int(k), int(sample_tokens), float(top_p), int(seed)
        self.keep_fraction = float(keep_fraction)
        self.lambda_norm, self.lambda_sim = float(lambda_norm), float(lambda_sim)
        self.strength, self.similarity, self.renorm, self.sign = float(strength), similarity, renorm, sign
        self.attributes = dict(ATTRIBUTES if attributes is None else attributes)
        self.diagnosis_batch_size, self.min_shared_prefix = int(diagnosis_batch_size), min_shared_prefix
        self._installed = False
        self._mode: str | None = None  # None: hooks pass through; "read" / "steer": one of our own forwards
        self._seen: list[list[torch.Tensor]] | None = None
        self._prefill_row: int | None = None
        self.finish()

    @classmethod
    def from_options(cls, model: Any, tokenizer: Any, **options: str) -> FGDILP:
        """From command-line strings: ``k=``, ``sample_tokens=``, ``top_p=``, ``keep_fraction=``,
        ``lambda_norm=``, ``lambda_sim=``, ``strength=``, ``seed=``, ``similarity=prefix|direction``,
        ``renorm=head|layer|none``, ``sign=mass|normmass`` (all optional)."""
        types: dict[str, Callable[[str], Any]] = {
            "k": int, "sample_tokens": int, "seed": int, "top_p": float, "keep_fraction": float,
            "lambda_norm": float, "lambda_sim": float, "strength": float, "similarity": str, "renorm": str, "sign": str}
        unknown = sorted(set(options) - set(types))
        if unknown:
            raise ValueError(f"fgdilp takes {', '.join(f'{k}=' for k in types)}; unknown: {unknown}")
        parsed: dict[str, Any] = {}
        for key, value in options.items():
            try:
                parsed[key] = types[key](str(value).strip())
            except ValueError:
                raise ValueError(f"fgdilp option {key}={value!r} is not {types[key].__name__}") from None
        return cls(model, tokenizer, **parsed)

    def settings(self) -> dict[str, Any]:
        return {"kind": "fgdilp", "k": self.k, "sample_tokens": self.sample_tokens, "top_p": self.top_p,
                "keep_fraction": self.keep_fraction, "lambda_norm": self.lambda_norm, "lambda_sim": self.lambda_sim,
                "strength": self.strength, "similarity": self.similarity, "renorm": self.renorm, "sign": self.sign,
                "seed": self.seed, "attributes": list(self.attributes)}

    # ------------------------------------------------------------------ hooks

    def install(self, model: Any, stack: contextlib.ExitStack) -> None:
        if model is not self.model:
            raise ValueError("this FGDILP was built for another model (it steers the model it reads)")
        for i, layer in enumerate(decoder_layers(model, self.arch)):
            module = get_module(layer, self.arch.attn_out)
            stack.enter_context(Trace(module, retain_output=False, edit_input=functools.partial(self._head_outputs, i)))
        self._installed = True
        stack.callback(setattr, self, "_installed", False)

    def _head_outputs(self, layer: int, args: tuple, kwargs: dict, module: Any) -> tuple[tuple, dict] | None:
        """Pre-hook of layer ``layer``'s attention output projection, whose input [batch, seq, heads·head_dim]
        is the concatenated head outputs: read them, or steer them, at the last position."""
        if self._mode is None:
            return None
        x = args[0]
        if self._mode == "read":
            self._seen[layer].append(x[:, -1].detach().float().clone())  # type: ignore[index]
            return None
        fused, rows = self._fused, self._fused.shape[0]  # type: ignore[union-attr]
        pick: slice = slice(None)
        if x.shape[0] != rows:  # a prefill one prompt at a time (SlabBatch): rows come in order
            if self._prefill_row is None or x.shape[0] != 1:
                raise RuntimeError(f"FGDILP: a forward of {x.shape[0]} rows, {rows} expected")
            if layer == 0:
                self._prefill_row += 1
            pick = slice(self._prefill_row, self._prefill_row + 1)
        reference = None if self._reference is None else self._reference[pick, layer]
        v = x[:, -1].float().unflatten(-1, (self.heads, -1))  # [batch, heads, head_dim]
        steered = steer_heads(v, fused[pick, layer], self.lambda_norm, self.lambda_sim, reference=reference,
                              strength=self.strength, renorm=self.renorm)
        x = x.clone()
        x[:, -1] = steered.flatten(-2).to(x.dtype)
        return (x, *args[1:]), kwargs

    def _read(self, call: Callable[..., Any], rows: int, *args: Any) -> torch.Tensor:
        """``call(*args)`` (a forward of ours), reading every layer's head outputs at the last position:
        [rows, layers, heads·head_dim] float32, rows in call order."""
        if not self._installed:
            raise RuntimeError("FGDILP runs inside `with detoxifier.active(model):` (editkit.generate enters it)")
        self._seen = [[] for _ in decoder_layers(self.model, self.arch)]
        self._mode = "read"
        try:
            call(*args)
        finally:
            self._mode = None
        seen, self._seen = self._seen, None
        read = torch.stack([torch.cat(s) for s in seen], 1) if all(seen) else None
        if read is None or read.shape[0] != rows:
            got = 0 if read is None else read.shape[0]
            raise RuntimeError(f"FGDILP read {got} rows of head outputs, expected {rows}")
        return read

    def _steered(self, call: Callable[..., torch.Tensor], *args: Any, prefill: bool = False) -> torch.Tensor:
        """``call(*args)`` (a forward of the raw rows) with every layer's last position steered by ``_fused``."""
        self._mode, self._prefill_row = "steer", (-1 if prefill else None)
        try:
            return call(*args)
        finally:
            self._mode, self._prefill_row = None, None

    # ------------------------------------------------------------------ per batch

    def instance_prefixes(self, prompt: Sequence[int]) -> InstancePrefixes:
        """One prompt's self-generated, self-diagnosed prefixes (the same for the same ``seed``)."""
        return build_prefixes(self.model, self.tokenizer, prompt, k=self.k, max_new_tokens=self.sample_tokens,
                              top_p=self.top_p, seed=self.seed, attributes=self.attributes,
                              batch_size=self.diagnosis_batch_size)

    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None) -> None:
        self.finish()
        if not self._installed:
            raise RuntimeError("FGDILP runs inside `with detoxifier.active(model):` (editkit.generate enters it)")
        prompts = [list(p) for p in prompts]
        built: dict[tuple[int, ...], InstancePrefixes] = {}
        for p in prompts:  # identical prompts (k samples of one prompt) share their prefixes
            if tuple(p) not in built:
                built[tuple(p)] = self.instance_prefixes(p)
        bos = self.tokenizer.bos_token_id
        sequences, counts = [], []
        for p in prompts:  # row r's block: its positive, then its negatives
            found = built[tuple(p)]
            sequences.append(prefixed(found.positive_prefix, p, bos))
            sequences.extend(prefixed(n, p, bos) for n in found.negative_prefixes)
            counts.append(len(found.negative_prefixes))
        device = next(self.model.parameters()).device
        self._counts = torch.tensor(counts, device=device)
        if self.similarity == "prefix":
            self._reference = self._prefix_ends(prompts, built)
        aux = open_batch(self.model, sequences, new_tokens=max_new_tokens, min_shared_prefix=self.min_shared_prefix)
        self._fused = self._fuse(self._read(aux.prefill, len(sequences)))
        raw = open_batch(self.model, prompts, new_tokens=max_new_tokens, min_shared_prefix=self.min_shared_prefix)
        self._first = self._steered(raw.prefill, prefill=True)
        self._aux, self._raw = aux, raw
        self._rows = torch.arange(len(prompts), device=device)

    def _prefix_ends(self, prompts: list[list[int]], built: Mapping[tuple[int, ...], InstancePrefixes]) -> torch.Tensor:
        """e per row [rows, layers, heads, head_dim]: the head outputs at the last token of each negative
        prefix (read from the prefix alone: causal attention makes it the same), averaged over them."""
        bos = self.tokenizer.bos_token_id
        distinct = list(built)
        sequences = [prefixed(n, list(key[:1]) if bos is not None and key[:1] == (bos,) else [], bos)
                     for key in distinct for n in built[key].negative_prefixes]
        batch = open_batch(self.model, sequences, new_tokens=1, min_shared_prefix=self.min_shared_prefix)
        read = self._read(batch.prefill, len(sequences))
        sizes = [len(built[key].negative_prefixes) for key in distinct]
        means = torch.stack([part.mean(0) for part in read.split(sizes)])  # [distinct, layers, d]
        where = {key: i for i, key in enumerate(distinct)}
        index = torch.tensor([where[tuple(p)] for p in prompts], device=means.device)
        return means[index].unflatten(-1, (self.heads, -1))

    def _fuse(self, read: torch.Tensor) -> torch.Tensor:
        """Δ* [rows, layers, heads, head_dim] from the auxiliary rows' head outputs [n_aux, layers, d]."""
        counts = self._counts.to(read.device)  # type: ignore[union-attr]
        sizes = 1 + counts
        starts = sizes.cumsum(0) - sizes  # each row's positive; its negatives follow
        width = int(counts.max())
        j = torch.arange(width, device=read.device)
        valid = j[None] < counts[:, None]  # [rows, width]: a row with fewer negatives has zero Δⱼ
        index = (starts[:, None] + 1 + j[None]).clamp(max=read.shape[0] - 1)
        # [rows, width, layers, d]
        deltas = torch.where(valid[..., None, None], read[index] - read[starts][:, None], 0.0)
        fused = fuse_subtoxicity(deltas.transpose(0, 1), self.keep_fraction, sign=self.sign)
        return fused.unflatten(-1, (self.heads, -1))

    @torch.no_grad()
    def step(self, scores: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        if self._raw is None or self._aux is None or self._rows is None or self._counts is None:
            raise RuntimeError("FGDILP.step before start (or after finish)")
        index = follow_rows(self._rows, rows)
        if index is not None:
            self._keep(index)
        if fed is None:
            if self._first is None:
                raise RuntimeError("FGDILP.step got no fed tokens after its first step")
            logits, self._first = self._first, None
        else:
            fed = fed.to(self._counts.device)
            n_aux = int((1 + self._counts).sum())
            self._fused = self._fuse(self._read(self._aux.advance, n_aux, fed.repeat_interleave(1 + self._counts)))
            logits = self._steered(self._raw.advance, fed)
        if logits.shape != scores.shape:
            raise ValueError(f"scores are {tuple(scores.shape)}, the model gives {tuple(logits.shape)}: the scores do "
                             "not come from the model this FGDILP steers")
        return logits.to(scores.device).float().masked_fill(~torch.isfinite(scores), float("-inf"))

    def _keep(self, index: torch.Tensor) -> None:
        """Only the rows at ``index`` (positions in the batch) stay, with their auxiliary blocks."""
        index = index.to(self._counts.device)  # type: ignore[union-attr]
        sizes = 1 + self._counts  # type: ignore[operator]
        starts = sizes.cumsum(0) - sizes
        blocks = [torch.arange(s, s + n) for s, n in zip(starts[index].tolist(), sizes[index].tolist())]
        self._aux.keep(torch.cat(blocks).to(index.device))  # type: ignore[union-attr]
        self._raw.keep(index)  # type: ignore[union-attr]
        self._counts, self._rows = self._counts[index], self._rows[index.to(self._rows.device)]  # type: ignore[index]
        for name in ("_reference", "_fused", "_first"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index.to(value.device)])

    def finish(self) -> None:
        self._aux: Any = None
        self._raw: Any = None
        self._rows: torch.Tensor | None = None  # original row of each batch row
        self._counts: torch.Tensor | None = None  # negatives per row
        self._fused: torch.Tensor | None = None  # Δ* of the position the raw run is fed next
        self._reference: torch.Tensor | None = None  # e per row (similarity="prefix")
        self._first: torch.Tensor | None = None  # the steered logits after the prompts, until the first step
        self._mode, self._seen, self._prefill_row = None, None, None
