"""DINM edit speed and memory: fast path vs plain path vs the compute floor, as ratios from one run.

For each of N SafeEdit dev records (default 3) this measures, on one model (default:
SmolLM2-135M-Instruct), with the DINM settings of ``editkit/presets/DINM/smollm2-135m.yaml``:

* ``fast``  — ``editkit.edit(..., fast_path=True)``: EditResult.timings["edit"] (the optimisation:
  one no-grad reference forward per batch, T steps, one final no-grad evaluation) and ["total"]
  (localisation included).
* ``plain`` — the same with ``fast_path=False`` (full model forward at every step). Both paths
  locate on their own; the bench checks they found the same layer.
* the compute floor, measured directly on the same token batches: the residual stream entering
  the edited layer L is captured once (no grad), with the exact arguments the model passes to
  each decoder layer L..n-1 (causal mask, rotary embeddings, position ids — captured by
  pre-hooks, so the mask is the one the model built). Then T times, for both DINM batches
  ("edit" and "kl"): run layers[L:] and the final norm on the cached state, a scalar loss,
  backward into a trainable delta on layer L's MLP output projection (added by a forward hook,
  as the editor does). Model parameters are frozen while measuring (no weight gradients).
    - floor_body: loss = mean square of the final-norm output at the loss positions (no LM head).
    - floor_head: the LM head at the loss positions and DINM's own loss (CE on "edit",
      KL to the unedited distribution on "kl"). This is the least work any exact DINM step does.
  Neither floor counts the reference forwards, the optimizer step or the final evaluation that
  timings["edit"] includes; ``ref_fwd`` (one full no-grad forward of both batches) is printed
  beside them so the remaining gap can be read off.
* fast == plain: max |loss difference| over steps and terms, max |delta difference|.
* peak memory of one edit relative to the model's parameter bytes, one fresh subprocess per path
  (see ``_memory_probe``): on CPU the peak RSS increase sampled every 2 ms from /proc/self/statm
  by a background thread, from just before ``editkit.edit`` (model loaded, weights paged in by one
  warm-up forward) to its return, localisation included; on CUDA torch.cuda.max_memory_allocated.
  (ru_maxrss is no use here: loading the model peaks higher than the edit.)

Usage:  python bench/edit_speed.py [--n 3] [--model PATH] [--hparams YAML] [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import editkit
from editkit.arch import decoder_layers, get_module, linear_delta, lm_head, resolve_arch
from editkit.hooks import Trace
from editkit.text import encode_pairs, with_suffix

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HPARAMS = REPO / "hparams" / "DINM" / "smollm2-135m.yaml"
FALLBACK_HPARAMS = {"lr": 2e-3, "steps": 20, "c_edit": 1.0}


def default_data() -> Path:
    root = Path(os.environ.get("EDITKIT_SHARED_DATA") or REPO.parent / "shared" / "data")
    return root / "safeedit" / "safeedit_dev.json"


def dinm_settings(path: str | None, steps: int | None) -> dict[str, Any]:
    if path is None and DEFAULT_HPARAMS.is_file():
        path = str(DEFAULT_HPARAMS)
    settings = editkit.load_hparams("dinm", path).to_dict() if path else dict(FALLBACK_HPARAMS)
    settings.pop("method", None)
    if steps is not None:
        settings["steps"] = steps
    return settings


def dinm_batches(tok: Any, inst: Any, hp: dict[str, Any]) -> dict[str, Any]:
    """The two token batches DINM trains on, built as editkit.methods.dinm builds them."""
    config = editkit.load_hparams("dinm", hp)
    kw = dict(chat_template=config.chat_template, max_length=config.max_length)
    return {
        "edit": encode_pairs(tok, [(with_suffix(inst.prompt, config.active_suffix), inst.safe)], **kw),
        "kl": encode_pairs(tok, [(with_suffix(inst.knowledge_prompt, config.active_suffix), inst.knowledge_answer)],
                           **kw),
    }


# --------------------------------------------------------------------------------- compute floor


class _Frozen:
    """Parameters do not require grad inside the block (restored after)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.params:
            p.requires_grad_(True)


