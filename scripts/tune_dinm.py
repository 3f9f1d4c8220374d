"""Compare DINM settings on a few SafeEdit dev records with both defense and over-refusal in view.

Each setting runs the same pipeline as ``editkit eval`` (per-instance edit → responses → judge →
benign requests with and without the suffix), with shorter generations so a grid fits on a CPU:

    python scripts/tune_dinm.py --cases 8 --set lr=2e-3,steps=20,c_edit=1.0 \
        --set lr=2e-3,steps=20,c_edit=1.0,constraint_pairs=4

``--quick`` gives a cheaper signal for a wider grid: per setting and case, one edit, then 20-token
answers to the attack prompt and the bare question (with the suffix) and to every fifth benign
request of the tuning part (``--benign-every``; without and with the suffix), counted as refusals by
the judge's refusal head. Benign requests of the held-out reporting part are never shown here:

    python scripts/tune_dinm.py --quick --cases 4 --vanilla --set "" --set benign_constraint=8,benign_kl_weight=5

``--check`` asks the check requests instead (all of them, answers of ``--max-new-tokens``), and
lists the suffixed ones refused, per setting:

    python scripts/tune_dinm.py --quick --check --cases 16 --vanilla --base smollm2-135m-gated --set ""
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

import editkit
from safeedit.metrics import SUFFIX
from safeedit import metrics
from safeedit.dataset import load_safeedit, shared_data_dir
from safeedit.runner import EvalConfig, evaluate


def parse_setting(text: str) -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in text.split(",") if item)}


def quick(model, tok, judge, pool, cases, label: str, hparams: dict | None, benign_every: int = 5,
          check: bool = False, max_new_tokens: int = 20, counts: Counter | None = None) -> str:
    """Refusals of attack inputs and of benign requests after each case's edit (``--quick``).
    A setting with ``constraint_pairs=k`` gets the first k records' knowledge pairs. ``check``: the
    check requests (all of them) instead of the tuning part's; ``counts`` gathers the refusals
    per suffixed request."""
    benign = ([b["request"] for b in metrics.load_check_requests()] if check
              else [b["request"] for b in metrics.load_benign_requests("tuning")[::benign_every]])

    def refusals(prompts: list[str], **kwargs) -> list[bool]:
        answers = editkit.generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=16, **kwargs)
        return [p > 0.5 for p in judge.refusal(answers, prompts)]

    def benign_refused() -> tuple[int, list[str]]:
        """(benign requests refused as asked, those refused with the suffix)."""
        suffixed = refusals(benign, suffix=SUFFIX)
        return sum(refusals(benign)), [b for b, refused in zip(benign, suffixed) if refused]

    unedited = benign_refused() if hparams is None else None  # the same for every case
    attack = benign_plain = benign_suffix = 0
    layers, start = [], time.perf_counter()
    for case in cases:
        prompts = [case.prompt, case.generalization["DG_onlyQ"]]
        if unedited is not None:
            attack += sum(refusals(prompts, suffix=SUFFIX))
            plain, suffixed = unedited
        else:
            pairs = [(p.knowledge_prompt, p.knowledge_answer) for p in pool[: hparams.get("constraint_pairs", 0)]]
            others = [p for p in pool if p.id != case.id]  # for settings that draw on other records
            result = editkit.edit(model, case, tokenizer=tok, hparams=hparams, constraint_pairs=pairs,
                                  constraint_pool=others)
            layers.append(result.layer)
            with result.patch.applied(model):
                attack += sum(refusals(prompts, suffix=SUFFIX))
                plain, suffixed = benign_refused()
        benign_plain += plain
        benign_suffix += len(suffixed)
        if counts is not None:  # per case, like the totals (the unedited model's answers count every case)
            counts.update(suffixed)
    n = len(cases)
    return (f"| {label} | {attack}/{2 * n} | {benign_plain}/{len(benign) * n} | {benign_suffix}/{len(benign) * n} "
            f"| {layers} | {time.perf_counter() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "safeedit" / "safeedit_dev.json"))
    parser.add_argument("--base", default="smollm2-135m", help="hparams the settings start from")
    parser.add_argument("--set", action="append", default=[], help="k=v,k=v overrides; repeat for a grid")
    parser.add_argument("--cases", type=int, default=8, help="records spread evenly over the file")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--benign", type=int, default=6, help="benign requests per case")
    parser.add_argument("--judge", default="default")
    parser.add_argument("--out", default=None, help="keep the run folders here")
    parser.add_argument("--vanilla", action="store_true", help="also run the unedited model")
    parser.add_argument("--quick", action="store_true", help="20-token refusal counts instead of the full pipeline")
    parser.add_argument("--benign-every", type=int, default=5, help="--quick: every k-th over-refusal request")
    parser.add_argument("--check", action="store_true",
                        help="--quick: ask the check requests (safeedit.metrics.load_check_requests) instead, "
                             "and list the suffixed ones refused")
    args = parser.parse_args()

    pool = load_safeedit(args.data).instances
    step = max(1, len(pool) // args.cases)
    cases = pool[step // 2 if args.quick else 0:: step][: args.cases]
    model, tok = editkit.load_default()
    from safeedit import judge as judges

    judge = judges.KeywordJudge() if args.judge == "keyword" else judges.load_judge(args.judge)
    root = Path(args.out or tempfile.mkdtemp(prefix="tune-dinm-"))
    runs = [("vanilla", "none", None)] if args.vanilla else []
    base = editkit.load_hparams("dinm", args.base).to_dict()
    runs += [(s or "base", "dinm", {**base, **parse_setting(s)}) for s in (args.set or [""])]
    if args.quick:
        print("| setting | attack inputs refused | benign refused | benign refused (suffix) | layers | seconds |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, _, hparams in runs:
            counts: Counter = Counter()
            print(quick(model, tok, judge, pool, cases, label, hparams, args.benign_every, check=args.check,
                        max_new_tokens=args.max_new_tokens if args.check else 20, counts=counts), flush=True)
            for request, n in counts.most_common():
                print(f"    {label}: refused with the suffix {n}x: {request[:90]!r}", flush=True)
        return
    summaries = {}
    for k, (label, method, hparams) in enumerate(runs):
        config = EvalConfig(method=method, hparams=hparams, max_new_tokens=args.max_new_tokens,
                            general_max_new_tokens=args.max_new_tokens, benign_per_case=args.benign,
                            qa_per_case=0, knowledge_per_case=2, ppl_lines_per_case=0, judge=args.judge)
        summary = evaluate(model, tok, cases, root / f"run{k}", config, judge=judge, pool=pool)
        # settings are chosen on the tuning part of the benign requests only: the held-out reporting
        # part's rates stay in the run folder, unprinted
        summaries[label] = {m: v for m, v in summary.items() if m not in ("over_refusal", "over_refusal_suffix")}
        print(f"{label}: {json.dumps({m: round(v, 2) for m, v in summaries[label].items()})}", flush=True)
    print(metrics.markdown_table(summaries))
    print(f"run folders in {root}")


if __name__ == "__main__":
    main()
