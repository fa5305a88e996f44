"""The training loop, in the manner of nanoGPT and EDM: a step (``train_step``), the run's
calendar (``due_after``: what falls due after a step) and its bookkeeping (``bookkeeping``:
``log_window``, ``evaluate``, ``sample_grid``, ``save_snapshot``, ``save_checkpoint``) as small
named pieces; the run's state is ``state_dict`` / ``load_state_dict``. The objective is ``clevrgen.loss``, what a run measures ``clevrgen.monitor``,
its folder ``clevrgen.runfolder``.

One code path for the CPU and CUDA: precision, compile and channels-last are settings. The whole
training set lives on the device as uint8 and batches are drawn there. All randomness of the
loop flows through one generator whose state is checkpointed, so a resumed run on the CPU
continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clevrgen import monitor
from clevrgen.artifact import describe_model, load_artifact, resolve_checkpoint, save_artifact
from clevrgen.callbacks import SamplingStopped
from clevrgen.config import Config, TrainConfig
from clevrgen.config_file import to_toml
from clevrgen.data.iclevr import ImageSet, resize_images, split_scenes, to_float
from clevrgen.diffusion import training_scheduler
from clevrgen.ema import check_classic_resume
from clevrgen.errors import CheckpointError, ClevrgenError, ConfigError, Interrupted, UsageError, first_line
from clevrgen.loss import diffusion_loss
from clevrgen.model import LabelConditionedUNet, build_model, set_attention_kernel, warn_if_upsampled, widen_to_editor
from clevrgen.locks import run_lock
from clevrgen.output import WriteError, append_jsonl, atomic_write_text
from clevrgen.record import max_objects_of, training_data_of
from clevrgen.runfolder import (  # noqa: F401  (STATE_FILE, METRICS_FILE: the run folder's names, used by callers)
    METRICS_FILE, SNAPSHOTS_DIR, STATE_FILE, RunLog, checkpoint_note, drop_metrics_after, read_state,
    require_tensorboard, write_state,
)
from clevrgen.runtime import (SIGNAL_NAMES, StopVote, autocast_dtype, deferred_stop, grad_scaler, init_distributed,
                              machine_name, resolve_device)


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


def describe_data(cfg) -> str:
    """What the model is trained on, in words, for the artifact and every report."""
    real = f"the images in {cfg.path}" if cfg.path is not None else "the embedded renderer's scenes"
    return real + (f" + {cfg.fresh:.0%} fresh renders of {cfg.fresh_objects[0]}-{cfg.fresh_objects[1]} objects"
                   if cfg.fresh else "")


def init_from(model: LabelConditionedUNet, cfg: Config) -> Path:
    """Load the weights of ``cfg.train.init`` into ``model``; returns the source's folder."""
    try:
        source = resolve_checkpoint(cfg.train.init)
        trained, source_cfg = load_artifact(source)
    except CheckpointError as exc:  # say which setting named the model
        raise CheckpointError(f"train.init: {exc}") from None
    # an editor may start from the generator of its architecture (its source channels at zero)
    widen = cfg.model.source_image and not source_cfg.model.source_image
    expected = cfg.model.model_copy(update={"source_image": False}) if widen else cfg.model
    if source_cfg.model != expected:
        differ = [k for k in type(cfg.model).model_fields if getattr(expected, k) != getattr(source_cfg.model, k)]
        raise ConfigError([f"train.init: {source} is another architecture "
                           f"(model.{differ[0]}: {getattr(source_cfg.model, differ[0])!r}, "
                           f"this config: {getattr(expected, differ[0])!r})"])
    if widen:
        widen_to_editor(model, trained)
    else:
        model.load_state_dict(trained.state_dict())
    return source


