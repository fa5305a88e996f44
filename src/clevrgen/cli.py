"""The ``clevrgen`` Typer app: registers the commands and turns clevrgen's errors into one line.

Nothing heavy is imported here (torch, diffusers): ``clevrgen --help`` stays instant.
"""

from __future__ import annotations

import errno
import warnings

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from clevrgen import __version__
from clevrgen.commands import data, demo, denoise_strip, edit, evaluate, evaluator, export, sample, train
from clevrgen.errors import ClevrgenError, ClevrgenWarning
from clevrgen.runtime import StopSignal, sigterm_raises
from clevrgen.claims import name_too_long
from clevrgen.output import DISK_ERRNOS

err_console = Console(stderr=True)


class ClevrgenGroup(TyperGroup):
    """Prints a :class:`ClevrgenError` as ``error: message`` and exits with its code, and a
    :class:`ClevrgenWarning` as ``warning: message``."""

    def invoke(self, ctx):  # type: ignore[override]
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, ClevrgenWarning):
                err_console.print(Text("warning: ", style="bold yellow") + Text(str(message)), soft_wrap=True)
            else:
                show_other(message, category, filename, lineno, file, line)

        try:
            with warnings.catch_warnings(), sigterm_raises():
                warnings.simplefilter("always", ClevrgenWarning)
                warnings.showwarning = show
                return super().invoke(ctx)
        except (ClevrgenError, StopSignal, KeyboardInterrupt, OSError) as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if isinstance(exc, OSError) and exc.errno not in DISK_ERRNOS | {errno.ENAMETOOLONG}:
                raise  # not the user's: a bug
            message, code = _one_line(exc)
            # soft_wrap: long paths stay whole (copyable); the terminal wraps the line.
            err_console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
            raise typer.Exit(code) from None


def _one_line(exc: BaseException) -> tuple[str, int]:
    """The message and exit code of an error, a stop signal outside a loop that defers it (every
    file is written whole, so the command can simply be run again), or a write the disk refused
    somewhere no writer names it."""
    if isinstance(exc, ClevrgenError):
        return str(exc), exc.exit_code
    if isinstance(exc, (StopSignal, KeyboardInterrupt)):
        name, code = ("SIGTERM", 143) if isinstance(exc, StopSignal) else ("Ctrl-C", 130)
        return (f"stopped by {name}; no file was left half-written: run the same command again to finish "
                "(data render, evaluate and train --resume go on from where they stopped)"), code
    if exc.errno == errno.ENAMETOOLONG:  # an input path (outputs are checked before any work)
        return f"cannot read {exc.filename}: {name_too_long(exc.filename or '') or exc.strerror}", 2
    return f"cannot write {exc.filename or 'a file'}: {exc.strerror}", 1


app = typer.Typer(
    cls=ClevrgenGroup,
    help="Conditional diffusion for CLEVR scenes: color-shape phrases in, 64x64 scenes out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clevrgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """clevrgen: turn phrases like "red sphere" "cyan cube" into 64x64 CLEVR scenes."""
    ctx.obj = {"debug": debug}


app.command("train", help=train.HELP, epilog=train.EXAMPLES)(train.train)
app.command("sample", help=sample.HELP, epilog=sample.EXAMPLES)(sample.sample)
app.command("evaluate", help=evaluate.HELP, epilog=evaluate.EXAMPLES)(evaluate.evaluate)
app.command("denoise-strip", help=denoise_strip.HELP, epilog=denoise_strip.EXAMPLES)(
    denoise_strip.denoise_strip
)
app.command("edit", help=edit.HELP, epilog=edit.EXAMPLES)(edit.edit)
app.command("export", help=export.HELP, epilog=export.EXAMPLES)(export.export)
app.command("demo", help=demo.HELP, epilog=demo.EXAMPLES)(demo.demo)
app.add_typer(data.app, name="data")
app.add_typer(evaluator.app, name="evaluator")


def main() -> None:
    app(prog_name="clevrgen")
