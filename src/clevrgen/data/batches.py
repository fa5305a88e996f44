"""What a training run draws its batches from: the training images placed on the device
(``place_data``: the scene split, this rank's shard, the model's resolution, fresh renders, an
editor's pairs) and one step's random batch (``TrainingData.draw``, ``draw_batch``).

The whole training set lives on the device as uint8 and batches are drawn there, from the run's
one generator, so a resumed run draws the batches a straight one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clevrgen.data.iclevr import ImageSet, resize_images, split_scenes, to_float
from clevrgen.data.pairs import draw_edit_batch, edit_pairs
from clevrgen.errors import UsageError

if TYPE_CHECKING:
    from clevrgen.config import Config, DataConfig
    from clevrgen.data.embedded import FreshScenes


def describe_data(cfg: DataConfig) -> str:
    """What the model is trained on, in words, for the artifact and every report."""
    real = f"the images in {cfg.path}" if cfg.path is not None else "the embedded renderer's scenes"
    if cfg.extra_pairs is not None:
        real += f" + {cfg.extra_share:.0%} of each batch from the pairs in {cfg.extra_pairs}"
    return real + (f" + {cfg.fresh:.0%} fresh renders of {cfg.fresh_objects[0]}-{cfg.fresh_objects[1]} objects"
                   if cfg.fresh else "")


def batch_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s batch generator, from the run's ``seed`` (and, for a resume
    that cannot take the saved generator's state, the ``step``)."""
    return seed + 1_000_003 * rank + 7_919 * step


def draw_batch(images: torch.Tensor, labels: torch.Tensor, cfg: Config, gen: torch.Generator,
               fresh: tuple[torch.Tensor, torch.Tensor] | None = None):
    """A random batch on the device: images in [-1, 1] (randomly flipped), labels with dropout.
    ``fresh`` (uint8 images, labels), new scenes of this step, take the batch's first rows."""
    n, b = images.shape[0], cfg.train.batch_size
    device = images.device
    index = torch.randint(n, (b,), generator=gen, device=device)
    batch, labels = images[index], labels[index]
    if fresh is not None:
        m = len(fresh[0])
        batch, labels = torch.cat([fresh[0], batch[m:]]), torch.cat([fresh[1], labels[m:]])
    x0 = to_float(batch)
    if cfg.train.hflip:
        flip = torch.rand(b, generator=gen, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    keep = torch.rand(b, generator=gen, device=device) >= cfg.train.label_dropout
    return x0, labels * keep[:, None]


@dataclass
class TrainingData:
    """A run's data, placed: the scene split, the uint8 images and labels this rank draws from
    (on the device, at the model's resolution), an editor's (source, target) rows of ``images``
    (and those of its extra pairs, ``data.extra_pairs``), the fresh renders, and what the
    artifact records about the data (``record``)."""

    train_set: ImageSet
    val_set: ImageSet
    images: torch.Tensor
    labels: torch.Tensor
    pairs: torch.Tensor | None
    fresh: FreshScenes | None
    record: dict
    extra_pairs: torch.Tensor | None = None

    def draw(self, cfg: Config, gen: torch.Generator, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Step ``step``'s batch: (images in [-1, 1], labels, the model's other inputs: an editor's
        ``source``)."""
        t = cfg.train
        if self.pairs is not None:
            extra_rows = max(1, round(cfg.data.extra_share * t.batch_size)) if self.extra_pairs is not None else 0
            x0, labels, source = draw_edit_batch(self.images, self.labels, self.pairs, t.batch_size, gen,
                                                 t.label_dropout, t.source_dropout, t.joint_dropout, t.hflip,
                                                 self.extra_pairs, extra_rows)
            return x0, labels, {"source": source}
        fresh = self.fresh.draw(step) if self.fresh is not None else None
        return *draw_batch(self.images, self.labels, cfg, gen, fresh), {}


def place_data(data: ImageSet, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
               progress: bool = False) -> TrainingData:
    """The training images and labels on ``device`` (rank ``rank``'s shard of ``world_size``, at
    the model's resolution), the held-out scenes, an editor's extra pairs and the fresh renders if
    the config asks for them, and what the artifact records about the data."""
    from clevrgen.record import max_objects_of
    from clevrgen.runtime import machine_name

    if cfg.train.batch_size > len(data):
        raise UsageError(f"train.batch_size: {cfg.train.batch_size} is larger than the {len(data)} training images")
    train_set, val_set = split_scenes(data, cfg.data.val_fraction, cfg.data.split_seed)
    shard = slice(rank, None, world_size)
    pairs = extra_pairs = None
    seen = train_set.labels  # what sampling warns beyond: the most objects an image showed
    if cfg.model.source_image:
        if cfg.data.fresh > 0:
            raise UsageError("data.fresh: an editor trains on the dataset's sequences; fresh renders are not "
                             "pairs (set data.fresh = 0)")
        pairs = edit_pairs(train_set)[shard].to(device)
        if not len(pairs):
            raise UsageError(f"model.source_image: {cfg.data.path or 'the dataset'} has no image sequences "
                             "(<scene>_<k>.png -> <scene>_<k+1>.png) to train an editor on")
        # every image of the training scenes is some pair's source or target: all stay on each rank
        images, labels = train_set.images, train_set.labels
        if cfg.data.extra_pairs is not None:  # all of it trains: the held-out pairs are the real ones
            extra, extra_pairs = _extra_pairs(cfg.data, progress)
            extra_pairs = (extra_pairs[shard] + len(images)).to(device)
            images, labels = torch.cat([images, extra.images]), torch.cat([labels, extra.labels])
            seen = labels
    else:
        images, labels = train_set.images[shard], train_set.labels[shard]
    fresh = None  # new scenes rendered on the device at every step
    if cfg.data.fresh > 0:
        from clevrgen.data.embedded import FreshScenes

        fresh = FreshScenes(max(1, round(cfg.data.fresh * cfg.train.batch_size)), cfg.data.fresh_objects,
                            cfg.model.image_size, device, cfg.train.seed, rank)
    # Sampling warns beyond max_objects.
    record = {"max_objects": max(max_objects_of(seen), cfg.data.fresh_objects[1] if fresh else 0),
              "images": len(train_set), "data": describe_data(cfg.data), "machine": machine_name(device)}
    if pairs is not None:
        record["pairs"] = len(pairs) * world_size
    if extra_pairs is not None:
        record["extra_pairs"] = len(extra_pairs) * world_size
    return TrainingData(train_set, val_set, resize_images(images, cfg.model.image_size).to(device), labels.to(device),
                        pairs, fresh, record, extra_pairs)


def _extra_pairs(cfg: DataConfig, progress: bool) -> tuple[ImageSet, torch.Tensor]:
    """``data.extra_pairs`` read through the cache, with its (source, target) rows; refused if it
    holds no pair."""
    from clevrgen.data.iclevr import load_iclevr

    extra = load_iclevr(cfg.extra_pairs, cache_dir=cfg.cache_dir, progress=progress)
    pairs = edit_pairs(extra)
    if not len(pairs):
        raise UsageError(f"data.extra_pairs: {cfg.extra_pairs} has no image sequences (<scene>_<k>.png -> "
                         "<scene>_<k+1>.png): render some with clevrgen data render --random N --objects 3-5")
    return extra, pairs
