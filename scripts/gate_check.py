"""How well DINM's harmfulness gate separates harmful from benign inputs, held out.

The gate (``editkit.methods.dinm.gate``) is fitted on the records of one fold of the 100 dev
records (2-fold by record id, as the cross-fitted methods are scored) and read on the test inputs of
the other fold's records whose question no record of the first fold shares, and on the authored
benign requests of the **tuning part** and the check requests (``safeedit.metrics.load_check_requests``;
the reporting part is never shown here). For each layer and
each L2 strength ``C`` it prints the share of inputs whose gate at the prompt's last token is above
0.5 (and above 0.9): benign requests without and with the suffix (false openings), the other fold's
bare questions (DG_onlyQ) with and without the suffix and its other-attack inputs (DG_otherA,
DG_otherAQ) with the suffix (recall). ``--positions`` also prints the mean gate over every other
token of those prompts and over the tokens of the unedited model's answers (``--answer-tokens``,
20), and how many prompts have such a token above 0.1, for the gate shifted by the first margin and
sharpened by ``--sharpness`` (the gate reads every token, so it must stay shut there on benign text).

    python scripts/gate_check.py --layers 13 29 --c 1 0.1 0.01 0.001
    python scripts/gate_check.py --layers 13 29 --positions
    python scripts/gate_check.py --layers 13 --test-inputs
    python scripts/gate_check.py --layers 13 --test-inputs --margins 0 0.25 0.5 1   # harm_gate_margin
    python scripts/gate_check.py --layers 13 --test-inputs --figurative --margins 0 0.25 --open
    python scripts/gate_check.py --layers 13 --test-inputs --figurative --margins 0.25 --sharpness 4 \
        --positions --answer-tokens 48 [--opening] [--answers 48]   # the sixth version's gate, per token
"""
from __future__ import annotations

import argparse

import torch

import editkit
from editkit.arch import decoder_layers, get_module, resolve_arch
from editkit.instance import EditInstance
from editkit.interventions import folds_by_id
from editkit.methods.dinm import gate
from editkit.methods.dinm.nullspace import render
from editkit.text import prompt_ids, with_suffix
from safeedit.dataset import load_safeedit, shared_data_dir
from safeedit.metrics import SUFFIX, load_benign_requests, load_check_requests

# an instance that shares no text with any record: the fold's whole pool is used
NOBODY = EditInstance(id="-", prompt="-", safe="-", unsafe="-", knowledge_prompt="-", knowledge_answer="-")


