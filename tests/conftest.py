"""Shared fixtures: a small i-CLEVR-layout folder written by the tests, tiny model settings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and OpenMP threads that spin-wait against other
# work on a 2-core machine can slow every op tenfold.
torch.set_num_threads(1)

SHARED_ICLEVR = Path(__file__).resolve().parents[1].parent / "shared" / "iclevr"

# A UNet small enough to train a few steps in about a second on the CPU.
TINY = [
    "model.block_out_channels=[8, 16, 16]",
    "model.layers_per_block=1",
    "model.attention=[false, false, true]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "diffusion.num_train_timesteps=50",
    "train.batch_size=4",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.sample_every=1000",
    "train.checkpoint_every=2",
    "train.eval_images=0",
    "train.device='cpu'",
    "sample.steps=3",
    "sample.num=2",
    "sample.device='cpu'",
    "data.val_fraction=0.25",
]
# TINY's UNet with per-object tokens: a UNet2DConditionModel attending at its two lower levels.
TOKENS = ["model.cross_attention=[false, true, true]", "model.token_dim=16", "model.cross_attention_head_dim=8"]
EDITOR = [*TINY, *TOKENS, "model.patch_size=2", "model.source_image=true", "model.block_out_channels=[8, 16]",
          "model.attention=[false, true]", "model.cross_attention=[false, true]"]
"""A tiny editor (issue 47): the source image as more input channels."""


def drawn(model, scheduler, labels, seeds, steps: int, guidance: float = 1.0) -> torch.Tensor:
    """What a denoiser draws, in [-1, 1], image i from ``seeds[i]``: ``ClevrgenPipeline`` around it."""
    from clevrgen.pipeline import ClevrgenPipeline

    pipe = ClevrgenPipeline.from_denoiser(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(labels=labels, seed=list(seeds), num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent").images


def write_dataset(root: Path, scenes: int = 4, seed: int = 0) -> Path:
    """``scenes`` growing scenes of 1-3 objects (colored squares), in the i-CLEVR layout."""
    from PIL import Image, ImageDraw

    from clevrgen.labels import COLORS, PHRASES, asset_path

    rgb = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
           "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
    assert set(rgb) == set(COLORS)
    rng = random.Random(seed)
    (root / "iclevr").mkdir(parents=True, exist_ok=True)
    spec = {}
    for scene in range(scenes):
        objects = rng.sample(PHRASES, 3)
        image = Image.new("RGB", (320, 240), (120, 120, 118))
        draw = ImageDraw.Draw(image)
        for k, phrase in enumerate(objects):
            x, y = 40 + 90 * k, 80 + rng.randint(0, 60)
            color = rgb[phrase.split()[0]]
            if phrase.endswith("sphere"):
                draw.ellipse((x, y, x + 50, y + 50), fill=color)
            elif phrase.endswith("cube"):
                draw.rectangle((x, y, x + 50, y + 50), fill=color)
            else:
                draw.rectangle((x + 10, y, x + 40, y + 60), fill=color)
            name = f"CLEVR_train_{scene:06d}_{k}.png"
            image.save(root / "iclevr" / name)
            spec[name] = objects[: k + 1]
    (root / "train.json").write_text(json.dumps(spec))
    (root / "objects.json").write_text(asset_path("objects.json").read_text())
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own cache folder and working directory."""
    monkeypatch.setenv("CLEVRGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "iclevr-mini")


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()
