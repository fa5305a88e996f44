"""Wall time to draw both official splits (64 images) with a trained model on this machine.

    python benchmarks/sampling_speed.py                       # the shipped model, its own settings
    python benchmarks/sampling_speed.py --steps 25 --guidance 2 --checkpoint runs/cpu
    python benchmarks/sampling_speed.py --batch-size 16            # the 64 images in chunks of 16

The 32 label sets of ``test`` and the 32 of ``new_test`` are drawn in one batch of 64 (image i
from seed i), after a short warm-up, as ``clevrgen evaluate`` draws them. Prints one JSON line
with the seconds and images/s; the time excludes loading the model and scoring.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clevrgen.config import validate_config
from clevrgen.errors import ClevrgenError
from clevrgen.labels import load_label_sets
from clevrgen.loaded import LoadedModel
from diffusion_speed import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a run folder (default: the shipped model)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images per UNet batch (sample.batch_size)")
    args = parser.parse_args()
    given = {k: v for k, v in vars(args).items() if k in ("steps", "guidance", "sampler", "batch_size") and v is not None}
    try:
        model = LoadedModel.load(args.checkpoint)
        raw = model.config.model_dump(mode="json")
        raw["sample"].update(given)  # validated as any config is: a bad value is one line, not a traceback
        model.config = validate_config(raw, origins={f"sample.{k}": f"--{k.replace('_', '-')} {v}"
                                                     for k, v in given.items()})
    except ClevrgenError as exc:
        parser.exit(2, f"error: {exc}\n")
    sample = model.config.sample
    scenes = load_label_sets("test") + load_label_sets("new_test")
    model.generate(scenes[:2], [0, 1], progress=False)  # warm-up
    start = time.perf_counter()
    images = model.generate(scenes, list(range(len(scenes))), progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"checkpoint": str(model.run_dir), "images": len(images), "sampler": sample.sampler,
                      "steps": sample.steps, "guidance": sample.guidance, "batch_size": sample.batch_size,
                      "seconds": round(seconds, 2), "images_per_second": round(len(images) / seconds, 2),
                      "threads": torch.get_num_threads(), "device": str(model.device), "machine": machine(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
