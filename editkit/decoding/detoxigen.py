"""DetoxiGen (Niu et al., 2024: "Parameter-Efficient Detoxification with Contrastive Decoding"): the
generator contrasted, inside its own top-p nucleus, with a detoxifier that is the same base model
behind a soft prompt prompt-tuned on toxic text only.

* :class:`SoftPrompt` — the trained ``[n_virtual_tokens, d_model]`` embeddings, saved as
  ``soft_prompt.safetensors`` + ``soft_prompt.json`` with the fingerprint of the model they fit (its
  input embedding, and its architecture); loading refuses another model (:class:`SoftPromptError`).
  Trained by :func:`editkit.decoding.detoxigen_train.train_detoxigen_prompt`.
* :func:`contrastive_scores` — one step's combination, ``P = (1+α)·P_gen − α·P_det``.
* :class:`DetoxiGen` — the decoding-time detoxifier (:class:`~editkit.generation.detoxifier.Detoxifier`).
* :class:`SoftPromptBatch` — the detoxifier's runner: the base model over a batch of rows, each
  prompt preceded by the soft prompt, with a key/value cache of its own.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.arch import embedding_name
from editkit.decoding.nucleus import nucleus_mask
from editkit.devices import real_values
from editkit.generation.detoxifier import Detoxifier, FollowingRun
from editkit.generation.incremental import PaddedBatch
from editkit.patch import atomic_write_dir, base_mismatch, fingerprint, model_info

FORMAT = "editkit-soft-prompt"
FORMAT_VERSION = 1
WEIGHT_FILE = "soft_prompt.safetensors"
META_FILE = "soft_prompt.json"
# architecture facts a soft prompt must agree on (besides the input embedding's fingerprint)


class SoftPromptError(ValueError):
    """A soft-prompt file that cannot be read, or a soft prompt used with a model it was not trained for."""


# -- the artifact --------------------------------------------------------------------------------
@dataclass
class SoftPrompt:
    """A prompt-tuned soft prompt: ``embeddings`` [n_virtual_tokens, d_model] (float32, CPU), to be
    put before a sequence's token embeddings, and the fingerprint of the model it was trained for."""

    embeddings: torch.Tensor
    base_fingerprint: dict[str, Any] = field(default_factory=dict)  # {input embedding name: fingerprint}
    model: dict[str, Any] = field(default_factory=dict)  # editkit.patch.model_info of that model
    settings: dict[str, Any] = field(default_factory=dict)  # how it was trained
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    path: str | None = None  # where it was loaded from or last saved (not stored in the file)

    def __post_init__(self) -> None:
        if not isinstance(self.embeddings, torch.Tensor) or self.embeddings.ndim != 2 or not self.embeddings.numel():
            raise SoftPromptError("a soft prompt's embeddings must be a non-empty 2-d tensor "
                                  "[n_virtual_tokens, d_model]")
        if not torch.isfinite(self.embeddings).all():
            raise SoftPromptError("a soft prompt's embeddings hold NaN or inf")
        self.embeddings = self.embeddings.detach().to("cpu", torch.float32).contiguous()
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @classmethod
    def from_embeddings(cls, model: nn.Module, embeddings: torch.Tensor, **meta: Any) -> SoftPrompt:
        """A soft prompt for ``model`` (its input embedding's fingerprint and architecture are recorded)."""
        name = embedding_name(model)
        weight = real_values(model, name)
        if embeddings.ndim != 2 or embeddings.shape[1] != weight.shape[1]:
            raise SoftPromptError(f"soft-prompt embeddings must be [n_virtual_tokens, {weight.shape[1]}] for this "
                                  f"model, got {list(embeddings.shape)}")
        return cls(embeddings=embeddings, base_fingerprint={name: fingerprint(weight)}, model=model_info(model), **meta)

    @property
    def n_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.embeddings.shape[1])

    def digest(self) -> str:
        """A short hash of the embeddings (which soft prompt a run used)."""
        return hashlib.sha256(self.embeddings.numpy().tobytes()).hexdigest()[:16]

    # -- checks ------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`SoftPromptError` unless ``model`` is the model this soft prompt was trained for
        (same architecture, same input embedding; an edit of its decoder layers is accepted)."""
        problem = base_mismatch(model, self.model, self.base_fingerprint)
        if problem is not None:
            raise SoftPromptError(f"the model's weights differ from those this soft prompt was trained for "
                                  f"({self._trained_for()}), which was {problem}; train a soft prompt for this model")
        width = model.get_input_embeddings().weight.shape[1]
        if width != self.d_model:
            raise SoftPromptError(f"soft prompt of width {self.d_model}; the model's embeddings have {width}")

    def fits(self, model: nn.Module) -> bool:
        try:
            self.check_model(model)
        except SoftPromptError:
            return False
        return True

    def _trained_for(self) -> str:
        return self.model.get("name_or_path") or self.model.get("model_type") or "another model"

    # -- persistence -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """JSON-ready identification (for a detoxifier's settings in a run folder): size, a digest of
        the embeddings, the model it fits (architecture, and a digest of its recorded fingerprint)."""
        base = hashlib.sha256(json.dumps(self.base_fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        return {"n_virtual_tokens": self.n_virtual_tokens, "d_model": self.d_model, "digest": self.digest(),
                "model": self.model, "base_fingerprint": {"parameters": sorted(self.base_fingerprint),
                                                          "digest": base},
                "path": self.path, "created": self.created}

    def to_dict(self) -> dict[str, Any]:
        """The JSON file's content (without the embeddings themselves)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "n_virtual_tokens": self.n_virtual_tokens,
                "d_model": self.d_model, "digest": self.digest(), "base_fingerprint": self.base_fingerprint,
                "model": self.model, "settings": self.settings, "metrics": self.metrics, "created": self.created}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path/soft_prompt.safetensors`` and ``path/soft_prompt.json`` atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = json.dumps(self.to_dict(), indent=2, default=str)

        def write(tmp: Path) -> None:
            save_file({"embeddings": self.embeddings}, str(tmp / WEIGHT_FILE), metadata={"format": FORMAT})
            (tmp / META_FILE).write_text(meta, encoding="utf-8")

        atomic_write_dir(path, write, overwrite=overwrite)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> SoftPrompt:
        """Read a soft prompt saved by :meth:`save`; with ``model``, also check that it fits it."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / WEIGHT_FILE).is_file():
            raise SoftPromptError(f"{path} is not an editkit soft prompt (needs {META_FILE} and {WEIGHT_FILE})")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise SoftPromptError(f"{path}: unsupported soft-prompt format {meta.get('format')!r} "
                                  f"v{meta.get('format_version')}")
        tensors = load_file(str(path / WEIGHT_FILE))
        shape = [meta.get("n_virtual_tokens"), meta.get("d_model")]
        if set(tensors) != {"embeddings"} or list(tensors["embeddings"].shape) != shape:
            raise SoftPromptError(f"{path}: {WEIGHT_FILE} does not hold the {shape} embeddings {META_FILE} names")
        prompt = cls(embeddings=tensors["embeddings"], base_fingerprint=meta.get("base_fingerprint", {}),
                     model=meta.get("model", {}), settings=meta.get("settings", {}), metrics=meta.get("metrics", {}),
                     created=meta.get("created", ""), path=str(path))
        if model is not None:
            prompt.check_model(model)
        return prompt


# -- one step ------------------------------------------------------------------------------------
def contrastive_scores(scores: torch.Tensor, detoxifier_logits: torch.Tensor, *, alpha: float,
                       top_p: float | None) -> torch.Tensor:
    """DetoxiGen's next-token scores [rows, vocab] from the generator's ``scores`` and the detoxifier's
    logits (each [rows, vocab]; the detoxifier's vocabulary may differ in size)::

        P_gen = softmax(scores),  P_det = softmax(detoxifier_logits)
        P     = max(0, (1+α)·P_gen − α·P_det)   for tokens in the top-``top_p`` nucleus of P_gen
        P     = 0                                elsewhere
        P     = P / ΣP,  returned as log P (−∞ where P = 0)

    A token the detoxifier's vocabulary lacks has P_det = 0. When every nucleus token is clipped
    (possible only when α/(1+α) exceeds the nucleus' mass under P_gen), the row's probability goes to
    the nucleus token of largest (1+α)·P_gen − α·P_det (the least negative). With α = 0, P is P_gen renormalised over its nucleus: greedy decoding keeps its
    tokens and sampling is nucleus sampling.
    """
    scores = scores.float()
    keep = nucleus_mask(scores, top_p)  # finite scores only
    p_gen = torch.where(keep, scores.softmax(-1), 0.0)
    n = min(scores.shape[-1], detoxifier_logits.shape[-1])
    p_det = torch.zeros_like(p_gen)
    p_det[:, :n] = detoxifier_logits.to(p_gen.device).float().softmax(-1)[:, :n]
    raw = (1.0 + alpha) * p_gen - alpha * p_det  # [rows, vocab]
    mixed = torch.where(keep, raw.clamp(min=0.0), 0.0)
    total = mixed.sum(-1, keepdim=True)
    empty = (total.squeeze(-1) <= 0) & keep.any(-1)
    if bool(empty.any()):
        best = raw.masked_fill(~keep, float("-inf")).argmax(-1)  # [rows]
        mixed[empty] = nn.functional.one_hot(best[empty], mixed.shape[-1]).to(mixed.dtype)
        total = mixed.sum(-1, keepdim=True)
    return (mixed / total.clamp(min=torch.finfo(mixed.dtype).tiny)).log()


# -- the detoxifier's runner ---------------------------------------------------------------------
class SoftPromptBatch(PaddedBatch):
    """``model`` over a batch of token rows, each prompt preceded by the soft prompt ``embeddings``
    [n_virtual_tokens, d_model]: one left-padded prefill through ``inputs_embeds`` (soft prompt, then
    the prompt's token embeddings, positions from 0 at the first virtual token), then one token per
    row per :meth:`advance` through ``input_ids`` with a transformers ``DynamicCache`` of its own;
    :meth:`keep` drops rows from that cache (both inherited from :class:`PaddedBatch`)."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], embeddings: torch.Tensor) -> None:
        super().__init__(model, prompts)
        self.embeddings = embeddings

    def prefill(self) -> torch.Tensor:
        """[rows, vocab] the next-token logits after each soft prompt + prompt."""
        from transformers import DynamicCache

        embed = self.model.get_input_embeddings()
        soft = self.embeddings.to(self.device, embed.weight.dtype)  # [virtual, d_model]
        virtual, rows = soft.shape[0], len(self.prompts)
        width = virtual + max(len(p) for p in self.prompts)
        inputs = soft.new_zeros((rows, width, soft.shape[1]))  # [rows, width, d_model]; padding stays 0 (masked)
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        for r, ids in enumerate(self.prompts):
            start = width - virtual - len(ids)
            inputs[r, start:start + virtual] = soft
            inputs[r, start + virtual:] = embed(torch.tensor(ids, device=self.device))
            mask[r, start:] = 1
        self.mask = mask
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        extra: dict[str, Any] = {"position_ids": positions} if self.takes_positions else {}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            extra["logits_to_keep"] = 1
        out = self.model(inputs_embeds=inputs, attention_mask=mask, use_cache=True,
                         **{self.cache_arg: self.cache}, **extra)  # type: ignore[dict-item]
        self.position = positions[:, -1] + 1
        return out.logits[:, -1]


# -- the detoxifier ------------------------------------------------------------------------------
class DetoxiGen(Detoxifier):
    """Contrast the generator with a detoxifier: ``model`` (the generator itself, or any model the
    soft prompt fits) behind the soft ``prompt`` trained on toxic text only. At every step, inside the
    generator's top-``top_p`` nucleus, ``P = (1+α)·P_gen − α·P_det``, negatives clipped to 0,
    renormalised (:func:`contrastive_scores`); the step's scores become log P.

    The detoxifier runs beside the generator with its own key/value cache (a
    :class:`SoftPromptBatch`, never the generator's cache, also when ``model`` is the generator),
    fed the same tokens, dropping the rows the generator's batch drops. It installs no hooks.
    The soft prompt is trained on raw text (:mod:`editkit.decoding.detoxigen_train`); with a chat
    template the detoxifier sees the same chat-rendered prompt behind it as the generator sees.
    ``alpha``, ``top_p``: the defaults are a starting point (DExperts' values), not the paper's;
    tune them on held-apart prompts with both toxicity and perplexity in view.
    """

    label = "detoxigen"

    def __init__(self, model: Any, prompt: SoftPrompt | str | Path, *, alpha: float = 2.0,
                 top_p: float | None = 0.9) -> None:
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise ValueError(f"model must be a causal LM with input embeddings, got {type(model).__name__}")
        if isinstance(prompt, (str, Path)):
            prompt = SoftPrompt.load(prompt, model)
        elif isinstance(prompt, SoftPrompt):
            prompt.check_model(model)
        else:
            raise ValueError(f"prompt must be a SoftPrompt or the folder of a saved one, got {type(prompt).__name__}")
        self.model, self.prompt, self.alpha, self.top_p = model, prompt, float(alpha), top_p
        self._run: FollowingRun | None = None  # the detoxifier's own run, following the generator's rows

    @classmethod
    def from_options(cls, model: Any, tokenizer: Any = None, **options: str) -> DetoxiGen:
        """From command-line options (strings): ``prompt=PATH`` (a saved :class:`SoftPrompt`; required),
        ``alpha=FLOAT``, ``top_p=FLOAT|none``. ``model`` (the generator) is the detoxifier's base."""
        known = {"prompt", "alpha", "top_p"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown detoxigen option(s) {unknown}; known: {sorted(known)}")
        if not options.get("prompt"):
            raise ValueError("detoxigen needs prompt=PATH, the folder of a soft prompt saved by "
                             "train_detoxigen_prompt(...).save(PATH)")
        kwargs: dict[str, Any] = {}
        for key in ("alpha", "top_p"):
            value = options.get(key)
            if value is None:
                continue
            if key == "top_p" and str(value).strip().lower() in ("none", "null", ""):
                kwargs[key] = None
                continue
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise ValueError(f"detoxigen option {key}={value!r} is not a number") from None
        return cls(model, options["prompt"], **kwargs)

    def settings(self) -> dict[str, Any]:
        return {"kind": "detoxigen", "alpha": self.alpha, "top_p": self.top_p, "prompt": self.prompt.summary()}

    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None) -> None:
        self.finish()
        batch = SoftPromptBatch(self.model, prompts, self.prompt.embeddings)
        self._run = FollowingRun(batch, batch.prefill(), len(prompts))

    @torch.no_grad()
    def step(self, scores: torch.Tensor, fed: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("DetoxiGen.step before start (or after finish)")
        return self.combine(scores, self._run.next(fed, rows))

    def combine(self, scores: torch.Tensor, detoxifier_logits: torch.Tensor) -> torch.Tensor:
        """This detoxifier's :func:`contrastive_scores`."""
        return contrastive_scores(scores, detoxifier_logits, alpha=self.alpha, top_p=self.top_p)

    def finish(self) -> None:
        self._run = None


def soft_prompt_logits(model: Any, prompt: SoftPrompt, ids: Sequence[int]) -> torch.Tensor:
    """[len(ids) + 1, vocab]: row ``i`` holds ``model``'s next-token logits after the soft prompt and
    ``ids[:i]``, computed in one forward with no cache (the slow reference of the detoxifier's runner)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    tokens = embed(torch.tensor([list(ids)], device=device))  # [1, n, d_model]
    soft = prompt.embeddings.to(device, tokens.dtype)[None]  # [1, virtual, d_model]
    out = model(inputs_embeds=torch.cat([soft, tokens], 1))
    return out.logits[0, prompt.n_virtual_tokens - 1:]
