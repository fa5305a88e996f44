"""The one rule of which files clevrgen reads: regular files only (:func:`input_file`)."""

from __future__ import annotations

import os
from pathlib import Path

from clevrgen.errors import ClevrgenError
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
