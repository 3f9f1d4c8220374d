"""What the LoRA-trained dataset-scope methods (SFT, DPO) share: their common settings, the modules
to adapt (from the architecture map), a ``trl`` trainer run on the caller's model that leaves the
model exactly as it came, and the trained adapter turned into full-weight deltas for a Patch.

A run: ``trl`` wraps the model with ``peft`` (``peft_config=``) and trains the adapter only. For each
wrapped weight the adapter adds ΔW = B·A·alpha/r, which peft's ``get_delta_weight`` returns in the
weight's own layout (GPT-2's Conv1D stores [in, out]; peft's ``fan_in_fan_out`` handles it). Those
deltas become the patch, keyed by the base model's parameter names. The adapter is then removed
without merging (peft's ``unload()``), and :func:`~editkit.methods.model_state.preserved` puts back everything else the trainers
change on the model: train/eval flags, ``requires_grad``, dropout rates, ``config.use_cache``, the
fused-LM-head ``forward`` trl installs, model tags, activation checkpointing and its input-grad hook.
The weights are never written. All of this also holds when training raises.

With an ``output_dir`` the trainer checkpoints there every ``save_steps`` steps and a later call
with the same settings, records and base model resumes from the last checkpoint (a finished run
resumes at its end and trains nothing). Without one, a temporary folder is used and removed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from editkit.arch import ArchMap, decoder_layers, get_module, resolve_arch
from editkit.hparams import HParams, hp
from editkit.instance import EditInstance
from editkit.methods.model_state import global_rng_kept, preserved, quiet
from editkit.patch import Patch, fingerprint, fingerprint_matches, model_info
from editkit.result import EditResult
from editkit.text import encode_pairs, prompt_ids, target_ids, uses_chat

log = logging.getLogger(__name__)

RUN_FILE = "editkit-fit.json"  # what a checkpoint folder was trained with; a resume must match it
DEFAULT_SAVE_STEPS = 25


@dataclass
class LoRATrainConfig(HParams):
    """Settings shared by the LoRA-trained methods (algorithm settings only)."""

    method: ClassVar[str] = ""

    r: int = hp(16, "LoRA rank")
    alpha: float = hp(32.0, "LoRA alpha: the adapter's output is scaled by alpha / r")
    dropout: float = hp(0.05, "dropout on the adapter's input while training (no effect on the delta)")
    target_modules: list[str] = hp([], "modules to adapt, matched as peft does (a full name or its last parts, "
                                       "e.g. [q_proj, v_proj]); empty: every linear projection inside the attention "
                                       "and MLP blocks of every decoder layer, found through editkit.arch")
    lr: float = hp(2e-4, "AdamW learning rate")
    epochs: float = hp(3.0, "passes over the records (ignored when max_steps is set)")
    max_steps: int | None = hp(None, "stop after this many optimiser steps (overrides epochs; null: use epochs)")
    batch_size: int = hp(4, "records per forward pass")
    grad_accum: int = hp(1, "forward passes per optimiser step")
    weight_decay: float = hp(0.0, "AdamW weight decay on the adapter")
    warmup_steps: int = hp(0, "linear learning-rate warm-up steps")
    lr_scheduler: Literal["linear", "constant", "cosine"] = hp("linear", "learning-rate schedule after warm-up")
    max_grad_norm: float = hp(1.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int = hp(1024, "token budget of one prompt+answer sequence; a longer prompt loses its start")
    chat_template: Literal["auto", "none"] = hp("auto", "render prompts with the tokenizer's chat template, if any")
    seed: int = hp(0, "seed of the adapter's initialisation and of the data order")
    activation_checkpointing: bool = hp(True, "recompute activations in the backward pass instead of keeping "
                                              "them: several times less memory for ~30% more time")
    measure: bool = hp(True, "score the records before and after training (two extra forward passes over them)")

    def __post_init__(self) -> None:
        self._check(self.r >= 1, f"r must be >= 1, got {self.r}")
        self._check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        self._check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        self._check(all(isinstance(t, str) and t for t in self.target_modules), "target_modules: non-empty names")
        self._check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        self._check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        self._check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or null: {self.max_steps}")
        self._check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        self._check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        self._check(self.weight_decay >= 0, "weight_decay must be >= 0")
        self._check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        self._check(self.max_grad_norm >= 0, "max_grad_norm must be >= 0")
        self._check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")


def require_training_libraries() -> None:
    """Import check with an actionable message (peft, trl and datasets are the ``train`` extra)."""
    missing = []
    for name in ("peft", "trl", "datasets"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"SFT/DPO need {', '.join(missing)}: pip install 'editkit[train]'")


# -- which modules ---------------------------------------------------------------------------------
def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def lora_targets(model: nn.Module, targets: Sequence[str] = (), arch: ArchMap | dict | None = None) -> list[str]:
    """Full names of the modules to adapt. ``targets`` (peft-style names) select among the model's
    linear projections; without them, every projection inside the attention and MLP blocks of every
    decoder layer (the blocks holding the architecture map's ``attn_out`` and ``mlp_out``)."""
    if targets:
        found = [n for n, m in model.named_modules() if _is_projection(m) and any(_matches(n, t) for t in targets)]
        if not found:
            raise ValueError(f"target_modules {list(targets)} match no linear projection of {type(model).__name__}")
        return found
    arch = resolve_arch(model, arch)
    blocks = {path.rpartition(".")[0] for path in (arch.attn_out, arch.mlp_out)}
    found = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        for block in sorted(blocks):
            root = get_module(layer, block) if block else layer
            prefix = f"{arch.layers}.{i}" + (f".{block}" if block else "")
            found += [f"{prefix}.{n}" for n, m in root.named_modules() if n and _is_projection(m)]
    return found


def lora_config(model: nn.Module, hparams: LoRATrainConfig, targets: Sequence[str]) -> Any:
    """The ``peft.LoraConfig`` of a run (``fan_in_fan_out`` declared for Conv1D-stored weights)."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    return LoraConfig(r=hparams.r, lora_alpha=hparams.alpha, lora_dropout=hparams.dropout, bias="none",
                      target_modules=list(targets), task_type="CAUSAL_LM",
                      fan_in_fan_out=any(isinstance(modules[n], Conv1D) for n in targets))


# -- measuring -------------------------------------------------------------------------------------
@torch.no_grad()
def completion_logprobs(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *,
                        chat_template: str = "auto", max_length: int = 1024,
                        batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log p(target | prompt) per (prompt, target) pair and its number of target tokens, encoded as
    every editkit method encodes them (:func:`editkit.text.encode_pairs`). Runs in eval mode."""
    device = next(model.parameters()).device
    sums, counts = [], []
    with preserved(model):
        model.eval()
        for start in range(0, len(pairs), batch_size):
            batch = encode_pairs(tokenizer, pairs[start:start + batch_size], chat_template=chat_template,
                                 max_length=max_length).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [b, seq, vocab]
            predicting = batch.predicting_positions()  # [b, seq]
            logp = torch.log_softmax(logits[predicting].float(), dim=-1)  # [n_targets, vocab]
            token_logp = logp.gather(-1, batch.targets()[:, None]).squeeze(-1)  # [n_targets]
            rows = predicting.nonzero()[:, 0]
            sums.append(torch.zeros(len(batch.input_ids), device=device).index_add_(0, rows, token_logp).cpu())
            counts.append(predicting.sum(1).cpu())
    return torch.cat(sums), torch.cat(counts)


# -- data ------------------------------------------------------------------------------------------
def fit_prompt(tokenizer: Any, prompt: str, answers: Sequence[str], hparams: LoRATrainConfig) -> str:
    """``prompt``, shortened from its start when it and the longest answer (at most half the budget)
    would not fit in ``max_length`` tokens, so the trainers' truncation never cuts an answer short."""
    answer = max(len(target_ids(tokenizer, a, hparams.chat_template)) for a in answers)
    room = hparams.max_length - min(answer, hparams.max_length // 2) - 2  # 2: re-tokenisation slack
    excess = len(prompt_ids(tokenizer, prompt, hparams.chat_template)) - room
    if excess <= 0:
        return prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[min(excess, len(ids) - 1):])


def trl_prompt(tokenizer: Any, prompt: str, chat_template: str) -> str | list[dict[str, str]]:
    """A prompt in trl's conversational format when the chat template is used, else plain text ending
    in a newline (as :func:`editkit.text.prompt_ids` renders it)."""
    if uses_chat(tokenizer, chat_template):
        return [{"role": "user", "content": prompt}]
    return prompt + "\n"


def trl_answer(tokenizer: Any, answer: str, chat_template: str) -> str | list[dict[str, str]]:
    return [{"role": "assistant", "content": answer}] if uses_chat(tokenizer, chat_template) else answer


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class LoRARun:
    """What one trainer run produced (the deltas are keyed by the base model's parameter names)."""

    deltas: dict[str, torch.Tensor]
    log_history: list[dict[str, Any]]
    steps: int
    resumed_from_step: int
    train_seconds: float
    peak_rss_mb: float | None
    trainable_params: int

    def losses(self) -> list[dict[str, float]]:
        """One dict per logged optimiser step (numbers only)."""
        return [{k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                for entry in self.log_history if "loss" in entry]


def records_digest(records: Sequence[EditInstance]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.id, record.prompt, record.safe, record.unsafe]).encode())
    return digest.hexdigest()


