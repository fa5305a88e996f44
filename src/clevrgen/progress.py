"""Rich progress bars, one look for every long-running loop."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)


def make_progress(*extra: TextColumn, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        *extra, TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )


def track(items: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    with make_progress(enabled=enabled) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
