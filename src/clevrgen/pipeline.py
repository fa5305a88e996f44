"""``ClevrgenPipeline``: a trained model as a diffusers pipeline, and the one sampling loop.

    from clevrgen import ClevrgenPipeline
    pipe = ClevrgenPipeline.from_pretrained()          # the shipped model; or a run folder / export
    images = pipe([["red sphere", "cyan cube"]], generator=torch.Generator().manual_seed(0)).images

Every command draws through it: ``sample`` and ``evaluate`` call it in batches, the denoising
strip reads its step callback, and training's sample grids and accuracy checks wrap the EMA
weights in one. A pipeline folder is a clevrgen run folder's artifact: ``model_index.json``, one
folder per component (``unet``, ``label_encoder``, ``scheduler``), plus ``config.toml`` (how the
model was trained) and ``training_data.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from clevrgen.artifact import load_artifact, read_pipeline_index, resolve_checkpoint
from clevrgen.config import Config
from clevrgen.diffusion import sampling_scheduler
from clevrgen.errors import UsageError, warn
from clevrgen.labels import NUM_CLASSES, multi_hot
from clevrgen.model import LabelConditionedUNet, LabelEncoder
from clevrgen.record import training_data_of
from clevrgen.runtime import autocast, autocast_dtype

Scenes = Sequence[Sequence[str]] | Sequence[str]
StepEndCallback = Callable[["ClevrgenPipeline", int, torch.Tensor, dict], dict]


class ClevrgenPipeline(DiffusionPipeline):
    """Phrases in, 64x64 scenes out: a label encoder, a UNet and a scheduler.

    Args:
        unet: a ``UNet2DModel``, or a ``UNet2DConditionModel`` for a model with per-object tokens.
        label_encoder: the ``LabelEncoder`` that turns a multi-hot label into the UNet's conditioning.
        scheduler: the sampler (DPM-Solver++ for the shipped model); swap it as in any pipeline,
            ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.
        num_inference_steps, guidance_scale: the defaults of ``__call__`` (the model's chosen settings).
        precision: autocast while sampling: "bf16", "fp16", "fp32", or "auto" (bf16 on CUDA). On a
            CPU without bf16 (fp16) kernels, such as an AVX2-only one, "bf16" ("fp16") samples in fp32.
        max_objects: the most objects in one training image (a larger scene warns), or None.
        image_guidance_scale: an editor's default guidance toward its source image.
    """

    model_cpu_offload_seq = "label_encoder->unet"

    def __init__(self, unet, label_encoder: LabelEncoder, scheduler, num_inference_steps: int = 25,
                 guidance_scale: float = 2.0, precision: str = "fp32", max_objects: int | None = None,
                 image_guidance_scale: float = 1.5):
        super().__init__()
        self.register_modules(unet=unet, label_encoder=label_encoder, scheduler=scheduler)
        self.register_to_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                precision=precision, max_objects=max_objects, image_guidance_scale=image_guidance_scale)

    # --- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_denoiser(cls, model: LabelConditionedUNet, scheduler, **config) -> "ClevrgenPipeline":
        """A pipeline around a denoiser built or loaded by :mod:`clevrgen.model` (no copy)."""
        return cls(unet=model.unet, label_encoder=model.label_encoder, scheduler=scheduler, **config)

    @classmethod
    def from_run(cls, run: Path | str | None, config: Config | None = None) -> tuple["ClevrgenPipeline", Config]:
        """The pipeline of a clevrgen run folder, export or pipeline folder (None: the shipped model),
        with the config it was trained with; ``config`` may change the sampling settings."""
        run_dir = resolve_checkpoint(run)
        model, saved = load_artifact(run_dir, "cpu")
        config = (config or saved).model_copy(update={"model": saved.model, "diffusion": saved.diffusion})
        s = config.sample
        pipe = cls.from_denoiser(model, sampling_scheduler(saved.diffusion, s.sampler), num_inference_steps=s.steps,
                                 guidance_scale=s.guidance, precision=config.train.precision,
                                 max_objects=training_data_of(run_dir).get("max_objects"),
                                 image_guidance_scale=s.image_guidance)
        pipe.run_dir = run_dir
        return pipe, config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, **kwargs) -> "ClevrgenPipeline":
        """Load a pipeline: with no argument the shipped model, else a run folder, an export, or a
        folder written by :meth:`save_pretrained` (all local; nothing is downloaded).
        ``torch_dtype`` casts the weights as in any diffusers pipeline."""
        torch_dtype = kwargs.pop("torch_dtype", None)
        path = pretrained_model_name_or_path
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if path is None or (Path(path) / "config.toml").is_file() or str(path) in ("shipped", "latest"):
            pipe, _ = cls.from_run(path)
        else:  # a folder of save_pretrained without clevrgen's config.toml
            components, defaults = read_pipeline_index(Path(path))
            pipe = cls(**components, **defaults)
        return pipe.to(torch_dtype) if torch_dtype is not None else pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' layout (``model_index.json``, one folder per component, safetensors) plus the
        stub module through which ``DiffusionPipeline.from_pretrained`` finds this class. A
        pipeline loaded from a clevrgen folder also keeps its ``config.toml`` and
        ``training_data.json``, so the saved folder is a clevrgen model folder too.

        It follows ``clevrgen export``'s overwrite rule (:func:`clevrgen.output.claim_folder`): a
        new or empty folder, or an earlier model folder (its config and record replaced too), and
        never a training run or a folder of other files (UsageError, before anything is written)."""
        import shutil

        from clevrgen.artifact import CONFIG_FILE, PIPELINE_DEFAULTS, write_pipeline_index
        from clevrgen.output import claim_folder, folder_lock
        from clevrgen.record import DATA_FILE

        folder = Path(save_directory)
        source = getattr(self, "run_dir", None)
        same = source is not None and folder.is_dir() and Path(source).resolve() == folder.resolve()
        if not same:
            claim_folder(folder, "model", "save_directory")
        kwargs.setdefault("safe_serialization", True)
        with folder_lock(folder):  # one writer per model folder, as for `clevrgen export`
            super().save_pretrained(save_directory, **kwargs)
            for name in (CONFIG_FILE, DATA_FILE):
                if same:
                    continue
                if source is not None and (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, folder / name)
                else:  # an earlier model's file would describe another model
                    (folder / name).unlink(missing_ok=True)
            write_pipeline_index(folder, {n: getattr(self, n) for n in ("unet", "label_encoder", "scheduler")},
                                 {k: self.config[k] for k in PIPELINE_DEFAULTS})

    # --- the model's geometry ----------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return round(math.sqrt(self.unet.config.out_channels / 3))

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.patch_size

    def denoiser(self) -> LabelConditionedUNet:
        return LabelConditionedUNet(self.unet, self.label_encoder, self.patch_size)

    def encode_scenes(self, scenes: Scenes) -> torch.Tensor:
        """Multi-hot labels [N, 24] of phrase lists; a flat list of phrases is one scene. A bad
        phrase raises clevrgen's PhraseError, with the closest valid phrase."""
        if isinstance(scenes, str) or (len(scenes) and all(isinstance(s, str) for s in scenes)):
            scenes = [[scenes] if isinstance(scenes, str) else list(scenes)]
        self.check_scene_sizes(scenes)
        return multi_hot(scenes)

    def check_scene_sizes(self, scenes: Sequence[Sequence[str]]) -> None:
        """Warn (once) when a scene names more objects than any training image held: allowed,
        but the model has never seen such a scene."""
        most_seen = self.config.max_objects
        if most_seen is None:
            return
        distinct = list(dict.fromkeys(tuple(scene) for scene in scenes))
        big = [scene for scene in distinct if len(scene) > most_seen]
        if not big:
            return
        most = max(len(scene) for scene in big)
        which = "the scene has" if len(distinct) == 1 else f"{len(big)} of {len(distinct)} label sets have up to"
        warn(f"{which} {most} objects, but the model was trained on images of at most {most_seen}: "
             "expect missing or merged objects")

    # --- sampling: the one loop ----------------------------------------------------------------
    def _check_call(self, scenes, steps, guidance, seed, output_type, callback, labels, latents, batch_size):
        """The arguments of :meth:`__call__`, checked with the CLI's ranges before any work: a bad
        one is clevrgen's UsageError, never a torch error, a NaN image or a silent default.
        Returns (steps, guidance, labels [N, 24], the callback wrapped to check what it returns)."""
        from clevrgen.config import MAX_GUIDANCE, MAX_SAMPLE_STEPS, MAX_SEED

        limit = min(MAX_SAMPLE_STEPS, self.scheduler.config.num_train_timesteps)
        steps = _checked_number("num_inference_steps", self.config.num_inference_steps if steps is None else steps,
                                1, limit, integer=True, why="the model's training timesteps")
        guidance = _checked_number("guidance_scale", self.config.guidance_scale if guidance is None else guidance,
                                   0.0, MAX_GUIDANCE)
        _checked_number("batch_size", batch_size, 1, 65_536, integer=True)
        if isinstance(seed, Sequence):
            for s in seed:
                _checked_number("seed", s, 0, 2**63 - 1, integer=True)
        elif seed is not None:
            _checked_number("seed", seed, 0, MAX_SEED, integer=True)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise UsageError(f"output_type {output_type!r}: choose pil, np, pt or latent")
        if callback is not None and not callable(callback):
            raise UsageError(f"callback_on_step_end {callback!r} is not callable")
        if labels is None:
            if scenes is None:
                raise UsageError("give the scenes to draw (phrase lists) or labels")
            labels = self.encode_scenes(scenes)
        if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.shape[1] != NUM_CLASSES:
            shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise UsageError(f"labels {shape}: give multi-hot labels [N, {NUM_CLASSES}] (clevrgen.labels.multi_hot)")
        if len(labels) == 0:
            raise UsageError("nothing to draw: give at least one scene")
        if labels.is_floating_point() and not bool(((labels >= 0) & (labels <= 1)).all()):
            raise UsageError("labels must be multi-hot: every entry 0 or 1 (none NaN)")
        if latents is not None:
            shape = (len(labels), 3, self.image_size, self.image_size)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                given = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise UsageError(f"latents {given}: this model draws from noise {list(shape)}, one per label set")
            if not bool(torch.isfinite(latents).all()):
                raise UsageError("latents hold NaN or infinite values: give finite noise")
        if callback is not None:
            callback = _checked_callback(callback)
        return steps, guidance, labels, callback

    @torch.no_grad()
    def __call__(
        self,
        scenes: Scenes | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        labels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        batch_size: int = 64,
        image: "torch.Tensor | Sequence | None" = None,
        image_guidance_scale: float | None = None,
    ):
        """Draw one image per scene; an editor (``model.source_image``) given ``image`` draws
        each source image with its scene's objects (the source's and the added ones).

        Args:
            scenes: phrase lists such as ``[["red sphere", "cyan cube"], ["gray cube"]]``; a flat
                list of phrases is one scene. Or pass ``labels``, multi-hot [N, 24].
            num_inference_steps, guidance_scale: default to the model's chosen settings.
                Guidance is classifier-free: 1 conditional, 0 unconditional, above 1 away from the
                empty label.
            generator: one generator (the images' noise drawn from it in turn, so an image
                depends on its place in the call) or a list, one per image (an image depends
                on its own generator alone).
            seed: clevrgen's convention: image i from ``seed + i`` (or ``seed[i]`` for a list);
                the same image in any batch, on any device. Give ``seed`` or ``generator``.
            output_type: "pil" (a list of PIL images), "np" (float [N, 64, 64, 3] in [0, 1]),
                "pt" (float [N, 3, 64, 64] in [0, 1]), or "latent" (the sampler's output in [-1, 1]).
            callback_on_step_end: ``f(pipe, step_index, timestep, {"latents": x})`` after every
                step, returning that dict (a changed ``latents`` replaces the state).
            latents: the initial noise [N, 3, 64, 64] instead of drawing it.
            batch_size: images per UNet batch (twice that with guidance; three times with ``image``).
            image: an editor's source scenes, one per scene (or one for all): PIL images, or a
                tensor [N, 3, 64, 64] in [0, 1] as ``output_type="pt"`` returns (uint8: 0-255).
            image_guidance_scale: how strongly the edit keeps its source (InstructPix2Pix's
                scale: the prediction is uncond + s_image (source - uncond) + s (full - source)).
        """
        steps, guidance, labels, callback_on_step_end = self._check_call(
            scenes, num_inference_steps, guidance_scale, seed, output_type, callback_on_step_end, labels, latents,
            batch_size)
        n, device = len(labels), self._execution_device
        source, image_guidance = self._check_image(image, image_guidance_scale, n)
        noise_gens, step_gens = self._generators(n, generator, seed)
        self._check_memory(n, output_type)
        size = (3, self.image_size, self.image_size)
        # The noise is drawn where the generator lives (diffusers' convention), the CPU for seed=;
        # one generator per image (seed=, a list) draws batch by batch, the same noise in less memory.
        per_image = isinstance(noise_gens, list)
        if latents is None and not per_image:
            latents = randn_tensor((n, *size), generator=noise_gens, device=noise_device(noise_gens), dtype=torch.float32)
        out = []
        with self.progress_bar(total=math.ceil(n / batch_size) * steps) as bar:
            for start in range(0, n, batch_size):
                batch = slice(start, start + batch_size)
                gens = step_gens[batch] if isinstance(step_gens, list) else step_gens
                noise = latents[batch] if latents is not None else randn_tensor(
                    (len(labels[batch]), *size), generator=noise_gens[batch], device=noise_device(noise_gens),
                    dtype=torch.float32)
                edit = None if source is None else (source[batch].to(device), image_guidance)
                out.append(self._denoise(labels[batch], noise.to(device), steps, guidance, gens,
                                         callback_on_step_end, start, bar, edit))
        x = torch.cat(out).clamp(-1.0, 1.0)
        images = self._postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _check_memory(self, n: int, output_type: str) -> None:
        """Refuse, before any work, a call whose images cannot all be held at once (they are
        returned together: the images, their concatenation and the output's own copy)."""
        from clevrgen.runtime import available_memory

        per_image = 3 * self.image_size**2 * 4 * (2 if output_type in ("latent", "pt") else 3)
        free = available_memory()
        if free is not None and n * per_image > free:
            raise UsageError(f"{n} images need about {n * per_image / 2**30:.1f} GiB at once, and this machine has "
                             f"{free / 2**30:.1f} GiB free: draw them in parts (`clevrgen sample -n` writes its "
                             "images to disk as it goes)")

    def _generators(self, n: int, generator, seed):
        """The noise generators and the step-noise generators (stochastic samplers) of a call."""
        if seed is not None and generator is not None:
            raise UsageError("give seed or generator, not both")
        if seed is not None:
            seeds = [int(s) for s in seed] if isinstance(seed, Sequence) else [int(seed) + i for i in range(n)]
            if len(seeds) != n:
                raise UsageError(f"{len(seeds)} seeds for {n} images")
            # Each image's step noise comes from a second generator of its seed, as clevrgen always did.
            return ([torch.Generator().manual_seed(s) for s in seeds], [torch.Generator().manual_seed(s) for s in seeds])
        if isinstance(generator, list) and len(generator) != n:
            raise UsageError(f"{len(generator)} generators for {n} images: give one, or one per image")
        return generator, generator

    def _check_image(self, image, image_guidance_scale, n: int) -> tuple[torch.Tensor | None, float]:
        """An editor's source images as float [N, 3, S, S] in [-1, 1] on the CPU (None: none given)
        and the image guidance scale; an image given to a generator, or of another size, is a
        UsageError."""
        from clevrgen.config import MAX_GUIDANCE

        scale = _checked_number("image_guidance_scale", self.config.image_guidance_scale
                                if image_guidance_scale is None else image_guidance_scale, 0.0, MAX_GUIDANCE)
        if image is None:
            return None, scale
        if not self.is_editor:
            raise UsageError("this model is a generator: it draws scenes from noise and takes no image "
                             "(give an editor, e.g. the shipped editor, to edit a scene)")
        source = _image_tensor(image)
        size = self.image_size
        if source.shape[1:] != (3, size, size):
            raise UsageError(f"image {list(source.shape)}: this editor takes [N, 3, {size}, {size}] images")
        if len(source) == 1 and n > 1:
            source = source.expand(n, -1, -1, -1)
        if len(source) != n:
            raise UsageError(f"{len(source)} source images for {n} scenes: give one, or one per scene")
        return source * 2 - 1, scale

    @property
    def is_editor(self) -> bool:
        return self.unet.config.in_channels == 2 * self.unet.config.out_channels

    def _denoise(self, labels, x, steps, guidance, generators, callback, offset, bar, edit=None) -> torch.Tensor:
        if edit is not None:
            return self._denoise_edit(labels, x, steps, guidance, generators, callback, offset, bar, *edit)
        scheduler, model = self.scheduler, self.denoiser()
        device = x.device
        amp = autocast_dtype(self.config.precision, device) if self.unet.dtype == torch.float32 else None
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        # The labels are encoded once for the whole loop, with as many object tokens as the batch's
        # largest scene: counted here, before the labels move to the device (no sync on a GPU).
        objects = 0 if guidance == 0.0 else int(labels.sum(dim=1).max())
        labels = labels.to(device)
        empty = torch.zeros_like(labels)
        copies = 1 if guidance in (0.0, 1.0) else 2  # guidance draws both halves in one batch
        drawn = labels if guidance == 1.0 else empty if guidance == 0.0 else torch.cat([labels, empty])
        with autocast(device, amp):
            conditioning = model.label_encoder(drawn, objects)
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([scheduler.scale_model_input(x, t)] * copies).to(self.unet.dtype)
            with autocast(device, amp):
                out = model.denoise(model_input, t, conditioning)
                if copies == 2:
                    cond, uncond = out.chunk(2)
                    out = uncond + guidance * (cond - uncond)
            x = scheduler.step(out.float(), t, x, generator=generators).prev_sample
            if callback is not None:
                result = callback(self, i, t, {"latents": x, "batch_start": offset})
                x = result.get("latents", x) if result else x
            bar.update()
        return x

    def _denoise_edit(self, labels, x, steps, guidance, generators, callback, offset, bar, source,
                      image_guidance) -> torch.Tensor:
        """An editor's loop: three predictions a step in one batch (labels and source; source
        alone; neither), combined as in InstructPix2Pix."""
        scheduler, model = self.scheduler, self.denoiser()
        device = x.device
        amp = autocast_dtype(self.config.precision, device) if self.unet.dtype == torch.float32 else None
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        objects = int(labels.sum(dim=1).max())
        labels = labels.to(device)
        empty = torch.zeros_like(labels)
        with autocast(device, amp):
            conditioning = model.label_encoder(torch.cat([labels, empty, empty]), objects)
        sources = torch.cat([source, source, torch.zeros_like(source)]).to(self.unet.dtype)
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([scheduler.scale_model_input(x, t)] * 3).to(self.unet.dtype)
            with autocast(device, amp):
                full, kept, uncond = model.denoise(model_input, t, conditioning, sources).chunk(3)
                out = uncond + image_guidance * (kept - uncond) + guidance * (full - kept)
            x = scheduler.step(out.float(), t, x, generator=generators).prev_sample
            if callback is not None:
                result = callback(self, i, t, {"latents": x, "batch_start": offset})
                x = result.get("latents", x) if result else x
            bar.update()
        return x

    def _postprocess(self, x: torch.Tensor, output_type: str):
        from clevrgen.data.iclevr import IMAGE_SIZE, resize_images

        if output_type == "latent":
            return x
        if self.image_size != IMAGE_SIZE:  # a model trained below 64x64 is enlarged
            x = resize_images(x, IMAGE_SIZE)
        images = (x.float().cpu() + 1) / 2
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)


