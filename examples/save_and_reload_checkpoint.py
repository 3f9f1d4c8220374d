"""Edit a model with DINM, save the patched model as a full Hugging Face checkpoint, reload it
with plain ``transformers`` and check it computes what the patched model computes.

    python examples/save_and_reload_checkpoint.py --out out/model
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import editkit

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="HF path or hub name; 'default' = SmolLM2-135M-Instruct")
    parser.add_argument("--instance", default=str(REPO / "safeedit" / "data" / "demo_instance.json"))
    parser.add_argument("--hparams", default="smollm2-135m", help="DINM YAML path or a preset name (editkit/presets/DINM/)")
    parser.add_argument("--out", default="out/model", help="checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")
    args = parser.parse_args()

    model, tok = editkit.load_model(args.model)
    instance = editkit.load_instances(args.instance, limit=1)[0]
    result = editkit.edit(model, instance, tokenizer=tok, hparams=args.hparams)
    print(f"edited layer {result.layer}: {result.patch}")
    # the patch is applied only while the checkpoint is written; `model` stays the unedited base
    path = editkit.save_checkpoint(model, tok, args.out, patch=result.patch, overwrite=args.overwrite)
    print(f"saved to {path}: {sorted(p.name for p in Path(path).iterdir())}")

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # no editkit involved
    ids = tok(instance.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with result.patch.applied(model):
            patched = model(input_ids=ids).logits
        again = reloaded(input_ids=ids.to(reloaded.device)).logits.to(patched.device)
    diff = (again - patched).abs().max().item()
    print(f"max |logits(reloaded) - logits(patched)| = {diff:.3g}")
    print(f"max |logits(reloaded) - logits(base)|    = {(again - base).abs().max().item():.3g}  (the edit is in)")
    if diff > 1e-4:
        raise SystemExit("the reloaded checkpoint does not match the patched model")


if __name__ == "__main__":
    main()
