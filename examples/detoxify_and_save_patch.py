"""Detoxify a model on one SafeEdit case with DINM and save the edit as a small patch.

Shows: ``editkit.edit`` (the model itself stays unchanged; the edit lives in ``result.patch``),
the located toxic layer, greedy responses before and after (the patch applied only inside a
``with`` block), and ``Patch.save`` (delta.safetensors + patch.json, a few MB).

    python examples/detoxify_and_save_patch.py --out out/patch --max-new-tokens 48
"""
from __future__ import annotations

import argparse
from pathlib import Path

import editkit

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="HF path or hub name; 'default' = SmolLM2-135M-Instruct")
    parser.add_argument("--instance", default=str(REPO / "safeedit" / "data" / "demo_instance.json"),
                        help="SafeEdit JSON; the first record is edited (file.json#ID picks one)")
    parser.add_argument("--hparams", default="smollm2-135m", help="DINM YAML path or a preset name (editkit/presets/DINM/)")
    parser.add_argument("--out", default="out/patch", help="folder to save the patch in")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing patch folder")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tok = editkit.load_model(args.model)
    instance = editkit.load_instances(args.instance, limit=1)[0]
    config = editkit.load_hparams("dinm", args.hparams)
    # DINM is evaluated with its suffix system prompt after the user's input; use it for both
    # responses so that the only difference between them is the edit.
    suffix = config.eval_suffix

    before = editkit.generate(model, tok, [instance.prompt], suffix=suffix, max_new_tokens=args.max_new_tokens)[0]
    result = editkit.edit(model, instance, tokenizer=tok, method="dinm", hparams=config)
    with result.patch.applied(model):  # restored bit-exactly when the block exits
        after = editkit.generate(model, tok, [instance.prompt], suffix=suffix, max_new_tokens=args.max_new_tokens)[0]

    m = result.metrics
    print(f"located layer {result.layer}; safe-response NLL {m['edit_nll_before']:.3f} -> {m['edit_nll_after']:.3f}, "
          f"knowledge NLL {m['knowledge_nll_before']:.3f} -> {m['knowledge_nll_after']:.3f} "
          f"({m['steps_run']} steps, {result.timings['total']:.1f}s)")
    print(f"\nprompt: {instance.prompt[:200]}{'...' if len(instance.prompt) > 200 else ''}")
    print(f"\nbefore: {before}\n\nafter:  {after}\n")
    path = result.patch.save(args.out, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    print(f"saved {result.patch} to {path} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
