"""Options shared by the commands: ``--config``, ``--set`` and ``--print-config``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.config import Config, load_config
from clevrgen.config_file import to_toml

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="A TOML file, or a shipped config by name from any folder: tiny, cpu, relay, small, "
                 "base, judge. Defaults are used for what it omits."),
]
SampleConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="A TOML file with only the sample and evaluate tables: the model's own "
                 "settings are the defaults, and its architecture comes from the checkpoint (so a training "
                 "config such as cpu is refused)."),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override one value, e.g. --set train.lr=2e-4 (repeatable; TOML literals)."),
]
PrintConfigOption = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved config as TOML and exit."),
]


def finish_config(raw: dict, overrides: list[str] | None, source: str, print_config: bool,
                  options: dict[str, str] | None = None) -> Config:
    """Merge ``--set`` overrides into ``raw``, validate once; with ``--print-config`` print and exit.
    ``options`` (dotted key -> option name) says which values a command's own options gave, so a
    bad one is blamed on the option rather than on ``source``."""
    from clevrgen.config import validate_config
    from clevrgen.config_file import merge_overrides, override_origins

    overrides = list(overrides or [])
    resolved = validate_config(merge_overrides(raw, overrides), source=source,
                               origins={**(options or {}), **override_origins(overrides)})
    if print_config:
        typer.echo(to_toml(resolved))
        raise typer.Exit()
    return resolved


def resolve_config(config: Path | None, overrides: list[str] | None, print_config: bool) -> Config:
    """The config of ``--config`` (or the defaults) with ``--set`` overrides, validated."""
    from clevrgen.config_file import find_config, read_toml

    config = find_config(config) if config is not None else None
    return finish_config(read_toml(config) if config is not None else {}, overrides, str(config or ""), print_config)


def resolve_run_config(run: Path, overrides: list[str] | None, print_config: bool) -> Config:
    """The config saved in a run folder, with ``--set`` overrides, validated."""
    return finish_config(load_config_of_run(run).model_dump(mode="json", exclude_none=True), overrides, str(run),
                         print_config)


CheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="A run folder written by `clevrgen train`, or `latest` for the newest under "
                 "runs/. (default: the model shipped with clevrgen)"),
]
# Ranges as config.py has them (the config module is not imported here: --help stays instant).
MAX_SEED, MAX_SAMPLE_STEPS, MAX_GUIDANCE = 2**53, 10_000, 100.0
def _finite_in(value: float | None, low: float, high: float) -> float | None:
    """A float option's check: NaN is not a number (no range message for it), then the range."""
    if value is None:
        return value
    if value != value:
        raise typer.BadParameter("must be a number (got nan)")
    if not low <= value <= high:
        raise typer.BadParameter(f"must be from {low:g} to {high:g} (got {value:g})")
    return value


SeedOption = Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="Base seed; image i uses seed + i. (default: sample.seed)")]
StepsOption = Annotated[Optional[int], typer.Option("--steps", min=1, max=MAX_SAMPLE_STEPS, help="Sampling steps, at most the model's training timesteps. (default: sample.steps)")]
SamplerOption = Annotated[
    Optional[str], typer.Option("--sampler", help="ddpm, ddim or dpm++. (default: sample.sampler)")
]
GuidanceOption = Annotated[
    Optional[float], typer.Option("--guidance", callback=lambda v: _finite_in(v, 0.0, MAX_GUIDANCE),
                                  help=f"Classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}. (default: sample.guidance)")
]


def load_model(checkpoint: Path | None, config: Path | None, overrides: list[str] | None, print_config: bool,
               **sample_options):
    """The trained model of ``checkpoint``, as a :class:`clevrgen.loaded.LoadedModel`. Its saved
    config supplies every default; ``--config`` may change the ``sample`` and ``evaluate``
    sections, then the command's own options (``sample_options``, None = unset), then ``--set``."""
    from clevrgen.artifact import describe_model, resolve_checkpoint
    from clevrgen.config_file import find_config, read_toml
    from clevrgen.errors import ConfigError
    from clevrgen.loaded import LoadedModel

    run = resolve_checkpoint(checkpoint)
    raw = load_config_of_run(run).model_dump(mode="json", exclude_none=True)
    config = find_config(config) if config is not None else None
    for section, values in (read_toml(config) if config is not None else {}).items():
        if section not in ("sample", "evaluate") or not isinstance(values, dict):
            raise ConfigError([f"{section}: comes from the checkpoint; only [sample] and [evaluate] tables may be set here"])
        raw[section].update(values)
    given = {k: v for k, v in sample_options.items() if v is not None}
    raw["sample"].update(given)
    options = {f"sample.{k}": f"--{k}" for k in given}
    model = LoadedModel.load(run, finish_config(raw, overrides, str(config or run), print_config, options))
    from rich.console import Console

    Console(stderr=True).print(f"model: {describe_model(run)}", highlight=False, soft_wrap=True)
    return model


def load_config_of_run(run: Path) -> Config:
    from clevrgen.artifact import CONFIG_FILE
    from clevrgen.errors import CheckpointError, ConfigError

    path = run / CONFIG_FILE
    if not path.is_file():
        if not run.exists():
            raise CheckpointError(f"checkpoint not found: {run}")
        raise CheckpointError(f"{run} is not a clevrgen run folder (no {CONFIG_FILE})")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CheckpointError(f"{path} is not a valid run config:\n" + "\n".join(f"  {p}" for p in exc.problems)) from None