def _image_tensor(image) -> torch.Tensor:
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


def noise_device(generator: torch.Generator | list[torch.Generator] | None) -> torch.device:
    """Where a call's starting noise is drawn: on its generator's device (a CUDA generator draws
    on the GPU, as in diffusers' pipelines), else on the CPU, so ``seed=`` and CPU generators
    give the same images on every device."""
    first = generator[0] if isinstance(generator, list) and generator else generator
    return torch.device(getattr(first, "device", None) or "cpu")


def _checked_number(name: str, value, low, high, integer: bool = False, why: str = ""):
    """``value`` as an int (``integer``) or a finite float in [low, high], else one UsageError
    naming the argument; a boolean is not a number."""
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UsageError(f"{name} {value!r}: give {'an integer' if integer else 'a number'} from {low} to {high}")
    if not (integer or math.isfinite(value)) or not low <= value <= high:
        raise UsageError(f"{name} {value!r}: must be from {low} to {high}" + (f", {why}" if why else ""))
    return int(value) if integer else float(value)


def _checked_callback(callback: StepEndCallback) -> StepEndCallback:
    """``callback``, refusing a return that is not the dict of tensors it was given (or None)."""
    def checked(pipe, i, t, kwargs):
        result = callback(pipe, i, t, kwargs)
        if result is not None and not (isinstance(result, dict) and isinstance(result.get("latents", kwargs["latents"]),
                                                                               torch.Tensor)):
            raise UsageError(f"callback_on_step_end returned {type(result).__name__}: it must return the dict it was "
                             "given (its 'latents' a tensor), or None")
        return result

    return checked


