"""``clevrgen data``: inspect a dataset folder; render the embedded dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    from clevrgen.data.summary import dataset_table, labelled_grid

    data = load_iclevr(root)
    from rich.console import Console

    Console().print(dataset_table(data, title=str(root)))
    labelled_grid(data, grid, count=count)
    typer.echo(f"wrote {grid}")
