"""The embedded default dataset: the official train.json rendered once, then cached."""

from __future__ import annotations

import hashlib
from pathlib import Path

from clevrgen.data.iclevr import ImageSet, load_cache, save_cache
from clevrgen.errors import DataError
from clevrgen.labels import asset_path
from clevrgen.runtime import user_cache_dir


def embedded_fingerprint(spec: bytes, seed: int, style=None) -> str:
    """Names a rendered set by everything its pixels depend on: the spec, the seed, the scene
    settings and the renderer's version, so that a renderer change never reuses an old cache."""
    from clevrgen.data.render import render_settings

    return hashlib.sha256(spec + render_settings(seed, style).encode()).hexdigest()[:16]


def load_embedded(seed: int = 0, cache_dir: Path | None = None, progress: bool = True) -> ImageSet:
    try:
        from clevrgen.data.render import render_dataset
    except ImportError:
        raise DataError(
            "no dataset configured and the embedded renderer is not available: "
            "set data.path to an i-CLEVR folder (e.g. --set data.path='../shared/iclevr')"
        ) from None
    from clevrgen.inputs import read_json

    spec_file = asset_path("train.json")
    fingerprint = embedded_fingerprint(spec_file.read_bytes(), seed)
    path = (cache_dir or user_cache_dir()) / f"rendered-{fingerprint}.safetensors"
    data = load_cache(path, fingerprint)
    if data is None:
        data = render_dataset(read_json(spec_file), seed=seed, progress=progress)
        save_cache(path, data, fingerprint)
    return data


def render_random(count: int, objects: tuple[int, int], seed: int = 0, progress: bool = True) -> ImageSet:
    """``count`` random scenes of ``objects`` = (MIN, MAX) objects, rendered (not cached): the
    images of each scene from MIN objects up, as :func:`clevrgen.data.render.random_spec` names them."""
    from clevrgen.data.render import random_spec, render_dataset

    return render_dataset(random_spec(count, objects, seed), seed=seed, progress=progress)


def concat(*sets: ImageSet) -> ImageSet:
    """One image set of several; scene ids of later sets are shifted so that none collide."""
    import torch

    shifted, offset = [], 0
    for part in sets:
        shifted.append(part.scenes + offset)
        offset += int(part.scenes.max()) + 1 if len(part) else 0
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                    torch.cat(shifted), [n for s in sets for n in s.names])


class FreshScenes:
    """New scenes for every training step, laid out and rendered on ``device``: ``count``
    scenes of ``objects`` = (MIN, MAX) distinct classes, resized to ``size``. What a step draws
    depends only on (seed, rank, step), so a resumed run draws the same scenes."""

    def __init__(self, count: int, objects: tuple[int, int], size: int, device, seed: int = 0, rank: int = 0):
        self.count, self.objects, self.size = count, objects, size
        self.device, self.seed, self.rank = device, seed, rank

    def draw(self, step: int):
        """(uint8 images [count, 3, size, size], float multi-hot labels [count, 24]) on the device."""
        import torch

        from clevrgen.data.iclevr import resize_images
        from clevrgen.data.render import random_label_sets, render_scenes, sample_scenes
        from clevrgen.labels import CLASS_INDEX, multi_hot

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + step)
        sets = random_label_sets(self.count, self.objects, g)
        keys = [f"fresh-{self.rank}-{step}-{i}" for i in range(self.count)]
        classes = [[CLASS_INDEX[p] for p in phrases] for phrases in sets]
        images = render_scenes(sample_scenes(classes, keys, self.seed, device=self.device))
        return resize_images(images, self.size), multi_hot(sets).to(self.device)