def lr_lambda(warmup: int, steps: int = 0, decay_steps: int = 0, final: float = 0.1):
    """The lr factor at a step: a linear warm-up, constant, then (with ``decay_steps``) a cosine
    cool-down to ``final`` over the last ``decay_steps`` of ``steps``."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        start = steps - decay_steps
        if not decay_steps or step < start:
            return warm
        done = min(1.0, (step - start) / decay_steps)
        return warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * done)))
    return factor


def draw_batch(images: torch.Tensor, labels: torch.Tensor, cfg: Config, gen: torch.Generator,
               fresh: tuple[torch.Tensor, torch.Tensor] | None = None):
    """A random batch on the device: images in [-1, 1] (randomly flipped), labels with dropout.
    ``fresh`` (uint8 images, labels), new scenes of this step, take the batch's first rows."""
    n, b = images.shape[0], cfg.train.batch_size
    device = images.device
    index = torch.randint(n, (b,), generator=gen, device=device)
    batch, labels = images[index], labels[index]
    if fresh is not None:
        m = len(fresh[0])
        batch, labels = torch.cat([fresh[0], batch[m:]]), torch.cat([fresh[1], labels[m:]])
    x0 = to_float(batch)
    if cfg.train.hflip:
        flip = torch.rand(b, generator=gen, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    keep = torch.rand(b, generator=gen, device=device) >= cfg.train.label_dropout
    return x0, labels * keep[:, None]


def make_ema(model: torch.nn.Module, cfg: Config):
    """The weights' average: EDM2's power-function EMAs with ``train.ema_sigma_rels`` (the first is
    the run's artifact; all are kept in snapshots, for a length chosen after training), else a
    classic EMA of ``train.ema_decay``."""
    if cfg.train.ema_sigma_rels:
        from clevrgen.ema import PowerEMA

        return PowerEMA(model.parameters(), cfg.train.ema_sigma_rels)
    from diffusers.training_utils import EMAModel

    # foreach: one fused update over all weights, not a kernel launch per tensor (on a GPU)
    return EMAModel(model.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup, foreach=True)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel on the CPU and CUDA: the same update as the loop (to
    fp32 rounding) in one pass over each parameter, ~3x faster on 2 CPU cores (docs/benchmarks.md)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda") or None
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)


@dataclass(frozen=True)
class Due:
    """What a run does after a step."""

    log: bool
    evaluate: bool
    sample: bool
    snapshot: bool
    checkpoint: bool


def due_after(step: int, t: TrainConfig) -> Due:
    """The run's calendar: what is due after ``step`` by ``train.*_every`` (``t``). The last step
    logs, evaluates, samples, snapshots and saves whatever the intervals say (a run of 8,500 steps
    that snapshots every 1,000 keeps its end too); an evaluation is logged."""
    last = step == t.steps
    evaluate = step % t.eval_every == 0 or last
    return Due(log=step % t.log_every == 0 or evaluate, evaluate=evaluate, sample=step % t.sample_every == 0 or last,
               snapshot=bool(t.snapshot_every) and (step % t.snapshot_every == 0 or last),
               checkpoint=step % t.checkpoint_every == 0 or last)


