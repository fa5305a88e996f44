"""The optimizer and its lr schedule: AdamW (fused where PyTorch has the kernel), a linear warm-up
and a cosine cool-down; and how a resumed run takes their saved state under its own config."""

from __future__ import annotations

import math

import torch

from clevrgen.config import TrainConfig


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


def warn_about_lr_plan(t: TrainConfig) -> None:
    """Say so when the warm-up or the cool-down is longer than the run: it would train throughout
    at a fraction of ``train.lr``. A warning, not a refusal: a short trial run of a long config is
    a fair thing to do, and its numbers are then read for what they are."""
    from clevrgen.errors import warn

    if t.warmup_steps + t.lr_decay_steps <= t.steps:
        return
    factor = lr_lambda(t.warmup_steps, t.steps, t.lr_decay_steps, t.lr_final)
    peak = max(factor(s) for s in range(0, t.steps, max(1, t.steps // 10_000)))
    if peak >= 0.9:  # a slight overlap of the two: near enough to the plan
        return
    warn(f"train.warmup_steps {t.warmup_steps} + train.lr_decay_steps {t.lr_decay_steps} are more than the run's "
         f"train.steps {t.steps}: the lr never reaches train.lr {t.lr:g} (at most {peak:.1%} of it); shorten them "
         "for a run this short")


def make_optimizer(model: torch.nn.Module, t: TrainConfig):
    """AdamW and its lr schedule, by ``train.*`` (``t``). PyTorch's fused AdamW kernel on the CPU
    and CUDA makes the same update as the loop (to fp32 rounding) in one pass over each parameter,
    ~3x faster on 2 CPU cores (docs/benchmarks.md)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda") or None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    factor = lr_lambda(t.warmup_steps, t.steps, t.lr_decay_steps, t.lr_final)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_optimizer_state(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR, state: dict,
                         lr: float) -> None:
    """Continue from a checkpoint's optimizer and schedule ``state``; ``lr`` (the config's: ``--set
    train.lr=...`` on a resume) and this machine's AdamW kernel govern from here, not the saved run's."""
    fused = optimizer.param_groups[0]["fused"]
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["lr_schedule"])
    schedule.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
        group["lr"] = lr * factor(schedule.last_epoch)
        group["fused"] = fused