def _peak_rss_mb() -> float | None:
    """The process's peak resident set size so far (getrusage; KiB on Linux, bytes on macOS)."""
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (AttributeError, OSError):
        return None
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _check_run_folder(folder: Path, identity: dict[str, Any], model: nn.Module, probe: str) -> None:
    """Before a run in ``folder``: if it holds checkpoints, they must come from a run with the same
    settings, records and base weights (``editkit-fit.json``), else resuming would silently mix two
    trainings; if it holds none, record this run's identity there."""
    path = folder / RUN_FILE
    params = dict(model.named_parameters())
    if not any(folder.glob("checkpoint-*")):
        folder.mkdir(parents=True, exist_ok=True)
        record = {**identity, "base_fingerprint": {probe: fingerprint(params[probe])}}
        path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        return
    if not path.is_file():
        raise ValueError(f"{folder} holds checkpoints that editkit did not write ({RUN_FILE} is missing); "
                         "choose another output_dir")
    recorded = json.loads(path.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(identity, default=str))
    differ = sorted(k for k in now if recorded.get(k) != now[k])
    prints = recorded.get("base_fingerprint", {})
    if probe not in prints or not fingerprint_matches(params[probe], prints[probe]):
        differ.append("base model weights")
    if differ:
        raise ValueError(f"{folder} holds checkpoints of a run with different {', '.join(differ)}; resuming would "
                         "mix two trainings. Use another output_dir, or delete this one to start again.")