@torch.no_grad()
def capture(model: Any, arch: Any, layer: int, batch: Any) -> dict[str, Any]:
    """One full no-grad forward: the state entering ``layer``, the args every layer >= ``layer``
    is called with, and the unedited logits at the loss positions. Also times the forward."""
    layers = decoder_layers(model, arch)
    calls: dict[int, tuple[tuple, dict]] = {}

    def keep(i: int):
        def hook(module, args, kwargs):
            calls[i] = (args, dict(kwargs))
        return hook

    with ExitStack() as stack:
        for i in range(layer, len(layers)):
            stack.callback(layers[i].register_forward_pre_hook(keep(i), with_kwargs=True).remove)
        entry = stack.enter_context(Trace(layers[layer], retain_input=True, retain_output=False, detach=True))
        start = time.perf_counter()
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        seconds = time.perf_counter() - start
    positions = batch.predicting_positions()
    return {"entry": entry.input, "calls": calls, "positions": positions, "targets": batch.targets(),
            "reference": F.log_softmax(out.logits[positions].float(), -1), "ref_seconds": seconds}


def floor_seconds(model: Any, arch: Any, layer: int, captured: dict[str, dict], steps: int,
                  head: bool) -> tuple[float, dict[str, float]]:
    """T × (forward + backward of layers[layer:] + final norm [+ LM head at the loss positions]).
    Also returns the first iteration's loss per batch (with the head: DINM's unedited NLL / KL)."""
    layers = decoder_layers(model, arch)
    norm = get_module(model, arch.final_norm)
    out_proj = get_module(layers[layer], arch.mlp_out)
    delta = torch.zeros(out_proj.weight.shape, dtype=torch.float32, device=out_proj.weight.device, requires_grad=True)

    def add_delta(module, args, output):
        return output + linear_delta(args[0].float(), delta, arch.mlp_out_transposed).to(output.dtype)

    def step(c: dict[str, Any], name: str) -> torch.Tensor:
        hidden = c["entry"]  # [batch, seq, d_model]
        for i in range(layer, len(layers)):
            args, kwargs = c["calls"][i]
            hidden = layers[i](hidden, *args[1:], **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = norm(hidden)[c["positions"]]  # [n_targets, d_model]
        if not head:
            return hidden.float().pow(2).mean()
        logits = lm_head(model, arch)(hidden).float()  # [n_targets, vocab]
        if name == "edit":
            return F.cross_entropy(logits, c["targets"])
        return F.kl_div(F.log_softmax(logits, -1), c["reference"], log_target=True, reduction="batchmean")

    handle = out_proj.register_forward_hook(add_delta)
    try:
        with _Frozen(model):
            first: dict[str, float] = {}
            start = time.perf_counter()
            for _ in range(steps):
                for name, c in captured.items():
                    loss = step(c, name)
                    loss.backward(inputs=[delta])
                    first.setdefault(name, loss.item())
            return time.perf_counter() - start, first
    finally:
        handle.remove()


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
    hp = {**dinm_settings(args.hparams, args.mem_steps), "fast_path": args.memory_probe == "fast"}
    inst = editkit.load_instances(args.data, limit=args.n)[args.mem_record]
    device = next(model.parameters()).device
    with torch.no_grad():  # touch every weight once (mmapped pages), warm the thread pool
        model(input_ids=tok("warm up", return_tensors="pt").input_ids.to(device))
    gc.collect()
    out: dict[str, Any] = {"path": args.memory_probe, "param_bytes": param_bytes(model), "steps": hp["steps"]}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        editkit.edit(model, inst, tokenizer=tok, hparams=hp)
        torch.cuda.synchronize()
        out.update(method="torch.cuda.max_memory_allocated - allocated before", peak_increase=torch.cuda.max_memory_allocated() - base)
    else:
        base = _rss_bytes()
        with RSSSampler() as sampler:
            editkit.edit(model, inst, tokenizer=tok, hparams=hp)
        out.update(method="peak RSS (sampled every 2 ms) - RSS before the edit", peak_increase=sampler.peak - base,
                   rss_before=base)
    print("MEMORY " + json.dumps(out))


def memory(args: argparse.Namespace, path: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-probe", path, "--model", args.model, "--data", str(args.data),
           "--n", str(args.n), "--mem-record", "0"]
    if args.mem_steps or args.steps:
        cmd += ["--mem-steps", str(args.mem_steps or args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.hparams:
        cmd += ["--hparams", args.hparams]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in done.stdout.splitlines() if x.startswith("MEMORY ")]
    if done.returncode != 0 or not line:
        raise RuntimeError(f"memory probe ({path}) failed:\n{done.stderr[-2000:]}")
    return json.loads(line[-1][len("MEMORY "):])


# ------------------------------------------------------------------------------------------ main


def max_diffs(fast: Any, plain: Any) -> tuple[float, float]:
    loss = max((abs(f[k] - p[k]) for f, p in zip(fast.losses, plain.losses) for k in ("loss", "edit_nll", "kl")),
               default=0.0)
    if len(fast.losses) != len(plain.losses):
        loss = float("inf")
    (name, d_fast), = fast.patch.deltas.items()
    delta = float((d_fast - plain.patch.deltas[name]).abs().max())
    return loss, delta


def bench_record(model: Any, tok: Any, arch: Any, inst: Any, hp: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs: dict[str, list[Any]] = {"fast": [], "plain": []}
    floors: dict[str, list[float]] = {"floor_body": [], "floor_head": []}
    batches = {k: b.to(next(model.parameters()).device) for k, b in dinm_batches(tok, inst, hp).items()}
    for _ in range(repeats):
        runs["fast"].append(editkit.edit(model, inst, tokenizer=tok, hparams={**hp, "fast_path": True}))
        layer, steps = runs["fast"][-1].layer, runs["fast"][-1].metrics["steps_run"]
        captured = {name: capture(model, arch, layer, b) for name, b in batches.items()}
        floors["floor_body"].append(floor_seconds(model, arch, layer, captured, steps, head=False)[0])
        seconds, first = floor_seconds(model, arch, layer, captured, steps, head=True)
        floors["floor_head"].append(seconds)
        # the replayed layers compute what the model computes: same unedited NLL and KL (= 0)
        replay_diff = max(abs(first["edit"] - runs["fast"][-1].losses[0]["edit_nll"]),
                          abs(first["kl"] - runs["fast"][-1].losses[0]["kl"]))
        runs["plain"].append(editkit.edit(model, inst, tokenizer=tok, hparams={**hp, "fast_path": False}))
    fast, plain = runs["fast"][0], runs["plain"][0]
    if plain.layer != fast.layer:
        raise RuntimeError(f"record {inst.id}: fast path located layer {fast.layer}, plain path {plain.layer}")
    loss_diff, delta_diff = max_diffs(fast, plain)
    row = {
        "id": inst.id, "layer": fast.layer, "steps": fast.metrics["steps_run"],
        "tokens": {k: [int(b.attention_mask.sum()), b.n_targets] for k, b in batches.items()},
        "ref_fwd": sum(c["ref_seconds"] for c in captured.values()),
        "max_loss_diff": loss_diff, "max_delta_diff": delta_diff, "floor_replay_diff": replay_diff,
    }
    for path, results in runs.items():  # min over repeats: the least disturbed run on a shared machine
        row[f"{path}_edit"] = min(r.timings["edit"] for r in results)
        row[f"{path}_total"] = min(r.timings["total"] for r in results)
    row.update({k: min(v) for k, v in floors.items()})
    return row


def print_table(rows: list[dict[str, Any]], n_layers: int) -> None:
    head = (f"{'id':>5} {'layer':>7} {'T':>3} {'edit tok/tgt':>12} {'kl tok/tgt':>10} | {'fast':>6} {'plain':>7} "
            f"{'floor':>6} {'+head':>6} {'refwd':>6} | {'fast/fl':>7} {'fast/+h':>7} {'plain/+h':>8} "
            f"{'plain/fast':>10} | {'fast tot':>8} {'plain tot':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        e, k = r["tokens"]["edit"], r["tokens"]["kl"]
        print(f"{r['id']:>5} {str(r['layer']) + '/' + str(n_layers):>7} {r['steps']:>3} {e[0]:>7}/{e[1]:<4} "
              f"{k[0]:>5}/{k[1]:<4} | {r['fast_edit']:6.2f} {r['plain_edit']:7.2f} {r['floor_body']:6.2f} "
              f"{r['floor_head']:6.2f} {r['ref_fwd']:6.2f} | {r['fast_edit'] / r['floor_body']:7.2f} "
              f"{r['fast_edit'] / r['floor_head']:7.2f} {r['plain_edit'] / r['floor_head']:8.2f} "
              f"{r['plain_edit'] / r['fast_edit']:10.2f} | {r['fast_total']:8.2f} {r['plain_total']:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="HF path/hub name, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, default=default_data(), help="SafeEdit JSON (default: shared dev set)")
    parser.add_argument("--n", type=int, default=3, help="records to edit")
    parser.add_argument("--hparams", default=None, help=f"DINM YAML (default {DEFAULT_HPARAMS.relative_to(REPO)})")
    parser.add_argument("--steps", type=int, default=None, help="override the YAML's steps (quick runs)")
    parser.add_argument("--repeats", type=int, default=1, help="time each path this many times, keep the minimum")
    parser.add_argument("--mem-steps", type=int, default=None, help="steps in the memory probes (default: as timed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--memory-probe", choices=["fast", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--mem-record", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return _memory_probe(args)

    hp = dinm_settings(args.hparams, args.steps)
    model, tok = editkit.load_model(args.model)
    arch = resolve_arch(model)
    n_layers = len(decoder_layers(model, arch))
    instances = editkit.load_instances(args.data, limit=args.n)
    print(f"model {args.model} ({type(model).__name__}, {n_layers} layers, {param_bytes(model) / 2**20:.0f} MiB params), "
          f"torch threads {torch.get_num_threads()}, DINM lr {hp['lr']} steps {hp['steps']} c_edit {hp['c_edit']}")
    # warm-up (kernels, allocator, thread pool): one step each path, untimed
    for fast_path in (True, False):
        editkit.edit(model, instances[0], tokenizer=tok, hparams={**hp, "steps": 1, "fast_path": fast_path})
    rows = []
    for inst in instances:
        rows.append(bench_record(model, tok, arch, inst, hp, args.repeats))
        print(f"  record {inst.id}: layer {rows[-1]['layer']}, fast {rows[-1]['fast_edit']:.1f}s, "
              f"plain {rows[-1]['plain_edit']:.1f}s", flush=True)
    print()
    print("seconds; fast/plain = EditResult.timings['edit'] (reference fwd + T steps + final eval);")
    print("floor = T x fwd+bwd of layers[L:] + final norm (no LM head); +head = also LM head + DINM loss at the loss")
    print("positions; refwd = one full no-grad forward of both batches (inside fast/plain, outside the floors)")
    print_table(rows, n_layers)
    ratio = {k: statistics.mean(r["fast_edit"] / r[k] for r in rows) for k in ("floor_body", "floor_head")}
    summary: dict[str, Any] = {
        "fast_over_floor_body": ratio["floor_body"], "fast_over_floor_head": ratio["floor_head"],
        "plain_over_floor_head": statistics.mean(r["plain_edit"] / r["floor_head"] for r in rows),
        "plain_over_fast": statistics.mean(r["plain_edit"] / r["fast_edit"] for r in rows),
        "max_loss_diff": max(r["max_loss_diff"] for r in rows), "max_delta_diff": max(r["max_delta_diff"] for r in rows),
        "floor_replay_diff": max(r["floor_replay_diff"] for r in rows),
    }
    print(f"mean ratios: fast/floor {summary['fast_over_floor_body']:.2f}  fast/floor+head "
          f"{summary['fast_over_floor_head']:.2f} (target <= 1.5: "
          f"{'met' if summary['fast_over_floor_head'] <= 1.5 else 'NOT met'})  plain/floor+head "
          f"{summary['plain_over_floor_head']:.2f}  plain/fast {summary['plain_over_fast']:.2f}")
    print(f"fast == plain: max |loss diff| {summary['max_loss_diff']:.2e}, max |delta diff| {summary['max_delta_diff']:.2e}; "
          f"floor replay vs model (unedited NLL/KL): {summary['floor_replay_diff']:.2e}")
    if not args.no_memory:
        mem = {path: memory(args, path) for path in ("fast", "plain")}
        size = mem["fast"]["param_bytes"]
        print(f"peak memory of one edit (record {instances[0].id}, {mem['fast']['steps']} steps, fresh process per path), "
              f"model params {size / 2**20:.0f} MiB; method: {mem['fast']['method']}")
        for path, m in mem.items():
            print(f"  {path:>5}: +{m['peak_increase'] / 2**20:.0f} MiB = {m['peak_increase'] / size:.2f} x params")
        summary["memory"] = mem
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "hparams": hp, "rows": rows, "summary": summary},
                                        indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
