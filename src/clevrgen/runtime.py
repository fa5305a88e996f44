"""Device, precision, seeds, atomic file writes, the run folder's lock and clean stops on signals:
the same code path on the CPU and CUDA."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from clevrgen.errors import ClevrgenError, UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` is CUDA when there is one, else the CPU; asking for missing CUDA is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but no CUDA GPU is available: use cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype for a precision setting, or None for plain fp32."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: "torch.device", dtype: "torch.dtype | None") -> contextlib.AbstractContextManager:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopSignal(BaseException):
    """SIGTERM where no loop defers it: raised at once, like KeyboardInterrupt for Ctrl-C, so
    every ``finally`` and atomic writer cleans up on the way out. A BaseException, so no
    ``except Exception`` mistakes it for a failure of the code it interrupts."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {SIGNAL_NAMES.get(signum, signum)}")
        self.signum = signum


@dataclasses.dataclass
class StopRequest:
    """What :func:`deferred_stop` saw: the first stop signal, and whether a second Ctrl-C forced it."""

    signum: int = 0
    forced: bool = False

    @property
    def requested(self) -> bool:
        return bool(self.signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_stop(enabled: bool = True, repeat_forces: bool = True) -> Iterator[StopRequest]:
    """Within: a first Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, a SLURM preemption)
    only sets ``.signum``, so a loop can stop at a clean boundary (a half-done optimizer step
    would make a torn checkpoint). A second Ctrl-C raises KeyboardInterrupt at once, with
    ``.forced`` set, unless not ``repeat_forces`` (under torchrun each worker gets the
    terminal's Ctrl-C and torchrun's forwarded copy of it). A repeated SIGTERM is ignored: a
    scheduler that will not wait follows it with SIGKILL. Disabled, or outside the main thread,
    it does nothing."""
    state = StopRequest()
    if not enabled or not _in_main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.requested:
            if signum == signal.SIGINT and repeat_forces:
                state.forced = True
                raise KeyboardInterrupt
            return
        state.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises :class:`StopSignal` at once (Python's default would end the process
    with no cleanup and no message). Outside the main thread it does nothing."""
    if not _in_main_thread():
        yield
        return

    def handler(signum, frame):
        raise StopSignal(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopVote:
    """Whether any rank of a torchrun job was asked to stop, so that all stop after the same
    step: one all-reduce (MAX) of the signal number per call, over a CPU (gloo) group, so it
    never waits for the GPU. Run alone, it is the local answer at no cost."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.group = None
        if enabled:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":  # NCCL: a side group on the CPU
                self.group = dist.new_group(backend="gloo")

    def __call__(self, signum: int) -> int:
        if not self.enabled:
            return signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


# --- one writer per run folder -------------------------------------------------------------
LOCK_FILE = "train.lock"
_held_locks: dict[Path, int] = {}  # resolved folder -> depth of this process's holds


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job (or a process run alone): the one that writes the run folder."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_lock(folder: Path | str, enabled: bool = True) -> Iterator[None]:
    """Within: this process is the one writer of the run folder ``folder``, by an exclusive
    advisory lock (``fcntl.flock``) on ``folder/train.lock``. The OS drops the lock when the
    process ends, however it ends, so no stale lock survives a kill. A second writer fails at
    once, having written nothing, with a :class:`ClevrgenError` naming the holder's PID.
    Re-entrant within a process. Readers (sample, evaluate) take no lock. Where there is no
    ``fcntl`` (Windows), or not ``enabled`` (the other ranks of a torchrun job), it does nothing."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    folder = Path(folder)
    key = folder.resolve()
    if not enabled or fcntl is None:
        yield
        return
    if key in _held_locks:  # held by this process already (the command, then the library)
        _held_locks[key] += 1
        try:
            yield
        finally:
            _held_locks[key] -= 1
        return
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as exc:
        raise write_error(exc, path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = f"PID {holder}" if holder.isdigit() else "PID unknown"
            raise ClevrgenError(
                f"{folder} is being trained by another process ({pid}): one writer per run folder; wait for it "
                "to finish or stop it, or train into another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[key] = 0
        try:
            yield
        finally:
            del _held_locks[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a write that fails (disk full) is cut off again, so the file never
    ends in half a record, and ends in a :class:`WriteError`."""
    line = (json.dumps(record) + "\n").encode()
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


def user_cache_dir() -> Path:
    """``$CLEVRGEN_CACHE``, else ``$XDG_CACHE_HOME/clevrgen``, else ``~/.cache/clevrgen``."""
    if env := os.environ.get("CLEVRGEN_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clevrgen"


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    """Started by torchrun: a job of one process is a DDP job too (DDP, NCCL, the sync check)."""

    @property
    def enabled(self) -> bool:
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: "torch.device") -> tuple[Distributed, "torch.device"]:
    """Join the torchrun job described by the environment, if any: NCCL on GPUs, gloo on the CPU.

    Returns the job's shape and this rank's device (``cuda:LOCAL_RANK`` on GPUs).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it, even for 1 process
        return Distributed(), device
    import torch
    import torch.distributed as dist

    dist_info = Distributed(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")), True)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info, device
