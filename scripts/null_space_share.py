"""How much of an input's key energy lies in the null space a DINM delta may use.

For a layer and ``null_space_tol``, the delta is composed with the projector P onto the null space
of the benign keys (see ``editkit.methods.dinm.nullspace``), so its effect on an input scales with
the share of that input's key energy inside the null space, trace(P·G)/trace(G) with G = Σ k·kᵀ over
the input's prompt tokens (keys = inputs of the layer's MLP output projection). The script prints
the median share, per layer and tol, for three kinds of input rendered as the edit renders them
(chat template, the DINM suffix): SafeEdit attack prompts, the same records' bare questions (the
DG_onlyQ inputs), and the held-out reporting part of the benign requests:

    python scripts/null_space_share.py --layers 13 29 --tols 1e-5 1e-2 --records 20

``--release K …`` asks whether the null space could be widened where harmful questions differ from
benign requests: it adds to the null space the K directions of the generalised eigenproblem
G_q·v = λ·G_b·v with the largest λ (G_q: keys of the bare questions of dev records 50–99, G_b: the
benign keys the null space is built from), and measures on records 0–49 (their questions kept out
of G_q):

    python scripts/null_space_share.py --layers 13 29 --tols 1e-5 --records 17 --release 0 8 32 128

``--last K`` keeps only the keys of each prompt's last K tokens (where the chat template hands over
to the answer and comply-or-refuse is decided), for the inputs measured and for a null space built
from the guard prompts' last K keys the same way (instead of DINM's null space of every token):

    python scripts/null_space_share.py --layers 13 29 --tols 1e-5 1e-3 --records 20 --last 1 5

``--separable`` asks instead whether anything at the layer tells the two apart: a logistic
regression (scikit-learn, standardised, C 0.1) on the key of the last prompt token, trained on the
bare questions of dev records 50–99 against the tuning part of the benign requests and scored on
the questions of records 0–49 (those of 50–99 left out) against the held-out reporting part:

    python scripts/null_space_share.py --layers 13 29 --separable
"""
from __future__ import annotations

import argparse
import statistics

import torch

import editkit
from editkit.arch import decoder_layers, get_module, resolve_arch
from editkit.hooks import Trace
from editkit.methods.dinm import nullspace
from editkit.text import pad_id, with_suffix
from safeedit.dataset import load_safeedit, shared_data_dir
from safeedit.metrics import SUFFIX, load_benign_requests


def null_share(model, tokenizer, arch, layer: int, prompts: list[str], projector: torch.Tensor) -> float:
    """Median over ``prompts`` of trace(P·G)/trace(G), G the Gram matrix of one prompt's keys."""
    grams = [gram(model, tokenizer, arch, layer, [prompt]) for prompt in prompts]
    return statistics.median(float(torch.trace(projector @ g) / torch.trace(g)) for g in grams)


def gram(model, tokenizer, arch, layer: int, prompts: list[str]) -> torch.Tensor:
    """Mean k·kᵀ over every prompt token of ``prompts`` (with the suffix)."""
    ids = nullspace.render(tokenizer, [with_suffix(p, SUFFIX) for p in prompts], chat_template="auto",
                           max_length=2048)
    total, n = nullspace.collect_gram(model, arch, layer, ids, pad_id(tokenizer))
    return total / n


def released(space, tol: float, harmful: torch.Tensor, k: int) -> torch.Tensor:
    """Projector onto the null space at ``tol`` plus the ``k`` directions where the harmful keys'
    energy is largest relative to the benign keys' (generalised eigenvectors, benign Gram regularised)."""
    basis = space.eigenvectors[:, space.null_mask(tol)]
    if k:
        benign = space.eigenvectors @ torch.diag(space.eigenvalues) @ space.eigenvectors.T
        chol = torch.linalg.cholesky(benign + 1e-5 * space.eigenvalues.max() * torch.eye(benign.shape[0]))
        inv = torch.linalg.inv(chol)
        _, vectors = torch.linalg.eigh(inv @ harmful @ inv.T)  # ascending
        basis = torch.cat([basis, (inv.T @ vectors)[:, -k:]], 1)
    q, _ = torch.linalg.qr(basis)
    return q @ q.T


@torch.no_grad()
def last_keys(model, tokenizer, arch, layer: int, prompts: list[str], k: int) -> list[torch.Tensor]:
    """Per prompt, the keys [k, d_in] of its last ``k`` tokens (prompts rendered as given)."""
    module = get_module(decoder_layers(model, arch)[layer], arch.mlp_out)
    keys = []
    for ids in nullspace.render(tokenizer, prompts, chat_template="auto", max_length=2048):
        with Trace(module, retain_input=True, retain_output=False, detach=True) as trace:
            model(input_ids=torch.tensor([ids]), use_cache=False)
        keys.append(trace.input[0, -k:].float())
    return keys


