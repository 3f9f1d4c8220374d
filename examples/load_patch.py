"""Apply a saved DINM patch to a fresh copy of the base model and generate with it.

Run ``examples/detoxify_and_save_patch.py`` first; it writes the patch this script reads.

    python examples/load_patch.py --patch out/patch --max-new-tokens 48
"""
from __future__ import annotations

import argparse
from pathlib import Path

import editkit
from editkit.patch import PatchError

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", default="out/patch", help="folder written by Patch.save")
    parser.add_argument("--model", default="default", help="the base model the patch was made for")
    parser.add_argument("--instance", default=str(REPO / "safeedit" / "data" / "demo_instance.json"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tok = editkit.load_model(args.model)  # a fresh, unedited copy of the base
    patch = editkit.load_patch(args.patch)
    print(f"loaded {patch} (made {patch.created} for {patch.model.get('name_or_path', '?')})")
    # apply() first compares a fingerprint of every targeted weight with the one recorded when the
    # patch was made. A different base (another checkpoint or fine-tune, another quantisation, or a
    # copy that already carries this patch) raises PatchError and leaves the model untouched;
    # strict=False skips the check for those who know what they are doing.
    patch.apply(model)
    try:
        patch.apply(model)  # the weights now differ from the recorded base: refused
    except PatchError as err:
        print(f"applying it twice is refused: {err}")

    instance = editkit.load_instances(args.instance, limit=1)[0]
    suffix = editkit.load_hparams(patch.method, patch.hparams).eval_suffix  # as the method evaluates
    for label, prompt in [("attack", instance.prompt), ("benign", instance.knowledge_prompt)]:
        reply = editkit.generate(model, tok, [prompt], suffix=suffix, max_new_tokens=args.max_new_tokens)[0]
        print(f"\n[{label}] {prompt[:120]}{'...' if len(prompt) > 120 else ''}\n-> {reply}")


if __name__ == "__main__":
    main()