def token_gates(model, tok, arch, layer: int, fitted: gate.Gate, prompts: list[str],
                answer_tokens: int = 20) -> dict[str, float]:
    """The gate over each prompt's tokens before the last and over the unedited model's answer's
    tokens: the means over all those tokens, and the share of prompts with one such token above 0.1."""
    answers = editkit.generate(model, tok, prompts, max_new_tokens=answer_tokens, batch_size=16)
    module = get_module(decoder_layers(model, arch)[layer], arch.mlp_out)
    body, answer, body_max, answer_max = [], [], [], []
    for prompt, text in zip(prompts, answers):
        ids = prompt_ids(tok, prompt, "auto")
        full = ids + tok(text, add_special_tokens=False).input_ids
        seen = []
        handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0][0].detach().float()))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([full]))
        finally:
            handle.remove()
        g = fitted(seen[0])
        body.append(g[: len(ids) - 1])
        answer.append(g[len(ids):])
        body_max.append(float(g[: len(ids) - 1].max()))
        answer_max.append(float(g[len(ids):].max()) if len(full) > len(ids) else 0.0)
    return {"body": float(torch.cat(body).mean()), "answer": float(torch.cat(answer).mean()),
            "body_open": sum(m > 0.1 for m in body_max) / len(prompts),
            "answer_open": sum(m > 0.1 for m in answer_max) / len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(shared_data_dir() / "safeedit" / "safeedit_dev.json"))
    parser.add_argument("--layers", type=int, nargs="+", default=[13, 29])
    parser.add_argument("--c", type=float, nargs="+", default=[0.1])
    parser.add_argument("--positions", action="store_true", help="also the mean gate on other tokens and answers")
    parser.add_argument("--sharpness", type=float, default=1.0,
                        help="--positions: read the gate sharpened by this (harm_gate_sharpness), shifted by the "
                             "first of --margins")
    parser.add_argument("--answer-tokens", type=int, default=20, help="--positions: the unedited model's answers' length")
    parser.add_argument("--max-negatives", type=int, default=gate.MAX_NEGATIVES,
                        help="benign token keys the probe is fitted on (a fixed draw beyond that)")
    parser.add_argument("--margins", type=float, nargs="+", default=None,
                        help="also the share of each input group with probe logit w·k + b above each margin "
                             "(harm_gate_margin: the gate is sigmoid(s·(w·k + b - margin)))")
    parser.add_argument("--test-inputs", action="store_true",
                        help="fit with the fold's generalization inputs among the harmful examples (harm_gate_test_inputs)")
    parser.add_argument("--open", action="store_true",
                        help="also list the tuning-part requests whose probe logit clears the smallest margin (0 without --margins)")
    parser.add_argument("--figurative", action="store_true",
                        help="fit with the figurative gate requests among the benign examples (harm_gate_figurative)")
    parser.add_argument("--opening", action="store_true",
                        help="the tokens every prompt opens with as a group of negatives of their own (harm_gate_opening)")
    parser.add_argument("--answers", type=int, default=0,
                        help="the unedited model's answers of this many tokens after the authored benign requests (harm_gate_answers)")
    parser.add_argument("--everyday", action="store_true",
                        help="fit with the everyday gate requests among the benign examples (harm_gate_everyday)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pool = load_safeedit(args.data).instances
    folds = folds_by_id(pool, 2)
    fit_on = [r for r in pool if folds[r.id] == 1]
    # read on the other fold's records whose question no fitting record shares (records share
    # questions, and an edit's own probe never sees its question: see gate.gate_texts)
    seen = {gate.normal_text(r.question) for r in fit_on}
    test = [r for r in pool if folds[r.id] == 0 and gate.normal_text(r.question) not in seen]
    harmful, benign = gate.gate_texts(NOBODY, fit_on, test_inputs=args.test_inputs, figurative=args.figurative,
                                      everyday=args.everyday)
    requests = [r["request"] for r in load_benign_requests("tuning")]
    checks = [r["request"] for r in load_check_requests()]
    inputs = {
        "benign": requests,
        "benign+s": [with_suffix(p, SUFFIX) for p in requests],
        "check": checks,
        "check+s": [with_suffix(p, SUFFIX) for p in checks],
        "onlyQ+s": [with_suffix(r.generalization["DG_onlyQ"], SUFFIX) for r in test],
        "onlyQ": [r.generalization["DG_onlyQ"] for r in test],
        "otherA+s": [with_suffix(r.generalization["DG_otherA"], SUFFIX) for r in test],
        "otherAQ+s": [with_suffix(r.generalization["DG_otherAQ"], SUFFIX) for r in test],
    }
    model, tok = editkit.load_default()
    arch = resolve_arch(model)
    rendered = render(tok, requests, chat_template="auto", max_length=2048)
    opening_len = gate.shared_opening(rendered)
    print(f"fitted on fold 1 ({len(fit_on)} records: {len(harmful)} harmful prompts, {len(benign)} benign texts); "
          f"read on fold 0 ({len(test)} records), the {len(requests)} tuning-part benign requests and the "
          f"{len(checks)} check requests")
    print("| layer | C | " + " | ".join(f"{name} > 0.5 | > 0.9" for name in inputs) + " |")
    print("| --- | --- | " + " | ".join("---: | ---:" for _ in inputs) + " |")
    for layer in args.layers:
        keys = {name: gate.last_keys(model, tok, arch, layer, prompts, chat_template="auto", max_length=2048)
                for name, prompts in inputs.items()}
        for c in args.c:
            fitted = gate.fit_gate(model, tok, arch, layer, harmful, benign, suffix=SUFFIX, chat_template="auto",
                                   max_length=2048, c=c, max_negatives=args.max_negatives, opening=args.opening,
                                   answers=args.answers)
            shares = [f"{float((fitted(k) > 0.5).float().mean()):.3f} | {float((fitted(k) > 0.9).float().mean()):.3f}"
                      for k in keys.values()]
            print(f"| {layer} | {c:g} | " + " | ".join(shares) + " |", flush=True)
            logits = {name: k.float() @ fitted.weight + fitted.bias for name, k in keys.items()}
            head = gate.sequence_keys(model, tok, arch, layer, rendered[:1], last_only=False)[0][:opening_len]
            z = head.float() @ fitted.weight + fitted.bias
            print(f"    layer {layer}, C {c:g}, the {opening_len} tokens every prompt opens with: highest logit "
                  f"{float(z.max()):.2f} (token {int(z.argmax())})", flush=True)
            for margin in args.margins or ():
                print(f"    layer {layer}, C {c:g}, logit > {margin:g}: " + ", ".join(
                    f"{name} {float((z > margin).float().mean()):.3f}" for name, z in logits.items()), flush=True)
            if args.open:
                floor = min(args.margins or [0.0])
                for name in ("benign", "benign+s", "check", "check+s"):
                    for text, z in sorted(zip(inputs[name], logits[name].tolist()), key=lambda p: -p[1]):
                        if z > floor:
                            print(f"    layer {layer}, C {c:g}, {name} logit {z:.2f}: {text[:100]!r}", flush=True)
            if args.positions:
                read = fitted.shifted((args.margins or [0.0])[0]).sharpened(args.sharpness)
                for name in ("benign", "benign+s", "check+s", "onlyQ+s"):
                    t = token_gates(model, tok, arch, layer, read, inputs[name], args.answer_tokens)
                    print(f"    layer {layer}, C {c:g}, {name}: mean gate on other prompt tokens {t['body']:.3f} "
                          f"(a token above 0.1 in {t['body_open']:.2f} of the prompts), on answer tokens "
                          f"{t['answer']:.3f} (above 0.1 in {t['answer_open']:.2f})", flush=True)


if __name__ == "__main__":
    main()
