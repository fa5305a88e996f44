"""Writing files: one clear error for a write that fails (:class:`WriteError`), atomic writes, and
JSON lines. What an output may replace is :mod:`clevrgen.claims`; one writer per folder is
:mod:`clevrgen.locks`; which files are read is :mod:`clevrgen.inputs`.

A file is written beside its target and renamed into place (:func:`atomic_path`), so a kill at
any moment leaves the old file or the new one; a FIFO or a device is never replaced, and a
symbolic link is followed (:func:`output_file`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from clevrgen.errors import ClevrgenError, UsageError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import: os.umask is process-wide, and writers run in threads


# A write the storage refused for want of room (disk full, quota) or of a writable file system.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class WriteError(ClevrgenError):
    """A file or folder that could not be written; ``path``, ``errno``, ``needed`` bytes (if known)."""

    def __init__(self, message: str, path: Path, err: int | None = None, needed: int | None = None):
        super().__init__(message)
        self.path, self.errno, self.needed = path, err, needed

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_ERRNOS


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _free_bytes(path: Path) -> int | None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def os_error_of(exc: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write, if it was one: an OSError with an errno, a library's
    wrapped one (safetensors' Rust writer says ``... (os error 28)``), or any failure on a
    file system left without free space (torch.save's ``unexpected pos`` RuntimeError).
    Call it before removing the temporary, which holds the space that ran out."""
    if isinstance(exc, OSError) and exc.errno:
        return exc
    if not isinstance(exc, Exception):  # KeyboardInterrupt, a stop signal: not the disk
        return None
    if match := re.search(r"os error (\d+)", str(exc)):
        number = int(match.group(1))
        return OSError(number, os.strerror(number))
    free = _free_bytes(path.parent)
    if free is not None and free < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def write_error(err: OSError, path: Path, needed: int | None = None) -> WriteError:
    """``cannot write PATH (SIZE): REASON (FREE free)``, one line; call it after the temporary
    is removed, so the free space is what the next try would have."""
    size = f" ({_megabytes(needed)})" if needed else ""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and (free := _free_bytes(path.parent)) is not None:
        reason += f" ({_megabytes(free)} free)"
    return WriteError(f"cannot write {path}{size}: {reason}", path, err.errno, needed)


@contextlib.contextmanager
def atomic_path(path: Path | str, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    Commands call :func:`clevrgen.claims.check_writable` once, before any work; here a failed
    write still ends in one clear message (:class:`WriteError`: a full disk, a quota, a read-only
    file system), the temporary is removed and the old file kept. ``needed``: the bytes to be
    written, if known, for the message.
    """
    path = output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:120]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(exc, path, needed) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp's 0600 would hide a shared run from its group
        os.replace(tmp_path, path)
    except BaseException as exc:
        err = os_error_of(exc, path)
        tmp_path.unlink(missing_ok=True)
        if err is not None:  # disk full, a folder in the way...
            raise write_error(err, path, needed) from None
        raise


def share_files(folder: Path) -> None:
    """Give the files a library wrote into ``folder`` the umask's permissions, as :func:`atomic_path`
    does: diffusers writes weights through a 0600 temporary, which would hide a model exported to
    share from everyone else."""
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o666 & ~UMASK)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that writers killed mid-write left in ``folder`` (and its
    ``samples/``). Only for a folder no other process is writing, e.g. a run being resumed."""
    removed = []
    for sub in (folder, folder / "samples"):
        for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def atomic_write(path: Path | str, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` atomically through ``writer(file)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer(f)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path | str, data: bytes | memoryview) -> None:
    """Write ``data`` atomically; a failure names the bytes that were needed."""
    with atomic_path(path, needed=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)



def strict_json(value: Any, **kwargs) -> str:
    """JSON that every parser reads: a non-finite float (nan, inf) is written as null, never as
    Python's ``NaN`` or ``Infinity``."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a write that fails (disk full) is cut off again, so the file never
    ends in half a record, and ends in a :class:`WriteError`."""
    line = (strict_json(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~UMASK)
    except OSError as exc:
        raise write_error(exc, Path(path), len(line)) from None
    size = os.fstat(fd).st_size
    try:
        if os.write(fd, line) != len(line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise write_error(exc, Path(path), len(line)) from None
    finally:
        os.close(fd)


def output_file(path: Path | str) -> Path:
    """Where a file output really goes: a symbolic link is followed (its target is written; the
    link stays), and a FIFO, a device or a socket is refused, never replaced by a regular file."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new file, or one check_writable explains
        return path
    except OSError as exc:
        raise ClevrgenError(f"cannot write {path}: {exc.strerror}") from None
    if what := special_file(mode):
        raise UsageError(f"cannot write {path}: it is {what}, not a regular file; clevrgen writes whole files "
                         "atomically and never replaces a special file: give a file name")
    return path


def special_file(mode: int) -> str | None:
    """What a special file is (a FIFO, a device, a socket), or None for a regular file or folder."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket")

