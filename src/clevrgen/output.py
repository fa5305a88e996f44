"""Writing files: atomic writes, the one-writer locks of a run folder and of a model folder, and the one rule of what an
output may overwrite, which every command follows.

A command that writes a folder claims it first (:func:`claim_folder`): a new or empty folder, or
its own earlier output of the same kind, and nothing else. A file is written beside its target
and renamed into place (:func:`atomic_path`), so a kill at any moment leaves the old file or the
new one; a FIFO or a device is never replaced, and a symbolic link is followed.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from clevrgen.errors import ClevrgenError, UsageError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask is process-wide, and writers run in threads


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
    Commands call :func:`check_writable` once, before any work; here a failed write still ends
    in one clear message (:class:`WriteError`: a full disk, a quota, a read-only file system),
    the temporary is removed and the old file kept. ``needed``: the bytes to be written, if
    known, for the message.
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
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide a shared run from its group
        os.replace(tmp_path, path)
    except BaseException as exc:
        err = os_error_of(exc, path)
        tmp_path.unlink(missing_ok=True)
        if err is not None:  # disk full, a folder in the way...
            raise write_error(err, path, needed) from None
        raise


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


def check_writable(path: Path | str, folder: bool = False) -> None:
    """Fail early, before any work, when ``path`` (a file, or with ``folder`` a folder) cannot be
    written: a folder where a file should go, a file where a folder should go, no permission."""
    path = Path(path)
    if problem := name_too_long(path):
        raise UsageError(f"cannot write {path}: {problem}")
    # a file output's own dangling link is followed (its target is written); nothing passes a broken folder
    if link := broken_link(path if folder else path.parent):
        raise ClevrgenError(f"cannot write {path}: {describe_broken_link(link)}")
    if not folder:
        path = output_file(path)
    if path.is_dir() and not folder:
        raise ClevrgenError(f"cannot write {path}: it is a folder, not a file; give a file name")
    if path.exists() and not path.is_dir() and folder:
        raise ClevrgenError(f"cannot write into {path}: it is a file, not a folder")
    parent = path if folder else path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ClevrgenError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or _is_virtual(existing):
        raise ClevrgenError(f"cannot write {path}: {existing} is not writable")


def name_too_long(path: Path | str) -> str | None:
    """Why the OS would refuse ``path`` for a name over :data:`NAME_MAX` bytes, or None: the one
    check of a name's length, for outputs (before any work) and inputs (the CLI's last net)."""
    long = next((part for part in Path(path).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is None:
        return None
    return f"the name {long[:40]}... is {len(os.fsencode(long))} bytes long; file systems allow {NAME_MAX} per name"


def broken_link(path: Path) -> Path | None:
    """``path`` or the first of its parents that is a symbolic link leading nowhere (to a missing
    target, or round a loop): nothing can be written through it."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return p
    return None


def describe_broken_link(link: Path) -> str:
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{link} is a symbolic link that loops back on itself: remove it or point it at a folder"
    return f"{link} is a symbolic link to {os.readlink(link)}, which does not exist: create it or remove the link"


def _is_virtual(folder: Path) -> bool:
    """/proc and /sys accept no new folders, even from root (whom os.access always allows)."""
    resolved = folder.resolve()
    return resolved.parts[:2] in (("/", "proc"), ("/", "sys"))


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


# --- one writer per run folder -------------------------------------------------------------
LOCK_FILE = "train.lock"
_held_locks: dict[Path, int] = {}  # resolved folder -> depth of this process's holds
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

    def open_fd() -> int:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, path) from None
        return _open_or_refuse(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)

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


_held_folders: dict[Path, int] = {}  # resolved folder -> depth of this process's holds


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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~_UMASK)
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


