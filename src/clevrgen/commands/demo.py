"""``clevrgen demo``: a local web page to draw scenes with a model (Gradio, an optional extra)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import CheckpointOption, PrintConfigOption, SampleConfigOption, SetOption

HELP = ("Start a web page on 127.0.0.1 to draw scenes: pick 1 to 5 objects, seed, images, steps and guidance; "
        "see the images, the first one's denoising strip and, if asked, the shipped judge's reading; "
        "or add an object to a scene (uploaded, or the last drawn) with the editor. "
        "Nothing leaves the machine. Needs pip install 'clevrgen\\[demo]'.")  # \\[: rich markup would eat [demo]
EXAMPLES = """Examples:

  clevrgen demo                   # the shipped model on http://127.0.0.1:7860

  clevrgen demo --checkpoint runs/tiny --port 8000 --set sample.steps=50

  clevrgen demo --editor runs/edit2      # the "Add an object" tab with another editor
"""


def demo(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The port on 127.0.0.1 to serve on.")] = 7860,
    checkpoint: CheckpointOption = None,
    editor: Annotated[Optional[Path], typer.Option("--editor", help="The editor of the \"Add an object\" tab: a run folder or export. (default: the shipped editor)")] = None,
    config: SampleConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    from clevrgen.errors import UsageError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the demo needs Gradio, an optional extra: pip install 'clevrgen[demo]'") from None
    from clevrgen.commands._options import load_model
    from clevrgen.demo_page import HOST, serve
    from clevrgen.runtime import StopSignal

    model = load_model(checkpoint, config, overrides, print_config)
    typer.echo(f"serving the demo on http://{HOST}:{port}/ (Ctrl-C stops it)")
    try:
        serve(model, port, editor_path=editor)
    except (KeyboardInterrupt, StopSignal) as exc:
        typer.echo("stopped the demo")
        sys.stdout.flush()
        sys.stderr.flush()
        # serve() has stopped the drawings and closed the server: nothing is left to write. The
        # interpreter's own teardown of Gradio's and torch's threads takes 10-15 s, and aborted
        # (134, "terminate called without an active exception") when a drawing was in hand.
        os._exit(143 if isinstance(exc, StopSignal) else 130)
