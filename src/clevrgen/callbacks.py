"""Step callbacks: what a caller watches while ``ClevrgenPipeline`` draws, each written once.

A callback is diffusers' ``callback_on_step_end``: ``f(pipe, step_index, timestep, kwargs)``
after every step of every batch, where ``kwargs`` is ``{"latents": x, "batch_start": i}`` (the
batch's images and the index of its first image in the call); it returns ``kwargs``. Several
combine with diffusers' ``MultiPipelineCallbacks([a, b])``.

- :class:`StepProgress` counts image-steps into a rich progress bar (or a function) and ends the
  call after the step in hand when asked to stop (:class:`SamplingStopped`);
- :class:`DenoisingStrip` keeps the first images at evenly spaced steps, noise first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SamplingStopped(Exception):
    """Raised from a step callback when ``should_stop()`` turns true: a deferred stop (training's
    Ctrl-C) ends a sampling pass within a step instead of at its end."""


class StepProgress:
    """Counts image-steps (a step of a batch of n images is n of ``total``) into a rich progress
    bar (unless not ``enabled``) and ``on_step(done, total)``; when ``should_stop()`` turns true the
    call ends after the step in hand (:class:`SamplingStopped`). The bar shows while it is open:

        with StepProgress(len(seeds) * steps, "sampling") as progress:
            pipe(..., callback_on_step_end=progress)
    """

    def __init__(self, total: int, description: str = "sampling", enabled: bool = True,
                 on_step: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None):
        from clevrgen.progress import make_progress

        self.total, self.done, self.on_step, self.should_stop = total, 0, on_step, should_stop
        self.bar = make_progress(enabled=enabled)
        self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> "StepProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        self.done += len(kwargs["latents"])
        self.bar.advance(self.task, len(kwargs["latents"]))
        if self.on_step is not None:
            self.on_step(self.done, self.total)
        if self.should_stop is not None and self.should_stop():
            raise SamplingStopped
        return kwargs


class DenoisingStrip:
    """Keeps the first ``len(noise)`` images of a call at ``frames`` evenly spaced steps of
    ``steps``: the starting ``noise`` (as ``pipe.prepare_latents`` draws it) first, the final image
    last. :meth:`images` gives them as uint8 [images, frames, 3, 64, 64]."""

    def __init__(self, steps: int, frames: int, noise: torch.Tensor):
        self.wanted = {round(k * steps / (frames - 1)) for k in range(frames)} if frames > 1 else {steps}
        self.noise = noise
        self.taken: dict[int, list[torch.Tensor]] = {}  # step -> the kept images of each batch, in order

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        x, start = kwargs["latents"], kwargs["batch_start"]
        kept = max(0, min(len(x), len(self.noise) - start))  # batches run in order: the first images first
        if kept and i == 0 and 0 in self.wanted:  # the noise this batch started from, as the loop scaled it
            self._keep(0, self.noise[start:start + kept] * pipe.scheduler.init_noise_sigma)
        if kept and i + 1 in self.wanted:
            self._keep(i + 1, x[:kept])
        return kwargs

    def _keep(self, step: int, x: torch.Tensor) -> None:
        from clevrgen.data.iclevr import to_uint8

        self.taken.setdefault(step, []).append(to_uint8(x.clamp(-1, 1)).cpu())

    def images(self) -> torch.Tensor:
        from clevrgen.data.iclevr import IMAGE_SIZE, resize_images

        frames = [resize_images(torch.cat(self.taken[step]), IMAGE_SIZE) for step in sorted(self.taken)]
        return torch.stack(frames, dim=1)
