"""Paired trials of generator designs at equal training images (and, through img/s, equal time).

Every arm is ``benchmarks/trial_base.toml`` (``configs/cpu.toml`` as the trials began) with a few
``--set`` overrides, trained from scratch on the real i-CLEVR images with one shared schedule
(``SCHEDULE``) and one seed: the arms draw the same batches, the same label dropout, the same
timesteps and the same noise, so they differ only in their design.

    python benchmarks/trials.py speed [ARM ...] [--set KEY=VALUE]  # train img/s and UNet-pass img/s, one run
    python benchmarks/trials.py train ARM [ARM ...]     # train (or resume) each in turn
    OMP_NUM_THREADS=1 nohup python benchmarks/trials.py train b-adagn e-immiscible > b.log &  # one slot
    python benchmarks/trials.py score ARM [--guidance 2 4 7]   # sweep on seed 20000, report on 30000
    python benchmarks/trials.py table                   # every scored arm as docs/benchmarks.md rows

Runs go to ``runs/trials/ARM`` (outside git). Scores: ``runs/trials/ARM/trial-score.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "trials"
DATA = ROOT.parent / "shared" / "iclevr"
BASE = ROOT / "benchmarks" / "trial_base.toml"
ADAGN = "model.resnet_time_scale_shift='scale_shift'"

ARMS: dict[str, list[str]] = {
    "a-control": [],
    "b-adagn": [ADAGN],
    # per-object tokens, cross-attention at the 16x16 and 8x8 UNet levels (the 4x4 level keeps its
    # self-attention; the mid block attends to the tokens too)
    "c-tokens": [ADAGN, "model.cross_attention=[false, true, true, false]"],
    # the same tokens at the 8x8 and 4x4 levels only: about AdaGN's speed
    "c2-tokens-low": [ADAGN, "model.cross_attention=[false, false, true, true]"],
    # capacity where shapes are decided: wider 16x16 and 8x8 levels (17.1 M parameters)
    "d-wide": [ADAGN, "model.block_out_channels=[64, 192, 224, 224]"],
    "e-immiscible": [ADAGN, "diffusion.immiscible=true"],
    "f-edm": [ADAGN, "diffusion.timesteps='lognormal'", "diffusion.weighting='edm'"],
}

STEPS = 5625  # 180,000 images of 32: what cpu.toml sees in ~60 min on 2 cores
SCHEDULE = [
    f"data.path='{DATA}'",
    f"train.steps={STEPS}",
    "train.lr=1e-3",
    "train.warmup_steps=300",
    "train.lr_decay_steps=2000",  # the arm's own cool-down: cosine to 5e-5 over the last 2000 steps
    "train.lr_final=0.05",
    "train.ema_decay=0.999",
    "train.seed=0",
    "train.eval_every=1875",
    "train.sample_every=5625",
    "train.checkpoint_every=250",
    "train.snapshot_every=1875",
    "train.attention_kernel='sdpa'",  # as every arm began; the final recipe's 'math' is the same math, faster
]
SWEEP_SEED, REPORT_SEED = 20000, 30000  # neither is a reporting seed of the shipped model (10000+)


def overrides(arm: str) -> list[str]:
    if arm not in ARMS:
        sys.exit(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")
    return SCHEDULE + ARMS[arm]


def clevrgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clevrgen", *args], cwd=ROOT, text=True)


def train(arms: list[str]) -> None:
    for arm in arms:
        run = RUNS / arm
        sets = [x for s in overrides(arm) for x in ("--set", s)]
        if (run / "state.pt").exists():
            done = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            if done and max(r["step"] for r in done) >= STEPS:
                print(f"{arm}: already trained", flush=True)
                continue
            result = clevrgen("train", "--resume", str(run))
        else:
            run.parent.mkdir(parents=True, exist_ok=True)
            result = clevrgen("train", "--config", str(BASE), *sets, "--out", str(run))
        if result.returncode:
            sys.exit(result.returncode)


def evaluate(run: Path, split: str, guidance: float, seed: int, passes: int) -> dict:
    out = run / f"trial-eval-{split}-g{guidance:g}-s{seed}"
    done = subprocess.run([sys.executable, "-m", "clevrgen", "evaluate", "--checkpoint", str(run), "--split", split,
                           "--steps", "25", "--guidance", str(guidance), "--seed", str(seed), "--seeds", str(passes),
                           "--out", str(out), "--json"], cwd=ROOT, text=True, capture_output=True)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(arm: str, guidances: list[float], checkpoint: str | None) -> None:
    """Guidance swept on 2 passes per split from SWEEP_SEED; the best one reported on 4 passes
    per split from REPORT_SEED (256 images)."""
    run = Path(checkpoint) if checkpoint else RUNS / arm
    sweep = {}
    for g in guidances:
        r = [evaluate(run, s, g, SWEEP_SEED, 2)["topk_accuracy"] for s in ("test", "new_test")]
        sweep[g] = sum(r) / 2
        print(f"{arm}: guidance {g:g}: sweep top-k {r[0]:.3f} / {r[1]:.3f}", flush=True)
    best = max(sweep, key=sweep.get)
    report = {s: evaluate(run, s, best, REPORT_SEED, 4) for s in ("test", "new_test")}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "val_loss" in m][-1]
    ips = [m["images_per_second"] for m in metrics if "images_per_second" in m]
    record = {
        "arm": arm, "checkpoint": str(run), "overrides": ARMS.get(arm, []), "guidance": best, "sweep": sweep,
        "step": last["step"], "images": last["step"] * 32, "val_loss": last["val_loss"],
        "logged_img_per_s_median": sorted(ips)[len(ips) // 2],
        **{f"{s}_{k}": report[s][k] for s in report for k in
           ("topk_accuracy", "topk_accuracy_std", "exact_accuracy", "exact_accuracy_std")},
    }
    (run / "trial-score.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


def speed(arms: list[str], steps: int, extra: list[str]) -> None:
    """Every arm's training step and UNet pass timed in one process, one after the other (each
    with the ``extra`` overrides too: a combination, or the final recipe's attention kernel)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from diffusion_speed import machine, time_setting

    from clevrgen.config import load_config
    from clevrgen.model import build_model

    rows = []
    for arm in arms:
        cfg = load_config(BASE, [s for s in overrides(arm) if not s.startswith("data.")] + extra)
        params = sum(p.numel() for p in build_model(cfg.model).parameters())
        r = time_setting(cfg, steps, 32)
        rows.append({"arm": arm, "parameters": params, **r})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, {machine()}, bf16 autocast, batch 32")
    print("| arm | parameters | training img/s | UNet pass img/s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['arm']} | {r['parameters'] / 1e6:.1f} M | {r['train_images_per_second']} | "
              f"{r['unet_pass_images_per_second']} |")


