"""A run's first weights from a saved model (``train.init``): the same architecture's weights, or
a generator's widened into an editor (its source channels at zero); and what the run's record says
of where its weights came from (that model, or on a resume the run's own record)."""

from __future__ import annotations

from pathlib import Path

from clevrgen.config import Config
from clevrgen.errors import CheckpointError, ConfigError
from clevrgen.model import (
    LabelConditionedUNet, describe_model, load_artifact, resolve_checkpoint, training_data_of, widen_to_editor,
)


def init_from(model: LabelConditionedUNet, cfg: Config) -> dict:
    """Load the weights of ``cfg.train.init`` into ``model``; returns the run's record of them: the
    source (``init``) and the source's own chain of stages, to which an export of this run adds it."""
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
    return {"init": describe_model(source), "stages": training_data_of(source).get("stages", [])}


def resumed_record(record: dict, run_dir: Path) -> dict:
    """A resumed run's ``record`` (of its data and this machine) with what its saved record says of
    its weights: the init source and stages, and the machines it ran on before. The checkpoint
    holds the weights: the init source is neither read nor needed."""
    saved = training_data_of(run_dir)
    record = {**record, **{k: saved[k] for k in ("init", "stages") if k in saved}}
    if saved.get("machine") and not saved["machine"].endswith(record["machine"]):
        record["machine"] = f"{saved['machine']}, then {record['machine']}"
    return record
