"""Accuracy against training time of a run, from its metrics.jsonl: a markdown table and a PNG.

    python benchmarks/training_curve.py runs/cpu --png docs/training_curve.png

The run must have been trained with ``train.eval_splits`` (configs/cpu.toml scores test and
new_test every ``eval_every`` steps, sampled from seed 0 with the config's sampler). Minutes are
training time: each log window's images over its measured images/s; the sampling for the
evaluations is not counted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clevrgen.config import load_config
from clevrgen.report import accuracy_curve, plot_accuracy_curve, read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--png", type=Path, default=None, help="where to draw the curve (default: RUN/accuracy.png)")
    args = parser.parse_args()
    cfg = load_config(args.run / "config.toml")
    splits = cfg.train.eval_splits
    rows = accuracy_curve(read_metrics(args.run / "metrics.jsonl"), cfg.train.batch_size, splits)
    header = "| step | minutes | " + " | ".join(f"{s} top-k | {s} exact" for s in splits) + " |"
    print(header)
    print("|" + " --- |" * (2 + 2 * len(splits)))
    for r in rows:
        cells = " | ".join(f"{r.get(f'{s}_topk', float('nan')):.3f} | {r.get(f'{s}_exact', float('nan')):.3f}"
                           for s in splits)
        print(f"| {r['step']} | {r['minutes']:.0f} | {cells} |")
    s = cfg.sample
    plot_accuracy_curve(rows, splits, args.png or args.run / "accuracy.png",
                        f"{args.run.name}: {s.sampler} {s.steps} steps, guidance {s.guidance}, seed {s.seed}")


if __name__ == "__main__":
    main()
