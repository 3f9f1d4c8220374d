"""The model side of MEND: which weights are edited, the rank-1 gradient factors of one backward
pass, and predicted deltas added to the model's forward without writing its weights.

For a projection y = x·Wᵀ (``nn.Linear``, weight [out, in]) the gradient of a loss is
∇W = Σ_t δ_t u_tᵀ over the tokens t of the batch, with u_t = x_t the projection's input and
δ_t = ∂L/∂y_t the gradient at its output. GPT-2's ``Conv1D`` stores W as [in, out] (y = x·W), so
there ∇W = Σ_t u_t δ_tᵀ. The layout is read from the module's type and checked against the
architecture map's declared flag for the MLP output projection; it is never guessed from shapes.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editkit.arch import ArchMap, check_layer, decoder_layers, get_module, linear_delta, lm_head
from editkit.text import TokenBatch

# {parameter name: (u [tokens, d_in], δ [tokens, d_out])}, float32, tokens where both are non-zero
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Target:
    """One edited weight: its parameter name, owning module, input/output sizes and layout."""

    name: str  # full parameter name, e.g. model.layers.29.mlp.down_proj.weight
    module: str  # dotted path of the owning module
    d_in: int
    d_out: int
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D) instead of [out, in]

    @property
    def shape_key(self) -> str:
        """Weights with the same key share one editor network."""
        return f"{self.d_in}x{self.d_out}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        return cls(name=str(data["name"]), module=str(data["module"]), d_in=int(data["d_in"]),
                   d_out=int(data["d_out"]), transposed=bool(data["transposed"]))


def _conv1d_type() -> type | tuple:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; plain torch models still work without it
        return ()
    return Conv1D


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d_type()))


def resolve_targets(model: nn.Module, arch: ArchMap, layers: Sequence[int],
                    modules: Sequence[str] = ()) -> list[Target]:
    """The weights MEND edits: in each of ``layers`` (negative counts from the top), the projections
    named by ``modules`` (relative to the layer), or by default every linear projection of the MLP
    block that holds the architecture map's ``mlp_out``. Ordered by layer, then module order."""
    indices = sorted({check_layer(model, arch, layer) for layer in layers})
    block = arch.mlp_out.rpartition(".")[0]
    conv1d = _conv1d_type()
    targets = []
    for index in indices:
        layer = decoder_layers(model, arch)[index]
        prefix = f"{arch.layers}.{index}"
        if modules:
            found = [(m, get_module(layer, m)) for m in modules]
        else:
            root = get_module(layer, block) if block else layer
            found = [(f"{block}.{n}" if block else n, m) for n, m in root.named_modules() if n and _is_projection(m)]
            if not found:
                raise ValueError(f"layer {index}: no linear projection inside {block or 'the layer'}; "
                                 "name the weights to edit with the 'modules' setting")
        for relative, module in found:
            if not _is_projection(module):
                raise ValueError(f"{prefix}.{relative} is a {type(module).__name__}, not a linear projection "
                                 "(nn.Linear or transformers' Conv1D); MEND edits projection weights")
            transposed = bool(conv1d) and isinstance(module, conv1d)
            if relative == arch.mlp_out and transposed != arch.mlp_out_transposed:
                raise ValueError(f"{prefix}.{relative}: the architecture map declares mlp_out_transposed="
                                 f"{arch.mlp_out_transposed} but the module is a {type(module).__name__}")
            rows, cols = module.weight.shape
            d_in, d_out = (rows, cols) if transposed else (cols, rows)
            targets.append(Target(f"{prefix}.{relative}.weight", f"{prefix}.{relative}", d_in, d_out, transposed))
    return targets


def weight_delta(target: Target, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Σ_t δ_t u_tᵀ in the weight's own layout ([out, in], or [in, out] for Conv1D)."""
    return u.T @ delta if target.transposed else delta.T @ u


# -- running the model ---------------------------------------------------------------------------------
@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter inside the block (only the editor
    trains; a model whose weights require grad keeps every layer's activations for nothing); flags
    and mode are put back on exit, also by exception. The weights are never written."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield model
    finally:
        params = dict(model.named_parameters())
        for n, flag in flags.items():
            params[n].requires_grad_(flag)
        model.train(training)


def answer_logits(model: nn.Module, arch: ArchMap, batch: TokenBatch) -> torch.Tensor:
    """[n_targets, vocab] fp32 logits at the batch's predicting positions. Where the architecture
    map declares it exact, the LM head runs at those positions only."""
    positions = batch.predicting_positions()
    if not arch.fast_path:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.logits[positions].float()
    hidden = get_module(model, arch.base)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          use_cache=False)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state  # [batch, seq, d_model]
    return lm_head(model, arch)(hidden[positions]).float()


def nll(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean NLL of the batch's target tokens."""
    return F.cross_entropy(logits, batch.targets())


def kl(reference_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_reference ‖ p_now)."""
    return F.kl_div(F.log_softmax(logits, -1), reference_logprobs, log_target=True, reduction="batchmean")


def gradient_factors(model: nn.Module, arch: ArchMap, targets: Sequence[Target],
                     batch: TokenBatch) -> tuple[Factors, torch.Tensor]:
    """One forward and backward pass of NLL(``batch``) through the unedited model: each target's
    input u and output gradient δ per token (detached, fp32, tokens where either is all-zero dropped
    — e.g. positions after the last target, as MEND does) and the loss (detached).

    δ is read from a zero tensor added to each target's output (``out + 0`` leaves the forward
    exact); its gradient is ∂L/∂out. The model's weights need no gradient, so a frozen model
    backpropagates only down to the lowest target."""
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            inputs[name] = args[0].detach()
            probes[name] = torch.zeros_like(output, requires_grad=True)
            return output + probes[name]
        return capture

    with ExitStack() as stack, torch.enable_grad():
        for target in targets:
            handle = get_module(model, target.module).register_forward_hook(hook(target.name))
            stack.callback(handle.remove)
        loss = nll(answer_logits(model, arch, batch), batch)
        missing = [t.name for t in targets if t.name not in probes]
        if missing:
            raise RuntimeError(f"the forward pass did not run the edited weight(s) {missing}")
        grads = torch.autograd.grad(loss, [probes[t.name] for t in targets], allow_unused=True)
    factors: Factors = {}
    for target, grad in zip(targets, grads):
        u = inputs[target.name].reshape(-1, target.d_in).float()  # [batch*seq, d_in]
        d = (grad if grad is not None else torch.zeros_like(probes[target.name]))
        d = d.reshape(-1, target.d_out).float()  # [batch*seq, d_out]
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        factors[target.name] = (u[keep], d[keep])
    return factors, loss.detach()


@contextmanager
def deltas_added(model: nn.Module, targets: Sequence[Target], deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block each target's forward returns ``out + x·ΔWᵀ`` (x·ΔW for Conv1D), computed in
    fp32: the edited model, with gradient flowing to whatever produced ΔW. The weights are not
    written; the hooks are removed on exit, also by exception."""
    with ExitStack() as stack:
        for target in targets:
            delta = deltas[target.name]

            def add(module: nn.Module, args: tuple, output: torch.Tensor, delta=delta,
                    transposed=target.transposed) -> torch.Tensor:
                return output + linear_delta(args[0].float(), delta, transposed).to(output.dtype)

            handle = get_module(model, target.module).register_forward_hook(add)
            stack.callback(handle.remove)
        yield