@torch.no_grad()
def adapter_deltas(peft_model: nn.Module, module_names: dict[int, str]) -> dict[str, torch.Tensor]:
    """{base parameter name: ΔW} for every LoRA layer of ``peft_model``'s active adapter: the change
    merging it would make, in the weight's own layout (peft's ``get_delta_weight``), as float32 on
    the CPU. ``module_names`` maps ``id(module)`` to its name in the base model, taken before the
    model was wrapped (the wrapped layer's ``get_base_layer()`` is that very module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = list(peft_model.active_adapters)
    if len(adapters) != 1:
        raise ValueError(f"expected one active adapter, found {adapters}")
    adapter = adapters[0]
    deltas = {}
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            name = f"{module_names[id(base)]}.weight"
            delta = module.get_delta_weight(adapter).detach().float().cpu()
            if delta.shape != base.weight.shape:
                raise RuntimeError(f"{name}: adapter delta {tuple(delta.shape)} does not match the weight "
                                   f"{tuple(base.weight.shape)}")
            deltas[name] = delta
    return deltas


def train_lora(
    method: str,
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditInstance],
    rows: list[dict[str, Any]],
    hparams: LoRATrainConfig,
    *,
    trainer_class: type,
    config_class: type,
    config_kwargs: dict[str, Any],
    output_dir: str | Path | None = None,
    save_steps: int | None = None,
    progress: bool = False,
    arch: ArchMap | dict | None = None,
) -> LoRARun:
    """Train a LoRA adapter on ``model`` with a trl trainer (``trainer_class``/``config_class``, e.g.
    SFTTrainer/SFTConfig) on ``rows`` (a trl dataset format) and return its full-weight deltas.
    ``model`` is left as it came (see :func:`preserved`), also when anything here raises."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    if save_steps is not None and save_steps < 1:
        raise ValueError(f"save_steps must be >= 1, got {save_steps}")
    targets = lora_targets(model, hparams.target_modules, arch)
    module_names = {id(m): n for n, m in model.named_modules()}
    device = next(model.parameters()).device
    # what decides the training (not where the model was loaded from, nor how it is run or scored)
    identity = {"method": method, "hparams": {k: v for k, v in hparams.to_dict().items()
                                              if k not in ("measure", "activation_checkpointing")},
                "records": records_digest(records), "n_records": len(records),
                "model": {k: v for k, v in model_info(model).items() if k != "name_or_path"}}

    with tempfile.TemporaryDirectory(prefix=f"editkit-{method}-") as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch)
        keep = output_dir is not None
        if keep:
            _check_run_folder(folder, identity, model, f"{targets[0]}.weight")
        resume = get_last_checkpoint(str(folder)) if keep and folder.is_dir() else None
        fields = {f.name for f in dataclasses.fields(config_class)}
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        args = config_class(
            output_dir=str(folder), use_cpu=device.type == "cpu", report_to=[], push_to_hub=False, bf16=False,
            fp16=False, **{checkpointing: hparams.activation_checkpointing}, learning_rate=hparams.lr,
            num_train_epochs=hparams.epochs, max_steps=hparams.max_steps or -1,
            per_device_train_batch_size=hparams.batch_size, gradient_accumulation_steps=hparams.grad_accum,
            weight_decay=hparams.weight_decay, warmup_steps=hparams.warmup_steps,
            lr_scheduler_type=hparams.lr_scheduler, max_grad_norm=hparams.max_grad_norm, seed=hparams.seed,
            max_length=hparams.max_length, logging_steps=1, logging_nan_inf_filter=False,
            save_strategy="steps" if keep else "no", save_steps=save_steps or DEFAULT_SAVE_STEPS,
            save_total_limit=2, disable_tqdm=not progress, dataloader_num_workers=0, **config_kwargs)
        peft_model = None
        with preserved(model), global_rng_kept(), quiet(progress):
            try:
                trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                        processing_class=copy.deepcopy(tokenizer),
                                        peft_config=lora_config(model, hparams, targets))
                peft_model = trainer.accelerator.unwrap_model(trainer.model)
                if not progress:
                    trainer.remove_callback(PrinterCallback)
                trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
                resumed_from = 0
                if resume is not None:
                    resumed_from = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
                    log.info("%s: resuming from %s (step %d)", method, resume, resumed_from)
                start = time.perf_counter()
                trainer.train(resume_from_checkpoint=resume)
                seconds = time.perf_counter() - start
                deltas = adapter_deltas(peft_model, module_names)
                history = list(trainer.state.log_history)
                steps = int(trainer.state.global_step)
            finally:
                if peft_model is not None:
                    peft_model.unload()  # removes the adapter layers; never merges them into the weights
    if len(deltas) != len(targets):
        raise RuntimeError(f"{method}: {len(targets)} modules were targeted but {len(deltas)} adapters found")
    bad = [n for n, d in deltas.items() if not torch.isfinite(d).all()]
    if bad:
        last = next((e["loss"] for e in reversed(history) if "loss" in e), None)
        raise FloatingPointError(f"{method}: training diverged (last logged loss {last}); the adapter of {bad[0]} "
                                 f"holds NaN or inf. The model is untouched; lower lr.")
    run = LoRARun(deltas=deltas, log_history=history, steps=steps, resumed_from_step=resumed_from,
                  train_seconds=seconds, peak_rss_mb=_peak_rss_mb(), trainable_params=trainable)
    log.info("%s: %d steps (%d run now) in %.1fs, %d adapted weights, %d trainable params", method, steps,
             steps - resumed_from, seconds, len(deltas), trainable)
    return run


