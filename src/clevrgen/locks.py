"""One writer per folder: the lock of a run folder (:func:`run_lock`, on ``RUN/train.lock``) and
of a model folder (:func:`folder_lock`, on the folder itself). Both are exclusive advisory locks
(``fcntl.flock``) that the OS drops when the process ends, however it ends, so no stale lock
survives a kill; a second writer fails at once, having written nothing.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from clevrgen.errors import ClevrgenError
from clevrgen.filenames import LOCK_FILE
from clevrgen.output import UMASK, write_error

_held_locks: dict[Path, int] = {}  # resolved run folder -> depth of this process's holds
_held_folders: dict[Path, int] = {}  # resolved model folder -> depth of this process's holds
_HAS_FCNTL = importlib.util.find_spec("fcntl") is not None  # not on Windows


@contextlib.contextmanager
def _exclusive(held: dict[Path, int], key: Path, open_fd: Callable[[], int], refuse: Callable[[int], ClevrgenError],
               unsupported_ok: bool = False) -> Iterator[int | None]:
    """The one-writer mechanism of both locks below: an exclusive ``flock`` on the descriptor
    ``open_fd()`` opens, held to the end of the block. A second holder meets ``refuse(fd)`` at
    once; within this process it is re-entrant by ``key`` (``held`` counts the depth, and a
    re-entry yields None). ``unsupported_ok``: a file system that cannot lock leaves it unguarded.
    The OS drops the lock when the process ends, however it ends."""
    import fcntl

    if key in held:  # held by this process already (the command, then the library)
        held[key] += 1
        try:
            yield None
        finally:
            held[key] -= 1
        return
    fd = open_fd()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refuse(fd) from None
        except OSError:
            if not unsupported_ok:
                raise
        held[key] = 0
        try:
            yield fd
        finally:
            del held[key]
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _open_or_refuse(path: Path, flags: int, mode: int = 0o777) -> int:
    try:
        return os.open(path, flags, mode)
    except OSError as exc:
        raise write_error(exc, path) from None


@contextlib.contextmanager
def run_lock(folder: Path | str, enabled: bool = True) -> Iterator[None]:
    """Within: this process is the one writer of the run folder ``folder``, by an exclusive
    advisory lock (``fcntl.flock``) on ``folder/train.lock``. The OS drops the lock when the
    process ends, however it ends, so no stale lock survives a kill. A second writer fails at
    once, having written nothing, with a :class:`ClevrgenError` naming the holder's PID.
    Re-entrant within a process. Readers (sample, evaluate) take no lock. Where there is no
    ``fcntl`` (Windows), or not ``enabled`` (the other ranks of a torchrun job), it does nothing."""
    folder = Path(folder)
    if not enabled or not _HAS_FCNTL:
        yield
        return
    path = folder / LOCK_FILE
    made = [p for p in (folder, path) if not p.exists()]  # what a refused run takes away again
    before = _contents(folder)

    def open_fd() -> int:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, path) from None
        return _open_or_refuse(path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)

    def refuse(fd: int) -> ClevrgenError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        pid = f"PID {holder}" if holder.isdigit() else "PID unknown"
        return ClevrgenError(f"{folder} is being trained by another process ({pid}): one writer per run folder; wait "
                             "for it to finish or stop it, or train into another --out")

    with _exclusive(_held_locks, folder.resolve(), open_fd, refuse) as fd:
        if fd is None:
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                if _contents(folder) == before:  # refused before it wrote a file: the folder as it was
                    for p in reversed(made):
                        p.rmdir() if p.is_dir() else p.unlink()


def _contents(folder: Path) -> set[str]:
    """The names in ``folder`` but its lock: what a run wrote, if they changed while it held it."""
    return {p.name for p in folder.iterdir() if p.name != LOCK_FILE} if folder.is_dir() else set()


@contextlib.contextmanager
def folder_lock(folder: Path | str) -> Iterator[None]:
    """Within: this process is the one writer of the model folder ``folder`` (an export, a
    ``save_pretrained``, a checkpoint's artifact), by an exclusive advisory lock on the folder
    itself, so no lock file is left in the model. It creates ``folder`` (take it after every
    check that may still refuse the command). A second writer fails at once, having written
    nothing; the OS drops the lock when the process ends, however it ends. Re-entrant within a
    process; a no-op where there is no ``fcntl`` (Windows), unguarded on a file system that
    cannot lock a folder (NFS emulates flock by write locks)."""
    if not _HAS_FCNTL:
        yield
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = folder.resolve()
    except (OSError, RuntimeError) as exc:
        raise write_error(exc if isinstance(exc, OSError) else OSError(errno.ELOOP, str(exc)), folder) from None

    def refuse(fd: int) -> ClevrgenError:
        return ClevrgenError(f"{folder} is being written by another process (an export or a save): one writer per "
                             "output folder; wait for it to finish, or write into another folder")

    with _exclusive(_held_folders, key, lambda: _open_or_refuse(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)),
                    refuse, unsupported_ok=True):
        yield
