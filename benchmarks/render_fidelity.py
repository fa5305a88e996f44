"""Fidelity of the renderer as the judge sees it.

    python benchmarks/render_fidelity.py [--judge PATH] [--renders 10] [--first-seed 1000] [--probe 2000]
                                         [--style KEY=VALUE ...]

(a) A judge trained on real i-CLEVR images scores renders of the 64 label sets of ``test`` and
of ``new_test``, each rendered ``--renders`` times with fresh seeds (``--first-seed``,
``--first-seed`` + 1, ...): the course's top-k accuracy per split (target >= 0.98).

``--probe N`` also renders N random two-object scenes whose second object is a cube or a
cylinder (half each, any color, anywhere on the ring), and prints how often that object is among
the judge's top two and how much probability the judge gives the other of the two shapes: the
cube/cylinder confusion the official label sets show, on scenes that are not theirs.
"""

from __future__ import annotations

import argparse

import torch

from clevrgen.data.render import (
    SceneStyle,
    render_dataset,
    render_scenes,
    sample_scenes,
    style_with,
)
from clevrgen.errors import ClevrgenError, DataError
from clevrgen.judge import judge_probs, load_judge, topk_accuracy
from clevrgen.labels import COLORS, SHAPES, multi_hot, shipped_split


def official(judge, renders: int, first_seed: int, style: SceneStyle) -> None:
    for split in ("test", "new_test"):
        scenes = [list(s) for s in shipped_split(split)]
        # names without a _k step: every label set is a scene of its own; seed r = render r
        spec = {f"{split}-{i:03d}.png": s for i, s in enumerate(scenes)}
        scores = []
        for r in range(renders):
            images = render_dataset(spec, seed=first_seed + r, style=style, progress=False).images
            scores.append(topk_accuracy(judge_probs(judge, images), multi_hot(scenes)))
        t = torch.tensor(scores)
        print(f"{split}: top-k {t.mean():.4f} (min {t.min():.4f}, max {t.max():.4f} over {renders} renders "
              f"of {len(scenes)} label sets, seeds {first_seed}-{first_seed + renders - 1})", flush=True)


def probe(judge, count: int, seed: int, style: SceneStyle) -> None:
    g = torch.Generator().manual_seed(seed)
    n = len(COLORS)
    cube, cylinder = SHAPES.index("cube"), SHAPES.index("cylinder")
    first = torch.randint(len(SHAPES) * n, (count,), generator=g)
    second_shape = torch.tensor([cube, cylinder]).repeat(count // 2 + 1)[:count]
    second = second_shape * n + torch.randint(n, (count,), generator=g)
    scenes = sample_scenes(torch.stack([first, second], 1).tolist(), [f"probe-{i}" for i in range(count)], seed=seed,
                           style=style)
    probs = judge_probs(judge, render_scenes(scenes))
    other = torch.where(second_shape == cube, cylinder, cube) * n + second % n
    rows = torch.arange(count)
    in_top2 = (probs.topk(2).indices == second[:, None]).any(1)
    for shape in (cube, cylinder):
        m = second_shape == shape
        print(f"probe, second object a {SHAPES[shape]}: in the top two {in_top2[m].float().mean():.4f}, "
              f"mean probability of the other shape {probs[rows, other][m].mean():.4f} ({int(m.sum())} scenes)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default=None, help="a judge file [default: the shipped one]")
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--probe", type=int, default=0, help="random two-object scenes to probe [default: none]")
    parser.add_argument("--style", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        style = style_with(args.style)
    except DataError as err:
        parser.error(str(err))
    try:
        judge = load_judge(args.judge)
    except ClevrgenError as err:
        parser.error(str(err))
    official(judge, args.renders, args.first_seed, style)
    if args.probe:
        probe(judge, args.probe, seed=5, style=style)


if __name__ == "__main__":
    main()
