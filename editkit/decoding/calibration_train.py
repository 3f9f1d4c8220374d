"""Training the two learnt parts of calibration-model fusion (:mod:`editkit.decoding.calibration`):

* :func:`train_alignment` — the alignment matrix ``A`` [d_cal, d_target], by InfoNCE on the
  embeddings of the tokens both vocabularies share (the same string in both tokenizers): for a batch
  of shared tokens, the calibration model's embedding of token t times ``A`` must be closest, by
  cosine similarity, to the target's embedding of t among the target embeddings of the batch
  (cross-entropy over the similarities divided by a temperature; the other tokens of the batch are
  the negatives, as the authors' random negatives from the shared vocabulary). ``A`` starts at the
  orthogonal Procrustes map between the two embedding tables (``init="procrustes"``, the default:
  the identity for a model against a fine-tuned copy of itself), and by default that closed-form
  map is the alignment (``steps=0``). Measured on the default model with its fine-tuned calibration
  copy: the Procrustes map keeps the mapped calibration state at cosine 0.94 to the generator's own
  (the identity: 0.95) and fused sampled text reads normally; 500 InfoNCE steps from it (retrieval
  already 99.95 % before them) shrank the directions all embedding rows share — where the hidden
  states carry most of their size — to 3 % of their length (singular values 0.03–1.49), cosine 0.89,
  and fused sampled text was nonsense; so was a random start (``init="random"``) and 500 steps kept
  orthogonal (tried, cosine 0.93, not kept). InfoNCE only needs the embedding rows told apart; the
  fusion needs every hidden direction carried. ``steps > 0`` runs the paper's InfoNCE training;
* :func:`train_calibration_model` — a small causal LM fine-tuned with the plain LM loss on non-toxic
  text (:func:`non_toxic_texts`: SafeEdit's safe generations and ToxiGen's neutral sentences), on a
  copy: the model passed in is left as it came. Any small causal LM sharing the generator's tokenizer
  can serve as the calibration model; save it with ``editkit.save_checkpoint``.

Neither writes the models' weights: the alignment reads detached copies of the embeddings.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from editkit.decoding.calibration import EMBEDDINGS, Alignment, embedding_parameter
from editkit.devices import real_values
from editkit.methods.lora import _peak_rss_mb

log = logging.getLogger(__name__)

ALIGNMENT_INITS = ("procrustes", "random")


def shared_tokens(tokenizer_target: Any, tokenizer_calibration: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ids, calibration ids) [n] of the token strings both vocabularies hold, in the order of
    the target's ids (the pairs are matched by string, never by id)."""
    target, calibration = tokenizer_target.get_vocab(), tokenizer_calibration.get_vocab()
    pairs = sorted((i, calibration[s]) for s, i in target.items() if s in calibration)
    if not pairs:
        raise ValueError("the two tokenizers share no token string")
    ids = torch.tensor(pairs, dtype=torch.long)
    return ids[:, 0], ids[:, 1]


