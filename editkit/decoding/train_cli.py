"""``editkit train detoxigen | anti-expert | calibration``: the learnt parts of the decoding-time
detoxifiers, trained on the shared data from the command line.

    editkit train detoxigen   --exclude-fold 0/2 --out out/detoxigen     # soft prompt on toxic text
    editkit train anti-expert --exclude-fold 0/2 --out out/anti-expert   # the model fine-tuned on toxic text
    editkit train calibration --exclude-fold 0/2 --out out/calibration   # fine-tuned on non-toxic text + alignment
    editkit detox-eval --fold 0/2 --prompts toxigen:hate --detoxifier detoxigen \\
        --detoxifier-opt prompt=out/detoxigen/prompt --out runs/tox-detoxigen

Texts: the toxic (SafeEdit unsafe generations, ToxiGen hate sentences) or non-toxic (safe
generations, neutral sentences) texts of ``--data-dir`` (default: the shared data). With
``--exclude-fold K/N`` every text of fold K is left out (:func:`safeedit.toxicity_prompts.fold_texts`),
so ``detox-eval --fold K/N`` scores the detoxifier on prompts it never saw. Each command writes its
artifact under ``--out``, ``train.json`` (settings, data, losses, seconds, peak memory) and prints the
``--detoxifier-opt`` to use it with. ``detoxigen`` resumes from ``--out/run`` when rerun.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser, texts: str) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub name: the generator")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--data-dir", default=None, help=f"the shared-data folder the {texts} texts come from "
                   "(default: $EDITKIT_SHARED_DATA or ../shared/data)")
    p.add_argument("--sources", default="safeedit,toxigen", help="comma-separated: safeedit, toxigen")
    p.add_argument("--exclude-fold", default=None, metavar="K/N",
                   help="leave out every text of fold K of N, to score with `detox-eval --fold K/N`")
    p.add_argument("--limit", type=int, default=None, help="train on at most this many texts")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the trainer's)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the trainer's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact already in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_detoxigen_command(sub: argparse._SubParsersAction) -> None:
    """``editkit train detoxigen``."""
    p = sub.add_parser("detoxigen", help="prompt-tune DetoxiGen's soft prompt on toxic text (resumable)")
    _common(p, "toxic")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the texts (--steps overrides)")
    p.add_argument("--n-virtual-tokens", type=int, default=20)
    p.set_defaults(func=run_train_detoxigen)


def add_anti_expert_command(sub: argparse._SubParsersAction) -> None:
    """``editkit train anti-expert``."""
    p = sub.add_parser("anti-expert", help="fine-tune a copy of the model on toxic text: DExperts' anti-expert")
    _common(p, "toxic")
    p.set_defaults(func=run_train_anti_expert)


def add_calibration_command(sub: argparse._SubParsersAction) -> None:
    """``editkit train calibration``."""
    p = sub.add_parser("calibration", help="fine-tune a calibration model on non-toxic text and train its "
                       "alignment to the generator")
    _common(p, "non-toxic")
    p.add_argument("--calibration-model", default=None, help="the small model to fine-tune (default: --model); "
                   "it must share the generator's tokenizer")
    p.add_argument("--alignment-steps", type=int, default=0,
                   help="InfoNCE steps after the Procrustes start (default 0: the closed-form map, which kept the "
                   "fused text sound on the default model where 500 steps did not)")
    p.add_argument("--alignment-init", choices=("procrustes", "random"), default="procrustes",
                   help="the alignment's start: the orthogonal map between the embedding tables (default) or random")
    p.set_defaults(func=run_train_calibration)


def _start(args: argparse.Namespace, *, toxic: bool) -> tuple[list[str], dict[str, Any]]:
    """(texts, what train.json records of them) — checked before any model loads."""
    import torch

    from editkit.decoding.calibration_train import non_toxic_texts
    from editkit.decoding.detoxigen_train import load_toxic_texts
    from safeedit.dataset import shared_data_dir
    from safeedit.toxicity_prompts import parse_fold

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fold = parse_fold(args.exclude_fold) if args.exclude_fold else None
    data = Path(args.data_dir) if args.data_dir else shared_data_dir()
    if not data.is_dir():
        raise FileNotFoundError(f"shared data folder not found: {data} (--data-dir or EDITKIT_SHARED_DATA)")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if toxic:
        texts = load_toxic_texts(data, sources=sources, limit=args.limit, exclude_fold=fold)
    else:
        texts = non_toxic_texts(data, sources, exclude_fold=fold)[: args.limit]
    if not texts:
        raise ValueError("no texts to train on")
    kind = "toxic" if toxic else "non-toxic"
    print(f"{len(texts)} {kind} texts from {', '.join(sources)}"
          + (f", fold {fold[0]}/{fold[1]} left out" if fold else ""), flush=True)
    info = {"texts": len(texts), "kind": kind, "sources": sources, "data_dir": str(data),
            "exclude_fold": f"{fold[0]}/{fold[1]}" if fold else None}
    return texts, info


def _write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "train.json")


def _trainer_settings(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """The trainer's keyword arguments the user set (``names``: argument → keyword)."""
    return {kw: getattr(args, arg) for arg, kw in names.items() if getattr(args, arg) is not None}


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def run_train_detoxigen(args: argparse.Namespace) -> int:
    import editkit
    from editkit.decoding.detoxigen_train import train_detoxigen_prompt

    out = Path(args.out)
    _refuse_existing(out / "prompt", args.overwrite)
    texts, info = _start(args, toxic=True)
    model, tokenizer = editkit.load_model(args.model, device=args.device)
    settings = _trainer_settings(args, lr="lr", steps="max_steps")
    prompt = train_detoxigen_prompt(model, tokenizer, texts, n_virtual_tokens=args.n_virtual_tokens,
                                    epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                                    seed=args.seed, output_dir=out / "run", progress=True, **settings)
    prompt.save(out / "prompt", overwrite=args.overwrite)
    metrics = {k: v for k, v in prompt.metrics.items() if k != "train_losses"}
    _write_report(out, {"artifact": "detoxigen soft prompt", "data": info, "settings": prompt.settings,
                        "metrics": metrics, "train_losses": prompt.metrics.get("train_losses")})
    print(json.dumps(metrics, indent=2))
    print(f"use it: --detoxifier detoxigen --detoxifier-opt prompt={out / 'prompt'}")
    return 0


