"""Accuracy against training time of a run, from its metrics.jsonl: a markdown table and a PNG.

    python benchmarks/training_curve.py runs/cpu --png docs/training_curve.png

A model trained in stages (a run continued by another with ``train.init``) is one curve: name
the runs in order, each but the last as RUN:STEP, the step its weights were taken at; the later
runs' steps and minutes count on from there.

    python benchmarks/training_curve.py runs/cpu:10503 runs/cpu2 --png docs/training_curve.png

The runs must have been trained with ``train.eval_splits`` (configs/cpu.toml scores test and
new_test every ``eval_every`` steps, sampled from seed 0 with the config's sampler). Minutes are
training time: each log window's images over its measured images/s; the sampling for the
evaluations is not counted. A run whose windows include pauses or cores shared with other work
is timed at one speed instead, measured on the idle machine (``--speed``, images/s):

    python benchmarks/training_curve.py runs/final --speed 55.8 --png docs/training_curve.png

A model continued in relay stages keeps its chain in its ``training_data.json`` (``stages``, one
entry per stage, each with the curve logged while it trained): ``--chain MODEL`` draws the whole
chain against its total minutes, each stage's start marked.

    python benchmarks/training_curve.py --chain src/clevrgen/assets/model --png docs/training_curve.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clevrgen.config import load_config
from clevrgen.record import chain_curve, training_data_of
from clevrgen.report import accuracy_curve, plot_accuracy_curve, read_metrics, training_minutes


def stage(arg: str) -> tuple[Path, int | None]:
    """RUN or RUN:STEP."""
    run, _, step = arg.rpartition(":") if ":" in arg else (arg, "", "")
    return Path(run), int(step) if step else None


def chained_curve(stages: list[tuple[Path, int | None]]) -> tuple[list[dict], list[str]]:
    """The accuracy rows of the runs in order, each cut at its step, steps and minutes summed."""
    rows, splits, step0, minutes0 = [], [], 0, 0.0
    for run, last in stages:
        cfg = load_config(run / "config.toml")
        splits = splits or cfg.train.eval_splits
        records = [r for r in read_metrics(run / "metrics.jsonl") if last is None or r["step"] <= last]
        for r in accuracy_curve(records, cfg.train.batch_size, splits):
            rows.append({**r, "step": r["step"] + step0, "minutes": r["minutes"] + minutes0})
        at = training_minutes(records, cfg.train.batch_size)
        if at:
            step0, minutes0 = step0 + at[-1][0], minutes0 + at[-1][1]
    return rows, splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", type=stage, metavar="RUN[:STEP]")
    parser.add_argument("--chain", type=Path, default=None, help="a model folder whose training_data.json lists its stages")
    parser.add_argument("--png", type=Path, default=None, help="where to draw the curve (default: RUN/accuracy.png)")
    parser.add_argument("--speed", type=float, default=None,
                        help="minutes as images over this many images/s, not the logged windows' speeds")
    args = parser.parse_args()
    if args.speed is not None and not args.speed > 0:
        parser.error(f"--speed: images/s must be above 0 (got {args.speed})")
    if args.chain is not None:
        return plot_chain(args.chain, args.png or args.chain / "accuracy.png")
    if not args.stages:
        parser.error("name the runs (RUN[:STEP] ...) or --chain MODEL")
    rows, splits = chained_curve(args.stages)
    if args.speed:
        batch = load_config(args.stages[-1][0] / "config.toml").train.batch_size
        rows = [{**r, "minutes": r["step"] * batch / args.speed / 60} for r in rows]
    header = "| step | minutes | " + " | ".join(f"{s} top-k | {s} exact" for s in splits) + " |"
    print(header)
    print("|" + " --- |" * (2 + 2 * len(splits)))
    for r in rows:
        cells = " | ".join(f"{r.get(f'{s}_topk', float('nan')):.3f} | {r.get(f'{s}_exact', float('nan')):.3f}"
                           for s in splits)
        print(f"| {r['step']} | {r['minutes']:.0f} | {cells} |")
    last = args.stages[-1][0]
    s = load_config(last / "config.toml").sample
    plot_accuracy_curve(rows, splits, args.png or last / "accuracy.png",
                        f"{' + '.join(p.name for p, _ in args.stages)}: {s.sampler} {s.steps} steps, "
                        f"guidance {s.guidance}, seed {s.seed}")


def plot_chain(model: Path, png: Path) -> None:
    """The chain of stages recorded in ``model``'s training_data.json: a table and the curve."""
    stages = training_data_of(model).get("stages")
    if not stages:
        raise SystemExit(f"error: {model}/training_data.json records no stages")
    rows, boundaries = chain_curve(stages)
    splits = ["test", "new_test"]
    print("| stage | step | minutes | " + " | ".join(f"{s} top-k" for s in splits) + " |")
    print("|" + " --- |" * (3 + len(splits)))
    for r in rows:
        cells = " | ".join(f"{r.get(f'{s}_topk', float('nan')):.3f}" for s in splits)
        print(f"| {r['stage']} | {r['step']} | {r['minutes']:.0f} | {cells} |")
    s = load_config(model / "config.toml").sample
    plot_accuracy_curve(rows, splits, png, f"{len(stages)} stages (dotted: a stage begins): one pass, seed 0, "
                        f"{s.sampler} {s.steps} steps, guidance {s.guidance}", boundaries)


if __name__ == "__main__":
    main()
