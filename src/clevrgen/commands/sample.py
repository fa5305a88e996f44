"""``clevrgen sample``: a grid of images of one scene."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import (
    CheckpointOption, SampleConfigOption, GuidanceOption, PrintConfigOption, SamplerOption, SeedOption, SetOption,
    StepsOption, load_model,
)

GRID_CHUNK = 512
"""Images drawn (and written into the grid) at a time."""

HELP = "Draw images of one scene, e.g. \"red sphere\" \"cyan cube\", as a grid PNG."
EXAMPLES = """Examples:

  clevrgen sample "red sphere" "cyan cube" -o out.png

  clevrgen sample "gray cube" "yellow cylinder" --num 16 --steps 50 --sampler ddim --guidance 2 --checkpoint runs/tiny
"""


def sample(
    phrases: Annotated[list[str], typer.Argument(help="The scene's objects as color-shape phrases, e.g. \"red sphere\" \"cyan cube\": the models were trained on 1 to 3; more are drawn, with a warning.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The grid PNG to write.")] = Path("out.png"),
    num: Annotated[Optional[int], typer.Option("--num", "-n", min=1, max=100_000, help="How many images. (default: sample.num)")] = None,
    seed: SeedOption = None,
    steps: StepsOption = None,
    sampler: SamplerOption = None,
    guidance: GuidanceOption = None,
    checkpoint: CheckpointOption = None,
    config: SampleConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    from clevrgen.evaluation import write_grid
    from clevrgen.labels import parse_phrases
    from clevrgen.claims import claim_file

    parse_phrases(phrases)  # fail on a bad phrase or an unwritable path before loading anything
    claim_file(out, "image", "--out")
    model = load_model(checkpoint, config, overrides, print_config,
                       num=num, seed=seed, steps=steps, sampler=sampler, guidance=guidance)
    s = model.config.sample
    write_grid(out, _drawn_in_chunks(model, phrases), s.num)
    typer.echo(f"wrote {out} ({s.num} images, {s.sampler} {s.steps} steps, guidance {s.guidance}, seed {s.seed})")


def _drawn_in_chunks(model, phrases: list[str]):
    """The images of ``sample``, GRID_CHUNK at a time: memory is one chunk, whatever --num (image
    i comes from seed + i in any chunk, so the grid is the one a single call draws)."""
    import warnings

    from clevrgen.errors import ClevrgenWarning

    s = model.config.sample
    chunk = -(-max(s.batch_size, GRID_CHUNK) // 8) * 8  # whole grid rows
    for start in range(0, s.num, chunk):
        end = min(start + chunk, s.num)
        with warnings.catch_warnings():
            if start:  # a large scene is warned about once
                warnings.simplefilter("ignore", ClevrgenWarning)
            images = model.generate([phrases] * (end - start), list(range(s.seed + start, s.seed + end)),
                                    description=f"sampling {start + 1}-{end} of {s.num}" if s.num > chunk
                                    else "sampling")
        yield images
