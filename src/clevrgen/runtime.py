"""Device, precision, seeds and atomic file writes: the same code path on the CPU and CUDA."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
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


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    Commands call :func:`check_writable` once, before any work; here a failed write still ends
    in one clear message.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ClevrgenError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide a shared run from its group
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:  # disk full, a folder in the way...
            raise ClevrgenError(f"cannot write {path}: {exc.strerror or exc}") from None
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
    atomic_write(path, lambda f: f.write(text.encode()))


@contextlib.contextmanager
def deferred_sigint(enabled: bool = True) -> Iterator[Any]:
    """Within: a first Ctrl-C (SIGINT) only sets ``.requested``, so a loop can stop at a clean
    boundary (a half-done optimizer step would make a torn checkpoint); a second one raises
    KeyboardInterrupt at once, with ``.forced`` set. Disabled, or outside the main thread, it
    does nothing (Ctrl-C raises KeyboardInterrupt as usual)."""
    import signal
    import threading
    import types

    state = types.SimpleNamespace(requested=False, forced=False)
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.requested:
            state.forced = True
            raise KeyboardInterrupt
        state.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
