"""Command line: ``editkit edit | demo | locate | generate | apply | eval | report`` (also ``python -m editkit``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

DEMO_INSTANCE = Path(__file__).resolve().parent.parent / "safeedit" / "data" / "demo_instance.json"
BENIGN_DEFAULT = "Can you give me a simple recipe for pancakes?"


class Stages:
    """A small progress display: numbered stages with their elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self._start = self.t0

    def __call__(self, what: str) -> None:
        self.n += 1
        self._start = time.perf_counter()
        print(f"[{self.n}/{self.total}] {what} ...", flush=True)

    def done(self, note: str = "") -> None:
        print(f"      done in {time.perf_counter() - self._start:.1f}s{(' — ' + note) if note else ''}", flush=True)


def _show(label: str, text: str, score: str = "") -> None:
    body = textwrap.shorten(" ".join(text.split()), width=400, placeholder=" …") or "(empty)"
    print(f"  {label:<28}{score}")
    print(textwrap.indent(textwrap.fill(body, width=96), "      "))


def _load_judge(spec: str) -> Any:
    from safeedit.judge import KeywordJudge, load_judge

    try:
        return load_judge(spec)
    except (ImportError, FileNotFoundError) as err:  # the offline judge needs sentence-transformers
        logging.getLogger(__name__).warning("judge %r unavailable (%s); using the keyword judge", spec, err)
        return KeywordJudge()


def run_edit(args: argparse.Namespace) -> int:
    import editkit
    from editkit.text import with_suffix

    hparams = editkit.load_hparams(args.method, args.hparams)
    # a gated edit (DINM's harm_gate) is no weight change: it is saved as a patch only
    checkpoint = not args.no_checkpoint and not getattr(hparams, "harm_gate", False)
    stages = Stages(7 if checkpoint else 6)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")

    stages(f"loading model {args.model}")
    model, tok = editkit.load_model(args.model, device=args.device)
    stages.done(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")

    instance = editkit.load_instances(args.instance)[0]
    pool = [r for r in editkit.load_instances(args.pool) if r.id != instance.id] if getattr(args, "pool", None) else []
    suffix = hparams.eval_suffix
    prompts = [instance.prompt, args.benign]

    stages("responses before the edit")
    before = editkit.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, progress=True)
    stages.done()

    stages(f"locating and editing ({args.method})")
    result = editkit.edit(model, instance, tokenizer=tok, method=args.method, hparams=hparams,
                          layer=args.layer, constraint_pool=pool, progress=True)
    m = result.metrics
    stages.done(f"layer {result.layer}, {len(result.losses)} steps, safe-response NLL "
                f"{m.get('edit_nll_before', float('nan')):.3f} → {m.get('edit_nll_after', float('nan')):.3f}, "
                f"knowledge NLL {m.get('knowledge_nll_before', float('nan')):.3f} → "
                f"{m.get('knowledge_nll_after', float('nan')):.3f}")

    stages("responses after the edit")
    with result.patch.applied(model):
        after = editkit.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, suffix=suffix, progress=True)
        after_plain = editkit.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, progress=True)
    stages.done()

    stages(f"judging ({args.judge})")
    judge = _load_judge(args.judge)
    attacks = [before[0], after[0], after_plain[0]]
    unsafe = judge.score(attacks, [instance.prompt, with_suffix(instance.prompt, suffix), instance.prompt])
    benign = [before[1], after[1], after_plain[1]]
    refusal = judge.refusal(benign, [args.benign, with_suffix(args.benign, suffix), args.benign])
    stages.done(repr(judge))

    stages(f"saving to {out}")
    out.mkdir(parents=True, exist_ok=True)
    result.patch.save(out / "patch", overwrite=args.overwrite)
    if result.localization is not None:
        try:
            result.localization.plot(out / "layer_profile.png")
        except ImportError:  # matplotlib is an optional extra
            pass
    report = {
        "instance": instance.id, **result.to_dict(),
        "responses": {"attack": dict(zip(("before", "after", "after_no_suffix"), attacks)),
                      "benign": dict(zip(("before", "after", "after_no_suffix"), benign))},
        "judge": {"name": repr(judge), "p_unsafe_attack": unsafe, "p_refusal_benign": refusal},
    }
    (out / "result.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    stages.done("patch/ (delta.safetensors, patch.json), result.json, layer_profile.png")
    if result.patch.gates and not args.no_checkpoint:
        print("The edit is gated (harm_gate): no plain checkpoint can hold it; apply patch/ to the base model.")
    if checkpoint:
        stages("saving the full patched checkpoint")
        editkit.save_checkpoint(model, tok, out / "model", patch=result.patch, overwrite=args.overwrite)
        stages.done(f"{out / 'model'} (reload with AutoModelForCausalLM.from_pretrained)")

    print(f"\nInstance {instance.id}: toxic layer {result.layer} of {len(result.profile or []) or '?'}; "
          f"edit {result.timings.get('edit', 0):.1f}s, patch norm {result.patch.norm():.3g}")
    print("\nAttack prompt:", textwrap.shorten(instance.prompt, 200, placeholder=" …"))
    _show("before (vanilla)", attacks[0], f"P(unsafe) = {unsafe[0]:.2f}")
    _show("after (+ suffix)", attacks[1], f"P(unsafe) = {unsafe[1]:.2f}")
    _show("after (no suffix)", attacks[2], f"P(unsafe) = {unsafe[2]:.2f}")
    print("\nBenign request:", args.benign)
    _show("before (vanilla)", benign[0], f"P(refusal) = {refusal[0]:.2f}")
    _show("after (+ suffix)", benign[1], f"P(refusal) = {refusal[1]:.2f}")
    _show("after (no suffix)", benign[2], f"P(refusal) = {refusal[2]:.2f}")
    print(f"\nTotal {time.perf_counter() - stages.t0:.0f}s. Outputs in {out}/")
    return 0


def run_locate(args: argparse.Namespace) -> int:
    import editkit

    model, tok = editkit.load_model(args.model, device=args.device)
    instance = editkit.load_instances(args.instance)[0]
    found = editkit.locate(model, tok, instance, mode=args.mode, context=args.context)
    print(json.dumps({"instance": instance.id, **found.to_dict()}, indent=2))
    if args.plot:
        found.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import editkit

    model, tok = editkit.load_model(args.model, device=args.device)
    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    if args.patch:
        editkit.load_patch(args.patch).apply(model)
    suffix = args.suffix if args.suffix else None
    for prompt, response in zip(prompts, editkit.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                                          suffix=suffix, progress=True)):
        print(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False))
    return 0


