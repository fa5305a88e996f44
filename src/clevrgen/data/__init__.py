"""Datasets: the i-CLEVR reader and cache, and the embedded procedural renderer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clevrgen.config import DataConfig
    from clevrgen.data.iclevr import ImageSet


def load_dataset(cfg: "DataConfig", progress: bool = True) -> "ImageSet":
    """The training images of ``data.path``; with no path, the embedded renderer's dataset."""
    from clevrgen.data.iclevr import load_iclevr

    if cfg.path is not None:
        return load_iclevr(cfg.path, cache_dir=cfg.cache_dir, progress=progress)
    from clevrgen.data.embedded import load_embedded

    return load_embedded(seed=cfg.render_seed, cache_dir=cfg.cache_dir, progress=progress)
