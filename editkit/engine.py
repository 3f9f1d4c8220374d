"""DeltaEditor: train an additive delta on one layer's MLP output projection, without touching
the model's weights.

The delta enters through a forward hook (``out + x·Δᵀ``), so the model is never half-edited: when
the context exits, for whatever reason, the hook is gone and the weights are as they were. With a
``projector`` P (symmetric, over the projection's input space) the delta acts as Δ·P (``P·Δ`` for a
transposed layout): the gradient flows through the projection, and :meth:`DeltaEditor.effective_delta`
is what a patch must carry.

The model's own parameters are frozen (``requires_grad=False``) while the editor is open and their
flags restored on exit: only the delta is trained, and a model whose weights require grad makes
autograd record the whole forward and keep every layer's activations for weight gradients nobody
asks for (on SmolLM2-135M the plain path's peak memory drops from ~2.2x to ~0.5x the model's size).

Fast path: only one layer changes, so the residual stream entering it is the same at every step.
It is computed once; afterwards the layers below are swapped for pass-through modules, the cached
state is fed to the edited layer, and the LM head runs only at the positions a loss reads.

Replay (fast path, ``arch.mlp_out_residual``): inside the edited layer too, everything but the
delta's own term is constant — the layer's unedited output O and the input K of its MLP output
projection (the keys) are the same at every step, and the edited output is O + Δ·K. Both are kept
from the reference pass and the layer is replaced by that sum: its attention and its other MLP
projections never run again. With a projector the keys are kept projected (K·P), so a step never
multiplies by P either. When the edited layer is the top one, only the predicting positions are
kept and a step is the final norm and the LM head there: no decoder layer runs at all.

Reference rows (fast path, ``rows=``): what the reference pass gives for one sequence, the state
entering the edited layer (or, replaying, its output and keys) and the final hidden state at its
predicting positions (:class:`RowReference`), does not depend on the other sequences of its batch. Given a store (scoped
by the caller to the model's current weights), the pass reads every sequence it holds, runs the
others as one padded batch, keeps their pieces, and assembles each batch from rows. Pads get a zero
state, which no real position sees (causal attention over right padding); a row computed beside
other rows, with other padding, equals the padded batch's up to float noise.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import nn

from editkit.arch import ArchMap, decoder_layers, get_module, linear_delta, lm_head
from editkit.devices import execution_device
from editkit.hooks import Trace
from editkit.text import TokenBatch


class PassThrough(nn.Module):
    """Stands in for a decoder layer below the edited one: returns its hidden-state input, or (given
    ``output``) what ``output()`` returns, the replayed edited layer.

    It carries the replaced layer's plain attributes (not its weights): a model's layer loop may
    read them, e.g. Qwen2's ``attention_type`` to pick the layer's attention mask.
    """

    def __init__(self, as_tuple: bool, replaced: nn.Module,
                 output: Callable[[], torch.Tensor] | None = None) -> None:
        super().__init__()
        for name, value in vars(replaced).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.as_tuple = as_tuple
        self.output = output

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if self.output is not None:
            hidden_states = self.output()
        elif hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        return (hidden_states,) if self.as_tuple else hidden_states


@dataclass(frozen=True)
class RowReference:
    """The unedited model's pieces of one sequence (unpadded) for an edit of one layer: the state
    entering it, or (replay) its output and keys — at every position, or at the predicting
    positions only when the layer is the top one."""

    head_input: torch.Tensor | None = None  # [n_predicting, d_model] the final hidden state where the losses read
    # logits (None: computed up to the edited layer only, for a batch whose unedited logits nobody read)
    entry: torch.Tensor | None = None  # [seq, d_model] the state entering the edited layer
    output: torch.Tensor | None = None  # [m, d_model] the edited layer's unedited output
    keys: torch.Tensor | None = None  # [m, d_in] the input of its MLP output projection

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields it holds (None ones left out), by name."""
        return {f.name: t for f in fields(self) if (t := getattr(self, f.name)) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.tensors().values())


class RowStore(Protocol):
    """Where a :class:`DeltaEditor` finds and leaves :class:`RowReference` s; the caller scopes it to
    the model's current weights (the editor's keys name the layer, token ids and target positions)."""

    def get(self, key: Hashable) -> RowReference | None: ...

    def put(self, key: Hashable, value: RowReference) -> None: ...