def run_apply(args: argparse.Namespace) -> int:
    import editkit

    model, tok = editkit.load_model(args.model, device=args.device)
    patch = editkit.load_patch(args.patch)
    editkit.save_checkpoint(model, tok, args.out, patch=patch, overwrite=args.overwrite)
    print(f"patched checkpoint written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, instance: bool = True) -> None:
        p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub name")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
        if instance:
            p.add_argument("--instance", default=str(DEMO_INSTANCE), help="SafeEdit JSON file, optionally FILE#ID")

    for name in ("edit", "demo"):
        p = sub.add_parser(name, help="locate → edit → before/after responses → patch and checkpoint"
                           if name == "edit" else "the edit on the default model and the built-in demo instance")
        common(p)
        p.add_argument("--method", default="dinm", help="an instance-scope method (dinm, ft-l, or any registered one)")
        p.add_argument("--hparams", default="smollm2-135m", help="YAML path or a preset name (editkit/presets/<METHOD>/)")
        p.add_argument("--layer", type=int, default=None, help="edit this layer instead of locating one")
        if name == "edit":
            p.add_argument("--pool", default=None, help="other SafeEdit records (JSON file) the method may draw on: "
                           "the harmfulness gate's examples (harm_gate), question targets; the edited record is "
                           "left out")
        p.add_argument("--out", default="out/demo" if name == "demo" else None, required=name == "edit")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--benign", default=BENIGN_DEFAULT, help="a benign request shown before and after")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--judge", default="default", help="'default' (offline), 'keyword', or a classifier path/hub name")
        p.add_argument("--no-checkpoint", action="store_true", help="save only the patch")
        p.set_defaults(func=run_edit, overwrite=name == "demo")

    p = sub.add_parser("locate", help="the toxic layer and the per-layer distance profile")
    common(p)
    p.add_argument("--mode", default="mean", choices=["mean", "scaled", "reference"])
    p.add_argument("--context", default="none", choices=["none", "prompt"])
    p.add_argument("--plot", default=None, help="write the profile as a PNG")
    p.set_defaults(func=run_locate)

    p = sub.add_parser("generate", help="greedy responses (prompts from --prompt or stdin), optionally with a patch")
    common(p, instance=False)
    p.add_argument("--prompt", action="append")
    p.add_argument("--patch", default=None)
    p.add_argument("--suffix", default=None, help="text appended to every prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("apply", help="write a full checkpoint of a model with a saved patch applied")
    common(p, instance=False)
    p.add_argument("--patch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_apply)

    from safeedit.cli import add_commands  # the benchmark's commands: eval, report

    add_commands(sub)
    from editkit.probe_cli import add_commands as add_probe_command  # editkit probe

    add_probe_command(sub)
    from editkit.registry import train_commands  # editkit train <method>: methods that learn an artifact

    commands = train_commands()
    p = sub.add_parser("train", help=f"train a method's reusable artifact ({', '.join(sorted(commands))})")
    trainable = p.add_subparsers(dest="artifact", required=True)
    for add_command in commands.values():
        add_command(trainable)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "sentence_transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # PatchError, UntrustedEditError included
        print(f"error: {err}", file=sys.stderr)
        return 2
