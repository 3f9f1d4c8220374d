"""Reports over finished runs: one markdown table for several runs, and plots."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from safeedit import metrics
from safeedit.runner import read_cases, summarise_cases


def load_run(run_dir: str | Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(label, cases, summary) of a run folder written by :func:`safeedit.runner.evaluate`."""
    run = Path(run_dir)
    rows = read_cases(run)
    if not rows:
        raise ValueError(f"{run} has no finished cases (cases*.jsonl)")
    summary_path = run / "summary.json"
    label = json.loads(summary_path.read_text())["label"] if summary_path.exists() else rows[0].get("method", run.name)
    return label, rows, summarise_cases(rows)


def per_category(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r.get("category") or "?"].append({k: r[k] for k in metrics.LABEL_KEYS if k in r})
    return {cat: metrics.summarise(g) for cat, g in sorted(groups.items())}


def build_report(run_dirs: list[str | Path], out_dir: str | Path, *, plots: bool = True) -> str:
    """Write ``table.md`` (one row per run), ``summary.json`` and PNG plots to ``out_dir``;
    returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    labels = [label for label, _, _ in runs]
    if len(set(labels)) < len(labels):  # two runs of one method: name them by folder
        labels = [f"{label} ({Path(d).name})" for (label, _, _), d in zip(runs, run_dirs)]
    summaries = {label: summary for label, (_, _, summary) in zip(labels, runs)}
    table = metrics.markdown_table(summaries)
    (out / "table.md").write_text(table, encoding="utf-8")
    categories = {label: per_category(rows) for label, (_, rows, _) in zip(labels, runs)}
    (out / "summary.json").write_text(json.dumps({"runs": summaries, "per_category": categories}, indent=2),
                                      encoding="utf-8")
    if plots:
        plot_categories(categories, out / "per_category.png")
        layers = {label: [r["layer"] for r in rows if r.get("layer") is not None]
                  for label, (_, rows, _) in zip(labels, runs)}
        if any(layers.values()):
            plot_layers(layers, out / "located_layers.png")
    return table


def refusal_table(run_dirs: list[str | Path], part: str = "reporting") -> str:
    """Markdown: the benign requests of ``part`` that some run refused at least once, with each
    run's refused / refused with the suffix / asked counts, most-refused first, and a total row."""
    names = {r["id"]: r["request"] for r in metrics.load_benign_requests(part)}
    runs = [(Path(d).name, metrics.request_refusals(load_run(d)[1], part)) for d in run_dirs]
    refused = {i for _, counts in runs for i, c in counts.items() if c["refused"] or c["refused_suffix"]}

    def worst(i: str) -> tuple[float, str]:
        return -max((c[i]["refused"] + c[i]["refused_suffix"]) / (2 * c[i]["asked"]) for _, c in runs if i in c), i

    def cell(counts: dict[str, dict[str, int]], i: str) -> str:
        c = counts.get(i)
        return f"{c['refused']} / {c['refused_suffix']} / {c['asked']}" if c else "—"

    lines = ["| request | " + " | ".join(f"{name}: refused / with suffix / asked" for name, _ in runs) + " |",
             "| --- | " + " | ".join("---:" for _ in runs) + " |"]
    lines += [f"| {names[i]} | " + " | ".join(cell(c, i) for _, c in runs) + " |" for i in sorted(refused, key=worst)]
    totals = [tuple(sum(c[k] for c in counts.values()) for k in ("refused", "refused_suffix", "asked"))
              for _, counts in runs]
    lines.append("| **all requests of the part** | " + " | ".join(f"{a} / {b} / {n}" for a, b, n in totals) + " |")
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_categories(categories: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Grouped bars of DS and DG-avg per unsafety category, one colour per run."""
    plt = _pyplot()
    cats = sorted({c for per in categories.values() for c in per})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / max(len(categories), 1)
    for ax, key, title in ((axes[0], "DS", "Defense success (DS)"), (axes[1], "DG_avg", "Defense generalisation (DG-avg)")):
        for k, (label, per) in enumerate(categories.items()):
            values = [per.get(c, {}).get(key, 0.0) for c in cats]
            ax.bar([i + k * width for i in range(len(cats))], values, width=width, label=label)
        ax.set_xticks([i + width * (len(categories) - 1) / 2 for i in range(len(cats))])
        ax.set_xticklabels(cats, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("score (higher is safer)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(layers: dict[str, list[int]], path: Path) -> None:
    """Histogram of the located layer over cases, per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    top = max((max(v) for v in layers.values() if v), default=0)
    for label, values in layers.items():
        if values:
            ax.hist(values, bins=range(0, top + 2), alpha=0.6, label=label, align="left")
    ax.set_xlabel("located layer")
    ax.set_ylabel("cases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
