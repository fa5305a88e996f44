"""clevrgen's own errors: each one is a single message the CLI prints before exiting."""

from __future__ import annotations


class ClevrgenError(Exception):
    """An error the user can cause and fix. The CLI prints it as one line and exits 1."""

    exit_code = 1


class UsageError(ClevrgenError):
    """A bad argument, phrase or config value. Exit code 2, like a command-line usage error."""

    exit_code = 2


class PhraseError(UsageError):
    """A phrase that is not one of the 24 classes, or a bad phrase list."""


class ConfigError(UsageError):
    """An invalid config: ``problems`` holds one ``dotted.path: message`` line each."""

    def __init__(self, problems: list[str], source: str | None = None, what: str = "config"):
        self.problems = problems
        if what != "config" and len(problems) == 1:  # one bad option or --set: one line
            super().__init__(f"invalid {what}: {problems[0]}")
            return
        head = f"invalid {what}{f' {source}' if source else ''}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class DataError(ClevrgenError):
    """A missing, empty, corrupt or mislabelled dataset file."""


class CheckpointError(ClevrgenError):
    """A checkpoint that is missing, truncated or of the wrong kind."""


class Interrupted(ClevrgenError):
    """Work stopped by a signal at a clean point: exit 130 for Ctrl-C, 143 for SIGTERM (128 + the
    signal's number, as a shell reports a process the signal ended)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class ClevrgenWarning(UserWarning):
    """Something the user may want to know (the CLI prints it as ``warning: message``)."""


def warn(message: str) -> None:
    """Issue a :class:`ClevrgenWarning` (library users see a normal Python warning)."""
    import warnings

    warnings.warn(message, ClevrgenWarning, stacklevel=2)


def first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (library errors can run to a paragraph)."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    head, sep, _ = text.partition(". ")
    return head + ("." if sep else "")
