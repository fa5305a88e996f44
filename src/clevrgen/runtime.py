"""Device, precision, seeds, clean stops on signals and torchrun's set-up: the same code path on
the CPU and CUDA. Writing files (atomic writes, the run lock, what an output may overwrite) is
``clevrgen.output``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from clevrgen.errors import UsageError, warn

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` is CUDA when there is one, else the CPU; asking for missing CUDA is an error.
    On CUDA it also turns on the GPU's fast math (:func:`use_fast_cuda_math`)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d{1,3})?", name):
        raise UsageError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but no CUDA GPU is available: use cpu or auto")
    if name.startswith("cuda"):
        use_fast_cuda_math()
    return torch.device(name)


def use_fast_cuda_math() -> None:
    """TF32 for fp32 matmuls and convolutions (what stays fp32 under autocast: the optimizer, the
    loss, sampling in fp32) and cuDNN's autotuner, which picks the fastest convolution for each
    of the few shapes a run uses. Settings of PyTorch's, global to the process; CPUs ignore them."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


@functools.cache  # the CPU does not change: ask PyTorch once per dtype, not per sampling batch
def cpu_has_kernels(dtype: "torch.dtype") -> bool:
    """Whether this CPU runs ``dtype``'s autocast ops (convolutions, matmuls) in oneDNN's kernels:
    bf16 needs AVX512 (native with AVX512-BF16 or AMX) or ARM's bf16, fp16 AVX512-FP16 or AMX-FP16.
    Without them PyTorch falls back to reference loops: a bf16 training step of ``cpu.toml`` ran
    24x slower than fp32 on an AVX2-only AMD EPYC (docs/benchmarks.md)."""
    import torch

    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch that cannot tell: trust the setting
        return True


def autocast_dtype(precision: str, device: "torch.device", warn_fallback: bool = False) -> "torch.dtype | None":
    """The autocast dtype for a precision setting, or None for plain fp32. "auto" is bf16 on CUDA
    and fp32 on the CPU. bf16 on a GPU without it (before Ampere) is fp16, which trains with
    :func:`grad_scaler`. "bf16" and "fp16" mean that precision where the device has kernels for
    it: on a CPU without them (:func:`cpu_has_kernels`) they compute in fp32, many times faster there
    (the images differ a little from bf16's; the shipped model scored the same on 8 passes of each
    split); ``warn_fallback`` says so (training)."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if warn_fallback:
            warn("precision = 'bf16': this GPU has no bf16 (it came with Ampere): computing in fp16 with a loss scaler")
        return torch.float16
    if dtype is not None and device.type == "cpu" and not cpu_has_kernels(dtype):
        if warn_fallback:
            warn(f"precision = {precision!r}: this CPU has no {precision} kernels (PyTorch sees "
                 f"{torch.backends.cpu.get_cpu_capability()}), where {precision} runs many times slower than fp32: "
                 "computing in fp32")
        return None
    return dtype


def grad_scaler(device: "torch.device", dtype: "torch.dtype | None") -> "torch.amp.GradScaler | None":
    """The loss scaler that fp16 training needs (its small range underflows gradients, and an
    overflow makes them inf): a step whose gradients are not finite is skipped, never applied,
    and the scale adapts. None for bf16 and fp32, which keep fp32's range."""
    import torch

    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


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


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job (or a process run alone): the one that writes the run folder."""
    return os.environ.get("RANK", "0") == "0"


def machine_name(device: "torch.device | None" = None) -> str:
    """The processor's name (a GPU's on CUDA) and core count, for the record of a run or a figure."""
    import platform

    import torch

    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's ``MemAvailable``), None where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


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

    def mean(self, value: "torch.Tensor") -> "torch.Tensor":
        """``value`` averaged over the ranks (itself when run alone)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        """Wait for every rank (nothing when run alone)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def in_sync(self, parameters) -> bool:
        """Whether every rank holds exactly the same ``parameters`` (a check at the end of a DDP
        run): three sums of the weights, in float64, gathered from every rank and compared."""
        import torch
        import torch.distributed as dist

        flat = torch.cat([p.detach().double().flatten() for p in parameters])
        stats = torch.stack([flat.sum(), flat.square().sum(), (flat * torch.arange(len(flat), device=flat.device)).sum()])
        gathered = [torch.empty_like(stats) for _ in range(self.world_size)]
        dist.all_gather(gathered, stats)
        return all(torch.equal(g, gathered[0]) for g in gathered)


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
