"""``clevrgen export``: a run's sampling artifact alone, fp16 by default: a model to share or ship."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = "Copy a run's sampling artifact (EMA weights, config, scheduler; no training state) to a folder, as fp16."
EXAMPLES = """Examples:

  clevrgen export runs/cpu --out my-model            # ~half the size of the run's fp32 artifact

  clevrgen sample "red sphere" --checkpoint my-model
"""


def export(
    run: Annotated[Path, typer.Argument(help="A run folder written by `clevrgen train` (or `latest`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write: new, empty, or an earlier export, which it replaces.")],
    fp32: Annotated[bool, typer.Option("--fp32", help="Keep the weights in fp32.")] = False,
) -> None:
    from clevrgen.errors import UsageError
    from clevrgen.model import export_artifact, resolve_checkpoint
    from clevrgen.output import claim_folder

    source = resolve_checkpoint(run)
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the run itself: give another folder")
    claim_folder(out, "model")
    export_artifact(source, out, half=not fp32)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(f"wrote {out} ({size / 2**20:.1f} MiB, {'fp32' if fp32 else 'fp16'} weights) from {source}")
