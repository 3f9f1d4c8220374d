"""Calibration-model fusion (Tian, Deng, Jin & Song, 2025: "Detoxification of Large Language Models
through Output-layer Fusion with a Calibration Model", arXiv:2506.01266).

A small *calibration model*, trained on non-toxic text, runs beside the generator over the same
tokens with its own key/value cache. Its last hidden state ``h_cal`` is mapped into the generator's
hidden space by an *alignment matrix* ``A`` [d_cal, d_target] (learnt with InfoNCE on the embeddings
of the tokens both vocabularies share, :func:`editkit.decoding.calibration_train.train_alignment`)
and fused with the generator's own last hidden state ``h`` before the LM head::

    h′ = α · N(h_cal · A) + (1 − α) · h            logits = head(h′)

``h`` is the input of the generator's LM head (its post-norm last hidden state), ``h_cal`` the input
of the calibration model's LM head. ``N`` puts the mapped state on the generator's scale:

* ``norm="rms"`` (the default) rescales ``h_cal · A`` to the root-mean-square of the same row's
  ``h``: the calibration model gives the direction, the generator the size. InfoNCE fixes only
  directions (it compares cosines), so the size of ``h_cal · A`` says nothing by itself; and with
  a copy of the generator as calibration model and the identity as ``A`` the fusion changes nothing.
* ``norm="layer"`` is a layer normalisation without learnt parameters (the authors' code builds a
  fresh ``nn.LayerNorm``): every dimension to unit variance. Post-norm states are not on that scale
  (SmolLM2-135M's head inputs have a standard deviation of about 1.65, its final norm's weights
  averaging 1.8), so the calibrated logits shrink by that factor, the fused distribution flattens
  (α 0.5 acts like temperature ≈ 1.25) and nucleus sampling drifts into nonsense even where greedy
  text reads normally. Kept for comparison with the paper.
* ``norm="none"`` fuses ``h_cal · A`` as it is (right when ``A`` keeps sizes: the identity or the
  orthogonal Procrustes start, between models of one width).

Where the fusion happens. The LM head is affine (an ``nn.Linear``, bias or not) and, on the
architectures whose map says ``fast_path`` (nothing between head and logits: no soft-capping or
scaling), ``head(h′) = α · head(N(h_cal·A)) + (1 − α) · head(h)`` exactly, the bias weighing
α + (1 − α) = 1. ``head(h)`` are the generator's logits, which every step already gets; so the
fusion is computed in :meth:`CalibrationFusion.step` from the scores and one extra LM-head product
per row; the only hook on the generator reads its LM head's input (for ``norm="rms"``) and changes
nothing. A hook replacing the final hidden state could not be kept exact: in editkit's greedy loop
the generator's forward runs *before* the step that tells the detoxifier which rows are still in
the batch and which token each was fed (the loop prefills one prompt at a time and drops finished
rows in between), so a hook would have to guess them. Tokens
the generator's processors banned (score −∞) stay banned. Processors that rescale scores in
``model.generate`` (a repetition penalty) act on the generator's part of the sum only.

The calibration model reads the generator's token ids, so both must share one tokenizer (checked
through the vocabularies the alignment was trained with); mapping between two tokenizers (decode the
prefix, re-encode it for the calibration model) is not done here. ``A`` itself may be trained
between models with different tokenizers (over the strings both vocabularies hold).

An :class:`Alignment` is saved as ``alignment.safetensors`` + ``alignment.json`` with fingerprints of
the embeddings it was trained on, for both models, and refuses other models.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.arch import ArchMap, lm_head, resolve_arch
from editkit.devices import real_values
from editkit.generation.detoxifier import Detoxifier, FollowingRun
from editkit.generation.incremental import MIN_SHARED_PREFIX, open_batch
from editkit.patch import atomic_write_dir, fingerprint, fingerprint_matches, model_info

log = logging.getLogger(__name__)

FORMAT = "editkit-alignment"
FORMAT_VERSION = 1
MATRIX_FILE = "alignment.safetensors"
META_FILE = "alignment.json"
EMBEDDINGS = ("output", "input")
NORMS = ("rms", "layer", "none")
_IDENTITY_KEYS = ("model_type", "hidden_size", "n_embd", "vocab_size")


class AlignmentError(ValueError):
    """An alignment file that cannot be read, or an alignment used with models it was not trained for."""


def embedding_parameter(model: nn.Module, embedding: str) -> str:
    """The name of the parameter holding ``model``'s input or output embedding [vocab, d_model]."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    module = model.get_output_embeddings() if embedding == "output" else model.get_input_embeddings()
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"{type(model).__name__} has no {embedding} embedding weight")
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is weight:
            return name
    raise ValueError(f"{type(model).__name__}: its {embedding} embedding weight is not among its parameters")


