"""Options shared by the commands: ``--config``, ``--set`` and ``--print-config``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.config import Config, load_config, to_toml

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="A TOML config (see configs/); defaults are used for what it omits."),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override one value, e.g. --set train.lr=2e-4 (repeatable; TOML literals)."),
]
PrintConfigOption = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved config as TOML and exit."),
]


def resolve_config(config: Path | None, overrides: list[str] | None, print_config: bool) -> Config:
    """Load and validate the config; with ``--print-config`` print it and exit."""
    resolved = load_config(config, overrides)
    if print_config:
        typer.echo(to_toml(resolved))
        raise typer.Exit()
    return resolved


CheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="A run folder written by `clevrgen train`. [default: the newest under runs/]"),
]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Base seed; image i uses seed + i. [default: sample.seed]")]
StepsOption = Annotated[Optional[int], typer.Option("--steps", min=1, help="Sampling steps. [default: sample.steps]")]
SamplerOption = Annotated[
    Optional[str], typer.Option("--sampler", help="ddpm, ddim or dpm++. [default: sample.sampler]")
]
GuidanceOption = Annotated[
    Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale (>= 0). [default: sample.guidance]")
]


def load_pipeline(checkpoint: Path | None, config: Path | None, overrides: list[str] | None, print_config: bool,
                  **sample_options):
    """The trained pipeline of ``checkpoint``. Its saved config supplies every default; ``--config``
    and ``--set`` may change the ``sample`` and ``evaluate`` sections, and the command's own
    options (``sample_options``, None = unset) come last."""
    from clevrgen.config import merge_overrides, read_toml, validate_config
    from clevrgen.errors import ConfigError
    from clevrgen.model import artifact_dir, latest_run, load_artifact  # noqa: F401
    from clevrgen.pipeline import ScenePipeline

    run = artifact_dir(checkpoint) if checkpoint is not None else latest_run()
    saved = load_config_of_run(run)
    raw = saved.model_dump(mode="json", exclude_none=True)
    user = read_toml(config) if config is not None else {}
    for section, values in user.items():
        if section not in ("sample", "evaluate"):
            raise ConfigError([f"{section}: comes from the checkpoint; only [sample] and [evaluate] may be set here"])
        raw[section].update(values)
    merge_overrides(raw, list(overrides or []))
    raw["sample"].update({k: v for k, v in sample_options.items() if v is not None})
    resolved = validate_config(raw, source=str(config or run))
    if print_config:
        typer.echo(to_toml(resolved))
        raise typer.Exit()
    return ScenePipeline.from_run(run, resolved)


def load_config_of_run(run: Path) -> Config:
    from clevrgen.errors import CheckpointError
    from clevrgen.errors import ConfigError
    from clevrgen.model import CONFIG_FILE

    path = run / CONFIG_FILE
    if not path.is_file():
        if not run.exists():
            raise CheckpointError(f"checkpoint not found: {run}")
        raise CheckpointError(f"{run} is not a clevrgen run folder (no {CONFIG_FILE})")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
