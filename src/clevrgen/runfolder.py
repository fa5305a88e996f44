"""A run folder's bookkeeping: where its numbers go (``metrics.jsonl``, TensorBoard), the loss
window each record sums up (``LossWindow``), its resumable state (``state.pt``) and what a
failure left of it.

    RUN/config.toml        the resolved config          RUN/state.pt       the resumable state
    RUN/metrics.jsonl      the record                   RUN/snapshots/     EMA weights of past steps
    RUN/tensorboard/       the same, for TensorBoard    RUN/unet/ ...      the artifact (clevrgen.model)
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clevrgen.errors import ClevrgenError, UsageError
from clevrgen.filenames import (  # noqa: F401  (SNAPSHOTS_DIR: the run folder's names, used by callers)
    METRICS_FILE, SNAPSHOTS_DIR, STATE_FILE, TENSORBOARD_DIR)
from clevrgen.inputs import input_file
from clevrgen.output import append_jsonl, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from clevrgen.runtime import Distributed
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "images_per_second": "train/images_per_second",
                    "val_loss": "eval/held_out_loss"}
"""metrics.jsonl keys as TensorBoard tags; the rest (judge accuracies) go under eval/."""


def write_state(run_dir: Path, state: dict) -> None:
    """``state.pt``, atomically. torch.save to a full disk fails as a RuntimeError with no errno,
    so the state is serialized to memory first and written as bytes (a plain OSError)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / STATE_FILE, buffer.getbuffer())


def read_state(run_dir: Path) -> dict:
    return torch.load(input_file(run_dir / STATE_FILE), map_location="cpu", weights_only=True)


def require_checkpoint(run_dir: Path) -> Path:
    """The run's checkpoint file, or the error a resume of a folder without one gives (checked
    before the data loads, so that a wrong folder fails at once)."""
    from clevrgen.errors import CheckpointError

    path = run_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (is {run_dir} a training run?)")
    return path


OBJECTIVE = ("prediction_type", "num_train_timesteps", "beta_schedule")
"""What the network learns to predict and on which noise schedule: a resume may not change them."""


def check_same_objective(run_dir: Path, diffusion) -> None:
    """A resume trains on with the objective and noise schedule its checkpoint was trained with, as
    ``RUN/scheduler/`` (written with every checkpoint) records them; another one, given by ``--set``
    or by an edit of ``config.toml``, is refused as a change of EMA kind is, before anything is
    rewritten."""
    from clevrgen.diffusion import training_scheduler
    from clevrgen.errors import CheckpointError
    from clevrgen.filenames import SCHEDULER_DIR
    from clevrgen.inputs import read_json

    saved_file = run_dir / SCHEDULER_DIR / "scheduler_config.json"
    if not saved_file.is_file():  # a run of an older layout: nothing to compare with
        return
    saved = read_json(saved_file, CheckpointError, "; the run folder is damaged")
    wanted = training_scheduler(diffusion).config
    for key in OBJECTIVE:
        if isinstance(saved, dict) and key in saved and saved[key] != wanted[key]:
            was = {"squaredcos_cap_v2": "cosine"}.get(saved[key], saved[key])  # the scheduler's name, the config's
            raise CheckpointError(
                f"cannot resume from {run_dir / STATE_FILE}: the checkpoint was trained with "
                f"diffusion.{key} = {was!r}, but the config asks for {getattr(diffusion, key)!r}, and the objective "
                f"and noise schedule cannot change on a resume: put diffusion.{key} back in {run_dir / 'config.toml'} "
                f"(or drop the --set), or start a new run from these weights with train.init={run_dir}")


class RunLog:
    """Where a run's numbers go: ``metrics.jsonl`` (the record, one JSON object per line) and,
    with ``train.tensorboard``, the same scalars and the sample grids in ``RUN/tensorboard/``."""

    def __init__(self, run_dir: Path, tensorboard: bool, step: int = 0):
        self.path = run_dir / METRICS_FILE
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run forgets the events written after its checkpoint, as metrics.jsonl does.
            self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        append_jsonl(self.path, record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(TENSORBOARD_TAGS.get(key, f"eval/{key}"), value, record["step"])
            self.writer.flush()

    def grid(self, images: torch.Tensor, step: int) -> None:
        """uint8 images [N, 3, H, W] as one image of the run's samples."""
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image("samples/new_test", make_grid(images, nrow=8), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LossWindow:
    """The steps since the last log record: their loss, summed on the device (no step waits for
    it), how many they were, the images they drew (all ranks) and when the window opened. Its
    loss and steps are part of the checkpoint, so a resumed window logs exactly."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.run_dir, self.device = run_dir, device
        self.loss, self.steps = torch.zeros((), device=device), 0
        self.start, self.images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images

    def mean_loss(self, dist: Distributed, step: int) -> float:
        """The window's mean loss over all ranks (so every rank logs, and stops, on the same
        value), refusing a non-finite one: no checkpoint ever holds weights a NaN has touched."""
        loss = (dist.mean(self.loss) / self.steps).item()  # the loop's one wait for the device
        if not math.isfinite(loss):
            raise ClevrgenError(f"the loss became non-finite ({loss}) by step {step}; "
                                f"{checkpoint_note(self.run_dir, kept=True)}. Try a lower train.lr or "
                                "train.precision='fp32'.")
        return loss

    def record(self, step: int, loss: float, lr: float) -> dict:
        """The log record of the window: the step, its mean loss, the lr and the speed."""
        seconds = time.perf_counter() - self.start
        return {"step": step, "loss": loss, "lr": lr, "images_per_second": self.images / seconds}

    def start_clock(self) -> None:
        """Time the window from now (as a run starts: a resumed window keeps its loss and steps)."""
        self.start, self.images = time.perf_counter(), 0

    def restart(self) -> None:
        """Open the next window."""
        self.loss, self.steps = torch.zeros((), device=self.device), 0
        self.start_clock()

    def state_dict(self) -> dict:
        return {"loss": self.loss.detach().cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.steps = state["loss"].to(self.device), int(state["steps"])


def require_tensorboard() -> None:
    """``train.tensorboard`` needs the tensorboard package: say so before any work."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("train.tensorboard needs the tensorboard package: pip install 'clevrgen[tensorboard]'")


def checkpoint_note(run_dir: Path, kept: bool = False) -> str:
    """What a failure left: the step of the intact ``state.pt`` (read back to be sure), or that
    none was saved. ``kept``: the note of a stop that leaves the disk as it is (no "make room")."""
    try:
        step = int(torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)["step"])
    except FileNotFoundError:
        return "no checkpoint had been saved yet"
    except Exception:
        return f"{run_dir / STATE_FILE} cannot be read back"
    if kept:
        return f"the last good checkpoint, {run_dir / STATE_FILE} at step {step}, is kept"
    return f"the last checkpoint, at step {step}, is intact. Make room, then resume with: clevrgen train --resume {run_dir}"


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the records a killed run wrote after its last checkpoint: they are trained again."""
    from clevrgen.report import read_metrics

    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
