"""The denoiser: a diffusers UNet2DModel whose class embedding is a projected multi-hot label.

The artifact of a run is what sampling needs and nothing else: the UNet saved with
``save_pretrained`` (so ``UNet2DModel.from_pretrained(RUN / "unet")`` works), the label
projection as safetensors, the scheduler config, the resolved ``config.toml`` and
``training_data.json`` (what the model saw, e.g. the most objects in one training image).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from clevrgen.config import Config, ModelConfig, load_config, to_toml
from clevrgen.errors import CheckpointError, ConfigError, first_line
from clevrgen.labels import NUM_CLASSES
from clevrgen.runtime import atomic_path, atomic_write_text

UNET_DIR = "unet"
LABEL_PROJ_FILE = "label_proj.safetensors"
SCHEDULER_DIR = "scheduler"
CONFIG_FILE = "config.toml"
DATA_FILE = "training_data.json"


class LabelConditionedUNet(nn.Module):
    """``unet(x_t, t, class_labels=label_proj(labels))``; the empty label is the unconditional one.

    With ``patch_size`` p > 1 the UNet sees each p x p patch of the image as 3 p^2 channels
    (pixel-unshuffle) and its output is shuffled back: full-size images in and out, at the cost
    of a UNet working at 1/p the resolution.
    """

    def __init__(self, unet: nn.Module, label_proj: nn.Linear, patch_size: int = 1):
        super().__init__()
        self.unet = unet
        self.label_proj = label_proj
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import pixel_shuffle, pixel_unshuffle

        embedding = self.label_proj(labels.to(self.label_proj.weight.dtype))
        p = self.patch_size
        if p == 1:
            return self.unet(x, t, class_labels=embedding).sample
        return pixel_shuffle(self.unet(pixel_unshuffle(x, p), t, class_labels=embedding).sample, p)


def unet_arguments(cfg: ModelConfig) -> dict:
    """The ``UNet2DModel`` arguments of an architecture config."""
    channels = 3 * cfg.patch_size**2
    return dict(
        sample_size=cfg.image_size // cfg.patch_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        class_embed_type="identity",
    )


def warn_if_upsampled(cfg: ModelConfig) -> None:
    """A model below 64x64 is capped by its upsampling: say so wherever one is trained or used."""
    if cfg.image_size < 64:
        from clevrgen.errors import warn

        warn(f"model.image_size = {cfg.image_size}: images are drawn below 64x64 and enlarged, which caps "
             "accuracy (real held-out images through a 32x32 path score 0.554 top-k, see benchmarks/resolution_path.py); "
             "model.patch_size = 2 keeps full 64x64 output at a similar cost")


def build_model(cfg: ModelConfig) -> LabelConditionedUNet:
    """A freshly initialized denoiser for this architecture config."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet_arguments(cfg))
    # The identity class embedding is added to the time embedding: 4x the first block's width.
    return LabelConditionedUNet(unet, nn.Linear(NUM_CLASSES, 4 * cfg.block_out_channels[0]), cfg.patch_size)


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _replace_dir(write, target: Path) -> None:
    """Write a folder beside ``target`` with ``write(tmp)``, then swap it in by renames.

    A kill between the two renames leaves no ``target`` but a complete ``.target.old``, which
    :func:`_settled_dir` reads; a kill at any other moment leaves ``target`` complete.
    """
    from clevrgen.runtime import os_error_of, write_error

    tmp = target.with_name(f".{target.name}.tmp")
    old = _old_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
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


def save_artifact(model: LabelConditionedUNet, config: Config, run_dir: Path,
                  training_data: dict | None = None) -> None:
    """Save the sampling artifact of ``model`` (pass the EMA weights) into ``run_dir``;
    ``training_data`` (e.g. ``{"max_objects": 3}``) goes to ``training_data.json``."""
    from safetensors.torch import save_file

    from clevrgen.diffusion import training_scheduler

    run_dir.mkdir(parents=True, exist_ok=True)
    if training_data is not None:
        atomic_write_text(run_dir / DATA_FILE, json.dumps(training_data) + "\n")
    _replace_dir(lambda tmp: model.unet.save_pretrained(tmp, safe_serialization=True), run_dir / UNET_DIR)
    proj = {k: v.detach().float().cpu().contiguous() for k, v in model.label_proj.state_dict().items()}
    with atomic_path(run_dir / LABEL_PROJ_FILE) as tmp:
        save_file(proj, str(tmp))
    _replace_dir(lambda tmp: training_scheduler(config.diffusion).save_pretrained(tmp), run_dir / SCHEDULER_DIR)
    atomic_write_text(run_dir / CONFIG_FILE, to_toml(config))