# --- what an output may overwrite --------------------------------------------------------------
FOLDER_KINDS = {
    "run": "a training run",
    "model": "a clevrgen model (an export, a snapshot or a pipeline)",
    "evaluation": "an evaluation",
    "dataset": "a dataset",
    "judge": "a judge's training folder",
}
NAME_MAX = 255
"""The longest file or folder name (in bytes) that Linux, macOS and Windows file systems take."""
OWN_OUTPUT = {"run": "a run it started without a checkpoint", "model": "an earlier export",
              "evaluation": "an earlier evaluation", "dataset": "an earlier render of the same settings",
              "judge": "an earlier judge's folder"}
# Files clevrgen leaves in any folder it writes, which say nothing about what the folder is.
_INCIDENTAL = {LOCK_FILE, ".DS_Store"}
PASSES_DIR = ".passes"
"""An evaluation's finished passes, kept until it is done: a stopped evaluation resumes from them."""


def _names(folder: Path) -> set[str]:
    """The names in ``folder`` that say what it is: not the lock, not a writer's temporaries."""
    names = {p.name for p in folder.iterdir()} - _INCIDENTAL
    return {n for n in names if not (n.startswith(".") and n.endswith(".tmp"))}


def folder_kind(folder: Path) -> str | None:
    """What clevrgen output ``folder`` holds, by the files that make it one: ``run``, ``model``,
    ``evaluation``, ``dataset`` or ``judge``; None for an empty folder; ``other`` for anything else."""
    names = _names(folder)
    if not names:
        return None
    weights = any(n.endswith(".safetensors") for n in names)
    if "state.pt" in names:
        return "run"
    if unfinished := unfinished_kind(folder, names):
        return unfinished
    if {"metrics.jsonl", "config.toml"} <= names and not weights:
        return "run"
    if "results.json" in names or PASSES_DIR in names:  # done, or stopped part way
        return "evaluation"
    if "config.toml" in names and ({"unet", "model_index.json"} & names):
        return "model"
    if "train.json" in names or "iclevr" in names:
        return "dataset"
    if "config.toml" in names and weights:
        return "judge"
    return "other"


# --- the rerun rule: a command's own unfinished output is its own ------------------------------
# What each writer leaves before its output is whole, so that its rerun (and nothing else) may
# take the folder over: an export or save_pretrained stopped before config.toml and
# model_index.json (written last); a training run or a judge's training stopped before its first
# checkpoint (a disk full, a non-finite loss, a signal), which leaves only its bookkeeping.
_MODEL_PARTS = {"unet", "label_encoder", "scheduler", "config.toml", "training_data.json", "model_index.json",
                "pipeline_clevrgen.py", "label_proj.safetensors"}
_BOOKKEEPING = {"config.toml", "metrics.jsonl", "training_data.json", "loss.png", "samples", "tensorboard"}
UNFINISHED = {"model": "an unfinished export (stopped before its config.toml and model_index.json)",
              "run": "a training run stopped before its first checkpoint",
              "judge": "a judge's training stopped before it saved a judge"}


def unfinished_kind(folder: Path, names: set[str] | None = None) -> str | None:
    """The kind of a command's own output in ``folder`` that stopped before it was whole, or None:
    ``model``, ``run`` (its folder holds training's lock file) or ``judge``."""
    if names is None:
        names = _names(folder)
    parts = {n[1:].removesuffix(".old") if n.startswith(".") and n.endswith(".old") else n for n in names}
    if parts & {"unet", "label_encoder", "scheduler"} and parts <= _MODEL_PARTS and "config.toml" not in parts:
        return "model"
    if "config.toml" in names and names <= _BOOKKEEPING and _written_by_clevrgen(folder / "config.toml"):
        return "run" if (folder / LOCK_FILE).exists() else "judge"
    return None


def _written_by_clevrgen(config: Path) -> bool:
    """A config.toml clevrgen resolved and wrote (every section), not one a user wrote by hand."""
    try:
        lines = set(config.read_text().splitlines())
    except (OSError, UnicodeDecodeError):
        return False
    return {"[data]", "[model]", "[diffusion]", "[train]", "[sample]", "[evaluate]", "[judge]"} <= lines


