"""Human-facing views of a dataset: a rich summary table and a grid of labelled images."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from clevrgen.data.iclevr import ImageSet
from clevrgen.labels import COLORS, SHAPES, phrases_of
from clevrgen.output import atomic_path


def dataset_table(data: ImageSet, title: str = "dataset") -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("images", f"{len(data):,}")
    table.add_row("scenes", f"{len(torch.unique(data.scenes)):,}")
    table.add_row("image size", "x".join(str(s) for s in data.images.shape[1:]))
    per_image = data.labels.sum(1).long()
    for k, n in zip(*torch.unique(per_image, return_counts=True)):
        table.add_row(f"images with {int(k)} object{'s' * (int(k) != 1)}", f"{int(n):,}")
    return table


def class_count_table(data: ImageSet) -> Table:
    """How many images show each class: colors down, shapes across."""
    counts = data.labels.sum(0).long().view(len(SHAPES), len(COLORS))
    table = Table(title="images per class")
    table.add_column("color")
    for shape in SHAPES:
        table.add_column(shape, justify="right")
    for c, color in enumerate(COLORS):
        table.add_row(color, *(f"{int(counts[s, c]):,}" for s in range(len(SHAPES))))
    return table


def labelled_grid(data: ImageSet, path: Path, count: int = 16, per_row: int = 8, scale: int = 2) -> None:
    """A PNG of the first ``count`` images, each with its phrases written beneath."""
    from PIL import Image, ImageDraw

    count = min(count, len(data))
    size = data.images.shape[-1] * scale
    caption = 34
    rows = (count + per_row - 1) // per_row
    sheet = Image.new("RGB", (per_row * size, rows * (size + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, phrases in enumerate(phrases_of(data.labels[:count])):
        x, y = (i % per_row) * size, (i // per_row) * (size + caption)
        tile = Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
        sheet.paste(tile, (x, y))
        draw.multiline_text((x + 2, y + size + 1), "\n".join(phrases), fill="black", spacing=0)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
