"""The training loop, in the manner of nanoGPT: ``Trainer.run`` reads top to bottom (a step, its
loss, what is due by the run's calendar ``due_after``, the log record, a sample grid, a snapshot,
the checkpoint, a stop); the step is ``train_step``, the run's state ``state_dict`` /
``load_state_dict``. The pieces live next to what they serve: the batches next to the data
(``clevrgen.data.batches``), the objective in ``clevrgen.loss``, the weights' average in
``clevrgen.ema``, a start from a saved model in ``clevrgen.artifact.init_from``, what a run measures in
``clevrgen.monitor``, its folder and loss window in ``clevrgen.runfolder``.

One code path for the CPU and CUDA: precision, compile and channels-last are settings. All
randomness of the loop flows through one generator whose state is checkpointed, so a resumed run
on the CPU continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from clevrgen import monitor
from clevrgen.config import Config, TrainConfig, to_toml
from clevrgen.data.batches import batch_seed, place_data
from clevrgen.data.iclevr import ImageSet
from clevrgen.diffusion import training_scheduler
from clevrgen.ema import check_classic_resume, make_ema
from clevrgen.errors import CheckpointError, Interrupted, UsageError, first_line
from clevrgen.loss import diffusion_loss
from clevrgen.artifact import init_from, save_artifact
from clevrgen.callbacks import SamplingStopped
from clevrgen.locks import run_lock
from clevrgen.model import LabelConditionedUNet, build_model, set_attention_kernel, warn_if_upsampled
from clevrgen.record import resumed_record
from clevrgen.optim import load_optimizer_state, make_optimizer, warn_about_lr_plan
from clevrgen.output import WriteError, append_jsonl, atomic_write_text
from clevrgen.runfolder import (
    METRICS_FILE, SNAPSHOTS_DIR, STATE_FILE, LossWindow, RunLog, check_same_objective, checkpoint_note,
    drop_metrics_after, read_state, require_checkpoint, write_state,
)
from clevrgen.runtime import (SIGNAL_NAMES, Distributed, StopVote, autocast_dtype, deferred_stop, grad_scaler,
                              init_distributed, resolve_device)


class TrainingInterrupted(Interrupted):
    """Training stopped by Ctrl-C (exit 130) or SIGTERM (exit 143)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float
    images_per_second: float
    val_loss: float | None
    world_size: int = 1
    is_main: bool = True


@dataclass(frozen=True)
class Due:
    """What a run does after a step (``measure``: the held-out loss and judge accuracies)."""

    log: bool
    measure: bool
    sample: bool
    snapshot: bool
    checkpoint: bool


def due_after(step: int, t: TrainConfig) -> Due:
    """The run's calendar: what is due after ``step`` by ``train.*_every`` (``t``). The last step
    logs, measures, samples, snapshots and saves whatever the intervals say (a run of 8,500 steps
    that snapshots every 1,000 keeps its end too); a measurement is logged."""
    last = step == t.steps
    measure = step % t.eval_every == 0 or last
    return Due(log=step % t.log_every == 0 or measure, measure=measure, sample=step % t.sample_every == 0 or last,
               snapshot=bool(t.snapshot_every) and (step % t.snapshot_every == 0 or last),
               checkpoint=step % t.checkpoint_every == 0 or last)


def place_model(model: LabelConditionedUNet, cfg: Config, dist: Distributed, device: torch.device):
    """``model`` on ``device`` with the config's attention kernel and layout; and what the loss
    calls: the model, wrapped by DDP and ``torch.compile`` as the config asks."""
    model = model.to(device)
    set_attention_kernel(model, cfg.train.attention_kernel)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        forward = torch.compile(forward)
    return model, forward


def stopped_message(how: str, step: int, steps: int, run_dir: Path) -> str:
    """What a stop after a whole step says: how to resume, or, at the run's last step (the stop
    came in its evaluation or sample grid), that there is nothing left to resume."""
    if step >= steps:
        return (f"{how} at step {step}, the run's last; checkpoint saved: training is complete ({run_dir} holds "
                "its model; the last step's evaluation or sample grid was cut short)")
    return f"{how} at step {step}; checkpoint saved. Resume with: clevrgen train --resume {run_dir}"


