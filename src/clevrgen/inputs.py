"""The one rule of which files clevrgen reads: regular files only (:func:`input_file`); and the
one reader of JSON files (:func:`read_json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from clevrgen.errors import ClevrgenError, DataError, first_line
from clevrgen.output import special_file


def input_file(path: Path | str) -> Path:
    """The one rule of which files clevrgen reads: regular files only. A FIFO, a device or a
    socket is refused before it is opened (opening a FIFO blocks until a writer comes, and no
    signal ends the wait), in one line. A missing file passes: its reader says what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path
    if what := special_file(mode):
        raise ClevrgenError(f"cannot read {path}: it is {what}, not a regular file; clevrgen reads only regular "
                            "files (a FIFO or a device could block forever): replace it with the file itself")
    return path


def read_json(path: Path | str, error: type[ClevrgenError] = DataError, hint: str = "") -> object:
    """The one reader of JSON files (a split, a dataset's ``train.json``, a run's records): any
    failure to read or parse one (not JSON, not UTF-8, nested deeper than the parser goes) is one
    ``error`` naming the file, followed by ``hint`` (what to do about it)."""
    path = input_file(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or first_line(exc)}{hint}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply to read){hint}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: not valid JSON ({first_line(exc)}){hint}") from None