def _retrieval_top1(mapped: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose mapped embedding is closest (cosine) to its own target embedding."""
    sim = nn.functional.normalize(mapped, dim=-1) @ nn.functional.normalize(target, dim=-1).T
    return float((sim.argmax(-1) == torch.arange(len(sim), device=sim.device)).float().mean())


def info_nce(mapped: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of a batch: row i of ``mapped`` [B, d] against every row of ``target`` [B, d], row i
    the positive: cross-entropy over cosine similarities / ``temperature``."""
    logits = nn.functional.normalize(mapped, dim=-1) @ nn.functional.normalize(target, dim=-1).T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def train_alignment(
    target: nn.Module,
    calibration: nn.Module,
    tokenizer_target: Any,
    tokenizer_calibration: Any,
    *,
    steps: int = 0,
    lr: float = 1e-3,
    temperature: float = 0.1,
    batch_size: int = 256,
    embedding: str = "output",
    init: str = "procrustes",
    seed: int = 0,
    progress: bool = False,
) -> Alignment:
    """The alignment matrix from ``calibration``'s hidden space to ``target``'s, trained by InfoNCE
    over the shared tokens' ``embedding`` rows ("output": the LM heads, whose rows the fused state is
    read against; "input": the token embeddings, as the authors do; the same for tied models).

    Each step draws ``batch_size`` distinct shared tokens (seeded; the global generators are not
    touched) and takes one Adam step on ``A`` (from ``init``; ``steps=0``: the Procrustes start as it
    is). The metrics hold the loss of the first and last steps (None without steps) and the top-1
    retrieval accuracy over (up to) 2048 shared tokens before and after training."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if init not in ALIGNMENT_INITS:
        raise ValueError(f"init must be one of {ALIGNMENT_INITS}, got {init!r}")
    if steps < 0 or batch_size < 2:
        raise ValueError("steps must be 0 or more and batch_size at least 2")
    if steps == 0 and init != "procrustes":
        raise ValueError("a random start needs InfoNCE steps (steps > 0); steps=0 keeps the Procrustes start")
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"lr and temperature must be positive numbers, got {lr!r} and {temperature!r}")
    started = time.perf_counter()
    weight_t = real_values(target, embedding_parameter(target, embedding))
    weight_c = real_values(calibration, embedding_parameter(calibration, embedding))
    ids_t, ids_c = shared_tokens(tokenizer_target, tokenizer_calibration)
    inside = (ids_t < weight_t.shape[0]) & (ids_c < weight_c.shape[0])  # ids past a model's rows: no embedding
    ids_t, ids_c = ids_t[inside], ids_c[inside]
    if len(ids_t) < 2:
        raise ValueError(f"only {len(ids_t)} shared token(s) have embeddings in both models; InfoNCE needs two")
    device = weight_t.device
    emb_t = weight_t[ids_t.to(device)].detach().float()  # [n, d_target] copies: the weights are never written
    emb_c = weight_c[ids_c.to(weight_c.device)].detach().to(device, torch.float32)  # [n, d_cal]
    n, batch = len(ids_t), min(batch_size, len(ids_t))
    generator = torch.Generator().manual_seed(seed)
    if init == "procrustes":  # the orthogonal map closest to carrying emb_c onto emb_t: U·Vᵀ of svd(emb_cᵀ·emb_t)
        u, _, vh = torch.linalg.svd(emb_c.T @ emb_t, full_matrices=False)
        matrix = (u @ vh).contiguous()
    else:
        matrix = (torch.randn(emb_c.shape[1], emb_t.shape[1], generator=generator) / math.sqrt(emb_c.shape[1])).to(device)
    matrix.requires_grad_(True)
    optimizer = torch.optim.Adam([matrix], lr=lr)
    sample = torch.randperm(n, generator=generator)[:2048].to(device)  # for the top-1 accuracy
    with torch.no_grad():
        top1_before = _retrieval_top1(emb_c[sample] @ matrix, emb_t[sample])
    losses: list[float] = []
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc="alignment", disable=not progress, leave=False):
            pick = torch.randperm(n, generator=generator)[:batch].to(device)
            loss = info_nce(emb_c[pick] @ matrix, emb_t[pick], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("the InfoNCE loss became NaN/inf; lower lr")
    with torch.no_grad():
        top1_after = _retrieval_top1(emb_c[sample] @ matrix, emb_t[sample])
    log.info("alignment: %d shared tokens, %d InfoNCE steps, top-1 %.3f -> %.3f", n, steps, top1_before, top1_after)
    settings = {"steps": steps, "lr": lr, "temperature": temperature, "batch_size": batch, "init": init, "seed": seed}
    metrics = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "losses": losses[:: max(1, steps // 100)],
               "top1_before": top1_before, "top1_after": top1_after, "shared_tokens": n,
               "seconds": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb()}
    return Alignment.for_models(target, calibration, matrix.detach(), embedding=embedding,
                                tokenizers=(tokenizer_target, tokenizer_calibration), shared=n,
                                settings=settings, metrics=metrics)


def non_toxic_texts(data_dir: str | Path, sources: Sequence[str] = ("safeedit", "toxigen"), *,
                    exclude_fold: str | tuple[int, int] | None = None) -> list[str]:
    """The non-toxic texts of the shared data: SafeEdit's safe generations and ToxiGen's neutral
    sentences (label 0 in :func:`editkit.probes.probe.load_probe_texts`), each text once, in file order.
    ``exclude_fold`` (``"K/N"``): leave out every text of that fold, as
    :func:`editkit.decoding.detoxigen_train.load_toxic_texts` does."""
    from editkit.probes.probe import load_probe_texts
    from safeedit.toxicity_prompts import fold_texts, parse_fold, text_key

    held = fold_texts(*parse_fold(exclude_fold), data_dir) if exclude_fold is not None else set()
    seen: set[str] = set()
    out = []
    for item in load_probe_texts(data_dir, sources):
        if item.label == 0 and item.text not in seen and text_key(item.text) not in held:
            seen.add(item.text)
            out.append(item.text)
    return out


@dataclass
class CalibrationRun:
    """A fine-tuned copy of the model and how training went."""

    model: nn.Module
    losses: list[float]
    steps: int
    seconds: float
    peak_rss_mb: float | None


def train_calibration_model(model: nn.Module, tokenizer: Any, texts: Sequence[str], **settings: Any) -> CalibrationRun:
    """The calibration model: a copy of ``model`` fine-tuned on non-toxic ``texts``
    (:func:`non_toxic_texts`) by :func:`fine_tune_copy`, which takes the same ``settings``."""
    return fine_tune_copy(model, tokenizer, texts, **{"desc": "calibration model", **settings})


def fine_tune_copy(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    steps: int = 200,
    lr: float = 5e-5,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = False,
    desc: str = "fine-tuning",
) -> CalibrationRun:
    """Fine-tune a copy of ``model`` (all its weights) on ``texts`` with the plain LM loss (the
    calibration model on non-toxic text, DExperts' anti-expert on toxic text): each text
    is tokenized (special tokens as the tokenizer adds them), cut to ``max_length`` tokens and ended
    with the end-of-sequence token; batches of ``batch_size`` texts are drawn in a seeded shuffled
    order, ``steps`` AdamW steps (``desc`` names them on the progress bar). ``model`` is not changed;
    the copy is returned in eval mode, its ``requires_grad`` flags as the original's."""
    from editkit.methods.model_state import global_rng_kept
    from editkit.text import pad_right

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("no non-empty texts to train on")
    if steps < 1 or batch_size < 1 or max_length < 2:
        raise ValueError("steps and batch_size must be positive, max_length at least 2")
    started = time.perf_counter()
    eos = tokenizer.eos_token_id
    encoded = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[: max_length - (eos is not None)]
        encoded.append(ids + ([eos] if eos is not None else []))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    flags = [param.requires_grad for param in model.parameters()]
    trained = copy.deepcopy(model)
    trained.train()
    for param in trained.parameters():
        param.requires_grad_(True)
    device = next(trained.parameters()).device
    optimizer = torch.optim.AdamW(trained.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    with global_rng_kept(), torch.enable_grad():
        torch.manual_seed(seed)  # dropout, inside the forked generators
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            if len(order) < batch_size:
                order += torch.randperm(len(encoded), generator=generator).tolist()
            pick, order = order[:batch_size], order[batch_size:]
            ids, mask = pad_right([encoded[i] for i in pick], pad)
            labels = ids.masked_fill(mask == 0, -100)
            out = trained(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("the LM loss became NaN/inf; lower lr")
    trained.eval()
    for param, flag in zip(trained.parameters(), flags):  # the copy's flags as the original's
        param.requires_grad_(flag)
    return CalibrationRun(model=trained, losses=losses, steps=steps, seconds=time.perf_counter() - started,
                          peak_rss_mb=_peak_rss_mb())
