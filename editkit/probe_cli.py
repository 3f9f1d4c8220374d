"""``editkit probe``: does an edit erase the toxic region or route around it? (DESIGN §6)

Per compared item (a registered method, edited or fitted on the fly, or a saved patch folder), the
probes' views without and with the edit: region toxicity and its reduction rate, the activation
shift at every layer's MLP projection input over the measured records' adversarial inputs, and the
safe/unsafe response states of one layer on the mean-shift direction and PC1. An instance-scope
method edits each measured record (numbers averaged; toxic layer = the layer each edit changed), a
dataset-scope method is fitted once on unmeasured records, a patch is applied as saved; an edit with
no layer of its own is measured at the most often located layer. Only a method's scope is asked.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit import probes  # names load lazily: no torch, scikit-learn or matplotlib at parser build time
from editkit.probe_report import aggregate, verdict, write_atomic, write_results

PAPER_COMPARISON = "dinm,ft-l,sft,dpo"
DEFAULT_PRESET = "smollm2-135m"
SAFEEDIT_KEYS = ("DS", "DG_avg", "over_refusal", "over_refusal_suffix", "n")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``editkit probe`` on the CLI's sub-parsers."""
    p = sub.add_parser("probe", help="toxicity-probe comparison of edits: region toxicity, activation shift, "
                       "projections (JSON, PNG, markdown)")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a folder, .gguf or hub name")
    p.add_argument("--device", default=None)
    p.add_argument("--compare", action="append", help="comma-separated method names and/or saved patch folders, "
                   f"a folder optionally as LABEL=FOLDER (repeatable; default {PAPER_COMPARISON})")
    p.add_argument("--data", default=None, help="SafeEdit JSON/JSONL file (default: the shared dev records)")
    p.add_argument("--records", type=int, default=3, help="measure on the first N records of --data")
    p.add_argument("--ids", default=None, help="comma-separated record ids to measure on (instead of --records)")
    p.add_argument("--train-records", type=int, help="dataset methods fit on the first N unmeasured records")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="preset of every method that has it (else defaults)")
    p.add_argument("--hparams", action="append", help="per-method settings: method=preset-or-yaml[,...] (repeatable)")
    p.add_argument("--probe", default=None, help="a saved toxicity probe (default: train one into OUT/probe)")
    p.add_argument("--probe-layer", type=int, default=None, help="layer of a probe trained here (default: the last)")
    p.add_argument("--probe-data", default=None, help="the probe's toxigen/, safeedit/ folder (default: shared data)")
    p.add_argument("--probe-sources", default="toxigen,safeedit")
    p.add_argument("--probe-held", type=float, default=0.2, help="fraction of each source held apart")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe's held-apart split and fit")
    p.add_argument("--shift-inputs", default="all", choices=["all", "attack"], help="per record, the attack prompt and "
                   "its four generalisation inputs, or the attack prompt only")
    p.add_argument("--projection-layer", type=int, default=None, help="layer of the projection (default: the middle)")
    p.add_argument("--projection-records", type=int, default=20, help="records whose responses are projected")
    p.add_argument("--erase-min", type=float, default=0.01, help="reduction rate from which region toxicity counts "
                   "as lowered (default 0.01 = 1%%)")
    p.add_argument("--shift-min", type=float, default=0.05, help="activation shift rate from which activations count "
                   "as moved (default 0.05 = 5%%)")
    p.add_argument("--with-safeedit", nargs="+", default=[], metavar="RUN", help="finished `editkit eval` run folders "
                   "(or NAME=FOLDER): DS / DG-avg / over-refusal beside the rates")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="token budget of one text read by the probes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    p.set_defaults(func=run_probe)


# -- what is compared ----------------------------------------------------------------------------
@dataclass
class Item:
    """A compared thing: a registered method (``kind`` = its scope) or a saved patch (``kind="patch"``)."""

    label: str
    kind: str
    method: str
    source: str
    patch: Any = None
    hparams: Any = None
    hparams_source: str | None = None


