"""``clevrgen export``: a run's sampling artifact alone, fp16 by default: a model to share or ship."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

HELP = "Copy a run's sampling artifact (EMA weights, config, scheduler; no training state) to a folder, as fp16."
EXAMPLES = """Examples:

  clevrgen export runs/cpu --out my-model            # ~half the size of the run's fp32 artifact

  clevrgen sample "red sphere" --checkpoint my-model

  clevrgen export runs/final --out final-ema08 --ema-sigma-rel 0.08   # post-hoc EMA from the snapshots

  clevrgen export runs/final --out my-model --set sample.guidance=5 --set sample.steps=25   # its defaults
"""


def export(
    run: Annotated[Path, typer.Argument(help="A run folder written by `clevrgen train` (or `latest`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write: new, empty, or an earlier export, which it replaces.")],
    fp32: Annotated[bool, typer.Option("--fp32", help="Keep the weights in fp32.")] = False,
    ema_sigma_rel: Annotated[Optional[float], typer.Option("--ema-sigma-rel", min=0.001, max=0.279, help="Post-hoc EMA: export the power-function average of this relative length, synthesized from the run's snapshots (a run trained with train.ema_sigma_rels).")] = None,
    step: Annotated[Optional[int], typer.Option("--step", min=1, max=10**9, help="With --ema-sigma-rel: the average at this snapshot's step. (default: the last)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="The exported model's own sampling defaults, e.g. --set sample.guidance=5 (sample.* only; repeatable).")] = None,
) -> None:
    from clevrgen.artifact import export_artifact, resolve_checkpoint
    from clevrgen.commands._options import resolve_run_config
    from clevrgen.errors import UsageError
    from clevrgen.claims import claim_folder
    from clevrgen.pipeline_inputs import check_sample_steps
    from clevrgen.record import with_stage

    source = resolve_checkpoint(run)
    claim_folder(out, "model", source=source)  # before the options: the run itself, a snapshot inside it
    for item in overrides or []:
        if not item.strip().startswith("sample."):
            raise UsageError(f"--set {item}: an export may change only its sampling defaults (sample.*); "
                             "the rest is the run's")
    chosen = resolve_run_config(source, overrides, False)  # the run's config with the new defaults
    check_sample_steps(chosen)
    if ema_sigma_rel is not None:
        from clevrgen.artifact import save_artifact
        from clevrgen.ema import posthoc_model
        from clevrgen.record import training_data_of

        model, _, weights = posthoc_model(source, ema_sigma_rel, step)
        if not fp32:
            model.unet.half()
        record = {**training_data_of(source), "ema_sigma_rel": ema_sigma_rel, "posthoc_ema": weights}
        record["steps"] = step or max(int(k[5:11]) for k in weights)
        save_artifact(model, chosen, out, with_stage(record, source, record["steps"]))
    elif step is not None:
        raise UsageError("--step goes with --ema-sigma-rel (a post-hoc average); a run exports its last weights")
    else:
        export_artifact(source, out, half=not fp32, sample=chosen.sample, stage=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))  # no temporaries
    typer.echo(f"wrote {out} ({size / 2**20:.1f} MiB, {'fp32' if fp32 else 'fp16'} weights) from {source}")