def table() -> None:
    print("| arm | guidance | images | held-out loss | `test` top-k | `test` exact | `new_test` top-k | `new_test` exact |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for file in sorted(RUNS.glob("*/trial-score.json")):
        r = json.loads(file.read_text())
        print(f"| {r['arm']} | {r['guidance']:g} | {r['images']:,} | {r['val_loss']:.5f} | "
              f"{r['test_topk_accuracy']:.3f} ± {r['test_topk_accuracy_std']:.3f} | "
              f"{r['test_exact_accuracy']:.3f} ± {r['test_exact_accuracy_std']:.3f} | "
              f"{r['new_test_topk_accuracy']:.3f} ± {r['new_test_topk_accuracy_std']:.3f} | "
              f"{r['new_test_exact_accuracy']:.3f} ± {r['new_test_exact_accuracy_std']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed")
    p.add_argument("arms", nargs="*", default=list(ARMS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every arm timed, e.g. --set train.attention_kernel='math'")
    p = sub.add_parser("train")
    p.add_argument("arms", nargs="+")
    p = sub.add_parser("score")
    p.add_argument("arm")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0, 7.0])
    p.add_argument("--checkpoint", help="score this folder (e.g. a snapshot) instead of the arm's run")
    sub.add_parser("table")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "speed":
        speed(args.arms, args.steps, args.extra)
    elif args.command == "train":
        train(args.arms)
    elif args.command == "score":
        score(args.arm, args.guidance, args.checkpoint)
    else:
        table()


if __name__ == "__main__":
    main()
