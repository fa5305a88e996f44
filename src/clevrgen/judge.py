"""The ResNet-18 judge: course-format and safetensors I/O, the course metrics, and training.

The judge is a plain torchvision ResNet-18 whose ``fc`` is ``Sequential(Linear(512, 24),
Sigmoid())``: it reads 64x64 images in [-1, 1] and outputs one probability per class. That is
the course classifier's architecture, so a course checkpoint (``torch.save({"model": sd})``)
loads into it unchanged, and ours exports to that format.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clevrgen.config import JudgeConfig
from clevrgen.data.iclevr import ImageSet, to_float
from clevrgen.errors import CheckpointError
from clevrgen.labels import NUM_CLASSES, PHRASES, asset_path
from clevrgen.runtime import autocast, autocast_dtype, grad_scaler, resolve_device
from clevrgen.inputs import input_file
from clevrgen.output import atomic_path

ARCHITECTURE = "torchvision.models.resnet18(weights=None), fc=Sequential(Linear(512, 24), Sigmoid())"
FORMAT = "clevrgen-judge"
if TYPE_CHECKING:
    from rich.table import Table

SHIPPED = "judge.safetensors"


def build_judge() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, NUM_CLASSES), nn.Sigmoid())
    return model


def judge_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The judge's pre-sigmoid outputs (training uses them for a stable BCE-with-logits)."""
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return m.fc[0](torch.flatten(m.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------
# Loading and saving


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # truncated header or data: safetensors raises several kinds
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path}: not a judge checkpoint (expected a dict whose key 'model' holds a ResNet-18 state dict)"
        )
    return state


def _check_state(path: Path, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or extra or wrong):
        return
    if wrong:
        k = wrong[0]
        what = f"{k} has shape {list(state[k].shape)}, a judge needs {list(expected[k].shape)}"
    else:
        parts = [f"{len(missing)} weights missing (first: {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (first: {extra[0]})" if extra else ""]
        what = ", ".join(p for p in parts if p)
    raise CheckpointError(f"{path}: not a 24-class ResNet-18 judge: {what}")


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a clevrgen judge (empty for a course checkpoint)."""
    path = Path(path)
    if path.is_file() and _is_safetensors(path):
        return _read_safetensors(path)[1]
    return {}


def load_judge(path: Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """A judge in eval mode: ``path`` is a course ``.pth`` or a clevrgen ``.safetensors``;
    None loads the shipped judge. It outputs probabilities [B, 24]."""
    shipped = path is None
    path = asset_path(SHIPPED) if shipped else input_file(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a judge: pass a course .pth or a clevrgen judge .safetensors")
    if not path.is_file():
        hint = " (the shipped judge is missing: train one with `clevrgen evaluator train`)" if shipped else ""
        raise CheckpointError(f"judge checkpoint not found: {path}{hint}")
    if shipped:
        from clevrgen.integrity import verify_shipped

        verify_shipped(path)
    if _is_safetensors(path):
        state, _ = _read_safetensors(path)
    else:
        state = _read_torch(path)
    model = build_judge()
    _check_state(path, state, model)
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval()


def save_judge(model: nn.Module, path: Path | str, metadata: dict[str, Any] | None = None) -> None:
    """The judge as fp16 safetensors (about 22 MB), written atomically, with string metadata
    (non-string values are stored as JSON)."""
    from safetensors.torch import save_file

    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"format": FORMAT, "architecture": ARCHITECTURE}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def export_course(model: nn.Module, path: Path | str) -> None:
    """The course format: ``torch.save({"model": state_dict})`` in fp32, written atomically."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state}, tmp)


# ---------------------------------------------------------------------------------------------
# Inference and the course metrics


@torch.no_grad()
def judge_probs(judge: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Probabilities [N, 24] on the CPU for uint8 images [N, 3, 64, 64] or floats in [-1, 1]."""
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        batch = to_float(batch) if batch.dtype == torch.uint8 else batch.float()
        out.append(judge(batch).float().cpu())
    judge.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES)


def topk_predictions(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image and class: True for the image's k highest outputs, k = the image's number of
    true classes (the course's rule)."""
    k = labels.bool().sum(1, keepdim=True)
    # rank of each output within its row; ties go to the lower class index, like a stable sort
    order = probs.float().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(probs.shape[1]).expand_as(order))
    return rank < k


def topk_hits(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image and class: True where a true class is among the image's k highest outputs."""
    return labels.bool() & topk_predictions(probs, labels)


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The course metric: for each image take its k highest outputs (k = number of true
    objects); hits over the sum of k."""
    total = labels.bool().sum().item()
    return topk_hits(probs, labels).sum().item() / total if total else float("nan")


def exact_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose set of outputs > 0.5 equals the true set."""
    if len(labels) == 0:
        return float("nan")
    return ((probs > 0.5) == labels.bool()).all(1).float().mean().item()


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def score_predictions(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Top-k and exact-set accuracy overall and by number of objects, and per-class recall
    (share of a class's true occurrences that are in its image's top k; None if it never occurs)."""
    probs, labels = probs.float().cpu(), labels.float().cpu()
    hits = topk_hits(probs, labels)
    present = labels.bool().sum(0)
    recall = hits.sum(0).float() / present.clamp(min=1)
    per_class = [None if int(n) == 0 else float(r) for r, n in zip(recall, present)]
    k = labels.sum(1).long()
    by_objects = {
        str(int(n)): {
            "n_images": int((k == n).sum()),
            "topk_accuracy": topk_accuracy(probs[k == n], labels[k == n]),
            "exact_accuracy": exact_accuracy(probs[k == n], labels[k == n]),
        }
        for n in torch.unique(k)
    }
    ranked = sorted((r, i) for i, r in enumerate(per_class) if r is not None)
    return {
        "n_images": len(labels),
        "topk_accuracy": _nan_to_none(topk_accuracy(probs, labels)),
        "exact_accuracy": _nan_to_none(exact_accuracy(probs, labels)),
        "by_objects": by_objects,
        "per_class_recall": per_class,
        "worst_classes": [{"class": PHRASES[i], "recall": r} for r, i in ranked[:5]],
    }


def score_table(result: dict[str, Any], title: str = "judge scores") -> "Table":
    """A rich table of :func:`score_predictions`'s result."""
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}%"

    table = Table(title=title)
    table.add_column("images")
    table.add_column("n", justify="right")
    table.add_column("top-k", justify="right")
    table.add_column("exact set", justify="right")
    table.add_row("all", f"{result['n_images']:,}", pct(result["topk_accuracy"]), pct(result["exact_accuracy"]))
    for k, row in result["by_objects"].items():
        table.add_row(f"{k} object{'s' * (k != '1')}", f"{row['n_images']:,}",
                      pct(row["topk_accuracy"]), pct(row["exact_accuracy"]))
    worst = ", ".join(f"{w['class']} {pct(w['recall'])}" for w in result["worst_classes"][:3])
    table.caption = f"worst classes (top-k recall): {worst}" if worst else None
    return table


# ---------------------------------------------------------------------------------------------
# Training


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


def evaluate_judge(model: nn.Module, data: ImageSet, batch_size: int = 256) -> dict[str, Any]:
    return score_predictions(judge_probs(model, data.images, batch_size), data.labels)


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
                scores = evaluate_judge(judged, val)
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