def _row_lengths(batch: TokenBatch) -> list[int] | None:
    """Each row's length when every row is right-padded with its targets inside it, else None."""
    mask = batch.attention_mask.bool()
    lengths = mask.sum(1)
    inside = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, inside) or bool((batch.target_mask & ~mask).any()):
        return None
    return lengths.tolist()


class _StopForward(Exception):
    """Raised by :func:`_stop_forward` to end a reference forward once the edited layer has run."""


def _stop_forward(module: nn.Module, args: tuple, output: Any) -> None:
    raise _StopForward


@contextmanager
def attention_implementation(model: nn.Module, implementation: str | None) -> Iterator[None]:
    """``model`` runs with ``implementation`` (transformers' ``attn_implementation``) inside the block,
    its own restored after, also on error; None: the model's own, untouched."""
    if implementation is None:
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"attention implementation {implementation!r} needs a transformers model; "
                         f"{type(model).__name__} has no set_attn_implementation")
    own = model.config._attn_implementation  # transformers keeps the implementation in use there
    if own == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def replace_first_arg(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class DeltaEditor:
    """Context manager owning a trainable ``delta`` (fp32, the weight's shape) for the MLP output
    projection of ``layer``, and the token batches the losses read.

    ``initial_logits[name]``: logits of the unedited model at the batch's predicting positions (the
    batches of ``reference_logits``, see below).
    ``logits(name)``: the same positions under the current delta, with gradient.
    ``projector``: [d_in, d_in] symmetric projector the delta is composed with (see the module docstring).
    ``rows``: on the fast path, a store of reference rows to read and fill (see the module docstring);
    ``row_stats`` counts the rows reused and computed, ``reference_seconds`` times the reference pass.
    ``replay``: whether the edited layer is replayed from its cached output and keys.
    ``gate``: keys [..., d_in] → weights [...]; the steps then see g(k)·Δ·k at each position, the
    change a gated patch makes at inference (keys are the unedited model's, so on the fast path the
    weights are computed once, from the unprojected keys).
    ``autocast``: a dtype (bfloat16) the steps' layers run in under ``torch.autocast``; the reference
    pass, the delta and its change Δ·k stay float32, and on the fast path so do the LM head's logits
    (its backward runs in the autocast dtype; the plain path runs the whole model under autocast).
    ``attention``: an attention implementation (transformers' ``attn_implementation``) the model runs
    with while the editor is open, the model's own restored on exit.
    ``reference_logits``: the batches whose unedited logits the caller reads (``initial_logits``;
    default all). On the fast path the reference pass of the others stops at the edited layer: the
    steps need only what enters it (or its output and keys), and the layers above are most of a
    forward's cost for a mid-layer edit.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: ArchMap,
        layer: int,
        batches: Mapping[str, TokenBatch],
        *,
        fast_path: bool = True,
        projector: torch.Tensor | None = None,
        rows: RowStore | None = None,
        gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
        autocast: torch.dtype | None = None,
        attention: str | None = None,
        reference_logits: Collection[str] | None = None,
    ) -> None:
        self.model = model
        self.autocast = autocast
        self.attention = attention
        self.reference_logits = set(batches) if reference_logits is None else set(reference_logits)
        self.gate = gate
        self.arch = arch
        self.layer = layer
        self.layers = decoder_layers(model, arch)
        self.module = get_module(self.layers[layer], arch.mlp_out)
        self.param_name = f"{arch.layers}.{layer}.{arch.mlp_out}.weight"
        self.device = execution_device(self.module)  # for an offloaded layer: where its forward runs
        self.batches = {k: b.to(self.device) for k, b in batches.items()}
        self.fast_path = fast_path and arch.fast_path
        self.replay = self.fast_path and arch.mlp_out_residual
        self.top = layer == len(self.layers) - 1  # replaying the top layer: predicting positions only
        self.delta = nn.Parameter(torch.zeros(self.module.weight.shape, dtype=torch.float32, device=self.device))
        self.projector = None
        if projector is not None:
            d_in = self.delta.shape[0] if arch.mlp_out_transposed else self.delta.shape[1]
            if tuple(projector.shape) != (d_in, d_in):
                raise ValueError(f"projector has shape {tuple(projector.shape)}; the input space of "
                                 f"{self.param_name} needs ({d_in}, {d_in})")
            self.projector = projector.detach().to(self.device, torch.float32)
        self.rows = rows if self.fast_path else None  # the rows' head inputs are exact on the fast path only
        self.row_stats = {"reused": 0, "computed": 0}
        self.reference_seconds = 0.0
        self.initial_logits: dict[str, torch.Tensor] = {}
        # per batch: the state entering the layer, or (replay) {"output", "keys"} (keys projected, fp32)
        self._cache: dict[str, Any] = {}
        self._as_tuple: bool | None = None
        self._stack = ExitStack()
        self._current: str | None = None
        self._low_head: torch.Tensor | None = None  # the LM head's weight in the autocast dtype, once

    def effective_delta(self) -> torch.Tensor:
        """The change to the weight the current delta makes (with gradient): ``delta`` itself, or
        composed with the projector on the input side (Δ·P for [out, in], P·Δ for [in, out])."""
        if self.projector is None:
            return self.delta
        return self.projector @ self.delta if self.arch.mlp_out_transposed else self.delta @ self.projector

    # -- hooks -----------------------------------------------------------------------------------
    def _add_delta(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()  # [batch, seq, d_in] input of the projection
        with torch.autocast(self.device.type, enabled=False):  # Δ·k in fp32 under any autocast
            change = linear_delta(x, self.effective_delta(), self.arch.mlp_out_transposed)
            if self.gate is not None:
                change = change * self.gate(x).unsqueeze(-1)
        return output + change.to(output.dtype)

    def _feed_cache(self, args: tuple, kwargs: dict, module: nn.Module) -> tuple[tuple, dict]:
        return replace_first_arg(args, kwargs, self._cache[self._current])

    def _replayed_output(self) -> torch.Tensor:
        """The edited layer's output for the current batch under the current delta: O + Δ·K."""
        cached = self._cache[self._current]
        with torch.autocast(self.device.type, enabled=False):  # Δ·K in fp32 under any autocast
            change = linear_delta(cached["keys"], self.delta, self.arch.mlp_out_transposed)
        if "gate" in cached:
            change = change * cached["gate"]
        return cached["output"] + change.to(cached["output"].dtype)

    def __enter__(self) -> DeltaEditor:
        try:
            self._stack.callback(self.module.register_forward_hook(self._add_delta).remove)
            self._stack.callback(self.model.train, self.model.training)
            self.model.eval()
            self._freeze_model()
            self._stack.enter_context(attention_implementation(self.model, self.attention))
            self._reference_pass()
            if self.replay:
                if not self.top:
                    self._swap_layers(self.layer + 1)
            elif self.fast_path:
                self._swap_layers(self.layer)
                self._stack.enter_context(Trace(self.layers[self.layer], edit_input=self._feed_cache, retain_output=False))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._cache.clear()
        self._low_head = None

    def _freeze_model(self) -> None:
        # by name: accelerate replaces an offloaded module's parameter objects at every forward
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]

        def restore() -> None:
            params = dict(self.model.named_parameters())
            for n in trainable:
                params[n].requires_grad_(True)

        self._stack.callback(restore)  # registered first, so a failure half-way still restores
        params = dict(self.model.named_parameters())
        for n in trainable:
            params[n].requires_grad_(False)

    @torch.no_grad()
    def _reference_pass(self) -> None:
        """The unedited logits of the batches in ``reference_logits`` and what the steps start from
        (the state entering the edited layer, or its output and keys): one forward per batch, or, with
        ``rows``, one over the batch's rows not in the store; on the fast path, a batch without
        reference logits stops at the edited layer."""
        start = time.perf_counter()
        for name, batch in self.batches.items():
            logits = name in self.reference_logits or not self.fast_path
            lengths = _row_lengths(batch) if self.rows is not None else None
            if lengths is not None:
                pieces, out = self._reference_from_rows(batch, lengths, logits)
            else:
                pieces, hidden = self._traced_forward(batch, logits)
                out = hidden if not self.fast_path or hidden is None else self._head(hidden)
            if logits:
                self.initial_logits[name] = out
            self._cache[name] = self._prepared(pieces)
        if self.fast_path and self._as_tuple is None and not (self.replay and self.top):  # every row was stored
            self._probe_layer_output(next(iter(self.batches.values())))
        self.reference_seconds = time.perf_counter() - start

    def _prepared(self, pieces: RowReference) -> Any:
        """What the steps read for a batch: the entry state, or the output and the (projected) keys."""
        if not self.replay:
            return pieces.entry
        keys = pieces.keys.float()
        prepared = {"output": pieces.output}
        if self.gate is not None:  # of the keys themselves, not of their projection
            prepared["gate"] = self.gate(keys).unsqueeze(-1)
        if self.projector is not None:
            keys = keys @ self.projector  # Δ·P·k = Δ·(k·P): P is symmetric
        return {**prepared, "keys": keys}

    def _traced_forward(self, batch: TokenBatch, logits: bool = True) -> tuple[RowReference, torch.Tensor | None]:
        """One forward: the pieces the steps start from (a :class:`RowReference` over the padded
        batch: [batch, seq, ...], or [n_targets, ...] for a replayed top layer) and the final hidden
        state at the predicting positions [n_targets, d_model] on the fast path (the logits there,
        [n_targets, vocab] fp32, otherwise). Without ``logits`` (fast path, below the top layer) the
        forward stops once the edited layer has run, and the hidden state is None."""
        stop = not logits and not self.top  # (the plain path always asks for logits)
        with ExitStack() as traces:
            layer = traces.enter_context(Trace(self.layers[self.layer], retain_input=not self.replay,
                                               retain_output=True, detach=True))
            keys = (traces.enter_context(Trace(self.module, retain_input=True, retain_output=False, detach=True))
                    if self.replay else None)
            if stop:  # registered after the trace, so it runs once the trace has kept its pieces
                traces.callback(self.layers[self.layer].register_forward_hook(_stop_forward).remove)
            try:
                out = self._final_hidden(batch) if self.fast_path else self._forward(batch)
            except _StopForward:
                out = None
        self._as_tuple = isinstance(layer.raw_output, tuple)
        if not self.replay:
            return RowReference(out, entry=layer.input), out
        output, key = layer.output, keys.input
        if self.top:
            where = batch.predicting_positions()
            output, key = output[where], key[where]
        return RowReference(out, output=output, keys=key), out

    def _reference_from_rows(self, batch: TokenBatch, lengths: list[int],
                             logits: bool = True) -> tuple[RowReference, torch.Tensor | None]:
        """(the pieces of ``batch`` as :meth:`_traced_forward` gives them, logits [n_targets, vocab]
        fp32 or, without ``logits``, None), each row read from ``rows`` or computed with the other
        missing rows and kept there (a row kept without its head input counts as missing when the
        logits are asked for)."""
        ids, targets = batch.input_ids.cpu(), batch.target_mask.cpu()
        kind = "top" if self.replay and self.top else "replay" if self.replay else "entry"
        keys = [(self.param_name, kind, ids[i, :n].numpy().tobytes(), targets[i, :n].numpy().tobytes())
                for i, n in enumerate(lengths)]
        found = [self.rows.get(key) for key in keys]
        missing = [i for i, row in enumerate(found) if row is None or (logits and row.head_input is None)]
        if missing:
            width = max(lengths[i] for i in missing)
            index = torch.tensor(missing, device=batch.input_ids.device)
            sub = TokenBatch(batch.input_ids[index, :width], batch.attention_mask[index, :width],
                             batch.target_mask[index, :width])
            pieces, hidden = self._traced_forward(sub, logits)
            counts = sub.predicting_positions().sum(1).tolist()
            heads = hidden.split(counts) if hidden is not None else [None] * len(missing)
            parts = {name: t for name, t in pieces.tensors().items() if name != "head_input"}
            if kind == "top":  # kept at the predicting positions: [n_targets, ...], split by row
                per_row = {name: t.split(counts) for name, t in parts.items()}
            for j, i in enumerate(missing):
                own = ({name: t[j] for name, t in per_row.items()} if kind == "top"
                       else {name: t[j, :lengths[i]] for name, t in parts.items()})
                found[i] = RowReference(heads[j].clone() if heads[j] is not None else None,
                                        **{name: t.clone() for name, t in own.items()})
                self.rows.put(keys[i], found[i])
        self.row_stats["reused"] += len(found) - len(missing)
        self.row_stats["computed"] += len(missing)
        head_input = torch.cat([row.head_input.to(self.device) for row in found]) if logits else None
        assembled = {}
        for name in found[0].tensors():
            if name == "head_input":
                continue
            if kind == "top":
                assembled[name] = torch.cat([getattr(row, name).to(self.device) for row in found])
                continue
            first = getattr(found[0], name)  # pads: zero, seen by no real position
            assembled[name] = torch.zeros((len(found), batch.input_ids.shape[1], first.shape[-1]),
                                          dtype=first.dtype, device=self.device)
            for i, row in enumerate(found):
                assembled[name][i, :lengths[i]] = getattr(row, name)
        return RowReference(head_input, **assembled), self._head(head_input) if logits else None

    def _probe_layer_output(self, batch: TokenBatch) -> None:
        """Whether the decoder layers return tuples, from a one-token forward (the pass-through
        modules must return what the model's layer loop expects)."""
        with Trace(self.layers[self.layer], retain_output=True) as probe:
            get_module(self.model, self.arch.base)(input_ids=batch.input_ids[:1, :1],
                                                   attention_mask=batch.attention_mask[:1, :1], use_cache=False)
        self._as_tuple = isinstance(probe.raw_output, tuple)

    def _swap_layers(self, upto: int) -> None:
        """Layers below ``upto`` become pass-throughs; replaying, the edited one returns O + Δ·K."""
        originals = [self.layers[i] for i in range(upto)]

        def restore() -> None:
            for i, module in enumerate(originals):
                self.layers[i] = module

        self._stack.callback(restore)
        for i, module in enumerate(originals):
            replayed = self.replay and i == self.layer
            self.layers[i] = PassThrough(self._as_tuple, module, self._replayed_output if replayed else None)

    # -- forward ---------------------------------------------------------------------------------
    def logits(self, name: str) -> torch.Tensor:
        """[n_targets, vocab] fp32 logits at ``name``'s predicting positions under the current delta."""
        self._current = name
        try:
            if self.replay and self.top:  # the top layer's output at the predicting positions -> norm -> head
                with self._autocast():
                    hidden = get_module(self.model, self.arch.final_norm)(self._replayed_output())
                return self._head(hidden)
            return self._forward(self.batches[name])
        finally:
            self._current = None

    def _autocast(self) -> AbstractContextManager:
        """The steps' autocast; passes without gradient (the reference, the final metrics) run exact."""
        if self.autocast is None or not torch.is_grad_enabled():
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _forward(self, batch: TokenBatch) -> torch.Tensor:
        """[n_targets, vocab] fp32 logits at the predicting positions. Where the fast path is exact,
        the LM head runs at those positions only (most tokens of a batch are prompt)."""
        if not self.fast_path:
            with self._autocast():
                out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            return out.logits[batch.predicting_positions()].float()
        with self._autocast():
            hidden = self._final_hidden(batch)
        return self._head(hidden)

    def _final_hidden(self, batch: TokenBatch) -> torch.Tensor:
        """[n_targets, d_model] the base model's last hidden state at the predicting positions."""
        base = get_module(self.model, self.arch.base)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
        return hidden[batch.predicting_positions()]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, vocab] fp32 logits from final hidden states [n, d_model] (fast path: exact there), never
        under autocast (bf16 logits would put their rounding into the KL term). During autocast steps
        the gradient into the hidden states is taken in the autocast dtype, as every layer below
        takes it (:class:`ExactForwardHead`): half the head's cost is that product."""
        head = lm_head(self.model, self.arch)
        weight = getattr(head, "weight", None)
        if weight is not None:  # an autocast forward may hand over bf16 states
            hidden = hidden.to(weight.dtype)
        with torch.autocast(self.device.type, enabled=False):
            if (self.autocast is not None and torch.is_grad_enabled() and isinstance(head, nn.Linear)
                    and head.bias is None and not weight.requires_grad and weight.device.type != "meta"):
                if self._low_head is None or self._low_head.device != weight.device:
                    self._low_head = weight.detach().to(self.autocast)
                return ExactForwardHead.apply(hidden, weight, self._low_head).float()
            return head(hidden).float()


class ExactForwardHead(torch.autograd.Function):
    """hidden @ weightᵀ exactly; backward: the gradient into ``hidden`` from the low-precision copy
    of the weight (the weight itself is frozen and gets none)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(low)
        ctx.dtype = hidden.dtype
        return hidden @ weight.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (low,) = ctx.saved_tensors
        return (grad.to(low.dtype) @ low).to(ctx.dtype), None, None
