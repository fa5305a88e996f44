"""``clevrgen train``: train the denoiser; a run folder holds everything it made."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import (
    ConfigOption, PrintConfigOption, SetOption, resolve_config, resolve_run_config,
)

HELP = "Train the conditional denoiser (config -> run folder with checkpoints, metrics and samples)."
EXAMPLES = """Examples:

  clevrgen train --config configs/tiny.toml

  clevrgen train --config configs/base.toml --set data.path='../shared/iclevr' --out runs/base

  clevrgen train --resume runs/base

  torchrun --nproc_per_node 4 -m clevrgen train --config configs/small.toml   # DDP on 4 GPUs
"""


def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder. (default: runs/<config>-<time>)")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder.")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to RUN/tensorboard/ (the same as "
                                              "--set train.tensorboard=true; needs clevrgen[tensorboard]).")] = False,
) -> None:
    from rich.console import Console

    from clevrgen.data import load_dataset
    from clevrgen.errors import UsageError
    from clevrgen.train import train as run_training

    if tensorboard:
        overrides = [*(overrides or []), "train.tensorboard=true"]
    if resume is not None:
        if (out is not None and out != resume) or config is not None:
            raise UsageError("--resume RUN continues with RUN's own config: give no --config or --out with it")
        cfg = resolve_run_config(resume, overrides, print_config)
        run_dir = resume
    else:
        cfg = resolve_config(config, overrides, print_config)
        stem = config.stem if config is not None else "run"
        run_dir = out or Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from clevrgen.runtime import is_rank_zero, resolve_device
    from clevrgen.claims import check_writable, claim_folder
    from clevrgen.locks import run_lock

    # an unwritable or occupied --out, or a missing GPU, fails before any work
    claim_folder(run_dir, "run") if resume is None else check_writable(run_dir, folder=True)
    resolve_device(cfg.train.device)
    if cfg.train.tensorboard:
        from clevrgen.runfolder import require_tensorboard

        require_tensorboard()
    with run_lock(run_dir, enabled=is_rank_zero()):  # a second writer of run_dir fails here, at once
        if resume is not None:  # a folder with no checkpoint fails before the data loads
            from clevrgen.runfolder import require_checkpoint

            require_checkpoint(run_dir)
        data = load_dataset(cfg.data)
        result = run_training(cfg, run_dir, data, resume=resume is not None)
    if not result.is_main:  # under torchrun, rank 0 speaks for the job
        return
    val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    Console().print(
        f"[bold green]done[/]: {result.step} steps, loss {result.loss:.4f}{val}, "
        f"{result.images_per_second:.0f} img/s on {result.world_size} rank{'s' * (result.world_size > 1)} "
        f"-> {result.run_dir}"
    )
