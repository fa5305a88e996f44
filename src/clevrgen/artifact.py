"""The saved model: a run folder's artifact, what sampling needs and nothing else.

    RUN/model_index.json     the ClevrgenPipeline's index (diffusers' layout) and its sampling defaults
    RUN/unet/                the UNet, ``save_pretrained`` (``UNet2DModel.from_pretrained(RUN / "unet")`` works)
    RUN/label_encoder/       the LabelEncoder, safetensors (fp32 always)
    RUN/scheduler/           the sampler's config
    RUN/config.toml          the resolved config it was trained with
    RUN/training_data.json   what it saw (:mod:`clevrgen.record`)

Saving, strict loading and exporting; where the shipped model lives and which folder a command
samples from. The network itself is :mod:`clevrgen.model`'s.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from clevrgen.config import Config, ModelConfig, SampleConfig, load_config
from clevrgen.config_file import to_toml
from clevrgen.errors import CheckpointError, ConfigError, first_line
from clevrgen.integrity import ASSETS, verify_shipped
from clevrgen.model import LabelConditionedUNet, build_model, unet_arguments, unet_class, widen_to_editor
from clevrgen.inputs import input_file, read_json
from clevrgen.locks import folder_lock
from clevrgen.output import atomic_write_text
from clevrgen.record import DATA_FILE, describe_chain, training_data_of, with_stage

UNET_DIR = "unet"
LABEL_ENCODER_DIR = "label_encoder"
LABEL_PROJ_FILE = "label_proj.safetensors"
"""How runs written before the label encoder kept its one linear layer (still read)."""
SCHEDULER_DIR = "scheduler"
CONFIG_FILE = "config.toml"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _replace_dir(write, target: Path) -> None:
    """Write a folder beside ``target`` with ``write(tmp)``, then swap it in by renames.

    A kill between the two renames leaves no ``target`` but a complete ``.target.old``, which
    :func:`_settled_dir` reads; a kill at any other moment leaves ``target`` complete.
    """
    from clevrgen.output import os_error_of, share_files, write_error

    tmp = target.with_name(f".{target.name}.tmp")
    old = _old_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        share_files(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
    except BaseException as exc:  # a full disk: the old folder stays, the half-written one goes
        err = os_error_of(exc, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise write_error(err, target) from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _settled_dir(target: Path) -> Path:
    """``target``, or the complete previous version a kill mid-swap left beside it."""
    return _old_dir(target) if not target.exists() and _old_dir(target).is_dir() else target


MODEL_INDEX = "model_index.json"
PIPELINE_DEFAULTS = ("num_inference_steps", "guidance_scale", "precision", "max_objects", "image_guidance_scale")
"""The settings a ClevrgenPipeline keeps in model_index.json beside its components."""
STUB_MODULE = "pipeline_clevrgen"
"""A one-line module in every artifact, named by ``model_index.json``'s ``_class_name``, through
which diffusers' own ``DiffusionPipeline.from_pretrained`` finds ``clevrgen.ClevrgenPipeline``."""
STUB = ('"""Lets diffusers\' DiffusionPipeline.from_pretrained load this folder (clevrgen must be installed)."""\n'
        "from clevrgen.pipeline import ClevrgenPipeline  # noqa: F401\n")


def write_pipeline_index(folder: Path, components: dict[str, object], defaults: dict) -> None:
    """``model_index.json`` as diffusers writes it, with the class named through the stub module."""
    import diffusers

    index = {"_class_name": [STUB_MODULE, "ClevrgenPipeline"], "_diffusers_version": diffusers.__version__, **defaults}
    for name, module in components.items():
        index[name] = [type(module).__module__.split(".")[0], type(module).__name__]
    atomic_write_text(folder / MODEL_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / f"{STUB_MODULE}.py", STUB)


