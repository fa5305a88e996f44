"""Training the ResNet-18 judge (:mod:`clevrgen.judge`): label-preserving augmentation, AdamW
under a warmup + cosine schedule, an optional moving average of the weights, the best epoch kept;
and ``clevrgen evaluator train``'s whole run, the judge and its bookkeeping written beside it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clevrgen.config import Config, JudgeConfig
from clevrgen.config_file import to_toml
from clevrgen.data.iclevr import ImageSet, load_iclevr, split_scenes, to_float
from clevrgen.filenames import CONFIG_FILE, METRICS_FILE
from clevrgen.judge import build_judge, judge_logits, load_judge, save_judge, score_judge
from clevrgen.output import append_jsonl, atomic_write_text
from clevrgen.runtime import autocast, autocast_dtype, grad_scaler, resolve_device, seed_everything


def run_judge_training(cfg: Config, root: Path | str, out: Path | str, command: str) -> list[dict[str, Any]]:
    """``clevrgen evaluator train``'s run: train a judge (:func:`train_judge`) on the i-CLEVR folder
    ``root``, holding out whole scenes (``cfg.data.val_fraction``, ``split_seed``), with
    ``cfg.judge.render_extra`` random renders added to the training images; keep the best epoch in
    ``out`` (fp16 safetensors whose metadata holds ``command``, the judge's config, the data, its
    held-out scores and split), with the resolved ``config.toml`` and ``metrics.jsonl`` (one line an
    epoch; an earlier judge's record is replaced) beside it. The caller claims ``out`` and its
    folder first (:func:`clevrgen.claims.claim_file`, :func:`~clevrgen.claims.claim_folder`).
    Returns the history, one record an epoch."""
    from clevrgen.progress import console

    out = Path(out)
    seed_everything(cfg.judge.seed)
    dataset = load_iclevr(root, cache_dir=cfg.data.cache_dir)
    train_set, val_set = split_scenes(dataset, cfg.data.val_fraction, cfg.data.split_seed)
    rendered = ""
    if cfg.judge.render_extra:
        from clevrgen.data.embedded import concat, render_random

        extra = render_random(cfg.judge.render_extra, cfg.judge.render_objects, seed=cfg.judge.seed)
        train_set = concat(train_set, extra)
        rendered = f" (with {len(extra):,} renders)"
    console.print(f"{len(train_set):,} training images{rendered}, {len(val_set):,} held out "
                  f"({torch.get_num_threads()} threads)", markup=False, highlight=False, soft_wrap=True)
    atomic_write_text(out.with_name(CONFIG_FILE), to_toml(cfg))
    metrics = out.with_name(METRICS_FILE)
    metrics.unlink(missing_ok=True)  # an earlier judge's record here is replaced, not continued
    split = {"val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed}

    def on_epoch(model: nn.Module, record: dict, is_best: bool) -> None:
        append_jsonl(metrics, record)
        if is_best:
            save_judge(model, out, {"command": command, "config": cfg.judge.model_dump(mode="json"), "data": str(root),
                                    "heldout": record, "heldout_images": len(val_set), "split": split})

    return train_judge(train_set, val_set, cfg.judge, on_epoch=on_epoch)[1]


def augment(images: torch.Tensor, cfg: JudgeConfig, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation of a uint8 batch, returned as floats in [-1, 1].

    Horizontal flips and shifts of a few pixels (edge pixels repeated, so nothing is cut out
    beyond a sliver at the border) keep every object; brightness and contrast change all three
    channels alike, so no color turns into another (no hue shift). It runs where the images and
    ``generator`` are (on a GPU, training never waits for the CPU).
    """
    x = to_float(images)
    b, _, h, w = x.shape
    device = x.device
    if cfg.hflip:
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.translate > 0:
        t = cfg.translate
        padded = nn.functional.pad(x, (t, t, t, t), mode="replicate")
        dy, dx = torch.randint(0, 2 * t + 1, (2, b), generator=generator, device=device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, :]
        x = padded[torch.arange(b, device=device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if cfg.jitter > 0:
        j = cfg.jitter
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator, device=device) * 2 - 1) * j
        brightness = (torch.rand(b, 1, 1, 1, generator=generator, device=device) * 2 - 1) * j
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp(-1, 1)
    return x


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    key = lambda r: (r["topk_accuracy"] or 0.0, r["exact_accuracy"] or 0.0)  # noqa: E731
    return b is None or key(a) > key(b)


def lr_factor(fraction: float, warmup: float = 0.1) -> float:
    """The learning-rate multiplier at ``fraction`` of training: linear warmup from 1/25, then
    cosine decay to zero (a one-cycle shape)."""
    if fraction < warmup:
        return 0.04 + 0.96 * fraction / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup))))


