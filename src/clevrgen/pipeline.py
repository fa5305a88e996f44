"""``ClevrgenPipeline``: a trained model as a diffusers pipeline, and the one sampling loop.

    from clevrgen import ClevrgenPipeline
    pipe = ClevrgenPipeline.from_pretrained()          # the shipped model; or a run folder / export
    images = pipe([["red sphere", "cyan cube"]], generator=torch.Generator().manual_seed(0)).images

Every image clevrgen draws comes from its ``__call__``: the commands' through
:class:`clevrgen.loaded.LoadedModel`, training's sample grids and accuracy checks around the EMA
weights (:meth:`ClevrgenPipeline.from_denoiser`). What a caller watches while it draws (a progress
bar, a stop, the denoising strip) are step callbacks (:mod:`clevrgen.callbacks`); the arguments are
checked by :mod:`clevrgen.pipeline_inputs`. A pipeline folder is a clevrgen run folder's artifact
(:mod:`clevrgen.artifact`): ``model_index.json``, one folder per component (``unet``,
``label_encoder``, ``scheduler``), plus ``config.toml`` and ``training_data.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from clevrgen.artifact import CONFIG_FILE, load_artifact, read_pipeline_index, resolve_checkpoint
from clevrgen.config import Config
from clevrgen.diffusion import sampling_scheduler
from clevrgen.errors import warn
from clevrgen.labels import multi_hot
from clevrgen.model import LabelConditionedUNet, LabelEncoder
from clevrgen.pipeline_inputs import (
    Scenes, StepEndCallback, check_call, check_image, check_memory, checked_dtype, generators_of, noise_device,
)
from clevrgen.record import training_data_of
from clevrgen.runtime import autocast, autocast_dtype


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
        """A pipeline around a denoiser that :mod:`clevrgen.model` built or :mod:`clevrgen.artifact`
        loaded (no copy): what code holding a denoiser, such as training, draws with."""
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
        torch_dtype = checked_dtype(kwargs.pop("torch_dtype", None))
        path = pretrained_model_name_or_path
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if path is None or (Path(path) / CONFIG_FILE).is_file() or str(path) in ("shipped", "latest"):
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
        from clevrgen.artifact import PIPELINE_DEFAULTS, copy_run_record, write_pipeline_index
        from clevrgen.claims import claim_folder
        from clevrgen.locks import folder_lock
        from clevrgen.output import share_files

        folder = Path(save_directory)
        source = getattr(self, "run_dir", None)
        same = source is not None and folder.is_dir() and Path(source).resolve() == folder.resolve()
        # its own model folder may be saved over (a training run never: its weights are fp32), a folder inside it not
        claim_folder(folder, "model", "save_directory", source=None if same else source)
        kwargs.setdefault("safe_serialization", True)
        with folder_lock(folder):  # one writer per model folder, as for `clevrgen export`
            super().save_pretrained(save_directory, **kwargs)
            share_files(folder)
            if not same:
                copy_run_record(source, folder)
            write_pipeline_index(folder, {n: getattr(self, n) for n in ("unet", "label_encoder", "scheduler")},
                                 {k: self.config[k] for k in PIPELINE_DEFAULTS})

    # --- the model's geometry ----------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return round(math.sqrt(self.unet.config.out_channels / 3))

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.patch_size

    @property
    def is_editor(self) -> bool:
        return self.unet.config.in_channels == 2 * self.unet.config.out_channels

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

    # --- sampling: the one loop ---------------------------------------------------------------
    def prepare_latents(self, batch_size: int, generator=None, seed: int | Sequence[int] | None = None) -> torch.Tensor:
        """The starting noise of ``batch_size`` images, float32 [N, 3, S, S], as :meth:`__call__`
        draws it (and as its ``latents`` takes it; the loop scales it by the scheduler's
        ``init_noise_sigma``): from ``generator`` on the generator's device, or from ``seed``
        (image i from ``seed + i``, or ``seed[i]``) on the CPU."""
        if seed is not None:
            generator, _ = generators_of(batch_size, generator, seed)
        return randn_tensor((batch_size, 3, self.image_size, self.image_size), generator=generator,
                            device=noise_device(generator), dtype=torch.float32)

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
                "pt" (float [N, 3, 64, 64] in [0, 1]), "uint8" ([N, 3, 64, 64], 0-255, as the commands
                save them) or "latent" (the sampler's output in [-1, 1]).
            callback_on_step_end: ``f(pipe, step_index, timestep, {"latents": x, "batch_start": i})``
                after every step of every batch, returning that dict (a changed ``latents``
                replaces the state); :mod:`clevrgen.callbacks` has a progress bar and the strip.
            latents: the initial noise [N, 3, 64, 64] instead of drawing it (:meth:`prepare_latents`).
            batch_size: images per UNet batch (twice that with guidance; three times with ``image``).
            image: an editor's source scenes, one per scene (or one for all): PIL images, or a
                tensor [N, 3, 64, 64] in [0, 1] as ``output_type="pt"`` returns (uint8: 0-255).
            image_guidance_scale: how strongly the edit keeps its source (InstructPix2Pix's
                scale: the prediction is uncond + s_image (source - uncond) + s (full - source)).
        """
        steps, guidance, labels, callback_on_step_end = check_call(
            self, scenes, num_inference_steps, guidance_scale, seed, output_type, callback_on_step_end, labels, latents,
            batch_size)
        n, device = len(labels), self._execution_device
        source, image_guidance = check_image(self, image, image_guidance_scale, n)
        noise_gens, step_gens = generators_of(n, generator, seed)
        check_memory(self, n, output_type)
        # One generator draws every image's noise in turn, here; one generator per image (seed=, a
        # list) draws batch by batch: the same noise in less memory.
        if latents is None and not isinstance(noise_gens, list):
            latents = self.prepare_latents(n, noise_gens)
        out = []
        with self.progress_bar(total=math.ceil(n / batch_size) * steps) as bar:
            for start in range(0, n, batch_size):
                batch = slice(start, start + batch_size)
                gens = step_gens[batch] if isinstance(step_gens, list) else step_gens
                noise = latents[batch] if latents is not None else self.prepare_latents(len(labels[batch]),
                                                                                         noise_gens[batch])
                edit = None if source is None else source[batch].to(device)
                out.append(self._denoise(labels[batch], noise.to(device), steps, guidance, gens, callback_on_step_end,
                                         start, bar, edit, image_guidance))
        x = torch.cat(out).clamp(-1.0, 1.0)
        images = output_images(x, output_type, self.image_size)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _denoise(self, labels, x, steps, guidance, generators, callback, offset, bar, source=None,
                 image_guidance=1.0) -> torch.Tensor:
        """One batch from noise to image: every step predicts under each of the guidance's
        conditions in one UNet batch and combines the predictions (:func:`guidance_of`)."""
        scheduler, model, dtype, device = self.scheduler, self.denoiser(), self.unet.dtype, x.device
        amp = autocast_dtype(self.config.precision, device) if dtype == torch.float32 else None
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        conditions, combine = guidance_of(guidance, image_guidance, editing=source is not None)
        # The labels are encoded once for the whole loop, with as many object tokens as the batch's
        # largest scene: counted here, before the labels move to the device (no sync on a GPU).
        objects = int(labels.sum(dim=1).max()) if any(named for named, _ in conditions) else 0
        labels = labels.to(device)
        empty = torch.zeros_like(labels)
        with autocast(device, amp):
            conditioning = model.label_encoder(torch.cat([labels if named else empty for named, _ in conditions]),
                                               objects)
        if source is not None:
            source = torch.cat([source if kept else torch.zeros_like(source) for _, kept in conditions]).to(dtype)
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([scheduler.scale_model_input(x, t)] * len(conditions)).to(dtype)
            with autocast(device, amp):
                out = combine(*model.denoise(model_input, t, conditioning, source).chunk(len(conditions)))
            x = scheduler.step(out.float(), t, x, generator=generators).prev_sample
            if callback is not None:
                result = callback(self, i, t, {"latents": x, "batch_start": offset})
                x = result.get("latents", x) if result else x
            bar.update()
        return x


