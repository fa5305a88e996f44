"""``clevrgen denoise-strip``: one scene from pure noise to the final image, in a row."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import (
    CheckpointOption, SampleConfigOption, GuidanceOption, PrintConfigOption, SamplerOption, SeedOption, SetOption,
    StepsOption, load_model,
)

HELP = "Show the denoising process: the image at evenly spaced steps from noise to the end, one row per scene."
EXAMPLES = """Examples:

  clevrgen denoise-strip "red sphere" "cyan cylinder" "cyan cube" -o strip.png

  clevrgen denoise-strip --labels scenes.json --frames 12 -o strips.png
"""


def denoise_strip(
    phrases: Annotated[Optional[list[str]], typer.Argument(help="The scene's phrases (or use --labels).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="A JSON list of phrase lists: one row each.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The strip PNG to write.")] = Path("strip.png"),
    frames: Annotated[int, typer.Option("--frames", min=2, max=1000, help="Images per row, noise first, final last.")] = 10,
    seed: SeedOption = None,
    steps: StepsOption = None,
    sampler: SamplerOption = None,
    guidance: GuidanceOption = None,
    checkpoint: CheckpointOption = None,
    config: SampleConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    from clevrgen.errors import UsageError
    from clevrgen.evaluation import save_grid
    from clevrgen.labels import load_label_sets, parse_phrases

    if bool(phrases) == (labels is not None):
        raise UsageError("give the scene's phrases or --labels FILE (one of the two)")
    scenes = load_label_sets(str(labels)) if labels is not None else [phrases]
    for scene in scenes:
        parse_phrases(scene)
    from clevrgen.claims import claim_file

    claim_file(out, "image", "--out")
    model = load_model(checkpoint, config, overrides, print_config,
                       steps=steps, sampler=sampler, guidance=guidance, seed=seed)
    s = model.config.sample
    if frames > s.steps + 1:
        raise UsageError(f"--frames {frames} is more than the {s.steps} steps + 1 images the sampler makes")
    strip = model.trajectory(scenes, [s.seed + i for i in range(len(scenes))], frames)
    save_grid(strip.flatten(0, 1), out, per_row=frames)
    typer.echo(f"wrote {out} ({len(scenes)} row{'s' * (len(scenes) > 1)} of {frames} frames, {s.sampler} {s.steps} steps)")
