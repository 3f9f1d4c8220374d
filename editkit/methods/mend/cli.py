"""``editkit train mend``: meta-train a MEND editor from the command line.

    editkit train mend --model default --data safeedit_train.json --out out/mend
    editkit edit --method mend --hparams mend.yaml ...   # the preset, with archive: out/mend

Rerunning the same command resumes from ``--out``/checkpoint. Validation records are either a file
of their own (``--val-data``) or held apart from ``--data`` by record id (every k-th id in sorted
order, ``--val-fraction``), and are never trained on.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_train_command(sub: argparse._SubParsersAction) -> None:
    """Add ``mend`` to the subcommands of ``editkit train``."""
    p = sub.add_parser("mend", help="meta-train a MEND editor (archive: safetensors + JSON tied to the model)")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--data", required=True, help="SafeEdit JSON/JSONL training records (the archive lists their "
                   "ids: score SafeEdit on other records), or zjunlp/SafeEdit online")
    p.add_argument("--split", default="train", help="hub split, when --data is zjunlp/SafeEdit")
    p.add_argument("--val-data", default=None, help="validation records (default: held apart from --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="without --val-data: this share of --data's "
                   "records (every k-th id in sorted order) is held apart for validation; 0: no validation")
    p.add_argument("--limit", type=int, default=None, help="use at most this many records of --data")
    p.add_argument("--hparams", default="smollm2-135m", help="YAML path or a preset name (editkit/presets/MEND/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (YAML value), e.g. --set steps=200; repeatable")
    p.add_argument("--out", required=True, help="run folder: checkpoint/ and archive/ (rerun to resume)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--overwrite", action="store_true", help="train anew over an archive whose checkpoint is gone")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run_train_mend)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """{key: value} from KEY=VALUE strings (values read as YAML: numbers, lists, null)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_train_mend(args: argparse.Namespace) -> int:
    import torch

    import editkit
    from editkit.methods.mend.training import hold_out, train
    from safeedit.dataset import load_safeedit

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    records = load_safeedit(args.data, split=args.split, limit=args.limit, require_generalization=False).instances
    if args.val_data:
        train_records, val_records = records, load_safeedit(args.val_data, split="validation",
                                                           require_generalization=False).instances
    else:
        train_records, val_records = hold_out(records, args.val_fraction)
    hparams = editkit.load_hparams("mend", args.hparams, **overrides(args.set))
    print(f"MEND meta-training: {len(train_records)} training and {len(val_records)} validation records, "
          f"up to {hparams.steps} steps; run folder {args.out}", flush=True)
    model, tokenizer = editkit.load_model(args.model, device=args.device)
    result = train(model, tokenizer, train_records, val_records, args.out, hparams=hparams, progress=True,
                   checkpoint_every=args.checkpoint_every, overwrite=args.overwrite)
    summary = {
        "archive": str(result.archive), "steps": result.steps, "resumed_from_step": result.resumed_from_step,
        "nan_steps": result.nan_steps, "stopped_early": result.stopped_early, "best_val_loss": result.best_val_loss,
        "train_seconds": round(result.train_seconds, 1), "peak_rss_mb": result.peak_rss_mb,
    }
    print(json.dumps(summary, indent=2))
    print(f"edit with it: editkit.edit(model, instance, method='mend', hparams={{'archive': '{Path(args.out)}'}})")
    return 0
