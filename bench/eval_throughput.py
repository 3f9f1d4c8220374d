"""SafeEdit evaluation throughput: cases per minute with batched generation vs one input at a time.

    python bench/eval_throughput.py --cases 3 --threads 1

For each case the five SafeEdit inputs (attack prompt and the four generalisation inputs) are
answered greedily with ``max_new_tokens`` new tokens, once batched (one ``editkit.generate`` call
over all inputs, ``--batch-size`` rows decoded together) and once one prompt per call, in the same
process; the responses must be identical up to batching noise, and the ratio of the two rates is
printed. For greedy decoding on a known architecture ``editkit.generate`` prefills each prompt
without padding (a long prefix shared with another prompt of the batch once) and decodes the batch
from one merged left-padded cache (editkit/generation/greedy_loop.py); a single prompt goes through
the same loop, which then does what ``model.generate`` does. The line "generation path" says which path ran.
"""
from __future__ import annotations

import argparse
import time

import torch

import editkit
from editkit.generation.greedy_loop import loop_blocker
from editkit.text import prompt_ids
from safeedit.dataset import load_safeedit, shared_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "safeedit" / "safeedit_dev.json"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = editkit.load_model(args.model)
    cases = load_safeedit(args.data, limit=args.cases).instances
    prompts = [p for c in cases for p in [c.prompt, *c.generalization.values()]]
    gen = dict(max_new_tokens=args.max_new_tokens)
    editkit.generate(model, tok, prompts[:1], max_new_tokens=4)  # warm-up

    start = time.perf_counter()
    batched = editkit.generate(model, tok, prompts, batch_size=args.batch_size, **gen)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = [editkit.generate(model, tok, [p], batch_size=1, **gen)[0] for p in prompts]
    t_single = time.perf_counter() - start

    same = sum(a == b for a, b in zip(batched, single))
    rate_b, rate_s = 60 * len(cases) / t_batched, 60 * len(cases) / t_single
    print(f"{len(cases)} cases x {len(prompts) // len(cases)} inputs, {args.max_new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"batched (batch {args.batch_size}): {rate_b:.2f} cases/min   one at a time: {rate_s:.2f} cases/min")
    print(f"batched / one-at-a-time throughput: {rate_b / rate_s:.2f}x  (target >= 2x)")
    longest = max(len(prompt_ids(tok, p)) for p in prompts) + args.max_new_tokens
    blocker = loop_blocker(model, {"do_sample": False, "eos_token_id": tok.eos_token_id}, longest)
    print("generation path: " + ("editkit's greedy loop" if blocker is None else f"model.generate ({blocker})"))
    print(f"identical responses: {same}/{len(prompts)} (the rest differ by batching's float noise)")


if __name__ == "__main__":
    main()
