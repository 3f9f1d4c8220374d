"""``editkit eval`` and ``editkit report``: the SafeEdit benchmark from the command line."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="SafeEdit evaluation of a method (or the vanilla model) over a data file")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--method", default="none", help="'none' (vanilla) or a registered editing method; a dataset-scope "
                   "method, or MEND without an archive, is scored by cross-fitting (--folds)")
    p.add_argument("--hparams", default=None, help="method settings: YAML path or a preset name (editkit/presets/<METHOD>/)")
    p.add_argument("--patch", default=None, help="a saved patch applied for every case (instead of --method)")
    p.add_argument("--folds", type=int, default=2, help="cross-fitted methods: k-fold cross-fitting by record id")
    p.add_argument("--detoxifier", default=None, help="a decoding-time detoxifier on every generation, alone or on "
                   "top of --method/--patch (editkit.decoding.list_detoxifiers())")
    p.add_argument("--detoxifier-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the detoxifier, e.g. anti_expert=PATH; repeatable")
    p.add_argument("--fold", type=int, default=None, help="cross-fitted methods: score only the records of this fold "
                   "(one process per fold trains one model or editor each; instead of --shard)")
    p.add_argument("--data", default=None, help="SafeEdit JSON/JSONL file or zjunlp/SafeEdit (default: the shared dev records)")
    p.add_argument("--split", default="test", help="hub split")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--mode", default="per-instance", choices=["per-instance", "sequential"])
    p.add_argument("--suffix", default="auto", choices=["auto", "on", "off"], help="auto: as the method prescribes")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--ids", default=None, help="comma-separated record ids")
    p.add_argument("--shard", default=None, help="i/n: this process takes every n-th case from i")
    p.add_argument("--judge", default="default", help="'default' (offline), 'keyword', or a classifier path/hub name")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores shared out among "
                   "the n processes of --shard i/n or --fold, else torch's choice)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("rejudge", help="score a finished run's stored responses again with another judge")
    p.add_argument("run")
    p.add_argument("--judge", default="default")
    p.add_argument("--data", default=None, help="the SafeEdit file the run used (default: the shared dev records)")
    p.set_defaults(func=run_rejudge)

    p = sub.add_parser("reask-benign", help="ask a finished vanilla run the benign requests again, from the current "
                       "set (after requests were added), and rewrite its over-refusal")
    p.add_argument("run")
    p.add_argument("--model", default="default", help="the model the run used")
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=None, help="the SafeEdit file the run used (default: the shared dev records)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run_reask_benign)

    p = sub.add_parser("report", help="one table and plots over finished run folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_report)

    p = sub.add_parser("refusals", help="which benign requests finished runs refused: per request, refused without "
                       "and with the suffix, and asked, side by side")
    p.add_argument("runs", nargs="+")
    p.add_argument("--part", default="reporting", choices=["reporting", "tuning"],
                   help="the part of the benign requests (tune on the tuning part only)")
    p.set_defaults(func=run_refusals)

    from safeedit.toxicity_cli import add_commands as add_toxicity_commands  # detox-eval, detox-eval-report

    add_toxicity_commands(sub)


def run_eval(args: argparse.Namespace) -> int:
    import editkit
    from safeedit.dataset import dev_records_path, load_safeedit, parse_shard
    from safeedit.runner import EvalConfig, evaluate

    data = args.data or str(dev_records_path())
    pool = load_safeedit(data, split=args.split, skip_invalid=args.skip_invalid)
    if pool.skipped:
        print(f"skipped {pool.skipped} malformed record(s)")
    cases = pool.instances
    if args.ids:  # the pool stays whole: a case draws the same other-case pairs as in a full run
        cases = load_safeedit(data, split=args.split, ids=[i.strip() for i in args.ids.split(",")],
                              skip_invalid=args.skip_invalid).instances
    shard = parse_shard(args.shard)
    cases = cases[shard[0]:: shard[1]] if shard else cases
    if args.fold is not None:
        from editkit.interventions import folds_by_id

        if shard is not None or not 0 <= args.fold < args.folds:
            raise ValueError(f"--fold takes 0..{args.folds - 1} and replaces --shard")
        folds = folds_by_id(pool.instances, args.folds)
        cases = [c for c in cases if folds[c.id] == args.fold]
        shard = (args.fold, args.folds)  # its own cases file, beside the other folds
    cases = cases[: args.limit] if args.limit is not None else cases
    config = EvalConfig(method=args.method, hparams=args.hparams, mode=args.mode, suffix=args.suffix,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge=args.judge,
                        patch=args.patch, folds=args.folds)
    threads = args.threads or (cpu_share(shard[1]) if shard is not None else None)
    if threads:  # parallel shards each at torch's default would oversubscribe the cores
        import torch

        torch.set_num_threads(threads)
    intervention = None
    if args.detoxifier:
        from editkit.decoding import get_detoxifier, parse_options

        detoxifier_class, options = get_detoxifier(args.detoxifier), parse_options(args.detoxifier_opt)
    model, tok = editkit.load_model(args.model, device=args.device)
    if args.detoxifier:
        from editkit.interventions import Decoding
        from safeedit.runner import intervention_for

        intervention = Decoding(detoxifier_class.from_options(model, tok, **options), intervention_for(config))
    summary = evaluate(model, tok, cases, args.out, config, pool=pool.instances, shard=shard, intervention=intervention)
    print((Path(args.out) / "table.md").read_text())
    print(json.dumps(summary, indent=2))
    return 0


def cpu_share(processes: int) -> int:
    """Threads per process when ``processes`` run side by side on this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def run_rejudge(args: argparse.Namespace) -> int:
    from safeedit.dataset import dev_records_path, load_safeedit
    from safeedit.judge import load_judge
    from safeedit.runner import rejudge

    data = args.data or str(dev_records_path())
    summary = rejudge(args.run, load_judge(args.judge), load_safeedit(data).instances, judge_spec=args.judge)
    print((Path(args.run) / "table.md").read_text())
    print(json.dumps(summary, indent=2))
    return 0


def run_reask_benign(args: argparse.Namespace) -> int:
    import editkit
    from safeedit.dataset import dev_records_path, load_safeedit
    from safeedit.runner import reask_benign

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = args.data or str(dev_records_path())
    instances = load_safeedit(data).instances
    model, tok = editkit.load_model(args.model, device=args.device)
    summary = reask_benign(args.run, model, tok, instances)
    print((Path(args.run) / "table.md").read_text())
    print(json.dumps(summary, indent=2))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from safeedit.report import build_report

    print(build_report(args.runs, args.out))
    print(f"written to {args.out}/: " + ", ".join(sorted(p.name for p in Path(args.out).iterdir() if p.is_file())))
    return 0


def run_refusals(args: argparse.Namespace) -> int:
    from safeedit.report import refusal_table

    print(refusal_table(args.runs, args.part), end="")
    return 0
