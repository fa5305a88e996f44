"""Pictures of a run: the loss curve and accuracy against training time, from ``metrics.jsonl``.

A model's chain of training stages (``training_data.json``) is :mod:`clevrgen.record`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from clevrgen.output import atomic_path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # a line cut short by a kill (or damaged)
            continue
    return records


def plot_metrics(metrics: Path, out: Path) -> None:
    """Training (and held-out) loss against step, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics) if "loss" in r]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def training_minutes(records: list[dict], batch_size: int) -> list[tuple[int, float]]:
    """(step, minutes of training) at every logged step: each log window's images over its
    measured images/s, summed. Time spent sampling for evaluations is not counted."""
    out, minutes, last = [], 0.0, 0
    for r in records:
        if "images_per_second" in r and r["images_per_second"] > 0 and r["step"] > last:
            minutes += (r["step"] - last) * batch_size / r["images_per_second"] / 60
            last = r["step"]
            out.append((r["step"], minutes))
    return out


def accuracy_curve(records: list[dict], batch_size: int, splits: list[str]) -> list[dict]:
    """One row per evaluation: its step, the training minutes to it, and each split's accuracies."""
    at = dict(training_minutes(records, batch_size))
    rows = []
    for r in records:
        if any(f"{s}_topk_accuracy" in r for s in splits) and r["step"] in at:
            row = {"step": r["step"], "minutes": at[r["step"]]}
            for s in splits:
                for kind in ("topk", "exact"):
                    if f"{s}_{kind}_accuracy" in r:
                        row[f"{s}_{kind}"] = r[f"{s}_{kind}_accuracy"]
            rows.append(row)
    return rows


def plot_accuracy_curve(rows: list[dict], splits: list[str], out: Path, title: str = "",
                        boundaries: list[float] = ()) -> None:
    """Judge top-k (solid) and exact-set (dashed) accuracy against minutes of training, as a PNG;
    ``boundaries``: the minutes where one stage of a chain ended and the next began (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for i, s in enumerate(splits):
        color = f"C{i}"
        ax.plot([r["minutes"] for r in rows], [r.get(f"{s}_topk") for r in rows], "o-", color=color, ms=3,
                label=f"{s} top-k")
        ax.plot([r["minutes"] for r in rows], [r.get(f"{s}_exact") for r in rows], "s--", color=color, ms=2.5,
                alpha=0.6, label=f"{s} exact-set")
    for minutes in boundaries:
        ax.axvline(minutes, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("judge accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
