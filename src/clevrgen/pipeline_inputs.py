"""What a ``ClevrgenPipeline`` call takes, checked with the CLI's ranges before any work: a bad
argument is clevrgen's UsageError, never a torch error, a NaN image or a silent default.

The pipeline (:mod:`clevrgen.pipeline`) calls these with itself as ``pipe``; they read its config,
scheduler and geometry, and import nothing of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from clevrgen.errors import UsageError
from clevrgen.labels import NUM_CLASSES

Scenes = Sequence[Sequence[str]] | Sequence[str]
StepEndCallback = Callable[..., dict]
"""``f(pipe, step_index, timestep, {"latents": x, "batch_start": i}) -> that dict`` (or None)."""
OUTPUT_TYPES = ("pil", "np", "pt", "uint8", "latent")


def check_call(pipe, scenes, steps, guidance, seed, output_type, callback, labels, latents, batch_size):
    """The arguments of ``pipe.__call__``: returns (steps, guidance, labels [N, 24], the callback
    wrapped to check what it returns), the model's defaults where None was given."""
    from clevrgen.config import MAX_GUIDANCE, MAX_SAMPLE_STEPS, MAX_SEED

    limit = min(MAX_SAMPLE_STEPS, pipe.scheduler.config.num_train_timesteps)
    steps = checked_number("num_inference_steps", pipe.config.num_inference_steps if steps is None else steps,
                           1, limit, integer=True, why="the model's training timesteps")
    guidance = checked_number("guidance_scale", pipe.config.guidance_scale if guidance is None else guidance,
                              0.0, MAX_GUIDANCE)
    checked_number("batch_size", batch_size, 1, 65_536, integer=True)
    if isinstance(seed, Sequence):
        for s in seed:
            checked_number("seed", s, 0, 2**63 - 1, integer=True)
    elif seed is not None:
        checked_number("seed", seed, 0, MAX_SEED, integer=True)
    if output_type not in OUTPUT_TYPES:
        raise UsageError(f"output_type {output_type!r}: choose {', '.join(OUTPUT_TYPES[:-1])} or {OUTPUT_TYPES[-1]}")
    if callback is not None and not callable(callback):
        raise UsageError(f"callback_on_step_end {callback!r} is not callable")
    if labels is None:
        if scenes is None:
            raise UsageError("give the scenes to draw (phrase lists) or labels")
        labels = pipe.encode_scenes(scenes)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.shape[1] != NUM_CLASSES:
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise UsageError(f"labels {shape}: give multi-hot labels [N, {NUM_CLASSES}] (clevrgen.labels.multi_hot)")
    if len(labels) == 0:
        raise UsageError("nothing to draw: give at least one scene")
    if labels.is_complex() or not bool(((labels >= 0) & (labels <= 1)).all()):  # integer labels too: 2 is no label
        raise UsageError("labels must be multi-hot: every entry 0 or 1 (none NaN)")
    if latents is not None:
        shape = (len(labels), 3, pipe.image_size, pipe.image_size)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            given = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise UsageError(f"latents {given}: this model draws from noise {list(shape)}, one per label set")
        if not bool(torch.isfinite(latents).all()):
            raise UsageError("latents hold NaN or infinite values: give finite noise")
    return steps, guidance, labels, None if callback is None else checked_callback(callback)


def check_image(pipe, image, image_guidance_scale, n: int) -> tuple[torch.Tensor | None, float]:
    """An editor's source images as float [N, 3, S, S] in [-1, 1] on the CPU (None: none given)
    and the image guidance scale; an image given to a generator, or of another size, is a
    UsageError."""
    from clevrgen.config import MAX_GUIDANCE

    scale = checked_number("image_guidance_scale", pipe.config.image_guidance_scale
                           if image_guidance_scale is None else image_guidance_scale, 0.0, MAX_GUIDANCE)
    if image is None:
        return None, scale
    if not pipe.is_editor:
        raise UsageError("this model is a generator: it draws scenes from noise and takes no image "
                         "(give an editor, e.g. the shipped editor, to edit a scene)")
    source = image_tensor(image)
    size = pipe.image_size
    if source.shape[1:] != (3, size, size):
        raise UsageError(f"image {list(source.shape)}: this editor takes [N, 3, {size}, {size}] images")
    if len(source) == 1 and n > 1:
        source = source.expand(n, -1, -1, -1)
    if len(source) != n:
        raise UsageError(f"{len(source)} source images for {n} scenes: give one, or one per scene")
    return source * 2 - 1, scale


