"""Schedulers from the config, and the one sampling loop every command shares.

``sample`` is a pure function of (model, scheduler, labels, seeds): each image draws its noise
from its own generator, so an image does not depend on the batch it was drawn in. The denoising
strip comes from its ``callback``, never from a second loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from clevrgen.config import DiffusionConfig

SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}
StepCallback = Callable[[int, int, torch.Tensor], None]


def training_scheduler(cfg: DiffusionConfig):
    """The DDPM noise schedule the model is trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else "linear",
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def sampling_scheduler(cfg: DiffusionConfig, sampler: str):
    """A DDPM, DDIM or DPM-Solver++ scheduler built from the training schedule's config."""
    import diffusers

    base = training_scheduler(cfg)
    cls = getattr(diffusers, SCHEDULER_CLASSES[sampler])
    extra = {
        "ddim": {"timestep_spacing": "trailing", "set_alpha_to_one": False},
        "dpm++": {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"},
    }.get(sampler, {})
    return cls.from_config(base.config, **extra)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per image: the same seed gives the same noise on any device or batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    scheduler,
    labels: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    guidance: float = 1.0,
    image_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W], for multi-hot ``labels`` [B, 24].

    ``guidance`` is the classifier-free guidance scale: 1 conditional, 0 unconditional, above 1
    pushes away from the empty label. ``callback(step, steps, x)`` sees the initial noise
    (step 0) and the image after every step.
    """
    from clevrgen.runtime import autocast

    device = labels.device
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = initial_noise(seeds, (3, image_size, image_size)).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    empty = torch.zeros_like(labels)
    if callback is not None:
        callback(0, steps, x)
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        with autocast(device, autocast_dtype):
            if guidance == 1.0:
                out = model(model_input, t, labels)
            elif guidance == 0.0:
                out = model(model_input, t, empty)
            else:
                cond, uncond = model(torch.cat([model_input] * 2), t, torch.cat([labels, empty])).chunk(2)
                out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out.float(), t, x, generator=generators).prev_sample
        if callback is not None:
            callback(i + 1, steps, x)
    return x.clamp(-1.0, 1.0)


def generate(
    model: torch.nn.Module,
    scheduler,
    labels: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    guidance: float = 1.0,
    batch_size: int = 64,
    image_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str = "sampling",
) -> torch.Tensor:
    """:func:`sample` over any number of images in batches, with a progress bar: uint8 64x64 images
    on the CPU (a model trained at a lower ``image_size`` is upsampled)."""
    from clevrgen.data.iclevr import IMAGE_SIZE, resize_images, to_uint8
    from clevrgen.progress import make_progress

    out = []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task(description, total=len(seeds) * steps)
        for start in range(0, len(seeds), batch_size):
            batch = slice(start, start + batch_size)
            images = sample(
                model, scheduler, labels[batch], seeds[batch], steps, guidance, image_size,
                autocast_dtype, callback=lambda i, n, x: i and bar.advance(task, x.shape[0]),
            )
            out.append(resize_images(to_uint8(images).cpu(), IMAGE_SIZE))
    return torch.cat(out)
