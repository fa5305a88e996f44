"""``clevrgen edit``: add an object to a scene and keep everything else; or build a scene one object at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import (
    CheckpointOption, GuidanceOption, PrintConfigOption, SampleConfigOption, SeedOption, SetOption, StepsOption,
    _finite_in, MAX_GUIDANCE, load_model,
)

HELP = "Add an object to a scene (a PNG) and keep the rest, or build a scene one object at a time (--sequence)."
EXAMPLES = """Examples:

  clevrgen edit scene.png --add "red sphere" -o out.png

  clevrgen edit scene.png --has "cyan cube" --has "gray sphere" --add "red sphere" -o out.png

  clevrgen edit --sequence "gray cube" "red sphere" "cyan cylinder" -o steps.png
"""


def edit(
    items: Annotated[Optional[list[str]], typer.Argument(help="The scene PNG to add to; with --sequence, the objects to place one after another.", show_default=False)] = None,
    add: Annotated[Optional[list[str]], typer.Option("--add", help="The object to add, e.g. \"red sphere\" (repeatable: one edit each, in order).")] = None,
    has: Annotated[Optional[list[str]], typer.Option("--has", help="An object the scene already has (repeatable). (default: the shipped judge reads them from the image, and says what it read)")] = None,
    sequence: Annotated[bool, typer.Option("--sequence", help="Build a scene: the first object drawn by the generator, each next one added by the editor; writes the steps as a strip.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write: the edited scene, or the strip of steps.")] = Path("edit.png"),
    seed: SeedOption = None,
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    image_guidance: Annotated[Optional[float], typer.Option("--image-guidance", callback=lambda v: _finite_in(v, 0.0, MAX_GUIDANCE), help="How strongly the edit keeps its source image. (default: sample.image_guidance)")] = None,
    checkpoint: CheckpointOption = None,
    generator: Annotated[Optional[Path], typer.Option("--generator", help="The generator that draws --sequence's first object. (default: the shipped model)")] = None,
    config: SampleConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    from clevrgen.editing import check_addition, resolve_editor
    from clevrgen.errors import UsageError
    from clevrgen.labels import parse_phrase, parse_phrases
    from clevrgen.claims import claim_file

    items = list(items or [])
    if sequence:
        if add or has:
            raise UsageError("--sequence builds a scene from its phrases: give no --add or --has with it")
        parse_phrases(items)
        for k in range(1, len(items)):
            check_addition(items[:k], items[k])
    else:
        if len(items) != 1:
            raise UsageError("give one scene image to edit (or --sequence and the objects to place)")
        if not add:
            raise UsageError("say what to add: --add \"red sphere\"")
        for phrase in add:  # a bad phrase fails before the editor and the judge load
            parse_phrase(phrase)
        if has:
            parse_phrases(has)
    claim_file(out, "image", "--out")
    editor = load_model(resolve_editor(checkpoint), config, overrides, print_config,
                           seed=seed, steps=steps, guidance=guidance, image_guidance=image_guidance)
    if sequence:
        _build(editor, items, out, generator)
    else:
        _add(editor, Path(items[0]), add, has, out)


def _add(editor, scene: Path, add: list[str], has: list[str] | None, out: Path) -> None:
    """Each --add in turn, each edit from the one before; the last image is written."""
    from clevrgen.editing import check_addition, draw_edits, read_scene, scene_objects
    from clevrgen.labels import multi_hot
    from clevrgen.output import atomic_path

    image = read_scene(scene)
    present = scene_objects(image, has)
    if present.read_by_judge:
        typer.echo(f"the judge reads in {scene}: {', '.join(present.phrases)} (correct it with --has)", err=True)
    s = editor.config.sample
    objects = present.phrases
    current = image[None]
    for k, phrase in enumerate(add):
        objects = check_addition(objects, phrase)
        current = draw_edits(editor.pipe, current, multi_hot([objects]), [s.seed + k], s.steps, s.guidance,
                             s.image_guidance, 1, description=f"adding {phrase}")
    from torchvision.utils import save_image

    with atomic_path(out) as tmp:
        save_image(current[0].float() / 255, tmp, format="png")
    typer.echo(f"wrote {out} ({', '.join(objects)}; {s.sampler} {s.steps} steps, guidance {s.guidance}, "
               f"image guidance {s.image_guidance}, seed {s.seed})")


def _build(editor, phrases: list[str], out: Path, generator: Path | None) -> None:
    """The first object from the generator, then one edit per further object: the steps as a strip."""
    from clevrgen.commands._options import load_model as load
    from clevrgen.editing import draw_edits
    from clevrgen.evaluation import save_grid
    from clevrgen.labels import multi_hot

    s = editor.config.sample
    first = load(generator, None, [f"sample.seed={s.seed}", f"sample.steps={s.steps}"], False)
    frames = [first.generate([phrases[:1]], [s.seed], description=f"drawing {phrases[0]}")]
    for k in range(1, len(phrases)):
        frames.append(draw_edits(editor.pipe, frames[-1], multi_hot([phrases[: k + 1]]), [s.seed + k], s.steps,
                                 s.guidance, s.image_guidance, 1, description=f"adding {phrases[k]}"))
    import torch

    save_grid(torch.cat(frames), out, per_row=len(frames))
    typer.echo(f"wrote {out} ({len(frames)} steps: {' + '.join(phrases)}; seed {s.seed})")