def training_data_of(run_dir: Path) -> dict:
    """What the run's ``training_data.json`` records ({} for runs saved without one)."""
    try:
        record = json.loads((Path(run_dir) / DATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def max_objects_of(labels: torch.Tensor) -> int:
    """The most objects in one image of a multi-hot label set [N, 24]."""
    return int(labels.sum(dim=1).max().item()) if len(labels) else 0


def artifact_dir(path: Path) -> Path:
    """The run folder of ``path`` (a run folder, or its ``unet`` folder)."""
    path = Path(path)
    return path.parent if path.name == UNET_DIR and (path.parent / LABEL_PROJ_FILE).exists() else path


def load_artifact(path: Path, device: torch.device | str = "cpu") -> tuple[LabelConditionedUNet, Config]:
    """The denoiser and the config it was trained with, from a run folder."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    run_dir = artifact_dir(path)
    if not run_dir.exists():
        raise CheckpointError(f"checkpoint not found: {run_dir}")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder: pass the folder that `clevrgen train --out` wrote")
    unet_dir = _settled_dir(run_dir / UNET_DIR)
    missing = [n for n, p in ((UNET_DIR, unet_dir), (LABEL_PROJ_FILE, run_dir / LABEL_PROJ_FILE),
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
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True,
                                           low_cpu_mem_usage=_have_accelerate())
    except Exception as exc:  # truncated or foreign files
        raise CheckpointError(f"cannot load the UNet in {unet_dir}: {_unet_problem(unet_dir, exc)}; "
                              "the run folder is damaged or not from clevrgen") from None
    _check_architecture(unet_dir, unet.config, config.model)
    try:
        proj = load_file(str(run_dir / LABEL_PROJ_FILE))
        label_proj = nn.Linear(NUM_CLASSES, proj["weight"].shape[0])
        label_proj.load_state_dict(proj)
    except Exception as exc:  # truncated files, foreign weights, shape mismatches
        raise CheckpointError(f"cannot load {run_dir / LABEL_PROJ_FILE}: {first_line(exc)}; "
                              "the run folder is damaged or not from clevrgen") from None
    model = LabelConditionedUNet(unet.float(), label_proj, config.model.patch_size)  # fp16 artifacts run in fp32
    if label_proj.out_features != unet.config.block_out_channels[0] * 4:
        raise CheckpointError(f"{run_dir}: the label projection does not fit the UNet")
    return model.to(device).eval(), config


def _have_accelerate() -> bool:
    """diffusers warns at every load without ``accelerate``; ask for what it would fall back to."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _unet_problem(unet_dir: Path, exc: Exception) -> str:
    """A short reason: safetensors' own message for a truncated file, else the first line."""
    from safetensors import safe_open

    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return f"{weights.name} is missing"
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as inner:
        return f"{weights.name} is truncated or not a safetensors file ({first_line(inner)})"
    return first_line(exc)


def _plain(value):
    """Config values as comparable plain data: diffusers keeps tuples, TOML gives lists."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_architecture(unet_dir: Path, saved: dict, cfg: ModelConfig) -> None:
    """The weights must be the architecture ``config.toml`` describes (sampling relies on it)."""
    expected = unet_arguments(cfg)
    differ = [k for k, v in expected.items() if _plain(saved.get(k)) != _plain(v)]
    if differ:
        k = differ[0]
        raise CheckpointError(
            f"{unet_dir.parent}: config.toml does not match the weights in {unet_dir.name}/ "
            f"({k}: config gives {_plain(expected[k])!r}, the weights have {_plain(saved.get(k))!r}); "
            "the folder mixes files of different runs"
        )


SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "model"
"""The generator shipped with the package: a run folder's artifact with fp16 weights."""


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
    return Path(run_dir).resolve() == SHIPPED_MODEL.resolve()


def describe_model(run_dir: Path) -> str:
    """One line naming the model a command uses and what it was trained on."""
    record = training_data_of(run_dir)
    name = "the shipped model" if is_shipped(run_dir) else str(run_dir)
    facts = [f"trained on {record['data']}" if record.get("data") else None,
             f"{record['steps']} steps" if record.get("steps") else None]
    facts = [f for f in facts if f]
    return name + (f" ({', '.join(facts)})" if facts else "")


def export_artifact(run: Path, out: Path, half: bool = True) -> None:
    """Copy a run's sampling artifact (no training state) to ``out``, its weights as fp16 with
    ``half``: what ships in the package, about half the size of the fp32 artifact."""
    model, config = load_artifact(run)
    if half:
        model = model.half()
    training_data = training_data_of(artifact_dir(run)) or None
    save_artifact(model, config, out, training_data)


def latest_run(root: Path = Path("runs")) -> Path:
    """The newest run folder under ``root`` that holds an artifact."""
    runs = sorted(
        (p for p in root.glob("*") if (p / UNET_DIR).is_dir() and (p / LABEL_PROJ_FILE).is_file()),
        key=lambda p: (p / LABEL_PROJ_FILE).stat().st_mtime,
    )
    if not runs:
        raise CheckpointError(
            f"no trained model found under {root}/: train one with `clevrgen train` or pass --checkpoint RUN"
        )
    return runs[-1]