def fit_lora(
    method: Any,
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditInstance],
    rows: list[dict[str, Any]],
    *,
    trainer_class: type,
    config_class: type,
    config_kwargs: dict[str, Any],
    measure: Callable[[nn.Module], dict[str, Any]],
    summarize: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
    output_dir: str | Path | None = None,
    save_steps: int | None = None,
    progress: bool = False,
    arch: ArchMap | dict | None = None,
) -> EditResult:
    """The whole ``fit`` of a LoRA-trained method: ``measure`` scores the records on the model, then
    :func:`train_lora`, then the patch, then ``measure`` again with the patch applied;
    ``summarize(before, after)`` turns the two scores into the method's metrics."""
    hparams: LoRATrainConfig = method.hparams
    start = time.perf_counter()
    before = measure(model) if hparams.measure else {}
    measured = time.perf_counter() - start
    run = train_lora(method.name, model, tokenizer, records, rows, hparams, trainer_class=trainer_class,
                     config_class=config_class, config_kwargs=config_kwargs, output_dir=output_dir,
                     save_steps=save_steps, progress=progress, arch=arch)
    patch = Patch.from_deltas(model, run.deltas, method=method.name, hparams=hparams.to_dict())
    after: dict[str, Any] = {}
    if hparams.measure:
        mark = time.perf_counter()
        with patch.applied(model):
            after = measure(model)
        measured += time.perf_counter() - mark
    losses = run.losses()
    metrics: dict[str, Any] = {
        **summarize(before, after),
        "n_records": len(records),
        "steps": run.steps,
        "resumed_from_step": run.resumed_from_step,
        "train_loss_first": losses[0]["loss"] if losses else None,
        "train_loss_last": losses[-1]["loss"] if losses else None,
        "trainable_params": run.trainable_params,
        "adapted_weights": len(run.deltas),
        "train_seconds": round(run.train_seconds, 3),
        "peak_rss_mb": None if run.peak_rss_mb is None else round(run.peak_rss_mb, 1),
    }
    patch.metrics = metrics
    timings = {"train": run.train_seconds, "measure": measured, "fit": time.perf_counter() - start}
    return EditResult(method=method.name, patch=patch, losses=losses, metrics=metrics, timings=timings,
                      hparams=hparams.to_dict())
