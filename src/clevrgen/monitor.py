"""What a run measures while it trains: the held-out loss, the shipped judge's accuracy on
sampled label sets, and sample grids. Each is a function of the EMA model and the config; a stop
signal (``should_stop``) ends any of them within a step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from clevrgen.callbacks import SamplingStopped, StepProgress
from clevrgen.config import Config, DiffusionConfig
from clevrgen.data.iclevr import ImageSet, resize_images, to_float
from clevrgen.diffusion import sampling_scheduler
from clevrgen.errors import ClevrgenError
from clevrgen.loss import diffusion_loss
from clevrgen.output import atomic_path
from clevrgen.pipeline import ClevrgenPipeline

StopCheck = Callable[[], bool] | None


def held_out_objective(cfg: DiffusionConfig) -> DiffusionConfig:
    """The held-out loss is always uniform timesteps with Min-SNR weighting (the run's gamma)
    and no noise assignment, so that runs differing in their objective stay comparable."""
    return cfg.model_copy(update={"weighting": "min_snr", "timesteps": "uniform", "immiscible": False})


@torch.no_grad()
def held_out_loss(model, noise_scheduler, val: ImageSet, device, amp_dtype, batch_size: int, size: int,
                  objective: DiffusionConfig | None = None, should_stop=None) -> float:
    """Mean loss over (up to 512 of) the held-out images, with fixed noise: comparable over time.
    An editor's is over (up to 512 of) the held-out pairs, each target drawn from its source."""
    import functools

    gen = torch.Generator(device).manual_seed(1234)
    sources = None
    if getattr(model, "is_editor", False):
        from clevrgen.data.pairs import edit_pairs

        pairs = edit_pairs(val)[:512]
        sources = resize_images(val.images[pairs[:, 0]], size).to(device)
        images, labels = resize_images(val.images[pairs[:, 1]], size).to(device), val.labels[pairs[:, 1]].to(device)
    else:
        images, labels = resize_images(val.images[:512], size).to(device), val.labels[:512].to(device)
    total = 0.0
    for start in range(0, len(images), batch_size):
        if should_stop is not None and should_stop():
            raise SamplingStopped
        batch = slice(start, start + batch_size)
        x0 = to_float(images[batch])
        denoiser = model if sources is None else functools.partial(model, source=to_float(sources[batch]))
        total += diffusion_loss(denoiser, noise_scheduler, x0, labels[batch], gen, amp_dtype,
                                objective).item() * len(x0)
    return total / max(1, len(images))


def check_eval_splits(t) -> None:
    """Each of ``train.eval_splits`` is a shipped split or a split file of valid phrases, checked
    before training (else the first evaluation would fail, steps into the run)."""
    from clevrgen.labels import load_label_sets

    for split in t.eval_splits:
        try:
            load_label_sets(split)
        except ClevrgenError as exc:
            raise type(exc)(f"train.eval_splits: {exc}") from None


def judge_accuracy(model, cfg: Config, val_set: ImageSet, device, amp_dtype, should_stop: StopCheck = None) -> dict:
    """Judge accuracy of samples for the held-out scenes' label sets and for ``train.eval_splits``
    (seeds ``sample.seed + i``); {} when there is no judge."""
    try:
        from clevrgen.judge import judge_probs, load_judge, score_predictions
        judge = load_judge(None, device)
    except (ImportError, ClevrgenError):
        return {}
    from clevrgen.labels import load_label_sets, multi_hot

    t, s = cfg.train, cfg.sample
    label_sets = {f"{split}_": multi_hot(load_label_sets(split)) for split in t.eval_splits}
    if t.eval_images and len(val_set):
        label_sets["val_"] = val_set.labels[: t.eval_images]
    record = {}
    for prefix, labels in label_sets.items():
        images = draw(model, cfg, labels.to(device), [s.seed + i for i in range(len(labels))], amp_dtype, should_stop)
        scores = score_predictions(judge_probs(judge, images), labels)
        record.update({f"{prefix}topk_accuracy": scores["topk_accuracy"],
                       f"{prefix}exact_accuracy": scores["exact_accuracy"]})
    return record


def measure(model, noise_scheduler, cfg: Config, val_set: ImageSet, device, amp_dtype,
            should_stop: StopCheck = None) -> dict:
    """The held-out loss and (with ``eval_images`` or ``eval_splits``) judge accuracies."""
    record = {}
    if len(val_set):
        record["val_loss"] = held_out_loss(model, noise_scheduler, val_set, device, amp_dtype, cfg.train.batch_size,
                                           cfg.model.image_size, held_out_objective(cfg.diffusion), should_stop)
    if (cfg.train.eval_images and len(val_set)) or cfg.train.eval_splits:
        record.update(judge_accuracy(model, cfg, val_set, device, amp_dtype, should_stop))
    return record


def sample_grid(model, cfg: Config, device, amp_dtype, path: Path, should_stop: StopCheck = None) -> torch.Tensor:
    """The first 16 label sets of ``new_test`` as a grid PNG at ``path``; the uint8 images."""
    from torchvision.utils import save_image

    from clevrgen.labels import multi_hot, shipped_split

    scenes = [list(s) for s in shipped_split("new_test")[:16]]
    labels = multi_hot(scenes).to(device)
    images = draw(model, cfg, labels, list(range(len(scenes))), amp_dtype, should_stop)
    with atomic_path(path) as tmp:
        save_image(images.float() / 255, tmp, nrow=8, format="png")
    return images


def draw(model, cfg: Config, labels: torch.Tensor, seeds: list[int], amp_dtype,
         should_stop: StopCheck = None) -> torch.Tensor:
    """uint8 images [N, 3, 64, 64] of ``labels``, image i from ``seeds[i]``, as the commands draw
    them with the run's sample settings: ``ClevrgenPipeline`` around the EMA model, in the
    training's precision (``amp_dtype``)."""
    s = cfg.sample
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    pipe = ClevrgenPipeline.from_denoiser(model, sampling_scheduler(cfg.diffusion, s.sampler), precision=precision)
    pipe.set_progress_bar_config(disable=True)
    stop = StepProgress(len(seeds) * s.steps, enabled=False, should_stop=should_stop)
    return pipe(labels=labels, seed=seeds, num_inference_steps=s.steps, guidance_scale=s.guidance, output_type="uint8",
                callback_on_step_end=stop, batch_size=s.batch_size).images