def parse_items(specs: Sequence[str]) -> list[Item]:
    """Items from ``--compare`` values; an unknown name or a folder without a patch raises ValueError."""
    from editkit.patch import DELTA_FILE, META_FILE, load_patch
    from editkit.registry import get_method, list_methods

    items: list[Item] = []
    seen: Counter[str] = Counter()
    for token in (t.strip() for spec in specs for t in spec.split(",")):
        if not token:
            continue
        label, sep, where = token.partition("=")  # LABEL=FOLDER names a saved patch
        path = Path(where.strip() if sep else token)
        if sep and not (label.strip() and where.strip()):
            raise ValueError(f"--compare {token!r}: expected LABEL=PATCH_FOLDER")
        if (path / META_FILE).is_file():
            patch = load_patch(path)
            item = Item(label.strip() if sep else f"patch:{path.resolve().name}", "patch", patch.method, str(path),
                        patch=patch)
        elif sep:
            raise ValueError(f"--compare {token!r}: {path} is not a saved patch folder (needs {META_FILE} and "
                             f"{DELTA_FILE})")
        else:
            try:
                spec = get_method(token)
            except ValueError:
                if path.exists() or "/" in token or os.sep in token:
                    raise ValueError(f"--compare {token!r}: not a saved patch folder (needs {META_FILE} and "
                                     f"{DELTA_FILE})") from None
                raise ValueError(f"--compare {token!r}: neither a registered editing method "
                                 f"({', '.join(list_methods())}) nor a saved patch folder") from None
            item = Item(spec.name, spec.scope, spec.name, token)
        seen[item.label] += 1
        if seen[item.label] > 1:
            item.label = f"{item.label}#{seen[item.label]}"
        items.append(item)
    if not items:
        raise ValueError("--compare names nothing to compare")
    return items


def resolve_hparams(items: Sequence[Item], overrides: Sequence[str], preset: str) -> None:
    """Settings per method: ``--hparams method=spec``, else ``preset`` if the method has it, else its defaults."""
    from editkit.registry import hparams_path, load_hparams

    given: dict[str, str] = {}
    for token in (t.strip() for spec in overrides for t in spec.split(",")):
        name, sep, value = token.partition("=")
        if token and (not sep or not name.strip() or not value.strip()):
            raise ValueError(f"--hparams takes method=preset-or-yaml pairs, got {token!r}")
        given.update({name.strip().lower(): value.strip()} if token else {})
    methods = {it.method for it in items if it.kind != "patch"}
    unused = sorted(set(given) - methods)
    if unused:
        raise ValueError(f"--hparams names {unused}, which --compare does not run ({sorted(methods)})")
    for it in items:
        if it.kind != "patch":
            spec = given.get(it.method) or (preset if hparams_path(it.method, preset).is_file() else None)
            it.hparams, it.hparams_source = load_hparams(it.method, spec), spec or "defaults"