def train_judge(
    train: ImageSet,
    val: ImageSet,
    cfg: JudgeConfig,
    progress: bool = True,
    on_epoch: Callable[[nn.Module, dict[str, Any], bool], None] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a judge from scratch (or from ``cfg.init``): AdamW, warmup + cosine LR, BCE on the 24 outputs,
    label-preserving augmentation. With ``cfg.minutes`` the schedule runs over wall-clock time
    (for a shared machine) and training stops when it is spent, or after ``cfg.epochs``.
    With ``cfg.ema`` the moving average of the weights is what is scored and returned.
    Returns the best epoch's model (by held-out top-k, then exact; the last epoch when ``val``
    is empty) and one history record per epoch. ``on_epoch(model, record,
    is_best)`` runs after each epoch (the command saves the best model there)."""
    from rich.progress import TextColumn

    from clevrgen.progress import console, make_progress

    if len(train) == 0:
        raise ValueError("train_judge needs at least one training image")
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.precision, device, warn_fallback=True)
    scaler = grad_scaler(device, dtype)  # fp16 only: a step with non-finite gradients is skipped
    # The images, their shuffling and their augmentation stay on the device (on the CPU: as ever).
    generator = torch.Generator(device).manual_seed(cfg.seed)
    images, labels = train.images.to(device), train.labels.to(device)
    torch.manual_seed(cfg.seed)
    model = build_judge() if cfg.init is None else load_judge(cfg.init).train()
    model = model.to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # with cfg.ema the moving average is what is scored and kept; its BatchNorm statistics are
    # measured afresh before each evaluation (averaged weights do not match averaged statistics)
    average = copy.deepcopy(model).eval() if cfg.ema else None
    judged = average if average is not None else model
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    budget = cfg.minutes * 60 if cfg.minutes else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    best_state, best = None, None
    columns = TextColumn("loss {task.fields[loss]:.4f}")
    begun, done, out_of_time = time.time(), 0, False
    with make_progress(columns, enabled=progress) as bar:
        task = bar.add_task("training judge" + (" (seconds)" if budget else ""),
                            total=int(budget) if budget else total_steps, loss=float("nan"))
        for epoch in range(1, cfg.epochs + 1):
            started, steps = time.time(), 0
            total_loss = torch.zeros((), dtype=torch.float64, device=device)  # read back once an epoch
            model.train()
            order = torch.randperm(len(train), generator=generator, device=device)
            for step in range(steps_per_epoch):
                # where we are in the schedule: by steps, or by wall-clock time under a budget
                fraction = (time.time() - begun) / budget if budget else done / total_steps
                if fraction >= 1:
                    out_of_time = True
                    break
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(fraction)
                index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                x = augment(images[index], cfg, generator).contiguous(memory_format=memory_format)
                with autocast(device, dtype):
                    logits = judge_logits(model, x)
                loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels[index])
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if average is not None:
                    _update_average(average, model, cfg.ema, done)
                total_loss += loss.detach()
                steps, done = steps + 1, done + 1
                shown = {"loss": loss.item()} if steps % 25 == 1 else {}  # the bar's loss: a read-back every 25 steps
                if budget:
                    bar.update(task, completed=min(time.time() - begun, budget), **shown)
                else:
                    bar.update(task, advance=1, **shown)
            if steps == 0:
                break
            record: dict[str, Any] = {
                "epoch": epoch, "steps": steps, "train_loss": total_loss.item() / steps,
                "seconds": round(time.time() - started, 1),
            }
            if average is not None:
                _refresh_batchnorm(average, train, cfg, torch.Generator().manual_seed(cfg.seed + epoch),
                                   device, memory_format, dtype)
            if len(val):
                scores = score_judge(judged, val)
                record.update(topk_accuracy=scores["topk_accuracy"], exact_accuracy=scores["exact_accuracy"])
            is_best = not len(val) or _better(record, best)
            if is_best:
                best, best_state = record, copy.deepcopy(judged.state_dict())
            history.append(record)
            if progress:
                held = (f"held-out top-k {record['topk_accuracy']:.4f}  exact {record['exact_accuracy']:.4f}"
                        if len(val) else "no held-out images")
                console.print(f"epoch {epoch}{'' if budget else f'/{cfg.epochs}'}  loss {record['train_loss']:.4f}  {held}"
                              f"  ({record['seconds']:.0f} s){'  best' if is_best else ''}")
            if on_epoch is not None:
                on_epoch(judged, record, is_best)
            if out_of_time:
                break
    judged.load_state_dict(best_state)
    return judged.to(memory_format=torch.contiguous_format).eval(), history


@torch.no_grad()
def _update_average(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """average <- d * average + (1 - d) * model over the weights, with d = min(decay,
    (1 + step) / (10 + step)) so that the random initialization is soon forgotten."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1.0 - d)


@torch.no_grad()
def _refresh_batchnorm(model: nn.Module, data: ImageSet, cfg: JudgeConfig, generator: torch.Generator,
                       device: torch.device, memory_format: torch.memory_format,
                       dtype: torch.dtype | None = None, batches: int = 16) -> None:
    """Measure the BatchNorm statistics of ``model``'s own weights on up to ``batches``
    augmented training batches (a cumulative average, under autocast to ``dtype`` if given),
    then leave it in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    order = torch.randperm(len(data), generator=generator)[:batches * cfg.batch_size]
    for index in order.split(cfg.batch_size):
        x = augment(data.images[index], cfg, generator).to(device, memory_format=memory_format)
        with autocast(device, dtype):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
