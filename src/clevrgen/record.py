"""A model's training record, ``training_data.json``: what the model saw (its data, its steps, the
most objects in one training image) and its chain of training stages, each with its curve.

Training and ``clevrgen export`` write it (:mod:`clevrgen.artifact`), the pipeline reads the most
objects from it, and the commands and ``benchmarks/training_curve.py`` describe a model by it. A
stage is made from a run's ``metrics.jsonl`` with :mod:`clevrgen.report`'s readers.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from clevrgen.errors import CheckpointError
from clevrgen.inputs import input_file, read_json
from clevrgen.report import accuracy_curve, read_metrics, training_minutes

if TYPE_CHECKING:
    import torch

DATA_FILE = "training_data.json"


def training_data_of(run_dir: Path) -> dict:
    """What the run's ``training_data.json`` records ({} for runs saved without one); a file that
    is not JSON or holds values of the wrong type is a damaged run folder (CheckpointError)."""
    from clevrgen.config import validate_training_record

    file = input_file(Path(run_dir) / DATA_FILE)
    if not file.is_file():
        return {}
    record = read_json(file, CheckpointError, "; the run folder is damaged: restore it, or delete it (the model "
                       "then does not warn about large scenes)")
    problems = validate_training_record(record)
    if problems:
        raise CheckpointError(f"{file} is not a valid training record: {'; '.join(problems)}; the run folder is "
                              "damaged: restore it, or delete it (the model then does not warn about large scenes)")
    return record


def max_objects_of(labels: "torch.Tensor") -> int:
    """The most objects in one image of a multi-hot label set [N, 24]."""
    return int(labels.sum(dim=1).max().item()) if len(labels) else 0


def stage_record(run_dir: Path, steps: int) -> dict:
    """One stage of a model's chain of training runs (``training_data.json``'s ``stages``): what
    it started from, its steps, images, lr plan, data and machine, its minutes of training (the
    logged windows' images over their img/s) and its curve (one pass of each evaluated split, as
    logged while training)."""
    from clevrgen.config import load_config

    t = load_config(run_dir / "config.toml").train
    record = training_data_of(run_dir)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step", 0) <= steps]
    world = next((r["world_size"] for r in records if "world_size" in r), 1)
    at = training_minutes(records, t.batch_size * world)
    lr = f"{t.warmup_steps:,}-step warm-up to lr {t.lr:g}, constant"
    if t.lr_decay_steps:
        lr += f", cosine cool-down to {t.lr * t.lr_final:.2g} over the last {t.lr_decay_steps:,} steps"
    curve = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
             for row in accuracy_curve(records, t.batch_size * world, t.eval_splits)]
    return {"from": record.get("init", "random weights"), "steps": steps, "images": steps * t.batch_size * world,
            "lr_plan": lr, "data": record.get("data"), "machine": record.get("machine", "not recorded"),
            "minutes": round(at[-1][1], 1) if at else None, "curve": curve}


def with_stage(record: dict, run_dir: Path, steps: int) -> dict:
    """``record`` (a run's training_data) with the run appended to its chain of stages, if
    ``run_dir`` is a training run (an export of an export keeps the chain as it is)."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return record
    return {**record, "stages": [*record.get("stages", []), stage_record(Path(run_dir), steps)]}


def chain_curve(stages: list[dict]) -> tuple[list[dict], list[float]]:
    """The curves of a chain of stages (``training_data.json``'s ``stages``) as one, steps and
    minutes counted on from stage to stage; and the minutes at which each later stage began."""
    rows, boundaries, step0, minutes0 = [], [], 0, 0.0
    for i, stage in enumerate(stages):
        if i:
            boundaries.append(minutes0)
        rows += [{**r, "stage": i, "step": r["step"] + step0, "minutes": r["minutes"] + minutes0}
                 for r in stage.get("curve", [])]
        step0, minutes0 = step0 + stage["steps"], minutes0 + (stage["minutes"] or 0.0)
    return rows, boundaries


def describe_chain(stages: list[dict]) -> str:
    """The steps of a chain of stages, "12,000 + 7,000 steps"; where the stages' batch sizes
    differ, each run of equal batches says its own: "12,000 + 7,000 steps of 32 + 4,250 steps of 64"."""
    def batch(stage: dict) -> int:
        return stage.get("images", 0) // stage["steps"] if stage.get("steps") else 0

    groups = [(size, [f"{st.get('steps', 0):,}" for st in run]) for size, run in groupby(stages, key=batch)]
    if len(groups) == 1:
        return " + ".join(groups[0][1]) + " steps"
    return " + ".join(" + ".join(steps) + f" steps of {size}" for size, steps in groups)


def resumed_record(record: dict, run_dir: Path) -> dict:
    """A resumed run's ``record`` (of its data and this machine) with what its saved record says of
    its weights: the init source and stages, and the machines it ran on before. The checkpoint
    holds the weights: the init source is neither read nor needed."""
    saved = training_data_of(run_dir)
    record = {**record, **{k: saved[k] for k in ("init", "stages") if k in saved}}
    if saved.get("machine") and not saved["machine"].endswith(record["machine"]):
        record["machine"] = f"{saved['machine']}, then {record['machine']}"
    return record