class Trainer:
    """Owns the model, EMA, optimizer and run folder of one training run."""

    def __init__(self, cfg: Config, run_dir: Path, data: ImageSet, progress: bool = True, resume: bool = False):
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.dist, self.device = init_distributed(resolve_device(cfg.train.device))
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device, warn_fallback=self.dist.is_main)
        from clevrgen.pipeline_inputs import check_sample_steps

        check_sample_steps(cfg)  # the sample grids and accuracy checks draw with sample.steps
        self.place_data(data)
        torch.manual_seed(cfg.train.seed)
        self.build_model(resume)
        self.ema = make_ema(self.model, cfg) if self.dist.is_main else None
        self.power_ema = bool(cfg.train.ema_sigma_rels)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = grad_scaler(self.device, self.amp_dtype)  # fp16 only
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            cfg.train.warmup_steps, cfg.train.steps, cfg.train.lr_decay_steps, cfg.train.lr_final))
        self.noise_scheduler = training_scheduler(cfg.diffusion)
        self.gen = torch.Generator(self.device).manual_seed(self.rank_seed(0))
        self.step = 0
        self.stop_requested = lambda: False  # while run() loops: whether a stop signal came
        # The loss summed since the last log record; checkpointed, so a resumed window logs exactly.
        self.window_loss, self.window_steps = torch.zeros((), device=self.device), 0

    def place_data(self, data: ImageSet) -> None:
        """The training images and labels on the device (this rank's shard, at the model's
        resolution), the held-out scenes, the fresh renders if the config asks for them, and what
        the artifact records about the data."""
        cfg = self.cfg
        if cfg.train.batch_size > len(data):
            raise UsageError(f"train.batch_size: {cfg.train.batch_size} is larger than the {len(data)} training images")
        self.train_set, self.val_set = split_scenes(data, cfg.data.val_fraction, cfg.data.split_seed)
        shard = slice(self.dist.rank, None, self.dist.world_size)
        self.images = resize_images(self.train_set.images[shard], cfg.model.image_size).to(self.device)
        self.labels = self.train_set.labels[shard].to(self.device)
        self.pairs = None  # an editor's (source, target) rows of self.images
        if cfg.model.source_image:
            from clevrgen.data.pairs import edit_pairs

            if cfg.data.fresh > 0:
                raise UsageError("data.fresh: an editor trains on the dataset's sequences; fresh renders are not "
                                 "pairs (set data.fresh = 0)")
            self.pairs = edit_pairs(self.train_set)[shard.start::shard.step].to(self.device)
            # every image of the training scenes is some pair's source or target: all stay on each rank
            self.images = resize_images(self.train_set.images, cfg.model.image_size).to(self.device)
            self.labels = self.train_set.labels.to(self.device)
            if not len(self.pairs):
                raise UsageError(f"model.source_image: {cfg.data.path or 'the dataset'} has no image sequences "
                                 "(<scene>_<k>.png -> <scene>_<k+1>.png) to train an editor on")
        self.fresh = None  # new scenes rendered on the device at every step
        if cfg.data.fresh > 0:
            from clevrgen.data.embedded import FreshScenes

            self.fresh = FreshScenes(max(1, round(cfg.data.fresh * cfg.train.batch_size)), cfg.data.fresh_objects,
                                     cfg.model.image_size, self.device, cfg.train.seed, self.dist.rank)
        # Sampling warns beyond max_objects.
        self.training_data = {"max_objects": max(max_objects_of(self.train_set.labels),
                                                 cfg.data.fresh_objects[1] if self.fresh else 0),
                              "images": len(self.train_set), "data": describe_data(cfg.data),
                              "machine": machine_name(self.device)}
        if self.pairs is not None:
            self.training_data["pairs"] = len(self.pairs) * self.dist.world_size

    def build_model(self, resume: bool) -> None:
        """The model (from ``train.init``'s weights, unless a resume's checkpoint brings them),
        on the device with the config's attention kernel and layout, and ``self.forward``: what
        the loss calls (the model, wrapped by DDP and ``torch.compile`` as the config asks)."""
        cfg = self.cfg
        if self.dist.is_main:
            warn_if_upsampled(cfg.model)
        self.model = build_model(cfg.model)
        if resume:  # the checkpoint holds the weights: the init source is neither read nor needed
            saved = training_data_of(self.run_dir)
            self.training_data.update({k: saved[k] for k in ("init", "stages") if k in saved})
            if saved.get("machine") and not saved["machine"].endswith(self.training_data["machine"]):
                self.training_data["machine"] = f"{saved['machine']}, then {self.training_data['machine']}"
        elif cfg.train.init:
            source = init_from(self.model, cfg)
            # the source's own chain of stages: an export of this run adds this run to it
            self.training_data.update(init=describe_model(source), stages=training_data_of(source).get("stages", []))
        self.model = self.model.to(self.device)
        set_attention_kernel(self.model, cfg.train.attention_kernel)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.forward = torch.compile(self.forward)

    def rank_seed(self, step: int) -> int:
        """The batch-drawing seed of this rank, from the run's seed (and the step, on a resume)."""
        return self.cfg.train.seed + 1_000_003 * self.dist.rank + 7_919 * step

    # --- the step ----------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step; the loss stays on the device (no sync)."""
        t = self.cfg.train
        source = {}
        if self.pairs is not None:
            from clevrgen.data.pairs import draw_edit_batch

            x0, labels, source["source"] = draw_edit_batch(self.images, self.labels, self.pairs, t.batch_size, self.gen,
                                                           t.label_dropout, t.source_dropout, t.joint_dropout, t.hflip)
        else:
            fresh = self.fresh.draw(self.step) if self.fresh is not None else None
            x0, labels = draw_batch(self.images, self.labels, self.cfg, self.gen, fresh)
        if t.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        # as many object tokens as the data's largest scene: a fixed shape, no step waits for the device
        denoiser = functools.partial(self.forward, num_objects=self.training_data["max_objects"], **source)
        loss = diffusion_loss(denoiser, self.noise_scheduler, x0, labels, self.gen, self.amp_dtype,
                              self.cfg.diffusion)
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

    def ema_model(self, index: int = 0) -> LabelConditionedUNet:
        """A copy of the model holding the EMA weights (with power EMAs: the ``index``-th)."""
        model = copy.deepcopy(self.model).float().to(memory_format=torch.contiguous_format)
        self.ema.copy_to(model.parameters(), *([index] if self.power_ema else []))
        set_attention_kernel(model, "sdpa")  # sampling's kernel, as in the saved artifact, whatever training used
        return model.eval()

    # --- the run's bookkeeping -----------------------------------------------------------------
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
            "window": {"loss": self.window_loss.detach().cpu(), "steps": self.window_steps},
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

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

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s state. The config's lr (``--set train.lr=...``) and
        this machine's AdamW kernel govern the resumed run, not the saved run's."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if not self.power_ema:
                check_classic_resume(state["ema"])
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        fused = self.optimizer.param_groups[0]["fused"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.lr_schedule.base_lrs = [self.cfg.train.lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.lr_schedule.lr_lambdas):
            group["lr"] = self.cfg.train.lr * factor(self.lr_schedule.last_epoch)
            group["fused"] = fused
        self.step = int(state["step"])
        if "window" in state:
            self.window_loss = state["window"]["loss"].to(self.device)
            self.window_steps = int(state["window"]["steps"])
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
        self.gen.manual_seed(self.rank_seed(self.step))
        if same_shape and self.dist.is_main:
            from clevrgen.progress import console

            console.print(f"resuming on {self.device.type}: the checkpoint's batch generator was another device's, "
                          f"so batches are drawn afresh from step {self.step}")

    def load_checkpoint(self) -> None:
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} not found (is {self.run_dir} a training run?)")
        try:
            self.load_state_dict(read_state(self.run_dir))
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {path}: {first_line(exc)}") from None

    def evaluate(self) -> dict:
        """The held-out loss and judge accuracies of the EMA model (``clevrgen.monitor``)."""
        return monitor.measure(self.ema_model(), self.noise_scheduler, self.cfg, self.val_set, self.device,
                               self.amp_dtype, self.stop_requested)

    def held_out_accuracy(self, model) -> dict:
        return monitor.judge_accuracy(model, self.cfg, self.val_set, self.device, self.amp_dtype, self.stop_requested)

    def sample_grid(self, model: LabelConditionedUNet, log: RunLog | None = None) -> None:
        images = monitor.sample_grid(model, self.cfg, self.device, self.amp_dtype,
                                     self.run_dir / "samples" / f"step_{self.step:07d}.png", self.stop_requested)
        if log is not None:
            log.grid(images, self.step)

    def log_window(self, log: RunLog | None, evaluate: bool) -> None:
        """Log the steps since the last record: mean loss, lr, speed, and (``evaluate``) what the
        monitor measures; written on the main rank, kept as ``self.ips`` / ``self.val_loss`` for
        the progress bar and the result. Opens the next window."""
        seconds = time.perf_counter() - self.window_start
        record = {"step": self.step, "loss": self.loss, "lr": self.lr_schedule.get_last_lr()[0],
                  "images_per_second": self.window_images / seconds}
        if log is not None:
            if evaluate:
                with contextlib.suppress(SamplingStopped):  # a stop skips the rest of it
                    record.update(self.evaluate())
            log.write(record)
        self.ips, self.val_loss = record["images_per_second"], record.get("val_loss", self.val_loss)
        self.window_loss, self.window_steps = torch.zeros((), device=self.device), 0
        self.window_start, self.window_images = time.perf_counter(), 0

    def window_mean_loss(self) -> float:
        """The window's mean loss over all ranks (so every rank logs, and stops, on the same
        value), refusing a non-finite one: no checkpoint ever holds weights a NaN has touched."""
        loss = (self.dist.mean(self.window_loss) / self.window_steps).item()  # the loop's one wait for the device
        if not math.isfinite(loss):
            raise ClevrgenError(f"the loss became non-finite ({loss}) by step {self.step}; "
                                f"{checkpoint_note(self.run_dir, kept=True)}. Try a lower train.lr or "
                                "train.precision='fp32'.")
        return loss

    def plot_loss(self) -> None:
        from clevrgen.report import plot_metrics

        plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / "loss.png")

    def bookkeeping(self, due: Due, log: RunLog | None) -> None:
        """What the run does after a step, as ``due`` says: log (and evaluate), sample a grid,
        keep a snapshot, save the checkpoint. Only the main rank writes."""
        main = self.dist.is_main
        if due.log or due.checkpoint:
            self.loss = self.window_mean_loss()
        if due.log:
            self.log_window(log, due.evaluate)
        if main and due.sample and not self.stop_requested():
            with contextlib.suppress(SamplingStopped):
                self.sample_grid(self.ema_model(), log)
        if main and due.snapshot:
            self.save_snapshot()
        if due.checkpoint:
            if main:
                self.save_checkpoint()
            self.dist.barrier()

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from rich.progress import TextColumn

        from clevrgen.progress import make_progress

        t, main = self.cfg.train, self.dist.is_main
        self.start_run()
        log = RunLog(self.run_dir, t.tensorboard, self.step) if main else None
        self.loss, self.ips, self.val_loss = float("nan"), float("nan"), None
        self.window_start, self.window_images = time.perf_counter(), 0
        bar = make_progress(TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                            enabled=self.progress and main)
        interrupt = None
        stop_vote = StopVote(self.dist.enabled)  # under DDP every rank stops after the same step
        try:
            with bar, deferred_stop(repeat_forces=not self.dist.enabled) as interrupt:
                self.stop_requested = lambda: interrupt.requested  # periodic sampling ends within a step
                task = bar.add_task("training", total=t.steps, completed=self.step, loss=float("nan"), ips=0.0)
                while self.step < t.steps:
                    self.window_loss += self.train_step()
                    self.window_steps += 1
                    self.window_images += t.batch_size * self.dist.world_size
                    due = due_after(self.step, t)
                    self.bookkeeping(due, log)
                    bar.update(task, completed=self.step, loss=self.loss, ips=self.ips)
                    # Ctrl-C or SIGTERM: stop between two whole steps; under DDP the ranks vote at log steps
                    if (due.log or not self.dist.enabled) and (signum := stop_vote(interrupt.signum)):
                        self.stop(signum, saved=due.checkpoint)
        except KeyboardInterrupt:
            if interrupt is not None and interrupt.forced:
                raise TrainingInterrupted(
                    f"interrupted twice at step {self.step}: stopped without saving; {self.run_dir} keeps its last "
                    f"checkpoint. Resume with: clevrgen train --resume {self.run_dir}"
                ) from None
            if main:
                self.save_checkpoint()
            raise TrainingInterrupted(
                f"interrupted at step {self.step}; checkpoint saved. Resume with: clevrgen train --resume {self.run_dir}"
            ) from None
        finally:
            if log is not None:
                log.close()
        self.finish_run()
        return TrainResult(self.run_dir, self.step, self.loss, self.ips, self.val_loss, self.dist.world_size, main)

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
            self.plot_loss()

    def stop(self, signum: int, saved: bool) -> None:
        """A stop signal after a whole step: save (unless this step just did), then end the run."""
        if not saved:
            if self.dist.is_main:
                self.save_checkpoint()
            self.dist.barrier()  # no rank ends (and has torchrun stop the rest) before the save
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {SIGNAL_NAMES[signum]}"
        raise TrainingInterrupted(f"{how} at step {self.step}; checkpoint saved. Resume with: clevrgen train --resume "
                                  f"{self.run_dir}", exit_code=128 + signum)


def train(cfg: Config, run_dir: Path, data: ImageSet, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``run_dir``."""
    if not resume and (run_dir / STATE_FILE).exists():
        raise UsageError(f"{run_dir} already holds a training run: continue it with --resume {run_dir}, "
                         "or choose another --out")
    trainer = Trainer(cfg, run_dir, data, progress=progress, resume=resume)
    try:
        with run_lock(run_dir, enabled=trainer.dist.is_main):  # one writer per run folder
            if resume:
                trainer.load_checkpoint()
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