def vocabulary_digest(tokenizer: Any) -> str:
    """A digest of ``tokenizer``'s {token string: id} map: equal digests, same ids for the same strings."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Alignment:
    """``matrix`` [d_cal, d_target] maps the calibration model's hidden space into the target's."""

    matrix: torch.Tensor
    embedding: str = "output"  # which embeddings it was trained on (and whose fingerprints are kept)
    target_fingerprint: dict[str, Any] = field(default_factory=dict)
    calibration_fingerprint: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)  # model_info of each model
    calibration: dict[str, Any] = field(default_factory=dict)
    vocabularies: dict[str, Any] = field(default_factory=dict)  # digests, shared count, identical
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.matrix, torch.Tensor) or self.matrix.ndim != 2:
            raise AlignmentError("an alignment matrix must be a 2-d tensor [d_cal, d_target]")
        if not bool(torch.isfinite(self.matrix).all()):
            raise AlignmentError("the alignment matrix holds NaN or inf")
        if self.embedding not in EMBEDDINGS:
            raise AlignmentError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        self.matrix = self.matrix.detach().to("cpu", torch.float32).contiguous()
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @classmethod
    def for_models(cls, target: nn.Module, calibration: nn.Module, matrix: torch.Tensor, *, embedding: str = "output",
                   tokenizers: tuple[Any, Any] | None = None, shared: int | None = None, **meta: Any) -> Alignment:
        """An alignment of ``calibration`` into ``target``, recording both models' fingerprints (and the
        vocabularies of ``tokenizers`` = (target's, calibration's), if given)."""
        names = embedding_parameter(target, embedding), embedding_parameter(calibration, embedding)
        vocabularies: dict[str, Any] = {}
        if tokenizers is not None:
            digests = [vocabulary_digest(t) for t in tokenizers]
            vocabularies = {"target": digests[0], "calibration": digests[1], "identical": digests[0] == digests[1],
                            "shared": shared}
        return cls(matrix=matrix, embedding=embedding,
                   target_fingerprint={names[0]: fingerprint(real_values(target, names[0]))},
                   calibration_fingerprint={names[1]: fingerprint(real_values(calibration, names[1]))},
                   target=model_info(target), calibration=model_info(calibration), vocabularies=vocabularies, **meta)

    @property
    def same_vocabulary(self) -> bool:
        """Whether both models were aligned with one vocabulary (the same id for every token string)."""
        return bool(self.vocabularies.get("identical"))

    def check(self, target: nn.Module, calibration: nn.Module) -> None:
        """Raise :class:`AlignmentError` unless ``target`` and ``calibration`` are the models this
        alignment was trained for (same shapes, same embedding weights up to dtype rounding)."""
        for role, model, info, prints in (("target", target, self.target, self.target_fingerprint),
                                          ("calibration", calibration, self.calibration, self.calibration_fingerprint)):
            now = model_info(model)
            for key in _IDENTITY_KEYS:
                if key in info and key in now and info[key] != now[key]:
                    raise AlignmentError(f"this alignment's {role} model has {key}={info[key]!r}; this one has "
                                         f"{now[key]!r} ({self._trained_on(role)})")
            params = dict(model.named_parameters(remove_duplicate=False))
            for name, recorded in prints.items():
                if name not in params or not fingerprint_matches(real_values(model, name), recorded):
                    raise AlignmentError(f"{name}: the {role} model's weights differ from those this alignment was "
                                         f"trained on ({self._trained_on(role)}); train an alignment for these models")
        d_cal = real_values(calibration, embedding_parameter(calibration, self.embedding)).shape[-1]
        d_target = real_values(target, embedding_parameter(target, self.embedding)).shape[-1]
        if tuple(self.matrix.shape) != (d_cal, d_target):
            raise AlignmentError(f"the alignment matrix is {tuple(self.matrix.shape)}; these models need "
                                 f"({d_cal}, {d_target}) (calibration hidden size, target hidden size)")

    def _trained_on(self, role: str) -> str:
        info = self.target if role == "target" else self.calibration
        return f"trained for {info.get('name_or_path') or info.get('model_type') or 'another model'}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "shape": list(self.matrix.shape),
                "embedding": self.embedding, "target_fingerprint": self.target_fingerprint,
                "calibration_fingerprint": self.calibration_fingerprint, "target": self.target,
                "calibration": self.calibration, "vocabularies": self.vocabularies, "settings": self.settings,
                "metrics": self.metrics, "created": self.created}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path/alignment.safetensors`` and ``path/alignment.json`` atomically."""
        from safetensors.torch import save_file

        meta = json.dumps(self.to_dict(), indent=2, default=str)

        def write(tmp: Path) -> None:
            save_file({"matrix": self.matrix}, str(tmp / MATRIX_FILE), metadata={"format": FORMAT})
            (tmp / META_FILE).write_text(meta, encoding="utf-8")

        atomic_write_dir(Path(path), write, overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, target: nn.Module | None = None,
             calibration: nn.Module | None = None) -> Alignment:
        """Read an alignment saved by :meth:`save`; with both models, also :meth:`check` them."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / MATRIX_FILE).is_file():
            raise AlignmentError(f"{path} is not an editkit alignment (needs {META_FILE} and {MATRIX_FILE})")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise AlignmentError(f"{path}: unsupported alignment format {meta.get('format')!r} "
                                 f"v{meta.get('format_version')}")
        tensors = load_file(str(path / MATRIX_FILE))
        if set(tensors) != {"matrix"} or list(tensors["matrix"].shape) != meta.get("shape"):
            raise AlignmentError(f"{path}: {MATRIX_FILE} does not hold the {meta.get('shape')} matrix "
                                 f"{META_FILE} names")
        alignment = cls(matrix=tensors["matrix"], embedding=meta.get("embedding", "output"),
                        target_fingerprint=meta.get("target_fingerprint", {}),
                        calibration_fingerprint=meta.get("calibration_fingerprint", {}),
                        target=meta.get("target", {}), calibration=meta.get("calibration", {}),
                        vocabularies=meta.get("vocabularies", {}), settings=meta.get("settings", {}),
                        metrics=meta.get("metrics", {}), created=meta.get("created", ""))
        if (target is None) != (calibration is None):
            raise ValueError("pass both the target and the calibration model to check an alignment, or neither")
        if target is not None and calibration is not None:
            alignment.check(target, calibration)
        return alignment


def load_alignment(path: str | Path, target: nn.Module | None = None,
                   calibration: nn.Module | None = None) -> Alignment:
    """Read an alignment saved by :meth:`Alignment.save` (checked against both models if given)."""
    return Alignment.load(path, target, calibration)


@contextlib.contextmanager
def head_inputs(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, the last-position input of every call of ``head`` ([rows, d_model] each,
    appended in call order). The hook is registered inside the ``try`` and removed on exit."""
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["input"]
        seen.append(hidden[:, -1].detach())

    handle = None
    try:
        handle = head.register_forward_pre_hook(keep, with_kwargs=True)
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over the last dimension, in float32 [..., 1]."""
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


class CalibrationFusion(Detoxifier):
    """Fuse a calibration model's aligned last hidden state into the generator's before its LM head
    (see the module docstring): ``logits = head(α · N(h_cal · A) + (1 − α) · h)``. With ``α = 0`` the
    scores are the generator's own, bit for bit. With ``norm="rms"`` (the default) :meth:`step` reads
    ``h`` from the generator's LM head, so the generator must run inside ``with fusion.active(model):``
    (``editkit.generate`` does this).

    ``model`` is the generator (its LM head is read through its architecture map,
    ``arch`` overriding it), ``calibration`` a causal LM sharing its tokenizer, ``alignment`` an
    :class:`Alignment` trained for these two models. The calibration model runs over each prompt and
    every fed token with its own key/value cache, and drops the rows the generator's batch drops.
    """

    label = "calibration"

    def __init__(self, model: nn.Module, calibration: nn.Module, alignment: Alignment, *, alpha: float = 0.5,
                 norm: str = "rms", arch: ArchMap | Mapping[str, Any] | None = None,
                 min_shared_prefix: int = MIN_SHARED_PREFIX) -> None:
        if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(alignment, Alignment):
            raise TypeError(f"alignment must be an Alignment, got {type(alignment).__name__}")
        alignment.check(model, calibration)
        if not alignment.same_vocabulary:
            raise AlignmentError("calibration fusion feeds the generator's token ids to the calibration model, so both "
                                 "must share one tokenizer; this alignment was trained with two different vocabularies "
                                 "(or without recording them: pass tokenizers= to Alignment.for_models)")
        self.arch = resolve_arch(model, arch)
        if not self.arch.fast_path:
            raise ValueError(f"{getattr(model.config, 'model_type', type(model).__name__)}: the logits are not the LM "
                             "head's output alone (soft-capping or scaling), so the fusion cannot be taken through the "
                             "head's linearity")
        self.head = lm_head(model, self.arch)
        if not isinstance(self.head, nn.Linear):
            raise ValueError(f"the generator's LM head is a {type(self.head).__name__}, not an nn.Linear")
        calibration_head = calibration.get_output_embeddings()
        if calibration_head is None:
            raise ValueError(f"{type(calibration).__name__} has no LM head whose input is its last hidden state")
        if calibration_head is self.head:
            raise ValueError("the calibration model must be another model than the generator (a copy will do)")
        self.model, self.calibration, self.alignment = model, calibration, alignment
        self.calibration_head = calibration_head
        self.alpha, self.norm, self.min_shared_prefix = float(alpha), norm, min_shared_prefix
        self._matrix: torch.Tensor | None = None  # the alignment on the generator's device and dtype
        self._follow: FollowingRun | None = None  # the calibration model's run, giving [rows, d_cal] states
        self._head_inputs: list[torch.Tensor] | None = None  # the generator's h per head call, while active

    @classmethod
    def from_options(cls, model: Any, tokenizer: Any, **options: str) -> CalibrationFusion:
        """From command-line strings: ``calibration=PATH`` (a model ``editkit.load_model`` reads, with the
        generator's tokenizer; required), ``alignment=PATH`` (an :class:`Alignment` folder for the two
        models; required), ``alpha=`` (default 0.5), ``norm=rms|layer|none`` (default rms)."""
        import editkit

        known = {"calibration", "alignment", "alpha", "norm"}
        unknown = sorted(set(options) - known)
        if unknown or not {"calibration", "alignment"} <= set(options):
            raise ValueError(f"calibration takes calibration=PATH and alignment=PATH (both required), alpha=, norm=; "
                             f"got {sorted(options)}")
        device = next(model.parameters()).device
        calibration, calibration_tokenizer = editkit.load_model(options["calibration"], device=str(device))
        if vocabulary_digest(calibration_tokenizer) != vocabulary_digest(tokenizer):
            raise AlignmentError(f"{options['calibration']}: its tokenizer's vocabulary is not the generator's; "
                                 "calibration fusion needs one shared tokenizer")
        alignment = Alignment.load(options["alignment"], model, calibration)
        return cls(model, calibration, alignment, alpha=float(options.get("alpha", 0.5)),
                   norm=options.get("norm", "rms"))

    def settings(self) -> dict[str, Any]:
        return {"kind": "calibration", "alpha": self.alpha, "norm": self.norm,
                "calibration": self.alignment.calibration.get("name_or_path") or type(self.calibration).__name__,
                "calibration_type": self.alignment.calibration.get("model_type"),
                "alignment": {"embedding": self.alignment.embedding, "created": self.alignment.created,
                              **{k: v for k, v in self.alignment.settings.items() if isinstance(v, (int, float, str))}}}

    def install(self, model: Any, stack: contextlib.ExitStack) -> None:
        # the fusion is taken through the LM head's linearity in step(); the one hook (norm="rms")
        # only reads the head's input. A generator this fusion was not built for is refused.
        if model is not self.model:
            raise ValueError("this CalibrationFusion was built for another generator model")
        if self.norm == "rms":
            self._head_inputs = stack.enter_context(head_inputs(self.head))
            stack.callback(setattr, self, "_head_inputs", None)

    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None) -> None:
        self.finish()
        batch = open_batch(self.calibration, prompts, new_tokens=max_new_tokens,
                           min_shared_prefix=self.min_shared_prefix)
        self._follow = FollowingRun(batch, self._run(batch.prefill, len(prompts)), len(prompts))

    def _run(self, call: Any, rows: int, *args: Any) -> torch.Tensor:
        """``call(*args)`` on the calibration batch; its last hidden state per row [rows, d_cal]."""
        with head_inputs(self.calibration_head) as seen:
            call(*args)
        hidden = torch.cat(seen) if seen else None
        if hidden is None or hidden.shape[0] != rows:
            raise RuntimeError(f"the calibration model's LM head saw {0 if hidden is None else hidden.shape[0]} rows, "
                               f"expected {rows}")
        return hidden

    @torch.no_grad()
    def step(self, scores: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        run = self._follow
        if run is None:
            raise RuntimeError("CalibrationFusion.step before start (or after finish)")
        hidden = run.next(fed, rows, advance=lambda tokens: self._run(run.batch.advance, len(run.rows), tokens))
        return self.fuse(scores, hidden, self._generator_states(scores.shape[0]) if self.norm == "rms" else None)

    def _generator_states(self, rows: int) -> torch.Tensor:
        """The generator's LM-head inputs since the previous step [rows, d_target] (taken, not kept)."""
        if self._head_inputs is None:
            raise RuntimeError("norm='rms' reads the generator's LM-head input: run the generator inside "
                               "`with fusion.active(model):` (editkit.generate does)")
        seen = self._head_inputs
        states = torch.cat(seen) if seen else None
        seen.clear()
        if states is None or states.shape[0] != rows:
            raise RuntimeError(f"the generator's LM head saw {0 if states is None else states.shape[0]} rows since "
                               f"the previous step, the scores have {rows}: one step per generator forward")
        return states

    @torch.no_grad()
    def calibration_logits(self, hidden: torch.Tensor, generator_states: torch.Tensor | None = None) -> torch.Tensor:
        """``head(N(h_cal · A))`` [rows, vocab] for calibration hidden states ``hidden`` [rows, d_cal];
        ``generator_states`` [rows, d_target] (the generator's own ``h``) set the scale for ``norm="rms"``."""
        weight = self.head.weight
        if self._matrix is None or self._matrix.device != weight.device or self._matrix.dtype != weight.dtype:
            self._matrix = self.alignment.matrix.to(weight.device, weight.dtype)
        mapped = hidden.to(weight.device, weight.dtype) @ self._matrix  # [rows, d_target]
        if self.norm == "rms":
            if generator_states is None or generator_states.shape != mapped.shape:
                raise ValueError(f"norm='rms' needs the generator's head inputs [{mapped.shape[0]}, {mapped.shape[1]}]")
            scale = _rms(generator_states.to(weight.device)) / _rms(mapped).clamp_min(torch.finfo(torch.float32).tiny)
            normed = (mapped.float() * scale).to(weight.dtype)
        elif self.norm == "layer":
            normed = nn.functional.layer_norm(mapped.float(), mapped.shape[-1:], eps=1e-5).to(weight.dtype)
        else:
            normed = mapped
        # the head's product without calling the module (its input hook reads the generator's states)
        return nn.functional.linear(normed, self.head.weight, self.head.bias).float()

    @torch.no_grad()
    def fuse(self, scores: torch.Tensor, hidden: torch.Tensor,
             generator_states: torch.Tensor | None = None) -> torch.Tensor:
        """``α · head(N(h_cal·A)) + (1 − α) · scores`` [rows, vocab]; a score of −∞ stays −∞."""
        calibrated = self.calibration_logits(hidden, generator_states).to(scores.device)
        if calibrated.shape != scores.shape:
            raise ValueError(f"scores are {tuple(scores.shape)}, the LM head gives {tuple(calibrated.shape)}: the "
                             "scores do not come from this generator")
        fused = self.alpha * calibrated + (1.0 - self.alpha) * scores
        return fused.masked_fill(~torch.isfinite(scores), float("-inf"))

    def finish(self) -> None:
        self._follow = None
