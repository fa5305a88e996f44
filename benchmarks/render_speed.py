"""Renderer speed: scenes per second at 64x64 on the CPU (and CUDA when present).

    python benchmarks/render_speed.py [--scenes 512] [--batch 256] [--objects 3]

A scene is one i-CLEVR-like layout (first object at the origin, later ones around it) rendered
once with all its objects; layout sampling (with its visibility re-draws) is timed separately
from rendering. Prints one line per device to record in docs/renderer.md. On a shared machine
the wall-clock rate swings with the other jobs; the rate per CPU second of this process (run
with OMP_NUM_THREADS=1) is what one free core would give.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from clevrgen.data import render as R


def bench(device: str, scenes: int, batch: int, objects: int) -> str:
    g = torch.Generator().manual_seed(0)
    classes = [torch.randperm(24, generator=g)[:objects].tolist() for _ in range(scenes)]
    keys = [f"bench{i}" for i in range(scenes)]
    R.render_scenes(R.sample_scenes(classes[:8], keys[:8], device=device))  # warm up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_layout = t_render = cpu_layout = cpu_render = 0.0
    for start in range(0, scenes, batch):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        layout = R.sample_scenes(classes[start:start + batch], keys[start:start + batch], device=device)
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        R.render_scenes(layout)
        sync()
        t_render += time.perf_counter() - t1
        cpu_render += time.process_time() - c1
        t_layout += t1 - t0
        cpu_layout += c1 - c0
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return (f"{device} ({name}): {scenes / t_render:,.0f} scenes/s rendering, "
            f"{scenes / (t_render + t_layout):,.0f} scenes/s with layout sampling; per CPU second of the "
            f"process: {scenes / cpu_render:,.0f} and {scenes / (cpu_render + cpu_layout):,.0f} "
            f"({objects} objects, 64x64, 2x2 supersampled objects, batch {batch}, torch {torch.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--objects", type=int, default=3)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(bench(device, args.scenes, args.batch, args.objects), flush=True)


if __name__ == "__main__":
    main()