def image_tensor(image) -> torch.Tensor:
    """Source images as float [N, 3, H, W] in [0, 1]: PIL images (one or a list), or a tensor in
    [0, 1] (float) or 0-255 (uint8), [3, H, W] or [N, 3, H, W]."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image) or (isinstance(image, Sequence) and image and
                                          all(isinstance(i, Image.Image) for i in image)):
        images = [image] if isinstance(image, Image.Image) else list(image)
        return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                            for i in images])
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise UsageError(f"image {type(image).__name__}: give PIL images or a tensor [N, 3, H, W] in [0, 1]")
    image = image[None] if image.ndim == 3 else image
    if image.dtype == torch.uint8:
        return image.float().cpu() / 255
    if not image.is_floating_point() or not bool(((image >= 0) & (image <= 1)).all()):
        raise UsageError("image: a float tensor's values must be in [0, 1] (none NaN), as output_type='pt' gives")
    return image.float().cpu()


def check_memory(pipe, n: int, output_type: str) -> None:
    """Refuse, before any work, a call whose images cannot all be held at once (they are
    returned together: the images, their concatenation and the output's own copy)."""
    from clevrgen.runtime import available_memory

    per_image = 3 * pipe.image_size**2 * 4 * (2 if output_type in ("latent", "pt", "uint8") else 3)
    free = available_memory()
    if free is not None and n * per_image > free:
        raise UsageError(f"{n} images need about {n * per_image / 2**30:.1f} GiB at once, and this machine has "
                         f"{free / 2**30:.1f} GiB free: draw them in parts (`clevrgen sample -n` writes its "
                         "images to disk as it goes)")


def generators_of(n: int, generator, seed):
    """The noise generators and the step-noise generators (stochastic samplers) of a call for
    ``n`` images: ``seed`` gives image i two generators of its seed, as clevrgen always did."""
    if seed is not None and generator is not None:
        raise UsageError("give seed or generator, not both")
    if seed is not None:
        seeds = [int(s) for s in seed] if isinstance(seed, Sequence) else [int(seed) + i for i in range(n)]
        if len(seeds) != n:
            raise UsageError(f"{len(seeds)} seeds for {n} images")
        return [torch.Generator().manual_seed(s) for s in seeds], [torch.Generator().manual_seed(s) for s in seeds]
    if isinstance(generator, list) and len(generator) != n:
        raise UsageError(f"{len(generator)} generators for {n} images: give one, or one per image")
    given = generator if isinstance(generator, list) else [] if generator is None else [generator]
    if bad := next((g for g in given if not isinstance(g, torch.Generator)), None):
        raise UsageError(f"generator {type(bad).__name__}: give a torch.Generator, or a list of one per image (or seed=)")
    return generator, generator


def noise_device(generator: torch.Generator | list[torch.Generator] | None) -> torch.device:
    """Where a call's starting noise is drawn: on its generator's device (a CUDA generator draws
    on the GPU, as in diffusers' pipelines), else on the CPU, so ``seed=`` and CPU generators
    give the same images on every device."""
    first = generator[0] if isinstance(generator, list) and generator else generator
    return torch.device(getattr(first, "device", None) or "cpu")


def checked_number(name: str, value, low, high, integer: bool = False, why: str = ""):
    """``value`` as an int (``integer``) or a finite float in [low, high], else one UsageError
    naming the argument; a boolean is not a number."""
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UsageError(f"{name} {value!r}: give {'an integer' if integer else 'a number'} from {low} to {high}")
    if not (integer or math.isfinite(value)) or not low <= value <= high:
        raise UsageError(f"{name} {value!r}: must be from {low} to {high}" + (f", {why}" if why else ""))
    return int(value) if integer else float(value)


def checked_callback(callback: StepEndCallback) -> StepEndCallback:
    """``callback``, refusing a return that is not the dict of tensors it was given (or None), or
    whose latents are of another shape or not finite: the next step would fail in torch's terms,
    or draw NaN images."""
    def checked(pipe, i, t, kwargs):
        shape = tuple(kwargs["latents"].shape)
        result = callback(pipe, i, t, kwargs)
        if result is not None and not (isinstance(result, dict) and isinstance(result.get("latents", kwargs["latents"]),
                                                                               torch.Tensor)):
            raise UsageError(f"callback_on_step_end returned {type(result).__name__}: it must return the dict it was "
                             "given (its 'latents' a tensor), or None")
        latents = kwargs["latents"] if result is None else result.get("latents", kwargs["latents"])
        if tuple(latents.shape) != shape:
            raise UsageError(f"callback_on_step_end returned latents {list(latents.shape)} at step {i}: they must keep "
                             f"the shape they were given, {list(shape)}")
        if not bool(torch.isfinite(latents).all()):
            raise UsageError(f"callback_on_step_end returned latents holding NaN or infinite values at step {i}: "
                             "return finite latents")
        return result

    return checked


def checked_dtype(torch_dtype):
    """``from_pretrained``'s ``torch_dtype``: a floating torch dtype (or None), else a UsageError
    (a string such as "float16" would reach torch as a device name)."""
    if torch_dtype is None or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        return torch_dtype
    raise UsageError(f"torch_dtype {torch_dtype!r}: give a floating torch dtype, e.g. torch.float16, torch.bfloat16 "
                     "or torch.float32")


def check_sample_steps(config) -> None:
    """A sampler takes at most the model's training timesteps: say so before any work."""
    steps, limit = config.sample.steps, config.diffusion.num_train_timesteps
    if steps > limit:
        raise UsageError(f"--steps / sample.steps {steps} is more than the model's {limit} training timesteps: "
                         f"give at most {limit}")
