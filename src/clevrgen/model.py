"""The denoiser: a diffusers UNet2DModel whose class embedding is a projected multi-hot label.

The artifact of a run is what sampling needs and nothing else: the UNet saved with
``save_pretrained`` (so ``UNet2DModel.from_pretrained(RUN / "unet")`` works), the label
projection as safetensors, the scheduler config and the resolved ``config.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from clevrgen.config import Config, ModelConfig, load_config, to_toml
from clevrgen.errors import CheckpointError, ClevrgenError, ConfigError
from clevrgen.labels import NUM_CLASSES
from clevrgen.runtime import atomic_path, atomic_write_text

UNET_DIR = "unet"
LABEL_PROJ_FILE = "label_proj.safetensors"
SCHEDULER_DIR = "scheduler"
CONFIG_FILE = "config.toml"


class LabelConditionedUNet(nn.Module):
    """``unet(x_t, t, class_labels=label_proj(labels))``; the empty label is the unconditional one."""

    def __init__(self, unet: nn.Module, label_proj: nn.Linear):
        super().__init__()
        self.unet = unet
        self.label_proj = label_proj

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embedding = self.label_proj(labels.to(self.label_proj.weight.dtype))
        return self.unet(x, t, class_labels=embedding).sample


def build_model(cfg: ModelConfig) -> LabelConditionedUNet:
    """A freshly initialized denoiser for this architecture config."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        class_embed_type="identity",
    )
    # The identity class embedding is added to the time embedding: 4x the first block's width.
    return LabelConditionedUNet(unet, nn.Linear(NUM_CLASSES, 4 * cfg.block_out_channels[0]))


def _replace_dir(write, target: Path) -> None:
    """Write a folder beside ``target`` with ``write(tmp)``, then swap it in by renames."""
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_artifact(model: LabelConditionedUNet, config: Config, run_dir: Path) -> None:
    """Save the sampling artifact of ``model`` (pass the EMA weights) into ``run_dir``."""
    from safetensors.torch import save_file

    from clevrgen.diffusion import training_scheduler

    run_dir.mkdir(parents=True, exist_ok=True)
    _replace_dir(lambda tmp: model.unet.save_pretrained(tmp, safe_serialization=True), run_dir / UNET_DIR)
    proj = {k: v.detach().float().cpu().contiguous() for k, v in model.label_proj.state_dict().items()}
    with atomic_path(run_dir / LABEL_PROJ_FILE) as tmp:
        save_file(proj, str(tmp))
    _replace_dir(lambda tmp: training_scheduler(config.diffusion).save_pretrained(tmp), run_dir / SCHEDULER_DIR)
    atomic_write_text(run_dir / CONFIG_FILE, to_toml(config))


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
    missing = [n for n in (UNET_DIR, LABEL_PROJ_FILE, CONFIG_FILE) if not (run_dir / n).exists()]
    if missing:
        raise CheckpointError(
            f"{run_dir} is not a clevrgen run folder (missing {', '.join(missing)}); "
            "pass the folder that `clevrgen train --out` wrote"
        )
    try:
        config = load_config(run_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: {exc}") from None
    try:
        unet = UNet2DModel.from_pretrained(run_dir / UNET_DIR)
        proj = load_file(str(run_dir / LABEL_PROJ_FILE))
        label_proj = nn.Linear(NUM_CLASSES, proj["weight"].shape[0])
        label_proj.load_state_dict(proj)
    except ClevrgenError:
        raise
    except Exception as exc:  # truncated files, foreign weights, shape mismatches
        raise CheckpointError(f"cannot load the checkpoint in {run_dir}: {str(exc).splitlines()[0]}") from None
    model = LabelConditionedUNet(unet, label_proj)
    if label_proj.out_features != unet.config.block_out_channels[0] * 4:
        raise CheckpointError(f"{run_dir}: the label projection does not fit the UNet")
    return model.to(device).eval(), config


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