def describe_folder(folder: Path) -> str:
    """What is in ``folder``, in words, for a refusal."""
    kind = folder_kind(folder)
    if (unfinished := unfinished_kind(folder)) is not None and unfinished == kind:
        return UNFINISHED[kind]
    if kind in FOLDER_KINDS:
        detail = {"run": "state.pt", "model": "config.toml, unet/", "evaluation": "results.json",
                  "dataset": "train.json, iclevr/", "judge": "config.toml, *.safetensors"}[kind]
        return f"{FOLDER_KINDS[kind]} ({detail})"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in _INCIDENTAL)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"other files ({shown})"


def claim_folder(folder: Path | str, kind: str, option: str = "--out") -> None:
    """The one rule for an output folder: a new or empty folder, or this command's own earlier
    output of the same ``kind``, may be written; anything else (a dataset, a training run, an
    export, an evaluation, a folder of other files) is refused in one line saying what is there,
    before any work."""
    folder = Path(folder)
    check_writable(folder, folder=True)
    if not folder.is_dir():
        return
    found = folder_kind(folder)
    if found is not None and found == kind and unfinished_kind(folder) == kind:
        from clevrgen.errors import warn

        warn(f"{folder} holds {UNFINISHED[kind]}: this is its rerun, which starts it over")
    if found is None or found == kind:
        return
    raise UsageError(f"{option} {folder} already holds {describe_folder(folder)}; this command writes only into a "
                     f"new or empty folder or {OWN_OUTPUT[kind]}: choose another {option}")


# A file output replaces only a file of its own kind, read from the file's first bytes (its name
# may lie: `-o RUN/state.pt`): an image over an image, never a checkpoint, weights or a config.
FILE_KINDS = {
    "image": "an image",
    "weights": "safetensors weights",
    "course_judge": "a course-format judge (.pth)",
    "torch": "a torch checkpoint",
    "text": "a text file (a config, JSON or notes)",
    "other": "a file of another kind",
}
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def file_kind(path: Path) -> str | None:
    """What the existing file ``path`` holds, by its first bytes: ``image``, ``weights``
    (safetensors), ``course_judge`` (a torch file holding only ``model``), ``torch``, ``text`` or
    ``other``; None for an empty file (nothing to lose)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return None
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 << 20:
        return "weights"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        import torch

        try:
            keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK")))
        except Exception:
            return "torch"
        return "course_judge" if keys == {"model"} else "torch"
    try:
        head.decode()
    except UnicodeDecodeError:
        return "other"
    return "text"


def claim_file(path: Path | str, kind: str, option: str = "--out") -> None:
    """The one rule for an output file, beside :func:`claim_folder`'s for folders: a new or empty
    file, or a file of this command's own ``kind`` (an image over an image), may be replaced;
    a checkpoint, weights, a config or a dataset's JSON never is. Checked before any work."""
    check_writable(path)
    target = output_file(path)
    if not target.is_file():
        return
    found = file_kind(target)
    if found is None or found == kind:
        return
    raise UsageError(f"{option} {path} already holds {FILE_KINDS[found]}; this command replaces only "
                     f"{FILE_KINDS[kind]}: choose another {option}")


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
    if what := _special(mode):
        raise UsageError(f"cannot write {path}: it is {what}, not a regular file; clevrgen writes whole files "
                         "atomically and never replaces a special file: give a file name")
    return path


def _special(mode: int) -> str | None:
    """What a special file is (a FIFO, a device, a socket), or None for a regular file or folder."""
    import stat

    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket")


def input_file(path: Path | str) -> Path:
    """The one rule of which files clevrgen reads: regular files only. A FIFO, a device or a
    socket is refused before it is opened (opening a FIFO blocks until a writer comes, and no
    signal ends the wait), in one line. A missing file passes: its reader says what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path
    if what := _special(mode):
        raise ClevrgenError(f"cannot read {path}: it is {what}, not a regular file; clevrgen reads only regular "
                            "files (a FIFO or a device could block forever): replace it with the file itself")
    return path
