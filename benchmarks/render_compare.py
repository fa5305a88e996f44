"""Real i-CLEVR images against renders of the same label sets, object by object.

    python benchmarks/render_compare.py /work/shared/iclevr [--pairs 1500] [--style KEY=VALUE ...]

Each real pair ``X_0.png`` -> ``X_1.png`` adds one object to a scene; the difference of the two
images isolates that object and its shadow (the real images' grain is the same fixed pattern in
every image, so it cancels). The same pairs are rendered (seed 0) and measured the same way:

* lone objects (the ``X_0.png`` images, the object at the origin): median colored-pixel area,
  height and width per shape;
* size at equal height in the image: log pixel area, height and width of the added object
  regressed on its centroid row, read at row 32, per shape (objects nearer the camera sit lower);
* shadow: the darkening the added object brings to the floor more than 2 px from it, summed and
  split into below / above its base row and left / right of its centre column, per shape;
* grain: how much of one real image's fine noise is the fixed pattern shared by all of them.

``--style`` overrides a :class:`SceneStyle` setting (a Python literal), e.g. to measure the
previous defaults: ``--style cube_scale=0.93 --style "shadow_strength=(1, 0, 1, 1)"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clevrgen.data.render import render_dataset, style_with
from clevrgen.errors import DataError

SHAPES = ("cube", "sphere", "cylinder")
HALF = 24  # shadow window: 48 x 48 pixels around the added object's base


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    t = torch.from_numpy(mask).float()[None, None]
    return F.max_pool2d(t, 2 * r + 1, 1, r)[0, 0].numpy() > 0


def added_object(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Pixels of the object that ``after`` adds: changed a lot and colored (gray objects are left out)."""
    sat = after.max(-1) - after.min(-1)
    return (np.abs(after - before).max(-1) > 25) & (sat > 30)


def measure(before: np.ndarray, after: np.ndarray):
    obj = added_object(before, after)
    if obj.sum() < 5:
        return None
    ys, xs = np.nonzero(obj)
    size = (ys.mean(), np.log(obj.sum()), np.log(ys.max() - ys.min() + 1), np.log(xs.max() - xs.min() + 1))
    base, centre = ys.max(), int(round(xs.mean()))
    if not (HALF <= base < 64 - HALF and HALF <= centre < 64 - HALF):
        return size, None
    dark = (before - after).mean(-1)
    dark[_grow(obj, 2)] = np.nan
    window = dark[base - HALF:base + HALF, centre - HALF:centre + HALF]
    return size, window


def lone(image: np.ndarray):
    """(area, height, width) of the colored pixels in the middle of a one-object image."""
    box = image[8:56, 8:56]
    ys, xs = np.nonzero(box.max(-1) - box.min(-1) > 30)
    if len(ys) < 5:
        return None
    return len(ys), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def summarise(rows) -> dict[str, dict[str, float]]:
    out = {}
    for shape in SHAPES:
        sizes = np.array([s for sh, s, _ in rows if sh == shape])
        A = np.stack([np.ones(len(sizes)), sizes[:, 0] - 32], 1)
        at32 = [float(np.exp(np.linalg.lstsq(A, sizes[:, i], rcond=None)[0][0])) for i in (1, 2, 3)]
        windows = [w for sh, _, w in rows if sh == shape and w is not None]
        stack = np.stack(windows)
        seen = (~np.isnan(stack)).sum(0)
        total = np.nansum(stack, 0) / np.maximum(seen, 1)  # mean darkening per window pixel
        out[shape] = dict(area=at32[0], height=at32[1], width=at32[2], shadow=total.sum(),
                          below=total[HALF:].sum(), above=total[:HALF].sum(),
                          left=total[:, :HALF].sum(), right=total[:, HALF:].sum())
    return out


def grain_share(root: Path, names: list[str]) -> float:
    """Correlation of each image's fine noise (top rows: the bare backdrop) with the mean of them all."""
    ims = torch.from_numpy(np.stack([np.asarray(Image.open(root / "iclevr" / n).convert("RGB")) for n in names]))
    x = ims.permute(0, 3, 1, 2).float()[:, :, :12]
    fine = x - F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)
    pattern = fine.mean(0).flatten()
    return float(np.mean([torch.corrcoef(torch.stack([f.flatten(), pattern]))[0, 1].item() for f in fine[:200]]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--style", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        style = style_with(args.style)
    except DataError as err:
        parser.error(str(err))
    if not (args.root / "train.json").is_file() or not (args.root / "iclevr").is_dir():
        parser.error(f"{args.root} is not an i-CLEVR folder (train.json and iclevr/ with the images)")
    spec = json.loads((args.root / "train.json").read_text())
    pairs = [(n[:-6] + "_0.png", n) for n, v in spec.items() if n.endswith("_1.png") and not v[1].startswith("gray")]
    pairs = pairs[:args.pairs]
    rendered = render_dataset({n: spec[n] for pair in pairs for n in pair}, seed=0, style=style)
    index = {n: i for i, n in enumerate(rendered.names)}

    def real(n):
        return np.asarray(Image.open(args.root / "iclevr" / n).convert("RGB")).astype(np.float32)

    def render(n):
        return rendered.images[index[n]].permute(1, 2, 0).numpy().astype(np.float32)

    rows = {"real": [], "render": []}
    lones = {(source, shape): [] for source in rows for shape in SHAPES}
    for a, b in pairs:
        shape = spec[b][1].split()[1]
        for source, load in (("real", real), ("render", render)):
            before = load(a)
            m = measure(before, load(b))
            if m is not None:
                rows[source].append((shape, *m))
            first = spec[a][0]
            if not first.startswith("gray") and (one := lone(before)) is not None:
                lones[source, first.split()[1]].append(one)
    stats = {source: summarise(r) for source, r in rows.items()}
    print(f"{len(pairs)} pairs; style overrides: {', '.join(args.style) or 'none'}")
    print("lone object at the origin: median area px, height x width px   real | render")
    for shape in SHAPES:
        r, q = (np.median(np.array(lones[source, shape]), 0) for source in rows)
        print(f"  {shape:8s} {r[0]:5.0f} {r[1]:3.0f}x{r[2]:<3.0f} | {q[0]:5.0f} {q[1]:3.0f}x{q[2]:<3.0f}")
    print("added object at image row 32 (regression): area px, height px, width px   real | render")
    for shape in SHAPES:
        r, q = stats["real"][shape], stats["render"][shape]
        print(f"  {shape:8s} {r['area']:6.1f} {r['height']:5.2f} {r['width']:5.2f} | "
              f"{q['area']:6.1f} {q['height']:5.2f} {q['width']:5.2f}")
    print("its shadow, darkening beyond 2 px of it: total (below / above / left / right)   real | render")
    for shape in SHAPES:
        r, q = stats["real"][shape], stats["render"][shape]
        fmt = "{shadow:5.0f} ({below:4.0f} /{above:4.0f} /{left:4.0f} /{right:4.0f})"
        print(f"  {shape:8s} {fmt.format(**r)} | {fmt.format(**q)}")
    print(f"real grain: correlation of one image's fine noise with the shared pattern "
          f"{grain_share(args.root, [n for n in spec][:2000]):.2f}")


if __name__ == "__main__":
    main()
