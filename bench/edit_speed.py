"""DINM edit speed and memory of the committed configuration, against the plain path, the cost the
issue targets and the compute floor: medians and ratios from one run.

Settings: the committed preset, loaded through the package (``editkit.load_hparams("dinm",
"smollm2-135m")`` = ``editkit/presets/DINM/smollm2-135m.yaml``, over-refusal guard included);
``--hparams`` takes another YAML path or preset name. A missing preset is an error. ``--steps``
overrides the steps of the timed configurations (smoke runs only: the verdict then no longer
describes the committed configuration, and the bench says so).

For each of N SafeEdit dev records (default 3, from the shared data) on one model (default
SmolLM2-135M-Instruct), with ``--threads`` torch threads (default 1, see DESIGN §9), every path is
timed as a user sees it: the wall clock around the whole ``editkit.edit`` call (localisation, the
guard's self-answers = the unedited model generating answers to the benign requests, the encoding,
the steps, the result and its trust check), from cold DINM caches: every timed call first drops the
guard's cached self-answers, reference rows and null-space keys, and gets an empty disk cache
(``$EDITKIT_DINM_CACHE`` = a new temporary folder), so it costs what the first edit of a model
costs (within a SafeEdit run, later edits reuse what earlier ones cached; their ``edit_seconds`` are
recorded per case). The warm-up runs on a record that is not timed:

* ``fast``  — the committed settings. Besides the wall time, the split from EditResult.timings
  (every key but "total": locate, guard, edit, null_space when on); the bench checks that the parts
  sum to the wall time (``gap`` = wall - parts, flagged above 5 %).
* ``fast-disk`` — the same edit again with the memory caches dropped but the disk cache ``fast``
  wrote (null-space key space, self-answers): what an edit costs in a new process (e.g. each
  ``editkit edit`` call) once the model's first edit has run.
* ``plain`` — the same settings with ``fast_path=False`` (the full model forward at every step).
  Both paths locate on their own; the bench checks they found the same layer.
* ``reference-10`` — the cost the issue's target names: the reference implementation's kind of
  edit, i.e. the plain path, exactly 10 steps (``early_stop_loss=0``), the paper's lr 5e-4 and
  c_edit 0.1, the edit NLL plus the KL on the record's knowledge pair and no guard
  (``benign_constraint=0``, ``constraint_pairs=0``, every optional term at its default, off);
  the encoding as committed, the layer located by the paper's distance even when the committed settings
  fix one (what the reference implementation edits). Wall time of the whole call, localisation included.
* the compute floor (``bench/dinm_floor.py``), measured directly on every token batch the committed
  configuration trains on:
  "edit", "kl" and, with the guard, "benign" (built as DINM builds it, with editkit's own
  ``pick_requests`` + ``self_answered_pairs`` + ``encode_batches``; the bench checks the pair count
  against the edit's metrics and refuses a configuration whose loss reads a batch it does not
  model). Layer L's output O and the input K of its MLP output projection are captured once (no
  grad), with the exact arguments the model passes to each decoder layer above L (causal mask,
  rotary embeddings, position ids — captured by pre-hooks, so the mask is the one the model built).
  Then T times (T = the steps the fast edit ran), for every batch: O + Δ·K (only at the loss
  positions when L is the top layer), layers[L+1:] and the final norm (under bf16 autocast when the
  configuration's ``step_dtype`` is bfloat16, as its steps run; Δ·K and the head's logits fp32, its backward
  bf16; with the configuration's ``step_attention``), a scalar loss, backward
  into a trainable delta Δ on layer L's MLP output projection: nothing of layer L but the delta's
  own term is recomputed, since nothing else of it changes. Model parameters are frozen while
  measuring. (The null-space projector is not modelled: the editor folds it into K once.)
    - floor_body: loss = mean square of the final-norm output at the loss positions (no LM head).
    - floor_head: the LM head at the loss positions and DINM's own loss (CE on "edit", KL to the
      unedited distribution on "kl" and "benign"). This is the least work any exact DINM step does.
  Neither floor counts localisation, the guard's generation, the reference forwards, the optimizer
  step or the final evaluation; ``ref_fwd`` (one full no-grad forward of every batch) is printed
  beside them so the remaining gap can be read off.
* fast == plain: max |loss difference| over steps and loss terms, max |delta difference| (float
  rounding: the fast path adds Δ·K after the layer's residual sum, the plain path inside it).
* peak memory of one committed-configuration edit relative to the model's parameter bytes, one
  fresh subprocess per path (see ``_memory_probe``): on CPU the peak RSS increase sampled every 2 ms
  from /proc/self/statm by a background thread, from just before ``editkit.edit`` (model loaded,
  weights paged in by one warm-up forward) to its return, localisation and guard included; on CUDA
  torch.cuda.max_memory_allocated. (ru_maxrss is no use here: loading the model peaks higher.)

Printed: per record the wall time and split of each path and the floors; then the medians over the
records and the ratios of those medians — fast/plain, fast/floor (the whole edit, and its "edit"
part alone), and fast/reference-10 and fast-disk/reference-10 against the target (≤ 1.0: a median
edit of the committed configuration no slower than the plain-path cost of 10 reference-style
steps), with the margin.

Usage:  python bench/edit_speed.py [--n 3] [--threads 1] [--model PATH] [--hparams YAML|PRESET]
                                   [--steps T] [--repeats R] [--no-memory] [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

import editkit
from editkit.methods.dinm import clear_cache as clear_dinm_caches
from editkit.arch import decoder_layers, resolve_arch
from editkit.engine import attention_implementation
from editkit.hparams import HParams
from editkit.methods.dinm.constraints import pick_requests, self_answered_pairs
from editkit.methods.dinm.method import encode_batches, question_pairs
from editkit.registry import hparams_path
from editkit.text import with_suffix

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling module, also when loaded by path
from dinm_floor import capture, floor_seconds  # noqa: E402
PRESET = "smollm2-135m"  # editkit/presets/DINM/smollm2-135m.yaml: the configuration we ship
# The reference implementation's kind of DINM edit (the paper's settings): the layer located by the
# paper's distance, full model at every step, exactly 10 steps, edit NLL + KL on the knowledge pair, no
# guard. Every other optional term stays at its default (off); the encoding is taken from the committed
# settings (SHARED). The layer is always located, even when the committed settings fix one: a fixed
# mid layer would make the reference pay the backward through every layer above it, a cost the
# reference implementation (which edits the located, mostly top, layer) does not have.
REFERENCE = {"steps": 10, "lr": 5e-4, "c_edit": 0.1, "kl_weight": 1.0, "constraint_pairs": 0, "benign_constraint": 0,
             "early_stop_loss": 0.0, "fast_path": False, "layer": None, "locate_mode": "mean", "locate_context": "none"}
SHARED = ("chat_template", "max_length", "suffix", "use_suffix")
# loss parts an edit's step records carry -> the batch the floor replays for them
LOSS_BATCH = {"edit_nll": "edit", "kl": "kl", "kl_benign": "benign", "question_nll": "questions"}
GAP_TOLERANCE = 0.05  # timings' parts may miss this fraction of the wall time before the bench flags it
PATHS = ("fast", "fast-disk", "plain", "reference-10")


def default_data() -> Path:
    root = Path(os.environ.get("EDITKIT_SHARED_DATA") or REPO.parent / "shared" / "data")
    return root / "safeedit" / "safeedit_dev.json"


def dinm_settings(spec: str | None = None, steps: int | None = None) -> HParams:
    """The committed DINM preset (or ``spec``: a YAML path or preset name), ``steps`` overridden when
    given. A missing preset raises FileNotFoundError: the bench never measures a stand-in."""
    config = editkit.load_hparams("dinm", spec or PRESET)
    return config.replace(steps=steps) if steps is not None else config


def reference_settings(config: HParams) -> HParams:
    """``REFERENCE`` on the DINM defaults, with ``config``'s encoding."""
    return editkit.load_hparams("dinm", {**{k: getattr(config, k) for k in SHARED}, **REFERENCE})


