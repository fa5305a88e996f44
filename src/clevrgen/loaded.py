"""``LoadedModel``: a trained model as the commands hold it (not a pipeline: it has one), with
the config it samples by and the run folder it came from.

``sample``, ``evaluate``, ``denoise-strip`` and ``demo`` load one (``commands._options.load_model``)
and draw through its pipeline, with the step callbacks of :mod:`clevrgen.callbacks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clevrgen.callbacks import DenoisingStrip, StepProgress
from clevrgen.config import Config
from clevrgen.pipeline import ClevrgenPipeline
from clevrgen.pipeline_inputs import check_sample_steps


@dataclass
class LoadedModel:
    """A run's pipeline, the config it samples by (``config.sample``: the run's settings with a
    command's options) and its folder; ``device``: where it draws."""

    pipe: ClevrgenPipeline
    config: Config
    run_dir: Path
    device: torch.device = field(default=torch.device("cpu"))

    @classmethod
    def load(cls, run: Path | None = None, config: Config | None = None) -> "LoadedModel":
        """The model of a run folder or export (None: the shipped model); ``config`` may change
        its sampling settings."""
        from clevrgen.model import warn_if_upsampled
        from clevrgen.runtime import resolve_device

        if config is not None:  # a missing GPU is reported before the weights are read
            resolve_device(config.sample.device)
        pipe, config = ClevrgenPipeline.from_run(run, config)
        check_sample_steps(config)
        warn_if_upsampled(config.model)
        device = resolve_device(config.sample.device)
        pipe.set_progress_bar_config(disable=True)  # the commands show their own (StepProgress)
        return cls(pipe.to(device), config, pipe.run_dir, device)

    def generate(self, scenes: Sequence[Sequence[str]], seeds: Sequence[int], progress: bool = True,
                 description: str = "sampling") -> torch.Tensor:
        """uint8 images [N, 3, 64, 64], image i of ``scenes[i]`` drawn from ``seeds[i]``, with a
        rich progress bar."""
        s = self.config.sample
        with StepProgress(len(seeds) * s.steps, description, enabled=progress) as bar:
            return self._draw(scenes, seeds, "uint8", bar)

    def trajectory(self, scenes: Sequence[Sequence[str]], seeds: Sequence[int], frames: int) -> torch.Tensor:
        """uint8 [N, frames, 3, 64, 64]: each image at evenly spaced steps from noise to the end,
        kept by the pipeline's step callback."""
        noise = self.pipe.prepare_latents(len(seeds), seed=list(seeds))
        strip = DenoisingStrip(self.config.sample.steps, frames, noise)
        self._draw(scenes, seeds, "latent", strip, latents=noise)
        return strip.images()

    def _draw(self, scenes, seeds, output_type, callback, latents=None):
        s = self.config.sample
        return self.pipe(scenes, seed=list(seeds), latents=latents,
                         num_inference_steps=s.steps, guidance_scale=s.guidance, output_type=output_type,
                         callback_on_step_end=callback, batch_size=s.batch_size).images
