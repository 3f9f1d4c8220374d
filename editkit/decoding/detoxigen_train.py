"""Training DetoxiGen's detoxifier: a soft prompt, prompt-tuned with ``peft`` on toxic text only.

The base model is wrapped by ``peft`` (``PromptTuningConfig``, ``TaskType.CAUSAL_LM``): the wrapper
puts ``n_virtual_tokens`` trainable embeddings before each text's token embeddings, and only those
are trained, with the LM loss on the text's tokens (each text is a plain continuation of the soft
prompt, encoded as a raw prompt is: ``tokenizer(text)``, so a tokenizer's BOS is kept). The result is
the embedding tensor alone, a :class:`~editkit.decoding.detoxigen.SoftPrompt` tied to the model's
fingerprint. The wrapper is then dropped (prompt tuning merges nothing into the model) and
:func:`~editkit.methods.model_state.preserved` puts back everything the wrapper or the training
changed on the model (``requires_grad`` flags, train/eval mode, attributes, hooks, config); the
model's weights are never written. All of this also holds when training raises.

With an ``output_dir`` the run checkpoints there (``checkpoint-STEP/``: the embeddings and the
optimiser's moments) every ``save_steps`` steps and at its end; a later call with the same settings,
texts and base model resumes from the last checkpoint, and gives the soft prompt an uninterrupted run
gives (the data order is a function of seed and epoch, the random state of each step of seed and
step). A different run in the same folder is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.arch import embedding_name
from editkit.decoding.detoxigen import SoftPrompt
from editkit.methods.model_state import global_rng_kept, preserved
from editkit.patch import atomic_write_dir, model_info
from editkit.text import _ids, pad_id, pad_right

log = logging.getLogger(__name__)

TOXIC_SOURCES = ("safeedit", "toxigen")
CHECKPOINT_STATE = "state.safetensors"
CHECKPOINT_META = "state.json"
KEEP_CHECKPOINTS = 2


# -- data ----------------------------------------------------------------------------------------
def load_toxic_texts(data_dir: str | Path | None = None, *, sources: Sequence[str] = TOXIC_SOURCES,
                     limit: int | None = None, exclude_fold: str | tuple[int, int] | None = None) -> list[str]:
    """The toxic texts of the shared data: SafeEdit's ``unsafe generation`` of each record
    (``safeedit/safeedit_dev.json``) and ToxiGen's ``hate`` sentences
    (``toxigen/toxigen_demonstrations.jsonl``), exact repeats dropped, the sources interleaved (so
    that ``limit`` keeps some of each). ``data_dir``: the shared-data folder (default:
    ``$EDITKIT_SHARED_DATA`` or ``../shared/data`` beside the repository). ``exclude_fold``
    (``"K/N"``): leave out every text of that fold (:func:`safeedit.toxicity_prompts.fold_texts`), so
    the detoxifier can be scored on the fold's prompts (``detox-eval --fold K/N``)."""
    from editkit.probes.probe import load_safeedit_generations, load_toxigen

    loaders = {"safeedit": load_safeedit_generations, "toxigen": load_toxigen}
    unknown = sorted(set(sources) - set(loaders))
    if unknown or not sources:
        raise ValueError(f"unknown toxic text source(s) {unknown or list(sources)}; choose from {sorted(loaders)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if data_dir is None:
        from safeedit.dataset import shared_data_dir

        data_dir = shared_data_dir()
    from safeedit.toxicity_prompts import fold_texts, parse_fold, text_key

    seen: set[str] = set()
    if exclude_fold is not None:
        seen |= fold_texts(*parse_fold(exclude_fold), data_dir)  # already "seen": never taken
    per_source = []
    for source in dict.fromkeys(sources):
        texts = []
        for item in loaders[source](data_dir):
            key = text_key(item.text)
            if item.label == 1 and key not in seen:
                seen.add(key)
                texts.append(item.text)
        per_source.append(texts)
    mixed = [texts[i] for i in range(max(map(len, per_source))) for texts in per_source if i < len(texts)]
    return mixed[:limit] if limit is not None else mixed


def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(json.dumps(text).encode())
    return digest.hexdigest()


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    encoded = [_ids(tokenizer(text, add_special_tokens=True))[:max_length] for text in texts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"text(s) {empty[:5]} encode to no tokens")
    return encoded


# -- measuring -----------------------------------------------------------------------------------
@torch.no_grad()
def soft_prompt_loss(model: nn.Module, tokenizer: Any, prompt: SoftPrompt | torch.Tensor, texts: Sequence[str], *,
                     max_length: int = 128, batch_size: int = 8) -> float:
    """Mean token NLL of ``texts`` under ``model`` behind the soft prompt (each text encoded as in
    training, at most ``max_length`` tokens). Runs in eval mode; the model is left as it came."""
    embeddings = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt.detach()
    encoded = _encode(tokenizer, texts, max_length)
    embed = model.get_input_embeddings()
    device = embed.weight.device
    soft = embeddings.to(device, embed.weight.dtype)  # [virtual, d_model]
    total, count = 0.0, 0
    with preserved(model):
        model.eval()
        for start in range(0, len(encoded), batch_size):
            ids, mask = pad_right(encoded[start:start + batch_size], pad_id(tokenizer))
            ids, mask = ids.to(device), mask.to(device)
            rows, virtual = ids.shape[0], soft.shape[0]
            inputs = torch.cat([soft.expand(rows, -1, -1), embed(ids)], 1)  # [rows, virtual + seq, d_model]
            full_mask = torch.cat([mask.new_ones((rows, virtual)), mask], 1)
            logits = model(inputs_embeds=inputs, attention_mask=full_mask).logits
            logits = logits[:, virtual - 1:-1]  # [rows, seq, vocab]: position i predicts token i
            nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # [rows, seq]
            total += float((nll * mask).sum())
            count += int(mask.sum())
    return total / count


# -- the run -------------------------------------------------------------------------------------
def train_detoxigen_prompt(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    n_virtual_tokens: int = 20,
    init: Literal["vocab", "random", "text"] = "vocab",
    init_text: str | None = None,
    lr: float = 3e-2,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    output_dir: str | Path | None = None,
    save_steps: int = 25,
    measure: bool = True,
    progress: bool = False,
) -> SoftPrompt:
    """Prompt-tune a soft prompt of ``n_virtual_tokens`` on ``model`` with the LM loss on ``texts``
    (toxic text only: :func:`load_toxic_texts`) and return it; ``model`` is left exactly as it came.

    ``init``: ``"vocab"`` (embeddings of random vocabulary tokens, peft's ``SAMPLE_VOCAB``),
    ``"random"`` (peft's ``RANDOM``: N(0, 1) entries, far off the embedding scale of most models) or
    ``"text"`` (the embeddings of ``init_text``'s tokens, repeated or cut to length). AdamW at a
    constant ``lr`` on the soft prompt only, the gradient norm clipped to ``max_grad_norm`` (0: no
    clipping); ``max_steps`` overrides ``epochs``. ``measure``: also record the mean token NLL of the
    texts before and after training (two extra passes). See the module docstring for ``output_dir``.
    """
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from editkit.methods.lora import _check_run_folder, _peak_rss_mb

    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings")
    if n_virtual_tokens < 1 or batch_size < 1 or max_length < 1 or save_steps < 1:
        raise ValueError("n_virtual_tokens, batch_size, max_length and save_steps must be >= 1")
    if not (lr > 0 and epochs > 0 and max_grad_norm >= 0 and weight_decay >= 0):
        raise ValueError("lr and epochs must be > 0, max_grad_norm and weight_decay >= 0")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    if init not in ("vocab", "random", "text") or (init == "text") != bool(init_text):
        raise ValueError(f"init must be 'vocab', 'random' or 'text' (the last with init_text), got {init!r}")
    encoded = _encode(tokenizer, texts, max_length)
    per_epoch = math.ceil(len(encoded) / batch_size)
    total = max_steps or max(1, math.ceil(epochs * per_epoch))
    settings = {"n_virtual_tokens": n_virtual_tokens, "init": init, "init_text": init_text, "lr": lr,
                "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "max_length": max_length,
                "max_grad_norm": max_grad_norm, "weight_decay": weight_decay, "seed": seed,
                "texts_digest": texts_digest(texts), "n_texts": len(texts)}
    folder = Path(output_dir) if output_dir is not None else None
    if folder is not None:
        identity = {"method": "detoxigen-prompt", "settings": settings,
                    "model": {k: v for k, v in model_info(model).items() if k != "name_or_path"}}
        _check_run_folder(folder, identity, model, embedding_name(model))
    resume = _last_checkpoint(folder)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual_tokens,
                                prompt_tuning_init=PromptTuningInit.RANDOM if init == "random"
                                else PromptTuningInit.SAMPLE_VOCAB)
    start_time = time.perf_counter()
    with preserved(model), global_rng_kept(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*deprecated and will be removed in v6.*", FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        try:
            weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight  # [virtual, d_model]
            if init == "text":
                with torch.no_grad():
                    weight.copy_(_text_init(model, tokenizer, init_text or "", n_virtual_tokens))
            before = soft_prompt_loss(model, tokenizer, weight, texts, max_length=max_length,
                                      batch_size=batch_size) if measure else None
            optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
            losses: list[float] = []
            done = 0
            if resume is not None:
                done, losses = _load_checkpoint(resume, weight, optimizer)
                log.info("detoxigen prompt: resuming from %s (step %d of %d)", resume, done, total)
            peft_model.train()
            order: torch.Tensor | None = None
            for step in tqdm(range(done, total), desc="prompt tuning", disable=not progress, leave=False):
                epoch, b = divmod(step, per_epoch)
                if order is None or b == 0:  # the data order of an epoch: a function of seed and epoch
                    shuffle = torch.Generator().manual_seed(seed * 100_003 + epoch)
                    order = torch.randperm(len(encoded), generator=shuffle)
                ids, mask = pad_right([encoded[i] for i in order[b * batch_size:(b + 1) * batch_size].tolist()], pad)
                torch.manual_seed(seed * 1_000_003 + step)  # dropout, if any: each step as on a resume
                losses.append(_train_step(peft_model, optimizer, weight, ids.to(device), mask.to(device),
                                          max_grad_norm))
                if folder is not None and ((step + 1) % save_steps == 0 or step + 1 == total):
                    _save_checkpoint(folder, step + 1, weight, optimizer, losses)
            embeddings = weight.detach().to("cpu", torch.float32).clone()
        finally:
            del peft_model  # prompt tuning merges nothing; `preserved` undoes the wrapping
    seconds = time.perf_counter() - start_time
    if not torch.isfinite(embeddings).all():
        raise FloatingPointError("detoxigen prompt: training diverged (the soft prompt holds NaN or inf); the model "
                                 "is untouched; lower lr")
    prompt = SoftPrompt.from_embeddings(model, embeddings, settings=settings)
    after = soft_prompt_loss(model, tokenizer, prompt, texts, max_length=max_length,
                             batch_size=batch_size) if measure else None
    peak = _peak_rss_mb()
    prompt.metrics = {"steps": total, "resumed_from_step": done, "loss_before": before, "loss_after": after,
                      "train_loss_first": losses[0] if losses else None,
                      "train_loss_last": losses[-1] if losses else None, "train_losses": losses,
                      "trainable_params": int(embeddings.numel()), "train_seconds": round(seconds, 3),
                      "peak_rss_mb": None if peak is None else round(peak, 1)}
    log.info("detoxigen prompt: %d steps (%d now) in %.1fs, NLL %s -> %s", total, total - done, seconds, before, after)
    return prompt


def _train_step(peft_model: nn.Module, optimizer: torch.optim.Optimizer, weight: nn.Parameter, ids: torch.Tensor,
                mask: torch.Tensor, max_grad_norm: float) -> float:
    """One optimiser step on the soft prompt; the loss is the mean token NLL of the batch's texts
    (peft prepends the virtual tokens and gives them no labels)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detoxigen prompt: the loss is {float(loss)}; the model is untouched; lower lr")
        loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([weight], max_grad_norm)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _text_init(model: nn.Module, tokenizer: Any, text: str, n: int) -> torch.Tensor:
    """[n, d_model] the input embeddings of ``text``'s tokens, repeated or cut to ``n`` (peft's TEXT
    initialisation, which would load the tokenizer again by name)."""
    ids = _ids(tokenizer(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"init_text {text!r} encodes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    embed = model.get_input_embeddings()
    return embed(torch.tensor(ids, device=embed.weight.device)).float()


# -- checkpoints ---------------------------------------------------------------------------------
def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.rpartition("-")[2]
        if suffix.isdigit() and (path / CHECKPOINT_STATE).is_file() and (path / CHECKPOINT_META).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def _last_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    found = _checkpoints(folder)
    return found[-1][1] if found else None


def _save_checkpoint(folder: Path, step: int, weight: torch.Tensor, optimizer: torch.optim.Optimizer,
                     losses: list[float]) -> None:
    from safetensors.torch import save_file

    state = optimizer.state[weight]
    tensors = {"embeddings": weight.detach().cpu().contiguous(), "exp_avg": state["exp_avg"].cpu().contiguous(),
               "exp_avg_sq": state["exp_avg_sq"].cpu().contiguous()}
    meta = {"step": step, "adam_step": float(state["step"]), "losses": losses}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / CHECKPOINT_STATE))
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta), encoding="utf-8")

    atomic_write_dir(folder / f"checkpoint-{step}", write, overwrite=True)
    for _, old in _checkpoints(folder)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, weight: nn.Parameter, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / CHECKPOINT_STATE))
    meta = json.loads((path / CHECKPOINT_META).read_text(encoding="utf-8"))
    if tuple(tensors["embeddings"].shape) != tuple(weight.shape):
        raise ValueError(f"{path}: a soft prompt of shape {list(tensors['embeddings'].shape)}, this run's is "
                         f"{list(weight.shape)}")
    with torch.no_grad():
        weight.copy_(tensors["embeddings"])
    state = optimizer.state_dict()
    state["state"] = {0: {"step": torch.tensor(meta["adam_step"]), "exp_avg": tensors["exp_avg"],
                          "exp_avg_sq": tensors["exp_avg_sq"]}}
    optimizer.load_state_dict(state)
    return int(meta["step"]), [float(x) for x in meta["losses"]]