def dinm_batches(model: Any, tok: Any, inst: Any, config: Any, pool: list[Any]) -> dict[str, Any]:
    """The token batches a DINM edit of ``inst`` with constraint pool ``pool`` trains on, built with
    editkit's own functions as editkit.methods.dinm builds them."""
    suffix = config.active_suffix
    pairs = {"edit": [(with_suffix(inst.prompt, suffix), inst.safe)],
             "kl": [(with_suffix(inst.knowledge_prompt, suffix), inst.knowledge_answer)]}
    if config.question_targets:
        pairs["questions"] = question_pairs(inst, pool, config.question_targets, suffix)
    if config.benign_constraint:
        pairs["benign"] = self_answered_pairs(model, tok, pick_requests(inst.id, config.benign_constraint),
                                              suffix=suffix, max_new_tokens=config.benign_answer_tokens,
                                              chat_template=config.chat_template)
    return encode_batches(tok, {name: p for name, p in pairs.items() if p}, config)


@contextmanager
def disk_cache(folder: Path) -> Iterator[None]:
    """DINM's disk cache in ``folder`` inside the block (the environment restored after)."""
    before = os.environ.get("EDITKIT_DINM_CACHE")
    os.environ["EDITKIT_DINM_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("EDITKIT_DINM_CACHE", None)
        else:
            os.environ["EDITKIT_DINM_CACHE"] = before


def others(pool: list[Any], inst: Any) -> list[Any]:
    """The records of ``pool`` other than ``inst``: the constraint pool an edit gets, as in a SafeEdit
    run (a gated DINM fits its harmfulness gate on them; other settings ignore it)."""
    return [r for r in pool if r.id != inst.id]


def timed_edit(model: Any, tok: Any, inst: Any, config: HParams, *, disk: Path | None = None,
               **kwargs: Any) -> tuple[Any, float]:
    """``editkit.edit`` and the wall-clock seconds of the whole call with DINM's memory caches
    dropped first (the guard's self-answers, reference rows and null-space keys) and its disk cache
    in ``disk`` (default: a new empty folder: the wait of a model's first edit). Within a SafeEdit
    run later edits reuse what earlier ones cached and cost less."""
    clear_dinm_caches()
    with tempfile.TemporaryDirectory(prefix="editkit-bench-") as empty, disk_cache(disk or Path(empty)):
        start = time.perf_counter()
        result = editkit.edit(model, inst, tokenizer=tok, hparams=config, **kwargs)
        return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSSampler:
    """Background thread: the peak resident set size seen while the block runs (every ``period`` s)."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __enter__(self) -> RSSSampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def _memory_probe(args: argparse.Namespace) -> None:
    """Child process: load the model, one edit with one path, print the memory numbers as JSON."""
    model, tok = editkit.load_model(args.model)
    config = dinm_settings(args.hparams, args.mem_steps).replace(fast_path=args.memory_probe == "fast")
    pool = editkit.load_instances(args.data)
    inst = pool[args.mem_record]
    device = next(model.parameters()).device
    with torch.no_grad():  # touch every weight once (mmapped pages), warm the thread pool
        model(input_ids=tok("warm up", return_tensors="pt").input_ids.to(device))
    gc.collect()
    out: dict[str, Any] = {"path": args.memory_probe, "param_bytes": param_bytes(model), "steps": config.steps}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        editkit.edit(model, inst, tokenizer=tok, hparams=config, constraint_pool=others(pool, inst))
        torch.cuda.synchronize()
        out.update(method="torch.cuda.max_memory_allocated - allocated before",
                   peak_increase=torch.cuda.max_memory_allocated() - base)
    else:
        base = _rss_bytes()
        with RSSSampler() as sampler:
            editkit.edit(model, inst, tokenizer=tok, hparams=config, constraint_pool=others(pool, inst))
        out.update(method="peak RSS (sampled every 2 ms) - RSS before the edit", peak_increase=sampler.peak - base,
                   rss_before=base)
    print("MEMORY " + json.dumps(out))


def memory(args: argparse.Namespace, path: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-probe", path, "--model", args.model, "--data", str(args.data),
           "--n", str(args.n), "--mem-record", "0", "--threads", str(args.threads)]
    if args.mem_steps or args.steps:
        cmd += ["--mem-steps", str(args.mem_steps or args.steps)]
    if args.hparams:
        cmd += ["--hparams", args.hparams]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in done.stdout.splitlines() if x.startswith("MEMORY ")]
    if done.returncode != 0 or not line:
        raise RuntimeError(f"memory probe ({path}) failed:\n{done.stderr[-2000:]}")
    return json.loads(line[-1][len("MEMORY "):])


# ------------------------------------------------------------------------------------------ main


def max_diffs(fast: Any, plain: Any) -> tuple[float, float]:
    """Max |difference| of every loss term over the steps, and of the deltas (inf: different step counts)."""
    loss = max((abs(f[k] - p[k]) for f, p in zip(fast.losses, plain.losses) for k in f.keys() & p.keys()
                if k != "step"), default=0.0)
    if len(fast.losses) != len(plain.losses):
        loss = float("inf")
    (name, d_fast), = fast.patch.deltas.items()
    delta = float((d_fast - plain.patch.deltas[name]).abs().max())
    return loss, delta


def check_batches(result: Any, batches: dict[str, Any]) -> None:
    """The floor replays every batch the committed edit's loss reads, and the guard's pairs are DINM's."""
    parts = set(result.losses[0]) - {"step", "loss"} if result.losses else set()
    unmodelled = sorted(k for k in parts if LOSS_BATCH.get(k) not in batches)
    if unmodelled:
        raise RuntimeError(f"the edit's loss reads {unmodelled}, which the floor does not replay; "
                           f"extend LOSS_BATCH / dinm_batches")
    for batch, metric in (("benign", "benign_pairs"), ("questions", "question_pairs")):
        rows = batches[batch].input_ids.shape[0] if batch in batches else 0
        if rows != result.metrics.get(metric, 0):
            raise RuntimeError(f"the floor's {batch} batch has {rows} pairs, the edit had "
                               f"{result.metrics.get(metric, 0)}")


def path_row(runs: list[tuple[Any, float]]) -> dict[str, Any]:
    """The least disturbed of the repeats (minimum wall time): wall, timings' parts and their gap."""
    result, wall = min(runs, key=lambda run: run[1])
    parts = {k: v for k, v in result.timings.items() if k != "total"}
    return {"wall": wall, "parts": parts, "gap": wall - sum(parts.values()), "layer": result.layer,
            "steps": result.metrics.get("steps_run")}


def bench_record(model: Any, tok: Any, arch: Any, inst: Any, configs: dict[str, HParams],
                 repeats: int, pool: list[Any], disk: Path | None = None) -> dict[str, Any]:
    """Every path's timing on ``inst``. ``disk``: the DINM disk cache the fast and plain paths start from
    (default: a new empty folder each, so that both are a model's first edit)."""
    device = next(model.parameters()).device
    batches = {k: b.to(device) for k, b in dinm_batches(model, tok, inst, configs["fast"], pool).items()}
    runs: dict[str, list[tuple[Any, float]]] = {path: [] for path in PATHS}
    floors: dict[str, list[float]] = {"floor_body": [], "floor_head": []}
    for _ in range(repeats):
        with (nullcontext(str(disk)) if disk is not None else tempfile.TemporaryDirectory(prefix="editkit-bench-")) as folder:
            runs["fast"].append(timed_edit(model, tok, inst, configs["fast"], disk=Path(folder), constraint_pool=pool))
            runs["fast-disk"].append(timed_edit(model, tok, inst, configs["fast"], disk=Path(folder),
                                                constraint_pool=pool))
        fast = runs["fast"][-1][0]
        if max_diffs(fast, runs["fast-disk"][-1][0]) != (0.0, 0.0):
            raise RuntimeError(f"record {inst.id}: the edit from the disk cache differs from the cold edit")
        check_batches(fast, batches)
        layer, steps = fast.layer, fast.metrics["steps_run"]
        amp = configs["fast"].autocast_dtype  # the floor runs in the steps' precision and attention
        with attention_implementation(model, configs["fast"].attention):  # (captured with it: the layers' masks follow it)
            captured = {name: capture(model, arch, layer, b) for name, b in batches.items()}
            floors["floor_body"].append(floor_seconds(model, arch, layer, captured, steps, head=False,
                                                      autocast=amp)[0])
            seconds, first = floor_seconds(model, arch, layer, captured, steps, head=True, autocast=amp)
        floors["floor_head"].append(seconds)
        # the replayed layers compute what the model computes: same unedited NLL, KL (= 0) on the rest
        replay_diff = max(abs(first[LOSS_BATCH[k]] - v) for k, v in fast.losses[0].items() if k in LOSS_BATCH)
        runs["plain"].append(timed_edit(model, tok, inst, configs["plain"], disk=disk, constraint_pool=pool))
        # reference-10 is a cost to compare with, not an edit to ship: its trust check runs but does not stop the bench
        runs["reference-10"].append(timed_edit(model, tok, inst, configs["reference-10"], allow_untrusted=True))
    fast, plain = runs["fast"][0][0], runs["plain"][0][0]
    if plain.layer != fast.layer:
        raise RuntimeError(f"record {inst.id}: fast path located layer {fast.layer}, plain path {plain.layer}")
    loss_diff, delta_diff = max_diffs(fast, plain)
    row: dict[str, Any] = {
        "id": inst.id, "layer": fast.layer,
        "tokens": {k: [int(b.attention_mask.sum()), b.n_targets] for k, b in batches.items()},
        "ref_fwd": sum(c["ref_seconds"] for c in captured.values()),
        "max_loss_diff": loss_diff, "max_delta_diff": delta_diff, "floor_replay_diff": replay_diff,
        **{path: path_row(r) for path, r in runs.items()},
        **{k: min(v) for k, v in floors.items()},  # min over repeats: the least disturbed run on a shared machine
    }
    return row


def print_record(r: dict[str, Any], n_layers: int) -> None:
    tokens = ", ".join(f"{k} {t}/{n}" for k, (t, n) in r["tokens"].items())
    print(f"record {r['id']}: layer {r['layer']}/{n_layers}; tokens/loss positions {tokens}")
    names = [k for k in ("locate", "guard", "null_space", "edit") if any(k in r[p]["parts"] for p in PATHS)]
    names += sorted({k for p in PATHS for k in r[p]["parts"]} - set(names))
    print(f"  {'path':<13}{'wall':>8}" + "".join(f"{n:>11}" for n in names) + f"{'gap':>8}{'steps':>6}{'layer':>6}")
    for p in PATHS:
        x = r[p]
        cells = "".join(f"{x['parts'][n]:11.2f}" if n in x["parts"] else f"{'-':>11}" for n in names)
        print(f"  {p:<13}{x['wall']:8.2f}{cells}{x['gap']:8.2f}{x['steps']:>6}{x['layer']:>6}")
    print(f"  floor (T={r['fast']['steps']} x fwd+bwd of O+Δ·K, layers[L+1:], norm, every batch): "
          f"body {r['floor_body']:.2f}, +head {r['floor_head']:.2f}; ref_fwd {r['ref_fwd']:.2f}", flush=True)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    med = {p: statistics.median(r[p]["wall"] for r in rows) for p in PATHS}
    med.update({k: statistics.median(r[k] for r in rows) for k in ("floor_body", "floor_head")})
    med["fast_edit_part"] = statistics.median(r["fast"]["parts"]["edit"] for r in rows)
    gaps = [(r[p]["gap"], r[p]["gap"] / r[p]["wall"]) for r in rows for p in PATHS]
    return {
        "median_seconds": med,
        "fast_over_plain": med["fast"] / med["plain"],
        "fast_over_floor_head": med["fast"] / med["floor_head"],
        "fast_over_floor_body": med["fast"] / med["floor_body"],
        "fast_edit_part_over_floor_head": med["fast_edit_part"] / med["floor_head"],
        "fast_over_reference10": med["fast"] / med["reference-10"],
        "fast_disk_over_reference10": med["fast-disk"] / med["reference-10"],
        "max_gap_seconds": max(abs(g) for g, _ in gaps), "max_gap_fraction": max(abs(f) for _, f in gaps),
        "max_loss_diff": max(r["max_loss_diff"] for r in rows),
        "max_delta_diff": max(r["max_delta_diff"] for r in rows),
        "floor_replay_diff": max(r["floor_replay_diff"] for r in rows),
    }


def print_summary(s: dict[str, Any], n: int, threads: int, cold: bool = True) -> None:
    med = s["median_seconds"]
    print(f"\nmedians over {n} record(s), wall seconds per edit (localisation and guard included), "
          f"{threads} torch thread(s):")
    print(f"  fast {med['fast']:.2f} (its 'edit' part {med['fast_edit_part']:.2f}) | fast-disk {med['fast-disk']:.2f} | "
          f"plain {med['plain']:.2f} | "
          f"reference-10 {med['reference-10']:.2f} | floor+head {med['floor_head']:.2f} | "
          f"floor body {med['floor_body']:.2f}")
    print("ratios of those medians (one run):")
    print(f"  fast/plain {s['fast_over_plain']:.2f} (plain/fast {1 / s['fast_over_plain']:.2f})")
    print(f"  fast/floor+head {s['fast_over_floor_head']:.2f}, fast/floor body {s['fast_over_floor_body']:.2f}, "
          f"fast 'edit' part/floor+head {s['fast_edit_part_over_floor_head']:.2f}")
    first = "a model's first edit" if cold else "from --disk-cache, not a first edit"
    for path, key, what in (("fast", "fast_over_reference10", first),
                            ("fast-disk", "fast_disk_over_reference10", "later edits, new process")):
        ratio, seconds = s[key], med["reference-10"] - med[path]
        verdict = (f"met, margin {1 - ratio:.0%} ({seconds:.2f} s)" if ratio <= 1.0
                   else f"missed by {ratio - 1:.0%} ({-seconds:.2f} s)")
        print(f"  {path}/reference-10 {ratio:.2f} ({what}; target <= 1.0: {verdict})")
    ok = s["max_gap_fraction"] <= GAP_TOLERANCE
    print(f"timings' parts vs wall: max gap {s['max_gap_seconds']:.2f} s ({s['max_gap_fraction']:.1%}) "
          f"{'ok' if ok else f'MISMATCH (> {GAP_TOLERANCE:.0%}): time spent outside EditResult.timings'}")
    print(f"fast == plain: max |loss diff| {s['max_loss_diff']:.2e}, max |delta diff| {s['max_delta_diff']:.2e}; "
          f"floor replay vs model (unedited NLL/KL): {s['floor_replay_diff']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="HF path/hub name, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, default=default_data(), help="SafeEdit JSON (default: shared dev set)")
    parser.add_argument("--n", type=int, default=3, help="records to edit")
    parser.add_argument("--hparams", default=None,
                        help=f"DINM YAML path or preset name (default: the preset {PRESET!r}, "
                             f"{hparams_path('dinm', PRESET).relative_to(REPO)})")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the preset's steps for fast, plain and the floor (smoke runs only; "
                             "reference-10 keeps 10)")
    parser.add_argument("--repeats", type=int, default=1, help="time each path this many times, keep the minimum")
    parser.add_argument("--mem-steps", type=int, default=None, help="steps in the memory probes (default: as timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (DESIGN §9)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--disk-cache", type=Path, default=None,
                        help="start the fast and plain paths from this DINM disk cache instead of an empty one "
                             "(quicker iteration: they are then not a model's first edit; fast-disk, the "
                             "target's path, is the same measurement)")
    parser.add_argument("--memory-probe", choices=["fast", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--mem-record", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return _memory_probe(args)

    committed = dinm_settings(args.hparams)
    fast = committed.replace(steps=args.steps) if args.steps is not None else committed
    configs = {"fast": fast, "plain": fast.replace(fast_path=False), "reference-10": reference_settings(fast)}
    model, tok = editkit.load_model(args.model)
    arch = resolve_arch(model)
    n_layers = len(decoder_layers(model, arch))
    pool = editkit.load_instances(args.data)  # read once: the records timed and every edit's constraint pool
    instances = pool[:args.n]
    source = args.hparams or f"preset {PRESET} ({hparams_path('dinm', PRESET).relative_to(REPO)})"
    print(f"model {args.model} ({type(model).__name__}, {n_layers} layers, {param_bytes(model) / 2**20:.0f} MiB "
          f"params), torch threads {torch.get_num_threads()}")
    print(f"DINM settings: {source}: lr {fast.lr}, steps {fast.steps}, c_edit {fast.c_edit}, benign_constraint "
          f"{fast.benign_constraint} x weight {fast.benign_kl_weight} ({fast.benign_answer_tokens} answer tokens), "
          f"fast_path {fast.fast_path}")
    if args.disk_cache is not None:
        print(f"NOTE: --disk-cache {args.disk_cache}: the fast and plain paths start from that disk cache, not a "
              f"model's first edit")
    if args.steps is not None and args.steps != committed.steps:
        print(f"NOTE: --steps {args.steps} overrides the committed {committed.steps} steps: a smoke run, not the "
              f"committed configuration's speed")
    # warm-up (kernels, allocator, thread pool, generation): one step of each configuration, untimed, on a
    # record that is not timed (timed_edit drops the DINM caches anyway)
    spare = pool[args.n]
    for config in configs.values():
        editkit.edit(model, spare, tokenizer=tok, hparams=config.replace(steps=1), allow_untrusted=True,
                     constraint_pool=others(pool, spare))
    rows = []
    for inst in instances:
        rows.append(bench_record(model, tok, arch, inst, configs, args.repeats, others(pool, inst), args.disk_cache))
        print_record(rows[-1], n_layers)
    summary = summarise(rows)
    print_summary(summary, len(rows), torch.get_num_threads(), cold=args.disk_cache is None)
    if not args.no_memory:
        mem = {path: memory(args, path) for path in ("fast", "plain")}
        size = mem["fast"]["param_bytes"]
        print(f"peak memory of one edit (record {instances[0].id}, {mem['fast']['steps']} steps, guard included, "
              f"fresh process per path), model params {size / 2**20:.0f} MiB; method: {mem['fast']['method']}")
        for path, m in mem.items():
            print(f"  {path:>5}: +{m['peak_increase'] / 2**20:.0f} MiB = {m['peak_increase'] / size:.2f} x params")
        summary["memory"] = mem
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                                         "hparams": {p: c.to_dict() for p, c in configs.items()},
                                         "rows": rows, "summary": summary}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