# --- the functional form, for code that holds a denoiser rather than a pipeline -----------------
def sample(model: torch.nn.Module, scheduler, labels: torch.Tensor, seeds: Sequence[int], steps: int,
           guidance: float = 1.0, image_size: int = 64, autocast_dtype: torch.dtype | None = None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W], for multi-hot ``labels`` [B, 24], image i from ``seeds[i]``:
    :class:`ClevrgenPipeline` around ``model``. ``callback(step, steps, x)`` sees the initial
    noise (step 0) and the image after every step. (``image_size`` is the model's own.)"""
    return draw_seeded(pipeline_of(model, scheduler, autocast_dtype), labels, seeds, steps, guidance, callback)


def draw_seeded(pipe: ClevrgenPipeline, labels: torch.Tensor, seeds: Sequence[int], steps: int, guidance: float,
                callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """:func:`sample` with a pipeline in hand."""
    scheduler = pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = randn_tensor((len(seeds), 3, pipe.image_size, pipe.image_size), generator=gens, device=torch.device("cpu"))
    if callback is not None:
        callback(0, steps, noise.to(labels.device) * _init_sigma(scheduler, steps))
    step_end = (lambda p, i, t, kw: (callback(i + 1, steps, kw["latents"]), kw)[1]) if callback else None
    return pipe(labels=labels, seed=list(seeds), latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", callback_on_step_end=step_end, batch_size=max(1, len(seeds))).images


def _init_sigma(scheduler, steps: int) -> float:
    scheduler.set_timesteps(steps)
    return float(scheduler.init_noise_sigma)


def pipeline_of(model: torch.nn.Module, scheduler, amp_dtype: torch.dtype | None = None) -> ClevrgenPipeline:
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    return ClevrgenPipeline.from_denoiser(model, scheduler, precision=precision)


class SamplingStopped(Exception):
    """Raised from the step callback when ``should_stop()`` turns true: a deferred stop (training's
    Ctrl-C) ends a sampling pass within a step instead of at its end."""


def generate(model: torch.nn.Module, scheduler, labels: torch.Tensor, seeds: Sequence[int], steps: int,
             guidance: float = 1.0, batch_size: int = 64, image_size: int = 64, amp_dtype: torch.dtype | None = None,
             progress: bool = True, description: str = "sampling",
             should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """uint8 64x64 images on the CPU, in batches, with a rich progress bar."""
    pipe = pipeline_of(model, scheduler, amp_dtype)
    return draw_uint8(pipe, labels, seeds, steps, guidance, batch_size, progress, description, should_stop)


def draw_uint8(pipe: ClevrgenPipeline, labels: torch.Tensor, seeds: Sequence[int], steps: int, guidance: float,
               batch_size: int, progress: bool = True, description: str = "sampling",
               should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """What the commands save: uint8 [N, 3, 64, 64] images, with a rich progress bar. When
    ``should_stop()`` turns true the pass ends after the step in hand (:class:`SamplingStopped`)."""
    from clevrgen.data.iclevr import IMAGE_SIZE, resize_images, to_uint8
    from clevrgen.progress import make_progress

    pipe.set_progress_bar_config(disable=True)
    with make_progress(enabled=progress) as bar:
        task = bar.add_task(description, total=len(seeds) * steps)

        def advance(p, i, t, kw):
            bar.advance(task, kw["latents"].shape[0])
            if should_stop is not None and should_stop():
                raise SamplingStopped
            return kw

        x = pipe(labels=labels, seed=list(seeds), num_inference_steps=steps, guidance_scale=guidance,
                 output_type="latent", callback_on_step_end=advance, batch_size=batch_size).images
    return resize_images(to_uint8(x).cpu(), IMAGE_SIZE)


def check_sample_steps(config: Config) -> None:
    """A sampler takes at most the model's training timesteps: say so before any work."""
    steps, limit = config.sample.steps, config.diffusion.num_train_timesteps
    if steps > limit:
        raise UsageError(f"--steps / sample.steps {steps} is more than the model's {limit} training timesteps: "
                         f"give at most {limit}")


@dataclass
class LoadedRun:
    """What the commands sample with: a run's pipeline, the config it samples by, and its folder."""

    pipe: ClevrgenPipeline
    config: Config
    run_dir: Path
    device: torch.device = field(default=torch.device("cpu"))

    @classmethod
    def load(cls, run: Path | None = None, config: Config | None = None) -> "LoadedRun":
        from clevrgen.model import warn_if_upsampled
        from clevrgen.runtime import resolve_device

        if config is not None:  # a missing GPU is reported before the weights are read
            resolve_device(config.sample.device)
        pipe, config = ClevrgenPipeline.from_run(run, config)
        check_sample_steps(config)
        warn_if_upsampled(config.model)
        device = resolve_device(config.sample.device)
        return cls(pipe.to(device), config, pipe.run_dir, device)

    def labels(self, scenes: Sequence[Sequence[str]]) -> torch.Tensor:
        return multi_hot(scenes).to(self.device)

    def generate(self, scenes: Sequence[Sequence[str]], seeds: Sequence[int], progress: bool = True,
                 description: str = "sampling") -> torch.Tensor:
        """uint8 images [N, 3, 64, 64], image i of ``scenes[i]`` drawn from ``seeds[i]``."""
        s = self.config.sample
        self.pipe.check_scene_sizes(scenes)
        return draw_uint8(self.pipe, self.labels(scenes), seeds, s.steps, s.guidance, s.batch_size, progress,
                          description)

    def trajectory(self, scenes: Sequence[Sequence[str]], seeds: Sequence[int], frames: int) -> torch.Tensor:
        """uint8 [N, frames, 3, H, W]: each image at evenly spaced steps from noise to the end,
        taken by the pipeline's step callback."""
        from clevrgen.data.iclevr import IMAGE_SIZE, resize_images, to_uint8

        s = self.config.sample
        self.pipe.check_scene_sizes(scenes)
        wanted = {round(k * s.steps / (frames - 1)) for k in range(frames)} if frames > 1 else {s.steps}
        taken: list[torch.Tensor] = []

        def keep(step: int, total: int, x: torch.Tensor) -> None:
            if step in wanted:
                taken.append(resize_images(to_uint8(x.clamp(-1, 1)).cpu(), IMAGE_SIZE))

        rows = []
        labels, seeds = self.labels(scenes), list(seeds)
        for start in range(0, len(seeds), s.batch_size):  # in batches: a stop acts within a batch's step
            taken.clear()
            batch = slice(start, start + s.batch_size)
            draw_seeded(self.pipe, labels[batch], seeds[batch], s.steps, s.guidance, callback=keep)
            rows.append(torch.stack(taken, dim=1))
        return torch.cat(rows)
