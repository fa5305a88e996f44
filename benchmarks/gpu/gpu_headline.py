"""Issue 15 in one device call: the headline speed figures, each beside its target.

    python benchmarks/gpu/gpu_headline.py --data .carry/iclevr.npz                      # on the H200
    python benchmarks/gpu/gpu_headline.py --data .carry/iclevr.npz --toy --out out/toy   # CPU, seconds

1. Training throughput of clevrgen's Trainer (configs/gpu.toml: bf16, channels-last, compile,
   data on the device) against a reference loop written the way the course trains the same
   UNet: PNG bytes decoded by PIL in a DataLoader every epoch, fp32, batch 32, ``.item()`` every
   step, no compile. And clevrgen's model FLOP utilisation: FLOPs of one training step counted
   with torch.utils.flop_counter, per second, over the bf16 matmul rate measured in this run.
2. Wall time to generate and score both splits (64 images) with the batched sampler at the
   config's steps, against the reference way (one image at a time, 1000 DDPM steps, fp32), which
   is timed on ``--ref-images`` images for ``--ref-steps`` steps and scaled (the report says so).
3. The renderer's scenes/s on the device, 1-3 objects per scene at 64x64.
4. A one-process ``torchrun -m clevrgen train`` (NCCL on CUDA, gloo on the CPU) for
   ``--ddp-steps`` steps, which must end with ``ranks_in_sync`` in metrics.jsonl.

Writes gpu_headline.md and gpu_headline.json into ``--out`` ($OUT on the device machine).
``--toy`` runs everything at a tiny size on the CPU: its figures are no GPU measurements.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    TOY, command_line, default_out, machine, machine_md, md_table, script_parser, synchronize, write_reports,
)
from pack_images import load_images  # noqa: E402

from clevrgen.config import load_config  # noqa: E402
from clevrgen.data.iclevr import ImageSet  # noqa: E402
from clevrgen.diffusion import sampling_scheduler, training_scheduler  # noqa: E402
from clevrgen.judge import judge_probs, load_judge, score_predictions  # noqa: E402
from clevrgen.labels import load_label_sets, multi_hot  # noqa: E402
from clevrgen.model import build_model  # noqa: E402
from clevrgen.pipeline import ClevrgenPipeline  # noqa: E402
from clevrgen.train import Trainer  # noqa: E402

TARGETS = {"training_speedup": 10.0, "mfu": 0.40, "evaluation_speedup": 1000.0, "evaluation_seconds": 1.0,
           "render_scenes_per_second": 50_000.0}


def parse_args(argv=None):
    p = script_parser(__doc__, "gpu_headline")
    p.add_argument("--train-steps", type=int, default=100, help="timed clevrgen steps (after warm-up)")
    p.add_argument("--ref-seconds", type=float, default=30.0, help="how long the reference loop is timed")
    p.add_argument("--ref-images", type=int, default=2, help="images of the timed reference sampling")
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--render-scenes", type=int, default=262_144)
    p.add_argument("--render-batch", type=int, default=16_384)
    p.add_argument("--ddp-steps", type=int, default=300)
    p.add_argument("--matmul", type=int, default=8192, help="size of the bf16 matmul that measures the peak")
    p.add_argument("--toy", action="store_true", help="tiny sizes everywhere: a CPU check")
    args = p.parse_args(argv)
    if args.toy:
        args.overrides = TOY + args.overrides
        args.train_steps, args.ref_seconds, args.ref_images, args.ref_steps = 3, 1.0, 1, 3
        args.render_scenes, args.render_batch, args.ddp_steps, args.matmul = 64, 32, 3, 256
    args.out = args.out or default_out()
    return args


# --- 1. training throughput and MFU ----------------------------------------------------------
def matmul_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data (mean of 10 after 3 warm-ups)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def step_flops(cfg, device, amp) -> float:
    """FLOPs of one training step (forward + backward of the UNet at the config's batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clevrgen.runtime import autocast

    model = build_model(cfg.model).to(device)
    b = cfg.train.batch_size
    x = torch.randn(b, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    t = torch.randint(1000, (b,), device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, amp):
            out = model(x, t, torch.zeros(b, 24, device=device))
        out.float().square().mean().backward()
    return float(counter.get_total_flops())


def clevrgen_throughput(trainer: Trainer, steps: int) -> dict:
    device = trainer.device
    start = time.perf_counter()
    for _ in range(3):  # warm-up and compilation
        trainer.train_step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * trainer.cfg.train.batch_size / seconds,
            "steps_per_second": steps / seconds, "timed_steps": steps, "warmup_seconds_incl_compile": warmup_s}


class PngDataset(torch.utils.data.Dataset):
    """The course's way: a PNG per image, decoded by PIL and normalised at every access."""

    def __init__(self, data: ImageSet):
        from PIL import Image

        self.labels = data.labels
        self.pngs = []
        for image in data.images.numpy():
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            self.pngs.append(buffer.getvalue())

    def __len__(self):
        return len(self.pngs)

    def __getitem__(self, i):
        from PIL import Image

        image = Image.open(io.BytesIO(self.pngs[i])).convert("RGB")
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5, self.labels[i]


def reference_throughput(cfg, data: ImageSet, device, seconds: float, workers: int) -> dict:
    """The same UNet trained the course's way, for ``seconds`` after 3 warm-up steps."""
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = training_scheduler(cfg.diffusion)
    loader = torch.utils.data.DataLoader(PngDataset(data), batch_size=32, shuffle=True, num_workers=workers,
                                         drop_last=False)
    steps = images = 0
    start = None
    while True:
        for x, y in loader:  # a new epoch: every image decoded again
            x, y = x.to(device), y.to(device)
            noise = torch.randn_like(x)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=device)
            loss = F.mse_loss(model(scheduler.add_noise(x, noise, t), t, y), noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # logged every step: a device sync
            steps += 1
            if steps == 3:
                start, images = time.perf_counter(), 0
            elif start is not None:
                images += x.shape[0]
                if time.perf_counter() - start >= seconds:
                    elapsed = time.perf_counter() - start
                    return {"images_per_second": images / elapsed, "timed_steps": steps - 3,
                            "seconds": elapsed, "batch_size": 32, "num_workers": workers}


# --- 2. evaluation wall time -----------------------------------------------------------------
def batched_evaluation(model, cfg, judge, device) -> dict:
    scenes = load_label_sets("test") + load_label_sets("new_test")
    labels = multi_hot(scenes)
    s = cfg.sample
    pipe = ClevrgenPipeline.from_denoiser(model, sampling_scheduler(cfg.diffusion, s.sampler),
                                          precision=cfg.train.precision)  # the training's autocast
    pipe.set_progress_bar_config(disable=True)

    def once():
        images = pipe(labels=labels.to(device), seed=list(range(len(scenes))), num_inference_steps=s.steps,
                      guidance_scale=s.guidance, output_type="uint8", batch_size=s.batch_size).images
        return score_predictions(judge_probs(judge, images), labels)

    once()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    once()
    synchronize(device)
    return {"seconds": time.perf_counter() - start, "images": len(scenes), "sampler": s.sampler, "steps": s.steps,
            "guidance": s.guidance, "batch_size": s.batch_size}


@torch.no_grad()
def reference_evaluation(model, cfg, judge, device, images: int, steps: int, total_images: int = 64,
                         total_steps: int = 1000) -> dict:
    """One image at a time, fp32, DDPM: ``images`` images for ``steps`` steps timed, scaled to
    ``total_images`` x ``total_steps``."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(training_scheduler(cfg.diffusion).config)
    scheduler.set_timesteps(total_steps, device=device)
    labels = multi_hot(load_label_sets("test"))[:images].to(device)
    model = model.float()
    size = cfg.model.image_size
    synchronize(device)
    start = time.perf_counter()
    for i in range(images):
        x = torch.randn(1, 3, size, size, device=device)
        for t in scheduler.timesteps[:steps]:
            x = scheduler.step(model(x, t, labels[i:i + 1]), t, x).prev_sample
        judge_probs(judge, x.clamp(-1, 1))
    synchronize(device)
    seconds = time.perf_counter() - start
    scaled = seconds * (total_images / images) * (total_steps / steps)
    return {"timed_seconds": seconds, "timed_images": images, "timed_steps": steps,
            "scaled_seconds": scaled, "scaled_to": f"{total_images} images x {total_steps} steps",
            "note": "timed on a subset and scaled linearly (steps and images): not run in full"}


# --- 3. the renderer -------------------------------------------------------------------------
def render_rate(device: torch.device, scenes: int, batch: int) -> dict:
    from clevrgen.data import render as R

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 4, (scenes,), generator=g).tolist()
    classes = [torch.randperm(24, generator=g)[:k].tolist() for k in counts]
    keys = [f"bench{i}" for i in range(scenes)]
    R.render_scenes(R.sample_scenes(classes[:batch], keys[:batch], device=device))  # warm-up
    t_layout = t_render = 0.0
    for start in range(0, scenes, batch):
        synchronize(device)
        t0 = time.perf_counter()
        layout = R.sample_scenes(classes[start:start + batch], keys[start:start + batch], device=device)
        synchronize(device)
        t1 = time.perf_counter()
        R.render_scenes(layout)
        synchronize(device)
        t_layout += t1 - t0
        t_render += time.perf_counter() - t1
    return {"scenes": scenes, "batch": batch, "objects": "1-3, uniform", "size": "64x64",
            "rendering_scenes_per_second": scenes / t_render,
            "with_layout_scenes_per_second": scenes / (t_render + t_layout)}


# --- 4. one-process torchrun -----------------------------------------------------------------
def torchrun_check(args, data: ImageSet, work: Path, device: torch.device) -> dict:
    """Write the data as a cache-only dataset folder and train through ``torchrun -m clevrgen``."""
    from clevrgen.data.iclevr import cache_path, fingerprint_of, save_cache
    from clevrgen.labels import asset_path

    root, cache, run = work / "iclevr", work / "cache", work / "ddp-run"
    root.mkdir(parents=True, exist_ok=True)
    spec = {n: [_phrase(i) for i in row.nonzero().flatten().tolist()] for n, row in zip(data.names, data.labels)}
    (root / "train.json").write_text(json.dumps(spec))
    (root / "objects.json").write_text(asset_path("objects.json").read_text())
    save_cache(cache_path(root, cache), data, fingerprint_of(root))
    sets = [*args.overrides, f"data.path='{root}'", f"data.cache_dir='{cache}'", f"train.steps={args.ddp_steps}",
            "train.compile=false", f"train.log_every={max(1, args.ddp_steps // 3)}",
            f"train.eval_every={args.ddp_steps}", f"train.checkpoint_every={args.ddp_steps}",
            f"train.sample_every={args.ddp_steps}", "train.eval_splits=[]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "clevrgen", "train", "--config", str(args.config), "--out", str(run),
           *[x for s in sets for x in ("--set", s)]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    records = []
    if (run / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = records[-1] if records else {}
    return {"backend": "nccl" if device.type == "cuda" else "gloo", "steps": args.ddp_steps,
            "returncode": done.returncode, "seconds": seconds, "last_record": last,
            "ranks_in_sync": last.get("ranks_in_sync"), "command": " ".join(cmd[:12]) + " ...",
            "output_tail": (done.stdout + done.stderr)[-1500:]}


def _phrase(index: int) -> str:
    from clevrgen.labels import PHRASES

    return PHRASES[index]


# --- the report ------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    data = load_images(args.data)
    work = Path(tempfile.mkdtemp(prefix="gpu_headline_"))
    trainer = Trainer(cfg, work / "trainer", data, progress=False)
    device, amp = trainer.device, trainer.amp_dtype
    info = machine(device)
    workers = 0 if args.toy else min(4, os.cpu_count() or 1)

    print("1. training throughput", flush=True)
    ours = clevrgen_throughput(trainer, args.train_steps)
    peak = matmul_rate(device, args.matmul)
    flops = step_flops(cfg, device, amp)
    ours.update(flops_per_step=flops, achieved_flops_per_second=flops * ours["steps_per_second"],
                peak_matmul_flops_per_second=peak, peak_dtype="bf16" if device.type == "cuda" else "fp32",
                mfu=flops * ours["steps_per_second"] / peak)
    ref = reference_throughput(cfg, trainer.data.train_set, device, args.ref_seconds, workers)
    training = {"clevrgen": ours, "reference": ref, "speedup": ours["images_per_second"] / ref["images_per_second"]}

    print("2. evaluation wall time", flush=True)
    judge = load_judge(None, device)
    model = trainer.ema_model()
    fast = batched_evaluation(model, cfg, judge, device)
    slow = reference_evaluation(model, cfg, judge, device, args.ref_images, args.ref_steps)
    evaluation = {"clevrgen": fast, "reference": slow, "speedup": slow["scaled_seconds"] / fast["seconds"]}

    print("3. renderer", flush=True)
    render = render_rate(device, args.render_scenes, args.render_batch)

    print("4. torchrun", flush=True)
    ddp = torchrun_check(args, data, work, device)

    report = {
        "issue": 15, "toy": args.toy, "machine": info, "command": command_line(), "config": cfg.model_dump(mode="json"),
        "training": training, "evaluation": evaluation, "render": render, "torchrun": ddp, "targets": TARGETS,
        "seconds_total": time.perf_counter() - t_start,
    }
    write_reports(args.out, "gpu_headline", report, markdown(report))
    print(markdown(report), flush=True)
    return report


def markdown(r: dict) -> str:
    t, e, rd, d = r["training"], r["evaluation"], r["render"], r["torchrun"]
    ours, ref = t["clevrgen"], t["reference"]
    text = "# Issue 15: headline speed figures\n\n" + machine_md(r["machine"], r["command"], r["toy"]) + "\n"
    text += md_table(["figure", "measured", "target"], [
        ["training speed-up over the course-style loop", f"{t['speedup']:.1f}x", f">= {TARGETS['training_speedup']:g}x"],
        ["clevrgen model FLOP utilisation", f"{ours['mfu']:.1%}", f">= {TARGETS['mfu']:.0%}"],
        ["evaluation speed-up (both splits, 64 images)", f"{e['speedup']:,.0f}x", f">= {TARGETS['evaluation_speedup']:,.0f}x"],
        ["evaluation wall time, clevrgen", f"{e['clevrgen']['seconds']:.3f} s", f"<= {TARGETS['evaluation_seconds']:g} s"],
        ["renderer, 1-3 objects at 64x64", f"{rd['rendering_scenes_per_second']:,.0f} scenes/s",
         f">= {TARGETS['render_scenes_per_second']:,.0f}"],
        [f"1-process torchrun ({d['backend']}), {d['steps']} steps", f"ranks_in_sync = {d['ranks_in_sync']}",
         "True"],
    ])
    text += (f"\n## 1. Training\n\n- clevrgen Trainer: {ours['images_per_second']:,.0f} img/s "
             f"(batch {r['config']['train']['batch_size']}, {ours['timed_steps']} timed steps after 3 warm-up steps "
             f"that took {ours['warmup_seconds_incl_compile']:.1f} s with compilation)\n"
             f"- reference loop (PIL-decoded PNGs in a DataLoader with {ref['num_workers']} workers every epoch, fp32, "
             f"batch 32, `.item()` every step, no compile, the same UNet): {ref['images_per_second']:,.0f} img/s over "
             f"{ref['seconds']:.1f} s\n"
             f"- FLOPs per clevrgen step (torch.utils.flop_counter, forward + backward): {ours['flops_per_step']:.3g}; "
             f"achieved {ours['achieved_flops_per_second'] / 1e12:.2f} TFLOP/s against a {ours['peak_dtype']} matmul rate "
             f"of {ours['peak_matmul_flops_per_second'] / 1e12:.2f} TFLOP/s measured in this run\n")
    fe, se = e["clevrgen"], e["reference"]
    text += (f"\n## 2. Evaluation\n\n- clevrgen: {fe['images']} images, {fe['sampler']} {fe['steps']} steps, guidance "
             f"{fe['guidance']}, batch {fe['batch_size']}, generated and scored in {fe['seconds']:.3f} s\n"
             f"- reference: one image at a time, DDPM, fp32, {se['timed_images']} image(s) x {se['timed_steps']} steps "
             f"took {se['timed_seconds']:.2f} s; {se['note']}: {se['scaled_seconds']:,.1f} s for {se['scaled_to']}\n")
    text += (f"\n## 3. Renderer\n\n{rd['scenes']:,} scenes of {rd['objects']} objects at {rd['size']}, batch "
             f"{rd['batch']}: {rd['rendering_scenes_per_second']:,.0f} scenes/s rendering, "
             f"{rd['with_layout_scenes_per_second']:,.0f} scenes/s with layout sampling\n")
    text += (f"\n## 4. torchrun\n\n`{d['command']}`: exit {d['returncode']} in {d['seconds']:.1f} s; last metrics "
             f"record `{json.dumps(d['last_record'])}`\n")
    return text


if __name__ == "__main__":
    main()
