"""How near the machine's limit a training step runs: its FLOPs, the achieved GFLOP/s against the
CPU's nominal bf16 peak, and where the step's time goes (torch.profiler).

    python benchmarks/step_profile.py --config cpu
    python benchmarks/step_profile.py --config cpu --set "model.cross_attention=[false,true,true,false]" --profile

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplies and
convolutions; a multiply-add is 2 FLOPs) for one training step of the real ``Trainer`` (forward and
backward of a batch) and for one sampling UNet pass (a guidance batch of 2 x 64 images). The peak
is nominal: cores x clock x bf16 FLOPs per cycle per core, 1024 with AMX (Sapphire Rapids and
later: one TDPBF16PS tile op of 16x16x32 multiply-adds every 16 cycles), 64 with AVX512-BF16 alone
on AMD Zen 4 (VDPBF16PS on two 256-bit pipes), 32 with FMA in fp32 otherwise. Record results with
the command and the machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusion_speed import fake_data, machine  # noqa: E402

from clevrgen.config import load_config  # noqa: E402
from clevrgen.labels import NUM_CLASSES  # noqa: E402
from clevrgen.runtime import autocast  # noqa: E402
from clevrgen.train import Trainer  # noqa: E402


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def clock_ghz() -> float:
    """The nominal clock: the model name's '@ X.XGHz', else BogoMIPS / 2 (x86 reports twice the
    TSC rate), else cpu MHz."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.startswith("model name") and "GHz" in line:
            return float(line.rsplit("@", 1)[-1].strip().removesuffix("GHz"))
    for key, scale in (("bogomips", 0.5e-3), ("cpu MHz", 1e-3)):
        for line in text.splitlines():
            if line.lower().startswith(key.lower()):
                return float(line.split(":", 1)[1]) * scale
    return float("nan")


def nominal_peak(threads: int, bf16: bool = True) -> tuple[float, str]:
    """The nominal peak of the precision the step computes in (``bf16``, else fp32)."""
    flags = cpu_flags()
    if bf16 and "amx_bf16" in flags:
        per_cycle, what = 1024, "AMX-BF16, 1024 FLOP/cycle/core"
    elif bf16 and "avx512_bf16" in flags:
        per_cycle, what = 64, "AVX512-BF16 (Zen 4: 2 x 256-bit), 64 FLOP/cycle/core"
    elif not bf16 and "avx512f" in flags:
        per_cycle, what = 64, "AVX512 FMA fp32 (two 512-bit units), 64 FLOP/cycle/core"
    else:
        per_cycle, what = 32, "FMA fp32, 32 FLOP/cycle/core"
    ghz = clock_ghz()
    return threads * ghz * per_cycle, f"{threads} cores x {ghz:.2f} GHz x {what}"


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def time_optimizer(model: torch.nn.Module, kind: str, steps: int = 5) -> float:
    """Seconds per AdamW step over the model's parameters (with the last step's gradients): the
    loop kernel, or the fused one ``Trainer`` uses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=kind == "fused" or None)
    optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table of a few steps")
    parser.add_argument("--trace", type=Path, help="with --profile: write a Chrome trace here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_fraction": 0.0})})
    trainer = Trainer(cfg, None, fake_data(max(256, cfg.train.batch_size)), progress=False)
    b = cfg.train.batch_size

    step_flops = count_flops(trainer.train_step)
    model = trainer.model
    x, t = torch.randn(128, 3, 64, 64), torch.full((128,), 500)
    labels = torch.zeros(128, NUM_CLASSES)
    labels[:64, 3] = 1

    def unet_pass():
        with torch.no_grad(), autocast(trainer.device, trainer.amp_dtype):
            model(x, t, labels)

    pass_flops = count_flops(unet_pass)
    for _ in range(2):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    step_s = (time.perf_counter() - start) / args.steps
    unet_pass()
    start = time.perf_counter()
    for _ in range(3):
        unet_pass()
    pass_s = (time.perf_counter() - start) / 3

    optimizer_ms = {kind: round(time_optimizer(model, kind) * 1e3, 1) for kind in ("loop", "fused")}

    threads = torch.get_num_threads()
    peak, how = nominal_peak(threads, bf16=trainer.amp_dtype == torch.bfloat16)
    result = {
        "config": args.config, "overrides": args.overrides, "cpu": machine(), "threads": threads,
        "torch": torch.__version__, "precision": cfg.train.precision,
        "computed_in": str(trainer.amp_dtype or torch.float32).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_step_gflop": round(step_flops / 1e9, 2), "train_gflop_per_image": round(step_flops / b / 1e9, 3),
        "train_images_per_second": round(b / step_s, 1), "train_gflops_achieved": round(step_flops / step_s / 1e9, 1),
        "unet_forward_gflop_per_image": round(pass_flops / 128 / 1e9, 3),
        "pass_images_per_second": round(128 / pass_s, 1), "pass_gflops_achieved": round(pass_flops / pass_s / 1e9, 1),
        "nominal_peak_gflops": round(peak, 0), "peak_from": how,
        "adamw_step_ms": optimizer_ms, "train_step_ms": round(step_s * 1e3, 1),
    }
    result["train_share_of_peak"] = round(result["train_gflops_achieved"] / peak, 3)
    result["pass_share_of_peak"] = round(result["pass_gflops_achieved"] / peak, 3)
    print(json.dumps(result), flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                trainer.train_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
