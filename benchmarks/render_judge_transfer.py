"""Fidelity (b): a judge trained on renders only, scored on held-out real i-CLEVR scenes.

    python benchmarks/render_judge_transfer.py /work/shared/iclevr --config configs/judge.toml --minutes 30 --copies 2

The real folder is split by whole scenes as the shipped judge's training split it
(``data.val_fraction``, ``data.split_seed``); the training scenes' label sets are rendered
(``--copies`` times, seeds 0, 1, ...; the same names, so the same sequences; each copy draws
new layouts and lights) and a judge is trained on those renders alone
with the ``judge`` config section, its best epoch picked on renders of the held-out label sets;
its top-k on the held-out real scenes is printed (target >= 0.95), next to its top-k on those
renders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clevrgen.config import load_config
from clevrgen.data.embedded import concat
from clevrgen.data.iclevr import load_iclevr, split_scenes
from clevrgen.data.render import render_dataset
from clevrgen.judge import score_judge
from clevrgen.judge_training import train_judge
from clevrgen.labels import phrases_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("real", help="an i-CLEVR folder (the held-out scenes are scored)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    parser.add_argument("--config", default=None, help="a config TOML, e.g. the shipped judge's run config")
    parser.add_argument("--set", action="append", default=[], help="config overrides, e.g. judge.epochs=8")
    parser.add_argument("--copies", type=int, default=1, help="renders of each training label set (fresh seeds)")
    args = parser.parse_args()
    overrides = list(args.set) + ([f"judge.minutes={args.minutes}"] if args.minutes else [])
    cfg = load_config(Path(args.config) if args.config else None, overrides)
    real = load_iclevr(args.real)
    train_real, held = split_scenes(real, cfg.data.val_fraction, cfg.data.split_seed)
    spec = dict(zip(train_real.names, phrases_of(train_real.labels)))
    rendered = concat(*(render_dataset(spec, seed=c) for c in range(args.copies)))
    held_spec = dict(zip(held.names, phrases_of(held.labels)))
    rendered_held = render_dataset(held_spec, seed=args.copies, progress=False)
    # the best epoch is picked on renders, so the real scenes stay unseen until the score
    model, history = train_judge(rendered, rendered_held, cfg.judge)
    on_real = score_judge(model, held)
    on_renders = score_judge(model, rendered_held)
    print(f"judge trained on {len(rendered):,} renders for {len(history)} epochs: top-k on {len(held)} held-out "
          f"real images {on_real['topk_accuracy']:.4f} (exact {on_real['exact_accuracy']:.4f}); on renders of "
          f"their label sets {on_renders['topk_accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
