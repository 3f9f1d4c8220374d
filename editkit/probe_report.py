"""What ``editkit probe`` writes: per-method aggregates of the per-edit measurements, the reading
("erases" / "routes around"), and results.json + summary.md."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _mean(values: Sequence[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over an item's edits (one edit: its own numbers)."""
    keys = ("region_toxicity_before", "region_toxicity_after", "reduction_rate", "activation_shift_rate")
    out: dict[str, Any] = {k: _mean([r[k] for r in rows]) for k in keys}
    out["shift_curve"] = [_mean(col) for col in zip(*(r["shift_curve"] for r in rows))]
    out["separation_before"] = rows[0]["projection"]["separation_before"]
    out["separation_after"] = _mean([r["projection"]["separation_after"] for r in rows])
    return out


def verdict(reduction: float | None, shift: float | None, erase_min: float, shift_min: float) -> str:
    """"erases", "routes around", "both" or "neither" (by the two thresholds), or "undefined"."""
    if reduction is None or shift is None:
        return "undefined"
    names = {(True, False): "erases", (False, True): "routes around", (True, True): "both"}
    return names.get((reduction >= erase_min, shift >= shift_min), "neither")


# -- outputs -------------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then one rename onto ``path`` (the temporary name keeps the suffix: PNGs know their format)."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _num(value: Any, fmt: str = ".4g", unit: str = "") -> str:
    return "n/a" if value is None else format(value, fmt) + unit


def _pct(value: float | None) -> str:
    return _num(None if value is None else 100 * value, ".2f", " %")


def _sentence(label: str, entry: dict[str, Any]) -> str:
    r, s = _pct(entry["reduction_rate"]), _pct(entry["activation_shift_rate"])
    return f"- {label}: " + {
        "erases": f"**erases**: region toxicity at the toxic layer falls by {r}, its MLP projection's input moves {s}.",
        "routes around": f"**routes around**: the toxic layer's MLP projection input moves {s}, its region toxicity "
                         f"changes by {r}.",
        "both": f"**both** lowers region toxicity ({r}) and moves the activations ({s}).",
        "neither": f"**neither** lowers region toxicity ({r}) nor moves the activations ({s}) beyond the thresholds.",
        "undefined": "a rate is undefined (region toxicity exactly 0 before the edit)."}[entry["verdict"]]


def summary_markdown(meta: dict[str, Any], methods: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]]) -> str:
    """The table (method × region toxicity before/after, rates), a reading per method and the caveats."""
    probe, settings = meta["probe"], meta["settings"]
    held = probe.get("held_accuracy") or {}
    accuracy = ", ".join(f"{k} {100 * v['accuracy']:.1f} % (n={v['n']})" for k, v in held.items()) or "not recorded"
    with_runs = any(e.get("safeedit") for e in methods.values())
    head = ["method", "kind", "toxic layer", "region toxicity before", "after", "reduction rate",
            "activation shift rate", *(["DS", "DG-avg", "over-refusal"] if with_runs else [])]
    model = meta["model"].get("name_or_path") or meta["model_arg"]
    lines = [f"# Toxicity probe comparison\n\nModel `{model}`; measured on records "
             f"{', '.join(meta['measured_records'])} of `{meta['data']}`; located toxic layer {meta['located_layer']} "
             f"(per record: {', '.join(map(str, meta['located_layers'].values()))}). Probe at layer {probe['layer']}, "
             f"held-apart accuracy: {accuracy}.\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in methods.items():
        kind = {"instance": f"instance, {e['edits']} edits", "dataset": f"dataset, fit on {len(e['trained_on'] or [])}",
                "patch": f"saved {e['method'] or ''} patch"}[e["kind"]]
        row = [label, kind, ", ".join(map(str, sorted(set(e["toxic_layers"])))), _num(e["region_toxicity_before"]),
               _num(e["region_toxicity_after"]), _pct(e["reduction_rate"]), _pct(e["activation_shift_rate"])]
        if with_runs:
            run = e.get("safeedit") or {}
            row += [_num(run.get("DS"), ".1f"), _num(run.get("DG_avg"), ".1f"),
                    _num(run.get("over_refusal"), ".1f", " %")]
        lines.append("| " + " | ".join(row) + " |")
    others = {k: v for k, v in runs.items() if not any(e.get("safeedit") is v for e in methods.values())}
    if others:
        lines.append("\nOther SafeEdit runs: " + "; ".join(
            f"{k}: DS {_num(v.get('DS'), '.1f')}, DG-avg {_num(v.get('DG_avg'), '.1f')}, over-refusal "
            f"{_num(v.get('over_refusal'), '.1f', ' %')}" for k, v in others.items()) + ".")
    lines += ["\n## Reading\n", f"Region toxicity counts as lowered from a reduction rate of "
              f"{_pct(settings['erase_min'])}, activations as moved from a shift rate of {_pct(settings['shift_min'])} "
              f"(`--erase-min`, `--shift-min`).\n"]
    lines += [_sentence(label, e) for label, e in methods.items()]
    lines += ["\n## What these numbers can and cannot tell\n",
              f"These are the probe's views. Region toxicity is the mean cosine of one layer's MLP value vectors with "
              f"one linear direction (a logistic-regression probe on layer {probe['layer']}'s pooled output): it does "
              f"not see toxicity written by other layers, by attention or along directions a linear probe misses, "
              f"and its small mean cosines make large ratios. The activation shift is read at the toxic layer's MLP "
              f"projection input over {settings['shift_prompts']} adversarial inputs without any method's suffix (only "
              f"the weights differ); an edit of that projection alone cannot move its input nor anything below, so a "
              f"zero there holds by construction (`shift_curves.png` shows where a shift starts). Instance-scope "
              f"methods are averaged over one edit per measured record; dataset-scope methods were fitted once on "
              f"unmeasured records. None of this says whether the model behaves more safely or refuses benign "
              f"requests: the SafeEdit evaluation (DS, DG, over-refusal) measures that."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict[str, Any], methods: dict[str, Any], runs: dict[str, Any]) -> str:
    """results.json and summary.md, rewritten after every compared item (a late failure keeps the rest)."""
    summary = summary_markdown(meta, methods, runs)
    results = json.dumps({**meta, "methods": methods, "safeedit_runs": runs}, indent=2, allow_nan=False, default=str)
    for name, text in (("results.json", results), ("summary.md", summary)):
        write_atomic(out / name, lambda p: p.write_text(text, encoding="utf-8"))
    return summary


# -- the command ---------------------------------------------------------------------------------
