"""What a config's resolution path alone costs: real held-out images through it, no model between.

    python benchmarks/resolution_path.py ../shared/iclevr
    python benchmarks/resolution_path.py ../shared/iclevr --config tiny --config cpu --set model.image_size=32

For each config, the held-out real images (whole scenes, as training holds them out) go the way a
sample of that config would: down to ``model.image_size`` as training feeds the data, through the
``model.patch_size`` pixel unshuffle and shuffle around the UNet, and back up to 64x64 as
sampling enlarges. The shipped judge scores what comes out. A config whose path scores below the
originals caps every model trained with it: no generator can beat its own output path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.functional import pixel_shuffle, pixel_unshuffle

from clevrgen.config import load_config
from clevrgen.config_file import shipped_config_names
from clevrgen.data.iclevr import IMAGE_SIZE, load_iclevr, resize_images, split_scenes
from clevrgen.judge import judge_probs, load_judge, score_predictions


def through_path(images: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """uint8 64x64 images after a config's input and output path, with no model in between."""
    small = resize_images(images, image_size)
    x = small.float()
    if patch_size > 1:
        x = pixel_shuffle(pixel_unshuffle(x, patch_size), patch_size)
    return resize_images(x.round().clamp(0, 255).to(torch.uint8), IMAGE_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="an i-CLEVR folder (real images)")
    parser.add_argument("--config", action="append", help="configs to measure (default: every shipped one)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="an override applied to every config, e.g. model.image_size=32")
    args = parser.parse_args()
    data = load_iclevr(args.data, progress=False)
    names = args.config or [n for n in shipped_config_names() if n != "judge"]
    judge = load_judge()
    rows = []
    for name in names:
        cfg = load_config(Path(name), args.overrides)
        _, val = split_scenes(data, cfg.data.val_fraction, cfg.data.split_seed)
        images = through_path(val.images, cfg.model.image_size, cfg.model.patch_size)
        scores = score_predictions(judge_probs(judge, images), val.labels)
        rows.append({"config": name, "overrides": args.overrides, "image_size": cfg.model.image_size,
                     "patch_size": cfg.model.patch_size, "unet_positions": cfg.model.image_size // cfg.model.patch_size,
                     "images": len(val), "topk_accuracy": round(scores["topk_accuracy"], 4),
                     "exact_accuracy": round(scores["exact_accuracy"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| config | drawn at | UNet works at | held-out real images | top-k | exact-set |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['config']}` {' '.join(r['overrides'])} | {r['image_size']}x{r['image_size']} | "
              f"{r['unet_positions']}x{r['unet_positions']} (patch {r['patch_size']}) | {r['images']} | "
              f"{r['topk_accuracy']:.4f} | {r['exact_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
