"""Training and sampling throughput of a config's UNet on this machine (CPU or CUDA).

    python benchmarks/diffusion_speed.py --config configs/tiny.toml
    python benchmarks/diffusion_speed.py --config configs/small.toml --set train.compile=true
    python benchmarks/diffusion_speed.py --config cpu --compare

Prints one JSON line: training images/s (random data, the real training step: bf16 autocast,
channels-last and compile as the config says) and sampling images/s for each sampler at the
config's step count. With ``--compare``, the same model's training step and a sampling UNet pass
are timed in one run under each precision and layout (fp32, bf16, bf16 + channels-last, and with
``--compile`` also bf16 + torch.compile), with each speed-up over fp32. Record results with the
command and the machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clevrgen.config import load_config
from clevrgen.data.iclevr import ImageSet
from clevrgen.diffusion import sampling_scheduler
from clevrgen.labels import NUM_CLASSES
from clevrgen.pipeline import ClevrgenPipeline
from clevrgen.train import Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine() -> str:
    """The processor's name and core count, for the record (``clevrgen.runtime.machine_name``)."""
    from clevrgen.runtime import machine_name

    return machine_name()


def fake_data(n: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g),
                    (torch.rand(n, NUM_CLASSES, generator=g) < 0.1).float(), torch.arange(n), [str(i) for i in range(n)])


def time_setting(cfg, train_steps: int, sample_batch: int) -> dict:
    """Training images/s and UNet-pass images/s (a sampling step's forward, guidance batch) of one setting."""
    from clevrgen.runtime import autocast

    n = max(256, cfg.train.batch_size)
    trainer = Trainer(cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_fraction": 0.0})}),
                      None, fake_data(n), progress=False)
    for _ in range(2):  # warm-up (and compilation)
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(train_steps):
        trainer.train_step()
    train_ips = train_steps * cfg.train.batch_size / (time.perf_counter() - start)
    model = trainer.forward.eval()
    x = torch.randn(2 * sample_batch, 3, 64, 64)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels, t = torch.zeros(2 * sample_batch, NUM_CLASSES), torch.full((2 * sample_batch,), 500)
    with torch.no_grad(), autocast(trainer.device, trainer.amp_dtype):
        model(x, t, labels)
        start = time.perf_counter()
        for _ in range(3):
            model(x, t, labels)
    pass_ips = 3 * 2 * sample_batch / (time.perf_counter() - start)
    return {"train_images_per_second": round(train_ips, 1), "unet_pass_images_per_second": round(pass_ips, 1)}


def compare(cfg, args) -> None:
    settings = {"fp32": dict(precision="fp32"), "bf16": dict(precision="bf16"),
                "bf16 + channels-last": dict(precision="bf16", channels_last=True)}
    if args.compile:
        settings["bf16 + compile"] = dict(precision="bf16", compile=True)
    rows = {}
    for name, update in settings.items():
        setting = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
        rows[name] = time_setting(setting, args.train_steps, args.sample_batch)
        print(json.dumps({"setting": name, **rows[name]}), flush=True)
    base = rows["fp32"]
    print(f"\n{args.config} {' '.join(args.overrides)}: batch {cfg.train.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {machine()}")
    print("| setting | training img/s | x fp32 | UNet pass img/s | x fp32 |\n| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['train_images_per_second']} | "
              f"{r['train_images_per_second'] / base['train_images_per_second']:.2f} | "
              f"{r['unet_pass_images_per_second']} | "
              f"{r['unet_pass_images_per_second'] / base['unet_pass_images_per_second']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--compare", action="store_true", help="time fp32, bf16 and bf16 + channels-last side by side")
    parser.add_argument("--compile", action="store_true", help="with --compare: also bf16 + torch.compile")
    args = parser.parse_args()
    cfg = load_config(Path(args.config), args.overrides)
    if args.compare:
        compare(cfg, args)
        return

    fake = fake_data(max(256, cfg.train.batch_size))
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
        # the training's precision, as its sample grids draw
        pipe = ClevrgenPipeline.from_denoiser(model, sampling_scheduler(cfg.diffusion, sampler),
                                              precision=cfg.train.precision)
        pipe.set_progress_bar_config(disable=True)
        for n, steps in ((2, 2), (len(seeds), s.steps)):  # a warm-up, then the measured batch
            synchronize(device)
            start = time.perf_counter()
            pipe(labels=labels[:n], seed=seeds[:n], num_inference_steps=steps, guidance_scale=s.guidance,
                 output_type="latent", batch_size=n)
        synchronize(device)
        sampling[sampler] = args.sample_batch / (time.perf_counter() - start)

    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "train_images_per_second": round(train_ips, 1), "batch_size": cfg.train.batch_size,
        "sample_steps": s.steps, "guidance": s.guidance,
        "sample_images_per_second": {k: round(v, 1) for k, v in sampling.items()},
    }))


if __name__ == "__main__":
    main()
