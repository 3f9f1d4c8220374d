"""The DINM paper's mechanism comparison (DINM, FT-L, SFT, DPO) on the default model.

Does an edit erase the toxic region or route around it?

DINM and FT-L edit each of the measured SafeEdit dev records (their committed SmolLM2-135M
presets); SFT and DPO are fitted once on the dev records that are not measured (their presets: LoRA
r 16, 3 epochs). A toxicity probe is trained on ToxiGen and SafeEdit texts at the last layer, then
for every method: region toxicity of the toxic layer before/after (toxicity reduction rate), the
shift of that layer's MLP projection input over the records' adversarial inputs (activation shift
rate), the per-layer shift curves and the safe/unsafe projection. Finished SafeEdit runs under
results/smollm2-135m/ are put beside the rates.

    python examples/probe_comparison.py --out out/probe-comparison --threads 1
    python examples/probe_comparison.py --print-command      # the `editkit probe` command it runs

Slow on a CPU (estimated from the presets' measured step times, one thread): the probe reads ~790
texts (a few minutes), DINM takes ~1.5 min per record with its over-refusal guard, SFT ~25 min and
DPO ~1 h for 3 epochs over 97 records. Fits checkpoint into OUT/fits/<method>, so running again with
--overwrite resumes them. The outputs are described in README.md ("Toxicity probes").
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from editkit.cli import main as editkit_main

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "smollm2-135m"
PAPER_METHODS = "dinm,ft-l,sft,dpo"  # as compared in the DINM paper (Wang et al., 2024)


def finished_runs(folder: Path) -> list[str]:
    """SafeEdit run folders under ``folder`` that have a summary."""
    if not folder.is_dir():
        return []
    return [str(run) for run in sorted(folder.iterdir()) if (run / "summary.json").is_file() and run.is_dir()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/probe-comparison")
    parser.add_argument("--compare", default=PAPER_METHODS, help="methods and/or saved patch folders")
    parser.add_argument("--records", type=int, default=3, help="dev records each method is measured on")
    parser.add_argument("--train-records", type=int, default=None, help="fit SFT/DPO on fewer records (quicker)")
    parser.add_argument("--probe", default=None, help="a probe saved by an earlier run (OUT/probe)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing OUT (resumes fits)")
    parser.add_argument("--no-safeedit", action="store_true", help="leave the SafeEdit numbers out")
    parser.add_argument("--print-command", action="store_true", help="print the editkit command and exit")
    args = parser.parse_args()

    argv = ["probe", "--model", "default", "--compare", args.compare, "--preset", "smollm2-135m",
            "--records", str(args.records), "--threads", str(args.threads), "--out", args.out]
    argv += ["--train-records", str(args.train_records)] if args.train_records else []
    argv += ["--probe", args.probe] if args.probe else []
    argv += ["--overwrite"] if args.overwrite else []
    runs = [] if args.no_safeedit else finished_runs(RESULTS)
    argv += ["--with-safeedit", *runs] if runs else []
    if args.print_command:
        print(shlex.join(["editkit", *argv]))
        return 0
    return editkit_main(argv)


if __name__ == "__main__":
    sys.exit(main())
