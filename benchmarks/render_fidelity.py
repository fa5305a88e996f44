"""Fidelity of the renderer as the judge sees it.

    python benchmarks/render_fidelity.py [--judge PATH] [--renders 10]

(a) The shipped judge (trained on real i-CLEVR images) scores renders of the 64 label sets of
``test`` and of ``new_test``, each rendered ``--renders`` times with fresh seeds: the course's
top-k accuracy per split (target >= 0.98).
"""

from __future__ import annotations

import argparse

import torch

from clevrgen.data.render import render_dataset
from clevrgen.judge import judge_probs, load_judge, topk_accuracy
from clevrgen.labels import multi_hot, shipped_split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default=None, help="a judge file [default: the shipped one]")
    parser.add_argument("--renders", type=int, default=10)
    args = parser.parse_args()
    judge = load_judge(args.judge)
    for split in ("test", "new_test"):
        scenes = [list(s) for s in shipped_split(split)]
        # names without a _k step: every label set is a scene of its own; seed r = render r
        scores = []
        for r in range(args.renders):
            spec = {f"{split}-{i:03d}.png": s for i, s in enumerate(scenes)}
            images = render_dataset(spec, seed=1000 + r, progress=False).images
            scores.append(topk_accuracy(judge_probs(judge, images), multi_hot(scenes)))
        t = torch.tensor(scores)
        print(f"{split}: top-k {t.mean():.4f} (min {t.min():.4f}, max {t.max():.4f} over {args.renders} renders "
              f"of {len(scenes)} label sets)", flush=True)


if __name__ == "__main__":
    main()
