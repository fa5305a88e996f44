"""The ResNet-18 judge: the network, course-format and safetensors I/O, and the course metrics
(training it is :mod:`clevrgen.judge_training`).

The judge is a plain torchvision ResNet-18 whose ``fc`` is ``Sequential(Linear(512, 24),
Sigmoid())``: it reads 64x64 images in [-1, 1] and outputs one probability per class. That is
the course classifier's architecture, so a course checkpoint (``torch.save({"model": sd})``)
loads into it unchanged, and ours exports to that format.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clevrgen.data.iclevr import ImageSet, to_float
from clevrgen.errors import CheckpointError
from clevrgen.inputs import input_file
from clevrgen.labels import NUM_CLASSES, PHRASES, asset_path
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


def score_judge(judge: nn.Module, data: ImageSet, batch_size: int = 256) -> dict[str, Any]:
    """:func:`score_predictions` of ``judge`` on the labelled images ``data``."""
    return score_predictions(judge_probs(judge, data.images, batch_size), data.labels)


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
