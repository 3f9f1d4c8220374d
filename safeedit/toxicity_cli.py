"""``editkit detox-eval`` and ``editkit detox-eval-report``: toxicity evaluation from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detox-eval", help="toxicity of sampled continuations (RealToxicityPrompts protocol): expected "
                       "maximum toxicity, toxicity probability, perplexity, distinct-n, over-refusal")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub name")
    p.add_argument("--device", default=None)
    p.add_argument("--prompts", required=True, help="a JSONL file ('prompt', 'prompt.text' or 'text' per record), "
                   "safeedit[:PATH], toxigen[:hate|neutral|all[:PATH]] or allenai/real-toxicity-prompts[:challenging] (online)")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--detoxifier", default=None, help="a registered decoding-time detoxifier (editkit.decoding."
                   "list_detoxifiers(): dexperts, ...)")
    p.add_argument("--detoxifier-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the detoxifier, e.g. anti_expert=PATH alpha=2.0; repeatable")
    p.add_argument("--patch", default=None, help="a saved patch folder applied around generation")
    p.add_argument("--label", default=None, help="the run's name in tables and plots (default: patch/detoxifier)")
    p.add_argument("--k", type=int, default=25, help="samples per prompt (RealToxicityPrompts: 25)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut (nucleus sampling only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default="default", help="'default' (offline judge), 'keyword', or an HF classifier path/hub name")
    p.add_argument("--score-with-prompt", default="auto", choices=["auto", "yes", "no"],
                   help="give the scorer the prompt too (auto: for requests such as SafeEdit, not for continuations)")
    p.add_argument("--chat-template", default=None, choices=["auto", "none", "raw"],
                   help="default per prompt source: raw (the text continued as it stands) for continuations, auto for SafeEdit requests")
    p.add_argument("--ref-model", default=None, help="perplexity reference model (default: the generating model "
                   "without the patch or detoxifier)")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts (of --fold, when given)")
    p.add_argument("--fold", default=None, metavar="K/N", help="SafeEdit and ToxiGen prompts: only fold K of N, the "
                   "prompts a detoxifier trained with `editkit train ... --exclude-fold K/N` never saw")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--no-benign", action="store_true", help="skip the over-refusal check on benign requests")
    p.add_argument("--speed-prompts", type=int, default=4, help="with --patch or --detoxifier: decode the first N "
                   "prompts again with it and plainly, interleaved, for the decoding-speed ratio (0: skip)")
    p.add_argument("--compare", action="append", default=[], metavar="RUN",
                   help="a finished run folder drawn beside this run in OUT/compare/ (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run_detox_eval)

    p = sub.add_parser("detox-eval-report", help="one table and one toxicity-vs-perplexity plot over detox-eval runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_detox_report)


def detoxifier_class(name: str | None) -> Any:
    """The class registered as ``name`` (None for None): checked before the model loads."""
    if name is None:
        return None
    from editkit.decoding import get_detoxifier

    return get_detoxifier(name)


def run_detox_eval(args: argparse.Namespace) -> int:
    import editkit
    from safeedit.toxicity import evaluate_toxicity, load_prompts, report

    try:
        chosen = detoxifier_class(args.detoxifier)  # before the model: a bad name or spec fails fast
        from editkit.decoding import parse_options

        options = parse_options(args.detoxifier_opt)
        prompts = load_prompts(args.prompts, limit=args.limit, fold=args.fold)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        model, tok = editkit.load_model(args.model, device=args.device)
        ref, ref_tok = editkit.load_model(args.ref_model, device=args.device) if args.ref_model else (None, None)
        detoxifier = chosen.from_options(model, tok, **options) if chosen is not None else None
        summary = evaluate_toxicity(
            model, tok, prompts, args.out, k=args.k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, scorer=args.scorer,
            score_with_prompt={"auto": None, "yes": True, "no": False}[args.score_with_prompt],
            chat_template=args.chat_template, ref_model=ref, ref_tokenizer=ref_tok, intervention=args.patch,
            detoxifier=detoxifier, label=args.label, benign_check=not args.no_benign, batch_size=args.batch_size,
            speed_prompts=args.speed_prompts,
        )
    except NotImplementedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "by_group"}, indent=2))
    if args.compare:
        print(report([args.out, *args.compare], Path(args.out) / "compare"))
    return 0


def run_detox_report(args: argparse.Namespace) -> int:
    from safeedit.toxicity import report

    print(report(args.runs, args.out))
    print(f"written to {args.out}/: " + ", ".join(sorted(p.name for p in Path(args.out).iterdir() if p.is_file())))
    return 0
