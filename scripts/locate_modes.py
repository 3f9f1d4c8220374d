"""Where each localisation mode puts the toxic layer, over a SafeEdit file.

    python scripts/locate_modes.py --threads 1            # the 100 shared dev records, default model

Prints, per mode, how many records land on each layer, so the modes can be compared before one is
used for editing (the raw distance grows with the states' norm, which grows with depth)."""
from __future__ import annotations

import argparse
import collections
import json

import torch
from tqdm.auto import tqdm

import editkit
from safeedit.dataset import load_safeedit, shared_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "safeedit" / "safeedit_dev.json"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--modes", default="mean,scaled")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the per-record layers as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = editkit.load_model(args.model)
    records = load_safeedit(args.data, limit=args.limit).instances
    modes = args.modes.split(",")
    layers = {m: {} for m in modes}
    for inst in tqdm(records, desc="locate"):
        for mode in modes:
            layers[mode][inst.id] = editkit.locate(model, tok, inst, mode=mode).layer
    for mode in modes:
        counts = collections.Counter(layers[mode].values())
        print(f"{mode:>9}: " + ", ".join(f"layer {k}: {v}" for k, v in sorted(counts.items())))
    if len(modes) == 2:
        same = sum(layers[modes[0]][i] == layers[modes[1]][i] for i in layers[modes[0]])
        print(f"same layer under both modes: {same} of {len(records)}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(layers, f, indent=1)


if __name__ == "__main__":
    main()