def _fine_tune(args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str], desc: str) -> Any:
    from editkit.decoding.calibration_train import fine_tune_copy

    settings = _trainer_settings(args, lr="lr", steps="steps")
    return fine_tune_copy(model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length,
                          seed=args.seed, progress=True, desc=desc, **settings)


def _run_summary(run: Any) -> dict[str, Any]:
    return {"steps": run.steps, "loss_first": run.losses[0], "loss_last": run.losses[-1],
            "loss_last_10_mean": sum(run.losses[-10:]) / len(run.losses[-10:]),
            "train_seconds": round(run.seconds, 1),
            "peak_rss_mb": None if run.peak_rss_mb is None else round(run.peak_rss_mb, 1)}


def run_train_anti_expert(args: argparse.Namespace) -> int:
    import editkit

    out = Path(args.out)
    _refuse_existing(out / "model", args.overwrite)
    texts, info = _start(args, toxic=True)
    model, tokenizer = editkit.load_model(args.model, device=args.device)
    run = _fine_tune(args, model, tokenizer, texts, "anti-expert")
    editkit.save_checkpoint(run.model, tokenizer, out / "model", overwrite=args.overwrite)
    summary = _run_summary(run)
    _write_report(out, {"artifact": "DExperts anti-expert (the model fine-tuned on toxic text)", "data": info,
                        "settings": {"lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
                                     "max_length": args.max_length, "seed": args.seed},
                        "metrics": summary, "train_losses": run.losses})
    print(json.dumps(summary, indent=2))
    print(f"use it: --detoxifier dexperts --detoxifier-opt anti_expert={out / 'model'}")
    return 0


def run_train_calibration(args: argparse.Namespace) -> int:
    import editkit
    from editkit.decoding.calibration import vocabulary_digest
    from editkit.decoding.calibration_train import train_alignment

    out = Path(args.out)
    for part in ("model", "alignment"):
        _refuse_existing(out / part, args.overwrite)
    texts, info = _start(args, toxic=False)
    target, tokenizer = editkit.load_model(args.model, device=args.device)
    if args.calibration_model:
        small, small_tokenizer = editkit.load_model(args.calibration_model, device=args.device)
        if vocabulary_digest(small_tokenizer) != vocabulary_digest(tokenizer):
            raise ValueError(f"{args.calibration_model}: its tokenizer's vocabulary is not the generator's; "
                             "calibration fusion needs one shared tokenizer")
    else:
        small, small_tokenizer = target, tokenizer
    run = _fine_tune(args, small, small_tokenizer, texts, "calibration model")
    started = time.perf_counter()
    alignment = train_alignment(target, run.model, tokenizer, small_tokenizer, steps=args.alignment_steps,
                                init=args.alignment_init, seed=args.seed, progress=True)
    align_seconds = time.perf_counter() - started
    editkit.save_checkpoint(run.model, small_tokenizer, out / "model", overwrite=args.overwrite)
    alignment.save(out / "alignment", overwrite=args.overwrite)
    summary = {**_run_summary(run), "alignment_seconds": round(align_seconds, 1),
               "alignment": {k: v for k, v in alignment.metrics.items() if isinstance(v, (int, float))}}
    _write_report(out, {"artifact": "calibration model (fine-tuned on non-toxic text) and its alignment",
                        "data": info, "settings": {"lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
                                                   "max_length": args.max_length, "seed": args.seed,
                                                   "alignment_steps": args.alignment_steps,
                                                   "alignment_init": args.alignment_init,
                                                   "calibration_model": args.calibration_model or args.model},
                        "metrics": summary, "train_losses": run.losses})
    print(json.dumps(summary, indent=2))
    print(f"use it: --detoxifier calibration --detoxifier-opt calibration={out / 'model'} "
          f"--detoxifier-opt alignment={out / 'alignment'}")
    return 0

