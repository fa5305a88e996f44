"""The trained model, ready to draw scenes: one factory for sample, evaluate and denoise-strip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clevrgen.config import Config
from clevrgen.diffusion import StepCallback, generate, sample, sampling_scheduler
from clevrgen.errors import warn
from clevrgen.labels import multi_hot
from clevrgen.model import LabelConditionedUNet, load_artifact, resolve_checkpoint, training_data_of, warn_if_upsampled
from clevrgen.runtime import autocast_dtype, resolve_device


@dataclass
class ScenePipeline:
    """A denoiser, the config it was trained with, and the device it runs on."""

    model: LabelConditionedUNet
    config: Config
    device: torch.device
    run_dir: Path
    amp_dtype: torch.dtype | None = field(default=None)
    max_objects: int | None = field(default=None)
    """The most objects in one training image (None: not recorded)."""

    @classmethod
    def from_run(cls, run: Path | None = None, config: Config | None = None) -> "ScenePipeline":
        """Load a run folder (default: the shipped model); ``config`` may override the
        sampling settings of the one saved with it."""
        run_dir = resolve_checkpoint(run)
        if config is not None:  # a missing GPU is reported before the weights are read
            resolve_device(config.sample.device)
        saved_model, saved = load_artifact(run_dir, "cpu")
        warn_if_upsampled(saved.model)
        config = config or saved
        device = resolve_device(config.sample.device)
        return cls(saved_model.to(device), config.model_copy(update={"model": saved.model, "diffusion": saved.diffusion}),
                   device, run_dir, autocast_dtype(config.train.precision, device),
                   training_data_of(run_dir).get("max_objects"))

    def labels(self, scenes: Sequence[Sequence[str]]) -> torch.Tensor:
        return multi_hot(scenes).to(self.device)

    def check_scene_sizes(self, scenes: Sequence[Sequence[str]]) -> None:
        """Warn (once) when a scene names more objects than any training image held: allowed,
        but the model has never seen such a scene."""
        if self.max_objects is None:
            return
        distinct = list(dict.fromkeys(tuple(scene) for scene in scenes))
        big = [scene for scene in distinct if len(scene) > self.max_objects]
        if not big:
            return
        most = max(len(scene) for scene in big)
        which = "the scene has" if len(distinct) == 1 else f"{len(big)} of {len(distinct)} label sets have up to"
        warn(f"{which} {most} objects, but the model was trained on images of at most {self.max_objects}: "
             "expect missing or merged objects")

    def scheduler(self):
        return sampling_scheduler(self.config.diffusion, self.config.sample.sampler)

    def generate(self, scenes: Sequence[Sequence[str]], seeds: Sequence[int], progress: bool = True,
                 description: str = "sampling") -> torch.Tensor:
        """uint8 images [N, 3, 64, 64], image i of ``scenes[i]`` drawn from ``seeds[i]``."""
        s = self.config.sample
        self.check_scene_sizes(scenes)
        return generate(self.model, self.scheduler(), self.labels(scenes), list(seeds), s.steps, s.guidance,
                        s.batch_size, self.config.model.image_size, self.amp_dtype, progress, description)

    def trajectory(self, scenes: Sequence[Sequence[str]], seeds: Sequence[int], frames: int) -> torch.Tensor:
        """uint8 [N, frames, 3, H, W]: each image at evenly spaced steps from noise to the end,
        taken by the sampler's step callback."""
        from clevrgen.data.iclevr import IMAGE_SIZE, resize_images, to_uint8

        s = self.config.sample
        self.check_scene_sizes(scenes)
        wanted = {round(k * s.steps / (frames - 1)) for k in range(frames)} if frames > 1 else {s.steps}
        taken: list[torch.Tensor] = []

        def keep(step: int, total: int, x: torch.Tensor) -> None:
            if step in wanted:
                taken.append(resize_images(to_uint8(x.clamp(-1, 1)).cpu(), IMAGE_SIZE))

        callback: StepCallback = keep
        sample(self.model, self.scheduler(), self.labels(scenes), list(seeds), s.steps, s.guidance,
               self.config.model.image_size, self.amp_dtype, callback=callback)
        return torch.stack(taken, dim=1)