def guidance_of(guidance: float, image_guidance: float, editing: bool):
    """The conditions a step predicts under, as (with the labels, with the source image) pairs,
    and how their predictions combine. A generator: classifier-free guidance, one prediction
    where the scale is 1 (conditional) or 0 (unconditional); an edit: InstructPix2Pix's three
    (labels and source, source alone, neither)."""
    if editing:
        return [(True, True), (False, True), (False, False)], (
            lambda full, kept, uncond: uncond + image_guidance * (kept - uncond) + guidance * (full - kept))
    if guidance in (0.0, 1.0):
        return [(guidance == 1.0, False)], lambda out: out
    return [(True, False), (False, False)], lambda cond, uncond: uncond + guidance * (cond - uncond)


def output_images(x: torch.Tensor, output_type: str, image_size: int):
    """The sampler's output in [-1, 1] as ``output_type`` asks (see ``ClevrgenPipeline.__call__``)."""
    from clevrgen.data.iclevr import IMAGE_SIZE, resize_images, to_uint8

    if output_type == "latent":
        return x
    if output_type == "uint8":  # what the commands save
        return resize_images(to_uint8(x).cpu(), IMAGE_SIZE)
    if image_size != IMAGE_SIZE:  # a model trained below 64x64 is enlarged
        x = resize_images(x, IMAGE_SIZE)
    images = (x.float().cpu() + 1) / 2
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else DiffusionPipeline.numpy_to_pil(array)
