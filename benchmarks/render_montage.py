"""docs/renderer.png: 16 real i-CLEVR images (top) above renders of the same label sets (bottom).

    python benchmarks/render_montage.py /work/shared/iclevr docs/renderer.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from clevrgen.data.iclevr import decode_image
from clevrgen.data.render import render_dataset


def main(root: str = "/work/shared/iclevr", out: str = "docs/renderer.png", scale: int = 3) -> None:
    root_path = Path(root)
    spec = json.loads((root_path / "train.json").read_text())
    # scenes 0-15 of the real set, 1, 2 and 3 objects in turn
    names = [f"CLEVR_train_{i:06d}_{i % 3}.png" for i in range(16)]
    real = torch.stack([torch.from_numpy(decode_image(root_path / "iclevr" / n).copy()) for n in names])
    # each label set as a scene of its own: the name carries no _k step
    rendered = render_dataset({f"m{i:02d}.png": spec[n] for i, n in enumerate(names)}, seed=0, progress=False).images
    grid = make_grid(torch.cat([real, rendered]), nrow=16, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
