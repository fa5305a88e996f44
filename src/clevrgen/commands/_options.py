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
