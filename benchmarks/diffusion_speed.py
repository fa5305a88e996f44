"""Training and sampling throughput of a config's UNet on this machine (CPU or CUDA).

    python benchmarks/diffusion_speed.py --config configs/tiny.toml
    python benchmarks/diffusion_speed.py --config configs/small.toml --set train.compile=true

Prints one JSON line: training images/s (random data, the real training step: bf16 autocast,
channels-last and compile as the config says) and sampling images/s for each sampler at the
config's step count. Record results with the command and the machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from clevrgen.config import load_config
from clevrgen.data.iclevr import ImageSet
from clevrgen.diffusion import sample, sampling_scheduler
from clevrgen.labels import NUM_CLASSES
from clevrgen.train import Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(Path(args.config), args.overrides)

    n = max(256, cfg.train.batch_size)
    g = torch.Generator().manual_seed(0)
    fake = ImageSet(torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g),
                    (torch.rand(n, NUM_CLASSES, generator=g) < 0.1).float(), torch.arange(n), [str(i) for i in range(n)])
    trainer = Trainer(cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_fraction": 0.0})}),
                      None, fake, progress=False)
    device = trainer.device
    for _ in range(3):  # warm-up (and compilation)
        trainer.train_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        trainer.train_step()
    synchronize(device)
    train_ips = args.train_steps * cfg.train.batch_size / (time.perf_counter() - start)

    model = trainer.ema_model().to(device)
    labels = fake.labels[: args.sample_batch].to(device)
    seeds = list(range(args.sample_batch))
    s = cfg.sample
    sampling = {}
    for sampler in ("ddim", "dpm++"):
        sched = sampling_scheduler(cfg.diffusion, sampler)
        sample(model, sched, labels[:2], seeds[:2], 2, s.guidance, cfg.model.image_size, trainer.amp_dtype)
        synchronize(device)
        start = time.perf_counter()
        sample(model, sched, labels, seeds, s.steps, s.guidance, cfg.model.image_size, trainer.amp_dtype)
        synchronize(device)
        sampling[sampler] = args.sample_batch / (time.perf_counter() - start)

    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "train_images_per_second": round(train_ips, 1), "batch_size": cfg.train.batch_size,
        "sample_steps": s.steps, "guidance": s.guidance,
        "sample_images_per_second": {k: round(v, 1) for k, v in sampling.items()},
    }))


if __name__ == "__main__":
    main()
