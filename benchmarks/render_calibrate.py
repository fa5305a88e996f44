"""Fit the renderer's light powers and backdrop curve to the mean of real i-CLEVR images.

    python benchmarks/render_calibrate.py /work/shared/iclevr

The empty floor's linear radiance is linear in the light powers, so for each backdrop shape on a
small grid the powers (key, fill, back lamps, sun, a constant bounce, the light on the backdrop's
upright part) come from one least-squares
fit to the mean real one-object image (the object's region masked out); the best fit is printed
as SceneStyle settings.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clevrgen.data.raycast.image import dense_rays
from clevrgen.data.raycast.scene import SceneStyle, ray_dirs
from clevrgen.data.raycast.shading import backdrop, floor_color
from clevrgen.data.render import sample_scenes


def real_mean(root: Path, count: int = 1500) -> torch.Tensor:
    spec = json.loads((root / "train.json").read_text())
    names = [n for n in spec if n.endswith("_0.png")][:count]
    ims = np.stack([np.asarray(Image.open(root / "iclevr" / n).convert("RGB")) for n in names])
    srgb = torch.from_numpy(ims).float() / 255
    linear = torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    return linear.mean(0)  # [64, 64, 3]


def basis(style: SceneStyle, jitters: int = 32) -> torch.Tensor:
    """[6, 64, 64, 3]: the floor lit by each light alone at unit power, averaged over jitter; a
    constant; and the light on the upright part of the backdrop."""
    scenes = sample_scenes([[0]] * jitters, [f"j{i}" for i in range(jitters)], 0, style)
    out = []
    for i in range(4):
        powers = [0.0, 0.0, 0.0]
        sun = 0.0
        if i < 3:
            powers[i] = 1.0
        else:
            sun = 1.0
        s = replace(scenes, style=replace(style, lamp_power=tuple(powers), sun_power=sun, floor_ambient=0.0,
                                          wall_light=0.0))
        b, y, x = dense_rays(jitters, 64, 64, "cpu")
        floor = floor_color(s, b, ray_dirs(s.camera, b, y, x, 64, 64), shadows=False)
        out.append(floor.view(jitters, 64, 64, 3).mean(0))
    out.append(torch.ones(64, 64, 3))
    b, y, x = dense_rays(1, 64, 64, "cpu")
    _, n = backdrop(scenes.camera[b], ray_dirs(scenes.camera, b, y, x, 64, 64), style.backdrop)
    out.append((1 - n[:, 2]).view(64, 64, 1).expand(64, 64, 3))
    return torch.stack(out)


def nonnegative_lstsq(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with every coefficient >= 0: drop the most negative term until none is."""
    active = list(range(A.shape[1]))
    while True:
        sol = torch.linalg.lstsq(A[:, active], y[:, None]).solution.flatten()
        if (sol >= 0).all():
            coef = torch.zeros(A.shape[1])
            coef[active] = sol
            return coef
        active.pop(int(sol.argmin()))


def main(root: str) -> None:
    target = real_mean(Path(root))
    mask = torch.ones(64, 64, dtype=torch.bool)
    mask[14:40, 22:42] = False  # the first object and its shadow
    best = None
    for start, radius in itertools.product([4.5, 6.0, 7.5], [1.5, 3.0, 5.0]):
        style = replace(SceneStyle(), backdrop=(start, radius))
        A = basis(style)[:, mask].reshape(6, -1).T  # [pixels*3, 6]
        y = target[mask].reshape(-1)
        coef = nonnegative_lstsq(A, y)
        err = (A @ coef - y).pow(2).mean().sqrt().item()
        if best is None or err < best[0]:
            best = (err, start, radius, coef)
        print(f"backdrop=({start}, {radius}) rms={err:.4f} powers={[round(c, 3) for c in coef.tolist()]}")
    err, start, radius, coef = best
    print(f"best: backdrop=({start}, {radius}), lamp_power={tuple(round(c, 3) for c in coef[:3].tolist())}, "
          f"sun_power={coef[3]:.3f}, floor_ambient={coef[4]:.4f}, wall_light={coef[5]:.4f} (rms {err:.4f} linear)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/iclevr")