def read_pipeline_index(folder: Path) -> tuple[dict[str, object], dict]:
    """The components (each by its own ``from_pretrained``, locally) and the sampling defaults of
    a folder written by ``ClevrgenPipeline.save_pretrained`` without clevrgen's ``config.toml``.
    The class is known, so the stub module diffusers' own loader goes through is not needed."""
    import importlib

    from clevrgen.config import validate_pipeline_index

    try:
        text = input_file(folder / MODEL_INDEX).read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a clevrgen model or pipeline folder (no config.toml or "
                              f"{MODEL_INDEX})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {folder / MODEL_INDEX}: {first_line(exc)}") from None
    problems = validate_pipeline_index(text)
    if problems:
        raise CheckpointError(f"{folder / MODEL_INDEX} is not a valid pipeline index: {'; '.join(problems)}; "
                              "restore it, or save the pipeline again (save_pretrained)")
    try:
        index = json.loads(text)
        components = {}
        for name in ("unet", "label_encoder", "scheduler"):
            library, class_name = index[name]
            if library not in ("diffusers", "clevrgen"):
                raise ValueError(f"{name} comes from {library!r}, not diffusers or clevrgen")
            component = getattr(importlib.import_module(library), class_name)
            components[name] = component.from_pretrained(folder / name, local_files_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a clevrgen model or pipeline folder (no config.toml or "
                              f"{MODEL_INDEX})") from None
    except Exception as exc:
        raise CheckpointError(f"cannot load the pipeline in {folder}: {first_line(exc)}") from None
    return components, {k: index[k] for k in PIPELINE_DEFAULTS if k in index}


def save_artifact(model: LabelConditionedUNet, config: Config, run_dir: Path,
                  training_data: dict | None = None) -> None:
    """Save the sampling artifact of ``model`` (pass the EMA weights) into ``run_dir``: a
    ``ClevrgenPipeline`` folder (``model_index.json``, ``unet/``, ``label_encoder/``, and the
    sampler of ``config.sample`` in ``scheduler/``) plus ``config.toml``; ``training_data``
    (e.g. ``{"max_objects": 3}``) goes to ``training_data.json``."""
    from clevrgen.diffusion import sampling_scheduler

    with folder_lock(run_dir):  # one writer: two exports into one folder never mix
        _replace_dir(lambda tmp: model.unet.save_pretrained(tmp, safe_serialization=True), run_dir / UNET_DIR)
        # The label encoder stays fp32 (it is tiny), so an fp16 export keeps the labels exact.
        encoder = copy.deepcopy(model.label_encoder).float()
        _replace_dir(lambda tmp: encoder.save_pretrained(tmp, safe_serialization=True), run_dir / LABEL_ENCODER_DIR)
        (run_dir / LABEL_PROJ_FILE).unlink(missing_ok=True)  # an older layout's copy, now stale
        scheduler = sampling_scheduler(config.diffusion, config.sample.sampler)
        _replace_dir(lambda tmp: scheduler.save_pretrained(tmp), run_dir / SCHEDULER_DIR)
        if training_data is not None:  # after the weights: a stop before them leaves nothing its rerun must explain
            atomic_write_text(run_dir / DATA_FILE, json.dumps(training_data) + "\n")
        atomic_write_text(run_dir / CONFIG_FILE, to_toml(config))
        record = training_data if training_data is not None else training_data_of(run_dir)
        write_pipeline_index(run_dir, {"unet": model.unet, "label_encoder": encoder, "scheduler": scheduler}, {
            "num_inference_steps": config.sample.steps, "guidance_scale": config.sample.guidance,
            "precision": config.train.precision, "max_objects": record.get("max_objects"),
            "image_guidance_scale": config.sample.image_guidance})


def copy_run_record(source: Path | None, folder: Path) -> None:
    """The model folder ``source``'s ``config.toml`` and ``training_data.json`` into ``folder``;
    one ``source`` lacks (or with no ``source``) is removed from ``folder``: an earlier model's
    file would describe another model."""
    for name in (CONFIG_FILE, DATA_FILE):
        if source is not None and (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, folder / name)
        else:
            (folder / name).unlink(missing_ok=True)


def artifact_dir(path: Path) -> Path:
    """The run folder of ``path`` (a run folder, or its ``unet`` folder)."""
    path = Path(path)
    if path.name == UNET_DIR and any((path.parent / n).exists() for n in (LABEL_ENCODER_DIR, LABEL_PROJ_FILE)):
        return path.parent
    return path


def _load_weights(module: nn.Module, file: Path, what: str, rename=lambda key: key) -> None:
    """Load ``file`` into ``module`` only if it holds exactly the module's tensors and shapes;
    else one line naming the first tensor that is missing, unexpected or of another shape."""
    from safetensors.torch import load_file

    input_file(file)
    try:
        weights = {rename(k): v for k, v in load_file(str(file)).items()}
    except Exception as exc:  # truncated or not safetensors at all
        raise CheckpointError(f"cannot load {what}: {file.name} is truncated or not a safetensors file "
                              f"({first_line(exc)}); the run folder is damaged or not from clevrgen") from None
    expected = module.state_dict()
    problem = next((f"tensor {k} is missing" for k in expected if k not in weights), None)
    problem = problem or next((f"tensor {k} is not part of this architecture" for k in weights if k not in expected), None)
    problem = problem or next((f"tensor {k} has shape {list(weights[k].shape)}, the architecture needs "
                               f"{list(v.shape)}" for k, v in expected.items() if weights[k].shape != v.shape), None)
    if problem:
        raise CheckpointError(f"cannot load {what} from {file}: {problem}; the weights do not fit the "
                              "architecture its config describes (damaged, or files of different runs)")
    module.load_state_dict(weights)


def _read_json(file: Path, what: str) -> dict:
    record = read_json(file, CheckpointError, f"; cannot load {what}: the run folder is damaged or not from clevrgen")
    if not isinstance(record, dict):
        raise CheckpointError(f"cannot load {what}: {file} is not a config object; the run folder is damaged")
    return record


def load_artifact(path: Path, device: torch.device | str = "cpu") -> tuple[LabelConditionedUNet, Config]:
    """The denoiser and the config it was trained with, from a run folder.

    The model is built from ``config.toml`` and the saved weights must fit it exactly: a missing,
    foreign or reshaped tensor is refused, never left at its random initial value.
    """
    run_dir = artifact_dir(path)
    if not run_dir.exists():
        raise CheckpointError(f"checkpoint not found: {run_dir}")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder: pass the folder that `clevrgen train --out` wrote")
    if is_shipped(run_dir):
        verify_shipped(run_dir)
    unet_dir = _settled_dir(run_dir / UNET_DIR)
    encoder_dir = _settled_dir(run_dir / LABEL_ENCODER_DIR)
    encoder = encoder_dir if encoder_dir.exists() else run_dir / LABEL_PROJ_FILE
    missing = [n for n, p in ((UNET_DIR, unet_dir), (LABEL_ENCODER_DIR, encoder),
                              (CONFIG_FILE, run_dir / CONFIG_FILE)) if not p.exists()]
    if missing:
        raise CheckpointError(
            f"{run_dir} is not a clevrgen run folder (missing {', '.join(missing)}); "
            "pass the folder that `clevrgen train --out` wrote"
        )
    try:
        config = load_config(run_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(f"{run_dir / CONFIG_FILE} is not a valid run config:\n"
                              + "\n".join(f"  {p}" for p in exc.problems)) from None
    if not (unet_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"cannot load the UNet in {unet_dir}: {WEIGHTS_FILE} is missing; "
                              "the run folder is damaged or not from clevrgen")
    _check_architecture(unet_dir, _read_json(unet_dir / "config.json", "the UNet"), config.model)
    model = build_model(config.model)
    _load_weights(model.unet, unet_dir / WEIGHTS_FILE, f"the UNet in {unet_dir}")
    if encoder.is_dir():
        saved = _read_json(encoder / "config.json", "the label encoder")
        differ = [k for k, v in model.label_encoder.config.items() if not k.startswith("_") and saved.get(k) != v]
        if differ:
            raise CheckpointError(f"{run_dir}: the label encoder ({differ[0]} {saved.get(differ[0])!r}) does not fit "
                                  f"config.toml's model ({model.label_encoder.config[differ[0]]!r}); the folder mixes runs")
        _load_weights(model.label_encoder, encoder / WEIGHTS_FILE, f"the label encoder in {encoder}")
    else:  # a run written before the label encoder: its one linear layer
        _load_weights(model.label_encoder, encoder, f"the label projection {encoder}", rename=lambda k: f"proj.{k}")
    return model.to(device).eval(), config


def _plain(value):
    """Config values as comparable plain data: diffusers keeps tuples, TOML gives lists."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_architecture(unet_dir: Path, saved: dict, cfg: ModelConfig) -> None:
    """The weights must be the architecture ``config.toml`` describes (sampling relies on it)."""
    expected = dict(unet_arguments(cfg), _class_name=unet_class(cfg).__name__)
    differ = [k for k, v in expected.items() if _plain(saved.get(k)) != _plain(v)]
    if differ:
        k = differ[0]
        raise CheckpointError(
            f"{unet_dir.parent}: config.toml does not match the weights in {unet_dir.name}/ "
            f"({k}: config gives {_plain(expected[k])!r}, the weights have {_plain(saved.get(k))!r}); "
            "the folder mixes files of different runs"
        )


SHIPPED_MODEL = ASSETS / "model"
"""The generator shipped with the package: a run folder's artifact with fp16 weights."""
SHIPPED_EDITOR = SHIPPED_MODEL.parent / "editor"
"""The editor shipped with the package (``clevrgen edit``): a model folder with fp16 weights."""


def resolve_checkpoint(checkpoint: Path | str | None) -> Path:
    """The run folder a command samples from: the shipped model when none is given, the newest
    run under ``runs/`` for ``latest``, else the folder given."""
    if checkpoint is None or (str(checkpoint) == "shipped" and not Path(checkpoint).exists()):
        if not (SHIPPED_MODEL / CONFIG_FILE).is_file():
            raise CheckpointError("this install has no shipped model: pass --checkpoint RUN (or latest)")
        return SHIPPED_MODEL
    if str(checkpoint) == "latest" and not Path(checkpoint).exists():
        return latest_run()
    return artifact_dir(Path(checkpoint))


def is_shipped(run_dir: Path) -> bool:
    """Whether ``run_dir`` is one of the models that ship in the package (checked against SHA256SUMS)."""
    return Path(run_dir).resolve() in (SHIPPED_MODEL.resolve(), SHIPPED_EDITOR.resolve())


def describe_model(run_dir: Path) -> str:
    """One line naming the model a command uses and what it was trained on."""
    record = training_data_of(run_dir)
    shipped = {SHIPPED_MODEL.resolve(): "the shipped model", SHIPPED_EDITOR.resolve(): "the shipped editor"}
    name = shipped.get(Path(run_dir).resolve(), str(run_dir))
    stages = record.get("stages") or []
    steps = (f"{describe_chain(stages)} in {len(stages)} stages" if len(stages) > 1
             else f"{record['steps']} steps" if record.get("steps") else None)
    facts = [f"trained on {record['data']}" if record.get("data") else None, steps]
    facts = [f for f in facts if f]
    return name + (f" ({', '.join(facts)})" if facts else "")


def export_artifact(run: Path, out: Path, half: bool = True, sample: SampleConfig | None = None,
                    stage: bool = False) -> None:
    """Copy a run's sampling artifact (no training state) to ``out``, its weights as fp16 with
    ``half``: what ships in the package, about half the size of the fp32 artifact. ``sample``
    (default: the run's) becomes the export's sampling defaults; with ``stage`` the run joins
    its model's chain of training stages (:func:`clevrgen.record.with_stage`)."""
    model, config = load_artifact(run)
    if sample is not None:
        config = config.model_copy(update={"sample": sample})
    if half:
        model.unet.half()  # the label encoder is tiny and stays fp32
    training_data = training_data_of(artifact_dir(run)) or None
    if stage and training_data is not None:
        training_data = with_stage(training_data, artifact_dir(run), int(training_data.get("steps", 0)))
    save_artifact(model, config, out, training_data)


def latest_run(root: Path = Path("runs")) -> Path:
    """The newest run folder under ``root`` that holds an artifact."""
    runs = sorted(
        (p for p in root.glob("*") if (p / UNET_DIR).is_dir() and (p / CONFIG_FILE).is_file()),
        key=lambda p: (p / CONFIG_FILE).stat().st_mtime,
    )
    if not runs:
        raise CheckpointError(
            f"no trained model found under {root}/: train one with `clevrgen train` or pass --checkpoint RUN"
        )
    return runs[-1]


# --- a run's first weights from a saved model (train.init) ---------------------------------------
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
