"""Beyond the training set: the judge on renders of every split, its floor on real images, and a
generator on every split (docs/generalization.md).

    python benchmarks/generalization.py [--parts renders floor generator] [--splits NAME ...]
        [--judge PATH] [--renders 10] [--first-seed 1000] [--data /work/shared/iclevr]
        [--checkpoint RUN] [--seeds 3] [--steps N] [--sampler S] [--guidance G] [--out generalization]

renders    The judge scores ``--renders`` renders of every label set of each split (seeds
           ``--first-seed``, ``--first-seed`` + 1, ...): top-k, exact set and the failure
           breakdown (clevrgen.analysis). Renders are the only ground truth for 4-5 objects; a
           split whose top-k is below 0.98 is flagged: the judge cannot referee it.
floor      The judge on the real images it held out in training (the split is read from its
           metadata; needs ``--data``): the errors it makes on real scenes.
generator  A trained run (default: the newest under runs/, as ``clevrgen evaluate``) draws
           every label set of each split once per seed run: run j draws label set i from seed
           1000 * (j + 1) + i, so no image shares a seed with the default evaluation (0..63)
           or with another run. Mean ± standard deviation (and min-max) over the runs of top-k
           and exact set; the breakdown pools all runs' images.

Writes OUT/generalization.md and OUT/generalization.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clevrgen.analysis import RULES, failure_breakdown
from clevrgen.errors import ClevrgenError
from clevrgen.judge import exact_accuracy, judge_probs, load_judge, read_metadata, topk_accuracy
from clevrgen.labels import SPLITS, asset_path, load_label_sets, multi_hot
from clevrgen.runtime import resolve_device
from clevrgen.output import atomic_write_text

PARTS = ("renders", "floor", "generator")
TARGET = 0.98
SEED_STRIDE = 1000


def generator_seed_bases(runs: int) -> list[int]:
    return [SEED_STRIDE * (j + 1) for j in range(runs)]


def judge_on_renders(judge, splits: list[str], renders: int, first_seed: int) -> dict[str, Any]:
    from clevrgen.data.render import render_dataset

    out = {}
    for split in splits:
        scenes = load_label_sets(split)
        # names without a _k step: every label set is a scene of its own; seed r = render r
        spec = {f"{split}-{i:03d}.png": s for i, s in enumerate(scenes)}
        probs, per_render = [], []
        for r in range(renders):
            p = judge_probs(judge, render_dataset(spec, seed=first_seed + r, progress=False).images)
            probs.append(p)
            per_render.append(topk_accuracy(p, multi_hot(scenes)))
        result = failure_breakdown(torch.cat(probs), multi_hot(scenes).repeat(renders, 1))
        result.update(renders=renders, seeds=[first_seed, first_seed + renders - 1],
                      topk_per_render={"min": min(per_render), "max": max(per_render)},
                      flagged=result["topk_accuracy"] < TARGET)
        out[split] = result
        print(f"renders  {split}: top-k {result['topk_accuracy']:.4f}, exact {result['exact_accuracy']:.4f}"
              f"{'  FLAGGED' if result['flagged'] else ''}", flush=True)
    return out


def judge_floor(judge, judge_path: Path | None, data: Path) -> dict[str, Any]:
    from clevrgen.data.iclevr import load_iclevr, split_scenes

    split = json.loads(read_metadata(judge_path or asset_path("judge.safetensors")).get("split", "null"))
    if not split:
        raise ClevrgenError("the floor needs a clevrgen judge whose metadata records its held-out split")
    held = split_scenes(load_iclevr(data, progress=False), split["val_fraction"], split["split_seed"])[1]
    result = failure_breakdown(judge_probs(judge, held.images), held.labels)
    result.update(data=str(data), split=split)
    print(f"floor    {len(held)} held-out real images: top-k {result['topk_accuracy']:.4f}, "
          f"exact {result['exact_accuracy']:.4f}", flush=True)
    return result


def load_generator(checkpoint: Path | None, steps: int | None, sampler: str | None, guidance: float | None):
    from clevrgen.artifact import resolve_checkpoint
    from clevrgen.config import Config
    from clevrgen.loaded import LoadedModel

    model = LoadedModel.load(resolve_checkpoint(checkpoint))
    sample = model.config.sample.model_dump()
    sample.update({k: v for k, v in (("steps", steps), ("sampler", sampler), ("guidance", guidance)) if v is not None})
    raw = model.config.model_dump(mode="json")
    raw["sample"] = sample
    model.config = Config.model_validate(raw)
    return model


def spread(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 0.0,
            "min": t.min().item(), "max": t.max().item()}


def generator_on_splits(model, judge, splits: list[str], runs: int, progress: bool = True) -> dict[str, Any]:
    out = {}
    for split in splits:
        scenes = load_label_sets(split)
        labels = multi_hot(scenes)
        probs, topk, exact = [], [], []
        for base in generator_seed_bases(runs):
            images = model.generate(scenes, [base + i for i in range(len(scenes))], progress,
                                    f"{split} seeds {base}+")
            p = judge_probs(judge, images)
            probs.append(p)
            topk.append(topk_accuracy(p, labels))
            exact.append(exact_accuracy(p, labels))
        result = failure_breakdown(torch.cat(probs), labels.repeat(runs, 1))
        result.update(seed_bases=generator_seed_bases(runs), topk_over_runs=spread(topk), exact_over_runs=spread(exact),
                      topk_per_run=topk, exact_per_run=exact)
        out[split] = result
        print(f"generator {split}: top-k {result['topk_over_runs']['mean']:.4f} ± {result['topk_over_runs']['std']:.4f}, "
              f"exact {result['exact_over_runs']['mean']:.4f} ± {result['exact_over_runs']['std']:.4f} ({runs} seed runs)", flush=True)
    return out


# --- the report ---------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _breakdown_rows(name: str, r: dict[str, Any]) -> list[str]:
    rows = []
    for label, g in [("all", r), *((f"{k} obj", g) for k, g in r["by_objects"].items())]:
        if label != "all" and len(r["by_objects"]) == 1:
            continue
        cells = [name, label, f"{g['n_images']:,}", _pct(g["topk_accuracy"]), _pct(g["exact_accuracy"])]
        for rule in RULES:
            e = g[rule]
            cells.append(f"{e['missing']} / {e['extra']} / {e['wrong_colour']} / {e['wrong_shape']}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


BREAKDOWN_HEAD = [
    "| split | images | n | top-k | exact set | top-k set: missing / extra / wrong colour / wrong shape "
    "| p > 0.5 set: missing / extra / wrong colour / wrong shape |",
    "| --- | --- | ---: | ---: | ---: | --- | --- |",
]


def _confusion_lines(r: dict[str, Any], rule: str = "topk", top: int = 5) -> str:
    c = r["confusions"][rule]
    subs = ", ".join(f"{s['true']} → {s['predicted']} ×{s['count']}" for s in c["substitutions"][:top]) or "none"
    missing = ", ".join(f"{k} ×{n}" for k, n in list(c["missing"].items())[:top]) or "none"
    extra = ", ".join(f"{k} ×{n}" for k, n in list(c["extra"].items())[:top]) or "none"
    swaps = ", ".join(f"{k} ×{n}" for k, n in c["shape_swaps"].items()) or "none"
    return f"substitutions: {subs}; wrong shapes: {swaps}; missing: {missing}; extra: {extra}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Generalization report ({report['date']})", "", f"Command: `{report['command']}`", "",
             f"Judge: {report['judge']}.", ""]
    if "renders" in report:
        r0 = next(iter(report["renders"].values()))
        lines += [f"## The judge on renders ({r0['renders']} renders per label set, seeds "
                  f"{r0['seeds'][0]}-{r0['seeds'][1]})", "", *BREAKDOWN_HEAD]
        for split, r in report["renders"].items():
            lines += _breakdown_rows(split + (" **FLAGGED**" if r["flagged"] else ""), r)
        flagged = [split for split, r in report["renders"].items() if r["flagged"]]
        lines += ["", f"Flagged (top-k below {TARGET}: the judge cannot referee the split): "
                  f"{', '.join(flagged) or 'none'}.", ""]
        lines += [f"- {split} (top-k set): {_confusion_lines(r)}" for split, r in report["renders"].items()]
        lines.append("")
    if "floor" in report:
        r = report["floor"]
        lines += ["## The judge's floor: held-out real images", "", *BREAKDOWN_HEAD, *_breakdown_rows("real", r), "",
                  f"- top-k set: {_confusion_lines(r, 'topk', 10)}",
                  f"- p > 0.5 set: {_confusion_lines(r, 'threshold', 10)}", ""]
    if "generator" in report:
        g = report["generator"]
        first = next(iter(g["splits"].values()))
        lines += [f"## The generator: {g['checkpoint']}", "",
                  f"{g['sampler']} {g['steps']} steps, guidance {g['guidance']}; {len(first['seed_bases'])} seed runs, "
                  f"label set i of run j drawn from seed {SEED_STRIDE} * (j + 1) + i.", "",
                  "| split | label sets | top-k mean ± std (min-max) | exact set mean ± std (min-max) | judge check |",
                  "| --- | ---: | --- | --- | --- |"]
        for split, r in g["splits"].items():
            check = report.get("renders", {}).get(split)
            verdict = "-" if check is None else ("**below 0.98**" if check["flagged"] else _pct(check["topk_accuracy"]))
            cells = [split, str(r["n_images"] // len(r["seed_bases"]))]
            for key in ("topk_over_runs", "exact_over_runs"):
                s = r[key]
                cells.append(f"{_pct(s['mean'])} ± {_pct(s['std'])} ({_pct(s['min'])}-{_pct(s['max'])})")
            cells.append(verdict)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Breakdown, all seed runs pooled:", "", *BREAKDOWN_HEAD]
        for split, r in g["splits"].items():
            lines += _breakdown_rows(split, r)
        lines += ["", *(f"- {split} (top-k set): {_confusion_lines(r)}" for split, r in g["splits"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="split names or JSON files [default: all shipped]")
    parser.add_argument("--judge", type=Path, default=None, help="a judge file [default: the shipped one]")
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=None, help="the i-CLEVR folder the judge was trained on (floor)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a run folder, or latest [default: the shipped model]")
    parser.add_argument("--seeds", type=int, default=3, help="seed runs per split for the generator")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("generalization"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.renders < 1 or args.seeds < 1:
        parser.error("--renders and --seeds must be at least 1")
    if "floor" in args.parts and args.data is None:
        parser.error("the floor part needs --data (the i-CLEVR folder), or leave it out of --parts")
    try:
        for split in args.splits:
            load_label_sets(split)
        judge = load_judge(args.judge, resolve_device("auto"))
        generator = (load_generator(args.checkpoint, args.steps, args.sampler, args.guidance)
                     if "generator" in args.parts else None)
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python", "benchmarks/generalization.py", *(argv if argv is not None else sys.argv[1:])]),
            "judge": str(args.judge or "the shipped judge"),
        }
        if "renders" in args.parts:
            report["renders"] = judge_on_renders(judge, args.splits, args.renders, args.first_seed)
        if "floor" in args.parts:
            report["floor"] = judge_floor(judge, args.judge, args.data)
        if generator is not None:
            s = generator.config.sample
            report["generator"] = {
                "checkpoint": str(generator.run_dir), "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                "splits": generator_on_splits(generator, judge, args.splits, args.seeds,
                                              progress=not args.no_progress),
            }
    except ClevrgenError as err:
        sys.exit(f"error: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "generalization.json", json.dumps(report, indent=1))
    atomic_write_text(args.out / "generalization.md", markdown(report))
    print(f"wrote {args.out}/generalization.md, {args.out}/generalization.json")
    return report


if __name__ == "__main__":
    main()