class Trainer:
    """Owns the model, EMA, optimizer, data and run folder of one training run."""

    def __init__(self, cfg: Config, run_dir: Path, data: ImageSet, progress: bool = True, resume: bool = False):
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.dist, self.device = init_distributed(resolve_device(cfg.train.device))
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device, warn_fallback=self.dist.is_main)
        from clevrgen.pipeline_inputs import check_sample_steps

        check_sample_steps(cfg)  # the sample grids and accuracy checks draw with sample.steps
        self.data = place_data(data, cfg, self.device, self.dist.rank, self.dist.world_size,
                               progress=progress and self.dist.is_main)
        self.training_data = dict(self.data.record)  # the artifact's record: the data, where the weights came from
        torch.manual_seed(cfg.train.seed)
        if self.dist.is_main:
            warn_if_upsampled(cfg.model)
        self.model = build_model(cfg.model)
        if resume:
            self.training_data = resumed_record(self.training_data, run_dir)
        elif cfg.train.init:
            self.training_data.update(init_from(self.model, cfg))
        self.model, self.forward = place_model(self.model, cfg, self.dist, self.device)
        self.ema = make_ema(self.model, cfg) if self.dist.is_main else None
        self.power_ema = bool(cfg.train.ema_sigma_rels)
        self.optimizer, self.lr_schedule = make_optimizer(self.model, cfg.train)
        self.scaler = grad_scaler(self.device, self.amp_dtype)  # fp16 only
        self.noise_scheduler = training_scheduler(cfg.diffusion)
        self.gen = torch.Generator(self.device).manual_seed(batch_seed(cfg.train.seed, self.dist.rank))
        self.step = 0
        self.window = LossWindow(run_dir, self.device)  # the steps since the last log record
        self.loss, self.ips, self.val_loss = float("nan"), float("nan"), None  # the last ones logged
        self.stop_requested = lambda: False  # while run() loops: whether a stop signal came

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train from ``self.step`` to ``train.steps``; a stop signal ends it after a whole step, saved."""
        from rich.progress import TextColumn

        from clevrgen.progress import make_progress

        t, main = self.cfg.train, self.dist.is_main
        self.start_run()
        log = RunLog(self.run_dir, t.tensorboard, self.step) if main else None
        self.window.start_clock()
        bar = make_progress(TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                            enabled=self.progress and main)
        interrupt = None
        stop_vote = StopVote(self.dist.enabled)  # under DDP every rank stops after the same step
        try:
            with bar, deferred_stop(repeat_forces=not self.dist.enabled) as interrupt:
                self.stop_requested = lambda: interrupt.requested  # periodic sampling ends within a step
                task = bar.add_task("training", total=t.steps, completed=self.step, loss=float("nan"), ips=0.0)
                while self.step < t.steps:
                    self.window.add(self.train_step(), t.batch_size * self.dist.world_size)
                    due = due_after(self.step, t)
                    if due.log or due.checkpoint:
                        self.loss = self.window.mean_loss(self.dist, self.step)
                    if due.log:
                        self.log_window(log, due.measure)
                    if main and due.sample and not self.stop_requested():
                        with contextlib.suppress(SamplingStopped):  # a stop skips the grid
                            log.grid(monitor.sample_grid(self.ema_model(), self.cfg, self.device, self.amp_dtype,
                                                         self.run_dir / "samples" / f"step_{self.step:07d}.png",
                                                         self.stop_requested), self.step)
                    if main and due.snapshot:
                        self.save_snapshot()
                    if due.checkpoint:
                        self.checkpoint()
                    bar.update(task, completed=self.step, loss=self.loss, ips=self.ips)
                    # Ctrl-C or SIGTERM: stop between two whole steps; under DDP the ranks vote at log steps
                    if (due.log or not self.dist.enabled) and (signum := stop_vote(interrupt.signum)):
                        self.stop(signum, saved=due.checkpoint)
        except KeyboardInterrupt:
            resume = f"Resume with: clevrgen train --resume {self.run_dir}"
            if interrupt is not None and interrupt.forced:
                raise TrainingInterrupted(f"interrupted twice at step {self.step}: stopped without saving; "
                                          f"{self.run_dir} keeps its last checkpoint. {resume}") from None
            if main:
                self.save_checkpoint()
            raise TrainingInterrupted(stopped_message("interrupted", self.step, t.steps, self.run_dir)) from None
        finally:
            if log is not None:
                log.close()
        self.finish_run()
        return TrainResult(self.run_dir, self.step, self.loss, self.ips, self.val_loss, self.dist.world_size, main)

    def train_step(self) -> torch.Tensor:
        """One optimizer step; the loss stays on the device (no sync)."""
        x0, labels, inputs = self.data.draw(self.cfg, self.gen, self.step)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        # as many object tokens as the data's largest scene: a fixed shape, no step waits for the device
        denoiser = functools.partial(self.forward, num_objects=self.training_data["max_objects"], **inputs)
        loss = diffusion_loss(denoiser, self.noise_scheduler, x0, labels, self.gen, self.amp_dtype, self.cfg.diffusion)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
        else:  # fp16: gradients scaled up, checked, unscaled; a non-finite step is skipped
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        self.step += 1
        return loss.detach()

    def log_window(self, log: RunLog | None, measure: bool) -> None:
        """Log the window (``measure``: with what the monitor measures of the EMA model) on the main
        rank, keep its speed and held-out loss for the progress bar and the result; open the next."""
        record = self.window.record(self.step, self.loss, self.lr_schedule.get_last_lr()[0])
        if log is not None:
            if measure:
                with contextlib.suppress(SamplingStopped):  # a stop skips the rest of it
                    record.update(monitor.measure(self.ema_model(), self.noise_scheduler, self.cfg, self.data.val_set,
                                                   self.device, self.amp_dtype, self.stop_requested))
            log.write(record)
        self.ips, self.val_loss = record["images_per_second"], record.get("val_loss", self.val_loss)
        self.window.restart()

    def ema_model(self, index: int = 0) -> LabelConditionedUNet:
        """A copy of the model holding the EMA weights (with power EMAs: the ``index``-th)."""
        model = copy.deepcopy(self.model).float().to(memory_format=torch.contiguous_format)
        self.ema.copy_to(model.parameters(), *([index] if self.power_ema else []))
        set_attention_kernel(model, "sdpa")  # sampling's kernel, as in the saved artifact, whatever training used
        return model.eval()

    def start_run(self) -> None:
        """The run folder and its resolved config (main rank), and the DDP job's shape, in words."""
        from clevrgen.progress import console

        t = self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
            if self.dist.enabled:
                console.print(f"DDP on {self.dist.world_size} ranks ({self.device.type}): batch {t.batch_size} per rank, "
                              f"effective batch {t.batch_size * self.dist.world_size}, lr {t.lr:g}")

    def finish_run(self) -> None:
        """After the last step: the DDP ranks' weights checked equal (and recorded), the loss plot."""
        if self.dist.enabled:
            in_sync = self.dist.in_sync(self.model.parameters())
            if self.dist.is_main:
                append_jsonl(self.run_dir / METRICS_FILE,
                             {"step": self.step, "world_size": self.dist.world_size, "ranks_in_sync": in_sync})
            if not in_sync:
                raise RuntimeError("DDP ranks ended with different weights")
        if self.dist.is_main:
            from clevrgen.report import plot_metrics

            plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / "loss.png")

    def stop(self, signum: int, saved: bool) -> None:
        """A stop signal after a whole step: save (unless this step just did), then end the run."""
        if not saved:
            self.checkpoint()
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {SIGNAL_NAMES[signum]}"
        raise TrainingInterrupted(stopped_message(how, self.step, self.cfg.train.steps, self.run_dir), 128 + signum)

    # --- the run's state -----------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save (main rank); no rank goes on, or ends and has torchrun stop the rest, before it is done."""
        if self.dist.is_main:
            self.save_checkpoint()
        self.dist.barrier()

    def save_checkpoint(self) -> None:
        """The resumable state (atomic) and the sampling artifact (EMA weights)."""
        write_state(self.run_dir, self.state_dict())
        save_artifact(self.ema_model(), self.cfg, self.run_dir, {**self.training_data, "steps": self.step})

    def save_snapshot(self) -> None:
        """The EMA weights of this step in model folders of their own that nothing overwrites:
        ``snapshots/step-N`` (fp16) for a classic EMA; with power EMAs ``snapshots/step-N/ema-S``
        for each relative length S, in fp32, from which ``clevrgen export --ema-sigma-rel``
        synthesizes an average of any other length."""
        folder = self.run_dir / SNAPSHOTS_DIR / f"step-{self.step:06d}"
        record = {**self.training_data, "steps": self.step}
        if not self.power_ema:
            model = self.ema_model()
            model.unet.half()
            save_artifact(model, self.cfg, folder, record)
            return
        for i, sigma_rel in enumerate(self.ema.sigma_rels):
            save_artifact(self.ema_model(i), self.cfg, folder / f"ema-{sigma_rel:.3f}",
                          {**record, "ema_sigma_rel": sigma_rel})

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "world_size": self.dist.world_size,
            "window": self.window.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s state. The config's lr (``--set train.lr=...``) and
        this machine's AdamW kernel govern the resumed run, not the saved run's."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if not self.power_ema:
                check_classic_resume(state["ema"])
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        load_optimizer_state(self.optimizer, self.lr_schedule, state, self.cfg.train.lr)
        self.step = int(state["step"])
        if "window" in state:
            self.window.load_state_dict(state["window"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.resume_batch_generator(state)

    def resume_batch_generator(self, state: dict) -> None:
        """The batch generator continues exactly where a single-process run on the same kind of
        device stopped. Another job shape or another device (a CPU generator's state is 5,056
        bytes, a CUDA one's 16) cannot take the saved state: each rank draws afresh from (seed,
        rank, step), as a run started there would, and the main rank says so."""
        saved = state["gen"]
        same_shape = int(state.get("world_size", 1)) == 1 == self.dist.world_size
        if same_shape and saved.numel() == self.gen.get_state().numel():
            self.gen.set_state(saved)
            return
        self.gen.manual_seed(batch_seed(self.cfg.train.seed, self.dist.rank, self.step))
        if same_shape and self.dist.is_main:
            from clevrgen.progress import console

            console.print(f"resuming on {self.device.type}: the checkpoint's batch generator was another device's, "
                          f"so batches are drawn afresh from step {self.step}")

    def load_checkpoint(self) -> None:
        path = require_checkpoint(self.run_dir)
        try:
            self.load_state_dict(read_state(self.run_dir))
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {path}: {first_line(exc)}") from None


def train(cfg: Config, run_dir: Path, data: ImageSet, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``run_dir``."""
    if not resume and (run_dir / STATE_FILE).exists():
        raise UsageError(f"{run_dir} already holds a training run: continue it with --resume {run_dir}, "
                         "or choose another --out")
    monitor.check_eval_splits(cfg.train)  # a bad split fails now, not at the first evaluation
    warn_about_lr_plan(cfg.train)
    trainer = Trainer(cfg, run_dir, data, progress=progress, resume=resume)
    try:
        with run_lock(run_dir, enabled=trainer.dist.is_main):  # one writer per run folder
            if resume:
                trainer.load_checkpoint()
                check_same_objective(run_dir, cfg.diffusion)
                if trainer.step >= cfg.train.steps:  # before anything of the run is rewritten
                    done = "has finished its" if trainer.step == cfg.train.steps else "is past train.steps ="
                    raise UsageError(f"{run_dir} {done} {cfg.train.steps} steps (its checkpoint is at step "
                                     f"{trainer.step}): nothing to train. To go on, resume with "
                                     f"--set train.steps=N, N above {trainer.step}")
                if trainer.dist.is_main:
                    from clevrgen.output import remove_stale_temporaries

                    drop_metrics_after(run_dir / METRICS_FILE, trainer.step)
                    remove_stale_temporaries(run_dir)  # half-written files of the killed run
            elif trainer.dist.is_main:  # a rerun of a run stopped before its first checkpoint starts over
                (run_dir / METRICS_FILE).unlink(missing_ok=True)
            return trainer.run()
    except WriteError as exc:  # a full disk, a quota, a read-only folder: say what is safe
        raise WriteError(f"{exc}; {checkpoint_note(run_dir)}", exc.path, exc.errno, exc.needed) from None
    finally:
        if trainer.dist.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
