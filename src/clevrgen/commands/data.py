"""``clevrgen data``: inspect a dataset folder; render the embedded dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Datasets in the i-CLEVR layout: inspect them, render new ones.", no_args_is_help=True)

INFO_EXAMPLES = """Examples:

  clevrgen data info ../shared/iclevr

  clevrgen data info ../shared/iclevr --grid iclevr.png --count 32
"""


@app.command("info", epilog=INFO_EXAMPLES)
def info(
    root: Annotated[Path, typer.Argument(help="A folder in the i-CLEVR layout (train.json, objects.json, iclevr/).")],
    grid: Annotated[Path, typer.Option("--grid", help="Where to write a grid of images with their labels.")] = Path("data-info.png"),
    count: Annotated[int, typer.Option("--count", min=1, max=256, help="Images in the grid.")] = 16,
) -> None:
    """Summarize a dataset (images, scenes, objects per image, class counts) and draw a labelled grid."""
    from clevrgen.data.iclevr import load_iclevr
    from rich.console import Console

    from clevrgen.data.summary import class_count_table, dataset_table, labelled_grid

    from clevrgen.claims import claim_file

    claim_file(grid, "image", "--grid")
    data = load_iclevr(root)
    Console().print(dataset_table(data, title=str(root)), class_count_table(data))
    labelled_grid(data, grid, count=count)
    typer.echo(f"wrote {grid}")


RENDER_EXAMPLES = """Examples:

  clevrgen data render --out rendered-iclevr

  clevrgen data render --out extra --random 5000 --objects 4-5 --seed 1 --format cache

  clevrgen data render --out mine --spec my_train.json --device cuda
"""


@app.command("render", epilog=RENDER_EXAMPLES)
def render(
    out: Annotated[Path, typer.Option("--out", help="Folder to write in the i-CLEVR layout: new or empty, or an earlier render of the same settings, which it resumes or adds to (never dropping its images).")],
    spec: Annotated[Optional[Path], typer.Option("--spec", help="A train.json (image name -> phrases). Default: the official i-CLEVR train.json.")] = None,
    random: Annotated[Optional[int], typer.Option("--random", min=1, max=10_000_000, help="Render N random scenes instead of a spec (each as its images of MIN..MAX objects).")] = None,
    objects: Annotated[str, typer.Option("--objects", help="Objects per random scene, MIN-MAX within 1-5.")] = "1-3",
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**53, help="Seed: the same seed gives the same images.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    fmt: Annotated[str, typer.Option("--format", help="png, cache (the reader's uint8 cache only) or both.")] = "png",
) -> None:
    """Render CLEVR scenes in the i-CLEVR layout: train.json, objects.json, scenes.json, iclevr/*.png."""
    from clevrgen.data.iclevr import read_json
    from clevrgen.data.render import random_spec
    from clevrgen.data.rendered_folder import render_folder
    from clevrgen.errors import DataError, UsageError
    from clevrgen.labels import asset_path
    from clevrgen.claims import claim_folder
    from clevrgen.runtime import resolve_device

    if fmt not in ("png", "cache", "both"):
        raise UsageError(f"--format must be png, cache or both (got {fmt!r})")
    if spec is not None and random is not None:
        raise UsageError("give --spec or --random, not both")
    if random is not None:
        table = random_spec(random, _object_range(objects), seed)
    else:
        table = read_json(spec or asset_path("train.json"))
        if not isinstance(table, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in table.values()
        ) or not table:
            raise DataError(f"{spec}: expected a non-empty JSON object mapping image names to phrase lists")
    where = resolve_device(device)
    claim_folder(out, "dataset")  # a dataset of its own: added to only with the same settings (render_folder)
    counts = render_folder(out, table, seed=seed, device=where, fmt=fmt)
    typer.echo(f"wrote {out}: {counts['rendered']:,} images rendered, {counts['kept']:,} already there")


def _object_range(text: str) -> tuple[int, int]:
    from clevrgen.errors import UsageError
    from clevrgen.data.render import MAX_OBJECTS

    try:
        low, _, high = text.partition("-")
        lo, hi = int(low), int(high or low)
    except ValueError:
        lo, hi = 0, -1
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise UsageError(f"--objects must be MIN-MAX with 1 <= MIN <= MAX <= {MAX_OBJECTS}, e.g. 1-3 (got {text!r})")
    return lo, hi
