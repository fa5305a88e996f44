"""Choose a run's EMA length after training, as EDM2 does: synthesize the power-function average of
each relative length from the run's snapshots, and score it on the selection seeds.

    python benchmarks/posthoc_ema.py runs/final --sigma-rels 0.03 0.05 0.08 0.10 0.15 --guidance 5 7
    python benchmarks/posthoc_ema.py runs/final --sigma-rels 0.08 --step 30000     # one snapshot step

Each (length, guidance) is scored on ``test`` and ``new_test`` with ``--passes`` passes from
``--seed`` (default 5000: the selection seeds 5000-8999, never the reporting seeds from 10000), 25
DPM-Solver++ steps. The exported models go to ``RUN/posthoc/ema-S-step-N`` (fp32). Prints one
JSON line per setting and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clevrgen(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "clevrgen", *args], cwd=ROOT, text=True, capture_output=True)
    if done.returncode:
        sys.exit(done.stderr.strip())
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=[0.03, 0.05, 0.08, 0.10, 0.15])
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.0])
    parser.add_argument("--step", type=int, help="the snapshot step (default: the last)")
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--passes", type=int, default=4)
    args = parser.parse_args()
    rows = []
    for sigma_rel in args.sigma_rels:
        out = args.run / "posthoc" / f"ema-{sigma_rel:.3f}-step-{args.step or 'last'}"
        export = ["export", str(args.run), "--out", str(out), "--ema-sigma-rel", str(sigma_rel), "--fp32"]
        clevrgen(*export, *(["--step", str(args.step)] if args.step else []))
        for guidance in args.guidance:
            row = {"sigma_rel": sigma_rel, "guidance": guidance}
            for split in ("test", "new_test"):
                result = json.loads(clevrgen(
                    "evaluate", "--checkpoint", str(out), "--split", split, "--steps", "25", "--guidance",
                    str(guidance), "--seed", str(args.seed), "--seeds", str(args.passes), "--json",
                    "--out", str(out / f"eval-{split}-g{guidance:g}-s{args.seed}")).strip().splitlines()[-1])
                row.update({f"{split}_topk": result["topk_accuracy"], f"{split}_topk_std": result["topk_accuracy_std"],
                            f"{split}_exact": result["exact_accuracy"]})
            row["mean_topk"] = (row["test_topk"] + row["new_test_topk"]) / 2
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.run}, step {args.step or 'last'}, {args.passes} passes from seed {args.seed}, 25 steps")
    print("| sigma_rel | guidance | `test` top-k | `new_test` top-k | exact (test / new_test) | mean top-k |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sigma_rel']:.3f} | {r['guidance']:g} | {r['test_topk']:.3f} ± {r['test_topk_std']:.3f} | "
              f"{r['new_test_topk']:.3f} ± {r['new_test_topk_std']:.3f} | {r['test_exact']:.3f} / "
              f"{r['new_test_exact']:.3f} | {r['mean_topk']:.3f} |")


if __name__ == "__main__":
    main()