def read_safeedit_runs(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{name: DS, DG_avg, over-refusal … of a finished run}; the name is NAME= if given, else the
    run's method (``vanilla`` for none), else its label."""
    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or Path(spec).exists():
            name, folder = "", spec
        run = Path(folder)
        if not (run / "summary.json").is_file():
            raise FileNotFoundError(f"--with-safeedit {spec!r}: {run / 'summary.json'} not found "
                                    "(give a finished `editkit eval` run folder)")
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        config = json.loads((run / "config.json").read_text(encoding="utf-8")) if (run / "config.json").exists() else {}
        method = config.get("config", {}).get("method")
        if not name:
            name = method if method not in (None, "none") and not config["config"].get("patch") \
                else summary.get("label", run.name)
        runs[name] = {"run": str(run), **{k: summary.get(k) for k in SAFEEDIT_KEYS}}
    return runs


def choose_records(pool: Sequence[Any], args: argparse.Namespace) -> tuple[list[Any], list[Any], list[Any]]:
    """(measured, training records for dataset methods, projection records)."""
    if args.ids:
        by_id = {r.id: r for r in pool}
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        missing = [i for i in wanted if i not in by_id]
        if missing or not wanted:
            raise ValueError(f"--ids: no record with id {', '.join(missing) or '(none given)'} in --data")
        measured = [by_id[i] for i in wanted]
    elif not 1 <= args.records <= len(pool):
        raise ValueError(f"--records must be in 1..{len(pool)} (the records of --data), got {args.records}")
    else:
        measured = list(pool[:args.records])
    measured_ids = {r.id for r in measured}
    rest = [r for r in pool if r.id not in measured_ids]
    if args.train_records is not None and not 1 <= args.train_records <= len(rest):
        raise ValueError(f"--train-records must be in 1..{len(rest)} (records not measured), got {args.train_records}")
    train = rest if args.train_records is None else rest[:args.train_records]
    return measured, train, (measured + rest)[:max(args.projection_records, len(measured))]


# -- measuring -----------------------------------------------------------------------------------
def _reduction(before: float, after: float) -> float | None:
    try:
        return probes.toxicity_reduction_rate(before, after)
    except ValueError:  # region toxicity exactly 0 before: undefined
        return None


class Probing:
    """The unedited model's readings, taken once, and the same readings with an edit applied."""

    def __init__(self, model: Any, tokenizer: Any, probe: Any, *, prompts: list[str], safe: list[str],
                 unsafe: list[str], layer: int | None, batch_size: int, max_length: int, progress: bool) -> None:
        from editkit.arch import check_layer, mlp_out_name, num_layers, resolve_arch

        self.model, self.tok, self.probe, self.prompts = model, tokenizer, probe, prompts
        self.arch = resolve_arch(model)
        self.mlp_out = [mlp_out_name(model, self.arch, i) for i in range(num_layers(model, self.arch))]
        self.layer = len(self.mlp_out) // 2 if layer is None else check_layer(model, self.arch, layer)
        self.texts, self.n_safe = safe + unsafe, len(safe)
        self.read = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
        self.means_before = self._means()
        states = self._states()
        self.axes = probes.projection_axes(states[:self.n_safe], states[self.n_safe:])
        self.projected_before = self._project(states)
        self._regions: dict[int, Any] = {}

    def _means(self) -> dict[int, Any]:
        return probes.mlp_input_means(self.model, self.tok, self.prompts, chat_template="auto", **self.read)

    def _states(self) -> Any:
        return probes.pooled(self.model, self.tok, self.texts, [self.layer], read="output", chat_template="none",
                             desc="projection states", **self.read)[self.layer]  # [n_safe + n_unsafe, d_model]

    def _project(self, states: Any) -> Any:
        n = self.n_safe
        return probes.ProjectedSet(safe=self.axes.project(states[:n]), unsafe=self.axes.project(states[n:]))

    def _region(self, layer: int) -> Any:
        return probes.region_toxicity(self.model, self.probe, layer, top_k=5, tokenizer=self.tok)

    def measure(self, patch: Any, layer: int) -> tuple[dict[str, Any], Any]:
        """(numbers, Projection) of ``patch`` at the toxic ``layer`` (the model is restored by the patch).
        Region toxicity is also read at every layer whose MLP output projection the patch changes."""
        touched = [i for i, name in enumerate(self.mlp_out) if name in patch.deltas]
        layers = sorted({layer, *touched})
        for i in layers:
            if i not in self._regions:
                self._regions[i] = self._region(i)
        with patch.applied(self.model):
            after = {i: self._region(i) for i in layers}
            shift = probes.activation_shift(self.means_before, self._means())
            projected = self._project(self._states())
        projection = probes.Projection(layer=self.layer, axes=self.axes, before=self.projected_before, after=projected)
        before = self._regions
        return {
            "layer": layer,
            "region_toxicity_before": before[layer].mean_cosine,
            "region_toxicity_after": after[layer].mean_cosine,
            "reduction_rate": _reduction(before[layer].mean_cosine, after[layer].mean_cosine),
            "activation_shift_rate": shift.rate(layer),
            "shift_curve": list(shift.rates),  # indexed by layer
            "touched_layers": {str(i): {"before": before[i].mean_cosine, "after": after[i].mean_cosine,
                                        "reduction_rate": _reduction(before[i].mean_cosine, after[i].mean_cosine)}
                               for i in touched},
            "top_vectors": {"before": [v.to_dict() for v in before[layer].top],
                            "after": [v.to_dict() for v in after[layer].top]},
            "projection": {"layer": self.layer, "separation_before": self.projected_before.separation,
                           "separation_after": projected.separation},
        }, projection


def _layer_of(patch: Any, fallback: int | None, located: int) -> tuple[int, str]:
    """The toxic layer of an edit: its own (the patch's, else the method's), else the located one."""
    own = patch.layer if patch.layer is not None else fallback
    return (int(own), "the layer the edit changed") if own is not None else (located, "located (most frequent)")


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "item"


def edits_of(item: Item, model: Any, tok: Any, *, measured: list[Any], train: list[Any], pool: list[Any],
             out: Path, progress: bool) -> Iterator[tuple[Any, int | None, str | None, float, dict[str, Any]]]:
    """(patch, layer the method reported, record, seconds, details) of the edits that stand for ``item``:
    one per measured record (instance scope), one fit (dataset scope), or the saved patch."""
    import editkit
    from tqdm.auto import tqdm

    if item.kind == "instance":
        for rec in tqdm(measured, desc=f"{item.label}: edits", disable=not progress, leave=False):
            start = time.perf_counter()
            result = editkit.edit(model, rec, tokenizer=tok, method=item.method, hparams=item.hparams,
                                  constraint_pool=[r for r in pool if r.id != rec.id], progress=progress)
            yield result.patch, result.layer, rec.id, time.perf_counter() - start, {"edit_timings": result.timings}
    elif item.kind == "dataset":
        start = time.perf_counter()
        result = editkit.fit(model, train, tokenizer=tok, method=item.method, hparams=item.hparams,
                             output_dir=str(out / "fits" / slug(item.label)), progress=progress)
        result.patch.metrics = {**result.patch.metrics, "trained_on_ids": [r.id for r in train]}
        result.patch.save(out / "patches" / slug(item.label), overwrite=True)
        yield result.patch, result.layer, None, time.perf_counter() - start, {"fit_timings": result.timings}
    else:
        overlap = sorted(set(item.patch.metrics.get("trained_on_ids", ())) & {r.id for r in measured})
        yield item.patch, None, None, 0.0, {"trained_on_measured_records": overlap} if overlap else {}


def _probe(args: argparse.Namespace, model: Any, tok: Any, out: Path, progress: bool,
           measured: Sequence[Any] = ()) -> tuple[Any, dict[str, Any]]:
    """The toxicity probe: loaded (``--probe``), or trained here on the shared data without the
    SafeEdit generations of the ``measured`` records, so no measured record's text shapes the
    direction it is measured against."""
    from safeedit.dataset import shared_data_dir

    if args.probe:
        if args.probe_layer is not None:
            raise ValueError("--probe-layer applies to a probe trained here, not to a loaded --probe")
        probe = probes.load_probe(args.probe, model)
        info: dict[str, Any] = {"path": str(args.probe), "trained_here": False}
    else:
        data = Path(args.probe_data) if args.probe_data else shared_data_dir()
        sources = [s.strip() for s in args.probe_sources.split(",") if s.strip()]
        texts = probes.load_probe_texts(data, sources)
        left_out = {f"safeedit:{r.id}" for r in measured}
        n_all = len(texts)
        texts = [t for t in texts if t.group not in left_out]
        probe = probes.train_probe(model, tok, texts, layer=-1 if args.probe_layer is None else args.probe_layer,
                                   held_fraction=args.probe_held, seed=args.seed, batch_size=args.batch_size,
                                   max_length=args.max_length, progress=progress)
        probe.save(out / "probe", overwrite=True)
        info = {"path": str(out / "probe"), "trained_here": True, "data": str(data), "sources": sources,
                "n_texts": len(texts), "left_out_measured_texts": n_all - len(texts)}
    return probe, {**info, "layer": probe.layer, "held_accuracy": probe.metrics.get("held"),
                   "train_accuracy": probe.metrics.get("train")}


def run_probe(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to write into it")
    if args.batch_size < 1 or args.max_length < 1 or args.projection_records < 1:
        raise ValueError("--batch-size, --max-length and --projection-records must be positive")
    items = parse_items(args.compare or [PAPER_COMPARISON])
    resolve_hparams(items, args.hparams or [], args.preset)
    runs = read_safeedit_runs(args.with_safeedit)
    import editkit
    import torch
    from editkit.patch import model_info
    from safeedit.dataset import dev_records_path, load_safeedit
    from tqdm.auto import tqdm

    data = args.data or str(dev_records_path())
    pool = load_safeedit(data).instances
    measured, train, shown = choose_records(pool, args)
    if any(it.kind == "dataset" for it in items) and not train:
        raise ValueError("a dataset-scope method needs records that are not measured to fit on; lower --records")
    if args.threads:  # a shared machine: torch's one thread per core oversubscribes it (DESIGN §9)
        torch.set_num_threads(args.threads)
    progress, t0 = not args.no_progress, time.perf_counter()
    print(f"loading model {args.model}", flush=True)
    model, tok = editkit.load_model(args.model, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    found = [editkit.locate(model, tok, r) for r in tqdm(measured, desc="locating", disable=not progress, leave=False)]
    located = Counter(f.layer for f in found).most_common(1)[0][0]
    write_atomic(out / "layer_profile.png", lambda p: found[0].plot(p, title=f"safe vs unsafe, record {measured[0].id}"))
    print(f"toxic layer (located): {located}; {'loading' if args.probe else 'training'} the toxicity probe", flush=True)
    probe, probe_info = _probe(args, model, tok, out, progress, measured)
    dg = args.shift_inputs == "all"
    prompts = list(dict.fromkeys(p for r in measured for p in [r.prompt, *(r.generalization.values() if dg else ())]))
    probing = Probing(model, tok, probe, prompts=prompts, safe=[r.safe for r in shown],
                      unsafe=[r.unsafe for r in shown], layer=args.projection_layer, batch_size=args.batch_size,
                      max_length=args.max_length, progress=progress)
    meta = {"model": model_info(model), "model_arg": args.model, "data": data,
            "measured_records": [r.id for r in measured],
            "located_layers": {r.id: f.layer for r, f in zip(measured, found)}, "located_layer": located,
            "localization": found[0].to_dict(), "probe": probe_info,
            "settings": {"erase_min": args.erase_min, "shift_min": args.shift_min, "shift_inputs": args.shift_inputs,
                         "shift_prompts": len(prompts), "prompt_rendering": "chat template if any, no method suffix",
                         "projection_layer": probing.layer, "projection_records": [r.id for r in shown],
                         "preset": args.preset, "threads": args.threads, "max_length": args.max_length}}
    methods: dict[str, dict[str, Any]] = {}
    for item in tqdm(items, desc="compared", disable=not progress):
        print(f"{item.label} ({item.kind})", flush=True)
        start, rows, projection = time.perf_counter(), [], None
        for patch, reported, record, seconds, info in edits_of(item, model, tok, measured=measured, train=train,
                                                               pool=pool, out=out, progress=progress):
            t, (layer, layer_source) = time.perf_counter(), _layer_of(patch, reported, located)
            row, this_projection = probing.measure(patch, layer)
            projection = projection or this_projection
            rows.append({"record": record, **row, "layer_source": layer_source, **info,
                         "edit_seconds": round(seconds, 3), "measure_seconds": round(time.perf_counter() - t, 3)})
        agg = aggregate(rows)
        methods[item.label] = {
            "kind": item.kind, "method": item.method, "source": item.source, **agg,
            "verdict": verdict(agg["reduction_rate"], agg["activation_shift_rate"], args.erase_min, args.shift_min),
            "toxic_layers": [r["layer"] for r in rows], "edits": len(rows), "records": [r.id for r in measured],
            "edited_records": [r["record"] for r in rows if r["record"]],
            "trained_on": [r.id for r in train] if item.kind == "dataset" else None,
            "saved_patch": str(out / "patches" / slug(item.label)) if item.kind == "dataset" else None,
            "hparams": item.hparams_source, "hparams_resolved": item.hparams.to_dict() if item.hparams else None,
            "timings": {"edit_seconds": round(sum(r["edit_seconds"] for r in rows), 3),
                        "measure_seconds": round(sum(r["measure_seconds"] for r in rows), 3),
                        "total_seconds": round(time.perf_counter() - start, 3)},
            "safeedit": runs.get(item.label) or (runs.get(item.method) if item.kind != "patch" else None),
            "per_edit": rows}
        write_atomic(out / f"projection_{slug(item.label)}.png",
                lambda p: probes.plot_projection(projection, p, title=f"{item.label}: safe vs unsafe responses"))
        summary = write_results(out, {**meta, "seconds": round(time.perf_counter() - t0, 2)}, methods, runs)
    bars = {k: {name: e[key] for name, key in (("toxicity reduction", "reduction_rate"),
                                               ("activation shift", "activation_shift_rate")) if e[key] is not None}
            for k, e in methods.items()}  # an undefined rate is left out
    write_atomic(out / "rates.png", lambda p: probes.plot_rates(bars, p))
    write_atomic(out / "shift_curves.png", lambda p: probes.plot_shift_curves(
        {k: e["shift_curve"] for k, e in methods.items()}, p, mark_layer=located))
    for stale in set(out.glob("projection_*.png")) - {out / f"projection_{slug(k)}.png" for k in methods}:
        stale.unlink()  # an earlier run's item (--overwrite)
    print(summary)
    print(f"written to {out}/: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return 0