def last_position_rows(model, tokenizer, arch, layer: int, tols: list[float], inputs: dict, k: int) -> None:
    """Table rows for ``--last k``: null space and shares from the last k positions only."""
    guard = torch.cat(last_keys(model, tokenizer, arch, layer, nullspace.guard_prompts(SUFFIX), k))
    values, vectors = torch.linalg.eigh(guard.T @ guard / len(guard))
    measured = [last_keys(model, tokenizer, arch, layer, [with_suffix(p, SUFFIX) for p in prompts], k)
                for prompts in inputs.values()]  # once, whatever the tol
    for tol in tols:
        null = vectors[:, values < tol * values.max()]
        shares = [statistics.median(float((x @ null).pow(2).sum() / x.pow(2).sum()) for x in keys)
                  for keys in measured]
        print(f"| {layer} | {tol:g} | last {k} | {null.shape[1]} of {null.shape[0]} | "
              + " | ".join(f"{s:.3f}" for s in shares) + " |", flush=True)


def separability(model, tokenizer, arch, layer: int, records: list) -> str:
    """Held-out accuracy of a linear harmful-question vs benign-request classifier on last-token keys."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    test = list(dict.fromkeys(r.question for r in records[:50] if r.question.strip()))
    train = [q for q in dict.fromkeys(r.question for r in records[50:] if r.question.strip()) if q not in test]
    benign_train = [b["request"] for b in load_benign_requests("tuning")]
    benign_test = [b["request"] for b in load_benign_requests("reporting")]

    def features(prompts: list[str]) -> np.ndarray:
        keys = last_keys(model, tokenizer, arch, layer, [with_suffix(p, SUFFIX) for p in prompts], 1)
        return torch.stack([k[-1] for k in keys]).numpy()

    x_train = np.concatenate([features(train), features(benign_train)])
    y_train = np.array([1] * len(train) + [0] * len(benign_train))
    x_test = np.concatenate([features(test), features(benign_test)])
    y_test = np.array([1] * len(test) + [0] * len(benign_test))
    predicted = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(
        x_train, y_train).predict(x_test)
    return (f"| {layer} | {len(train)} + {len(benign_train)} | {len(test)} + {len(benign_test)} | "
            f"{np.mean(predicted == y_test):.3f} | {np.mean(predicted[y_test == 1] == 1):.3f} | "
            f"{np.mean(predicted[y_test == 0] == 0):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--layers", type=int, nargs="+", default=[13, 29])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-5, 1e-2])
    parser.add_argument("--records", type=int, default=20, help="dev records, spread evenly over the first 100")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--release", type=int, nargs="*", default=None,
                        help="directions added to the null space (see above); test records from 0-49")
    parser.add_argument("--separable", action="store_true", help="linear separability instead (see above)")
    parser.add_argument("--last", type=int, nargs="*", default=None,
                        help="only the keys of each prompt's last K tokens (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = editkit.load_model(args.model)
    model.eval()
    arch = resolve_arch(model, None)
    records = load_safeedit(shared_data_dir() / "safeedit" / "safeedit_dev.json").instances[:100]
    if args.separable:
        print("| layer | trained on (questions + benign) | scored on | accuracy | questions caught | benign kept |")
        print("| ---: | --- | --- | ---: | ---: | ---: |")
        for layer in args.layers:
            print(separability(model, tokenizer, arch, layer, records), flush=True)
        return
    others: list[str] = []
    if args.release is not None:
        own = {r.question for r in records[:50]}
        others = list(dict.fromkeys(r.question for r in records[50:] if r.question.strip() and r.question not in own))
        records = records[:50]
    releases = args.release or [0]
    records = records[:: max(1, len(records) // args.records)][: args.records]
    inputs = {
        "attack prompt": [r.prompt for r in records],
        "bare question": [r.question for r in records if r.question.strip()],
        "held-out benign": [b["request"] for b in load_benign_requests("reporting")],
    }
    if args.last:
        print("| layer | null_space_tol | keys | free dims | " + " | ".join(inputs) + " |")
        print("| ---: | ---: | --- | ---: |" + " ---: |" * len(inputs))
        for layer in args.layers:
            for k in args.last:
                last_position_rows(model, tokenizer, arch, layer, args.tols, inputs, k)
        return
    print("| layer | null_space_tol | released | free dims | " + " | ".join(inputs) + " |")
    print("| ---: | ---: | ---: | ---: |" + " ---: |" * len(inputs))
    for layer in args.layers:
        space, _ = nullspace.key_space(model, tokenizer, arch, layer, suffix=SUFFIX, chat_template="auto",
                                       max_length=2048)
        harmful = gram(model, tokenizer, arch, layer, others) if others else None
        for tol in args.tols:
            for k in releases:
                projector = released(space, tol, harmful, k) if k else space.projector(tol)
                shares = [null_share(model, tokenizer, arch, layer, prompts, projector) for prompts in inputs.values()]
                print(f"| {layer} | {tol:g} | {k} | {int(space.null_mask(tol).sum()) + k} of {projector.shape[0]} | "
                      + " | ".join(f"{s:.3f}" for s in shares) + " |", flush=True)


if __name__ == "__main__":
    main()
