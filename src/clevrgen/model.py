"""The denoiser: a diffusers UNet2DModel whose class embedding is a projected multi-hot label.

The artifact of a run is what sampling needs and nothing else: the UNet saved with
``save_pretrained`` (so ``UNet2DModel.from_pretrained(RUN / "unet")`` works), the label
projection as safetensors, the scheduler config, the resolved ``config.toml`` and
``training_data.json`` (what the model saw, e.g. the most objects in one training image).
"""

from __future__ import annotations

import copy
import json
import shutil
from itertools import groupby
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from clevrgen.config import Config, ModelConfig, SampleConfig, load_config, to_toml
from clevrgen.errors import CheckpointError, ConfigError, first_line
from clevrgen.filenames import (CONFIG_FILE, DATA_FILE, LABEL_ENCODER_DIR, LABEL_PROJ_FILE, MODEL_INDEX, SCHEDULER_DIR,
                                STUB_MODULE, UNET_DIR)
from clevrgen.inputs import input_file
from clevrgen.labels import COLORS, NUM_CLASSES, SHAPES
from clevrgen.locks import folder_lock
from clevrgen.output import atomic_write_text


class LabelEncoder(ModelMixin, ConfigMixin):
    """A multi-hot label [B, 24] as the UNet's conditioning: always a pooled embedding (added to
    the time embedding, or scaling and shifting every block's norm), and with ``token_dim`` one
    token per object for cross-attention.

    An object's token is the sum of its class', its color's and its shape's embeddings; a learned
    null token is always present, so the empty label (the unconditional one) attends to it alone.
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, embedding_dim: int = 256, token_dim: int = 0,
                 num_colors: int = len(COLORS), num_shapes: int = len(SHAPES)):
        super().__init__()
        self.proj = nn.Linear(num_classes, embedding_dim)
        if token_dim:
            self.class_tokens = nn.Embedding(num_classes, token_dim)
            self.color_tokens = nn.Embedding(num_colors, token_dim)
            self.shape_tokens = nn.Embedding(num_shapes, token_dim)
            self.null_token = nn.Parameter(torch.zeros(token_dim))
            for table in (self.class_tokens, self.color_tokens, self.shape_tokens):
                nn.init.normal_(table.weight, std=0.5)
            class_index = torch.arange(num_classes)
            self.register_buffer("class_color", class_index % num_colors, persistent=False)
            self.register_buffer("class_shape", class_index // num_colors, persistent=False)

    def tokens(self, labels: torch.Tensor, num_objects: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1 + K, token_dim] tokens and their [B, 1 + K] mask (1: an object or the null
        token, 0: padding). K is ``num_objects``, at least the most objects in one label (a caller
        that knows it on the host passes it), else the number of classes: the largest scene the
        vocabulary allows, so that the shape never depends on the labels' values (no device sync,
        one graph for ``torch.compile``). The mask hides the padding from attention where a level
        has self- and cross-attention (every shipped design); diffusers applies no mask in a
        cross-attention-only block, whose output therefore depends on K."""
        k = labels.shape[1] if num_objects is None else num_objects
        present, index = labels.topk(k, dim=1)  # the objects first, in any order
        embed = self.class_tokens(index) + self.color_tokens(self.class_color[index]) + self.shape_tokens(self.class_shape[index])
        null = self.null_token.to(embed.dtype).expand(len(labels), 1, -1)
        mask = torch.cat([labels.new_ones(len(labels), 1), (present > 0).to(labels.dtype)], dim=1)
        return torch.cat([null, embed], dim=1), mask

    def forward(self, labels: torch.Tensor, num_objects: int | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning keyword arguments for ``labels`` (``num_objects``: see :meth:`tokens`)."""
        labels = labels.to(self.proj.weight.dtype)
        conditioning = {"class_labels": self.proj(labels)}
        if self.config.token_dim:
            tokens, mask = self.tokens(labels, num_objects)
            conditioning.update(encoder_hidden_states=tokens, encoder_attention_mask=mask)
        return conditioning


class LabelConditionedUNet(nn.Module):
    """``unet(x_t, t, **label_encoder(labels))``; the empty label is the unconditional one.

    With ``patch_size`` p > 1 the UNet sees each p x p patch of the image as 3 p^2 channels
    (pixel-unshuffle) and its output is shuffled back: full-size images in and out, at the cost
    of a UNet working at 1/p the resolution. An editor's UNet (twice the input channels) also
    sees a ``source`` image beside the noisy one; the empty source (zeros, or None) is no source.
    """

    def __init__(self, unet: nn.Module, label_encoder: LabelEncoder, patch_size: int = 1):
        super().__init__()
        self.unet = unet
        self.label_encoder = label_encoder
        self.patch_size = patch_size

    @property
    def is_editor(self) -> bool:
        """Whether the UNet takes a source image (its input channels are twice its output's)."""
        return self.unet.config.in_channels == 2 * self.unet.config.out_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, num_objects: int | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(x, t, self.label_encoder(labels, num_objects), source)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, conditioning: dict[str, torch.Tensor],
                source: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction for labels already encoded (``label_encoder(labels)``): a sampling loop
        encodes its labels once, not at every step. ``source``: an editor's source images, as
        ``x`` in [-1, 1] (None: the empty source)."""
        from torch.nn.functional import pixel_shuffle, pixel_unshuffle

        p = self.patch_size
        unshuffle = (lambda image: pixel_unshuffle(image, p)) if p > 1 else (lambda image: image)
        if self.is_editor:  # the channels: [noisy patch, source patch]
            source = torch.zeros_like(x) if source is None else source.to(x.dtype)
            x_in = torch.cat([unshuffle(x), unshuffle(source)], dim=1)
        elif source is not None:
            raise ValueError("this model is a generator: it takes no source image")
        else:
            x_in = unshuffle(x)
        out = self.unet(x_in, t, **conditioning).sample
        return pixel_shuffle(out, p) if p > 1 else out


def widen_to_editor(editor: LabelConditionedUNet, generator: LabelConditionedUNet) -> None:
    """Start ``editor`` as ``generator``: every weight copied, and the first convolution's new
    source channels zero, so that the editor's first prediction is the generator's, whatever
    the source (InstructPix2Pix's initialisation)."""
    state = generator.state_dict()
    key = "unet.conv_in.weight"
    wide = torch.zeros_like(editor.state_dict()[key])
    wide[:, : state[key].shape[1]] = state[key]
    editor.load_state_dict({**state, key: wide})


def is_conditional(cfg: ModelConfig) -> bool:
    """Whether the architecture attends to per-object tokens (a ``UNet2DConditionModel``)."""
    return any(cfg.cross_attention)


def unet_arguments(cfg: ModelConfig) -> dict:
    """The ``UNet2DModel`` (or, with cross-attention, ``UNet2DConditionModel``) arguments of an
    architecture config."""
    channels = 3 * cfg.patch_size**2
    common = dict(
        sample_size=cfg.image_size // cfg.patch_size,
        in_channels=2 * channels if cfg.source_image else channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        class_embed_type="identity",
        resnet_time_scale_shift=cfg.resnet_time_scale_shift,
    )
    if not is_conditional(cfg):
        return dict(
            common,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
            attention_head_dim=cfg.attention_head_dim,
        )
    # A level with cross-attention gets a transformer block (self-attention too where
    # ``attention`` asks for it); a level with self-attention alone keeps UNet2DModel's block.
    kinds = ["CrossAttn" if c else "Attn" if a else "" for a, c in zip(cfg.attention, cfg.cross_attention)]
    # diffusers' historical naming: for a UNet2DConditionModel "attention_head_dim" is the
    # number of heads of its transformer blocks, and the head width of its plain attention blocks.
    heads = tuple(c // cfg.cross_attention_head_dim if k == "CrossAttn" else cfg.attention_head_dim
                  for k, c in zip(kinds, cfg.block_out_channels))
    return dict(
        common,
        down_block_types=tuple(f"{k}DownBlock2D" for k in kinds),
        up_block_types=tuple(f"{k}UpBlock2D" for k in reversed(kinds)),
        only_cross_attention=tuple(c and not a for a, c in zip(cfg.attention, cfg.cross_attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=heads,
        cross_attention_dim=cfg.token_dim,
    )


def warn_if_upsampled(cfg: ModelConfig) -> None:
    """A model below 64x64 is capped by its upsampling: say so wherever one is trained or used."""
    if cfg.image_size < 64:
        from clevrgen.errors import warn

        warn(f"model.image_size = {cfg.image_size}: images are drawn below 64x64 and enlarged, which caps "
             "accuracy (real held-out images through a 32x32 path score 0.554 top-k, see benchmarks/resolution_path.py); "
             "model.patch_size = 2 keeps full 64x64 output at a similar cost")


def attention_kernel_for(kernel: str, device: "torch.device | str") -> str:
    """The attention kernel a model computes with on ``device``: "auto" is "math" on the CPU (the
    explicit matmuls train ~1.2x faster on 2 cores, whose fused backward is slow for short
    sequences) and "sdpa" elsewhere (the fused kernel is the fast one on a GPU); "sdpa" and
    "math" force that kernel."""
    if kernel != "auto":
        return kernel
    return "math" if torch.device(device).type == "cpu" else "sdpa"


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    """Every attention layer of ``model`` computes with ``kernel``: "sdpa" (torch's fused
    scaled_dot_product_attention, diffusers' default) or "math" (explicit matmuls and softmax);
    "auto" chooses by the device the model's weights are on (:func:`attention_kernel_for`)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    if kernel == "auto":
        kernel = attention_kernel_for(kernel, next(model.parameters()).device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor() if kernel == "math" else AttnProcessor2_0())


def unet_class(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel, UNet2DModel

    return UNet2DConditionModel if is_conditional(cfg) else UNet2DModel


def build_model(cfg: ModelConfig) -> LabelConditionedUNet:
    """A freshly initialized denoiser for this architecture config."""
    unet = unet_class(cfg)(**unet_arguments(cfg))
    # The identity class embedding goes where the time embedding goes: 4x the first block's width.
    encoder = LabelEncoder(embedding_dim=4 * cfg.block_out_channels[0], token_dim=cfg.token_dim if is_conditional(cfg) else 0)
    return LabelConditionedUNet(unet, encoder, cfg.patch_size)


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _replace_dir(write, target: Path) -> None:
    """Write a folder beside ``target`` with ``write(tmp)``, then swap it in by renames.

    A kill between the two renames leaves no ``target`` but a complete ``.target.old``, which
    :func:`_settled_dir` reads; a kill at any other moment leaves ``target`` complete.
    """
    from clevrgen.output import os_error_of, write_error

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


PIPELINE_DEFAULTS = ("num_inference_steps", "guidance_scale", "precision", "max_objects", "image_guidance_scale")
"""The settings a ClevrgenPipeline keeps in model_index.json beside its components."""
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


def save_artifact(model: LabelConditionedUNet, config: Config, run_dir: Path,
                  training_data: dict | None = None) -> None:
    """Save the sampling artifact of ``model`` (pass the EMA weights) into ``run_dir``: a
    ``ClevrgenPipeline`` folder (``model_index.json``, ``unet/``, ``label_encoder/``, and the
    sampler of ``config.sample`` in ``scheduler/``) plus ``config.toml``; ``training_data``
    (e.g. ``{"max_objects": 3}``) goes to ``training_data.json``."""
    from clevrgen.diffusion import sampling_scheduler

    with folder_lock(run_dir):  # one writer: two exports into one folder never mix
        if training_data is not None:
            atomic_write_text(run_dir / DATA_FILE, json.dumps(training_data) + "\n")
        _replace_dir(lambda tmp: model.unet.save_pretrained(tmp, safe_serialization=True), run_dir / UNET_DIR)
        # The label encoder stays fp32 (it is tiny), so an fp16 export keeps the labels exact.
        encoder = copy.deepcopy(model.label_encoder).float()
        _replace_dir(lambda tmp: encoder.save_pretrained(tmp, safe_serialization=True), run_dir / LABEL_ENCODER_DIR)
        (run_dir / LABEL_PROJ_FILE).unlink(missing_ok=True)  # an older layout's copy, now stale
        scheduler = sampling_scheduler(config.diffusion, config.sample.sampler)
        _replace_dir(lambda tmp: scheduler.save_pretrained(tmp), run_dir / SCHEDULER_DIR)
        atomic_write_text(run_dir / CONFIG_FILE, to_toml(config))
        record = training_data if training_data is not None else training_data_of(run_dir)
        write_pipeline_index(run_dir, {"unet": model.unet, "label_encoder": encoder, "scheduler": scheduler}, {
            "num_inference_steps": config.sample.steps, "guidance_scale": config.sample.guidance,
            "precision": config.train.precision, "max_objects": record.get("max_objects"),
            "image_guidance_scale": config.sample.image_guidance})


def training_data_of(run_dir: Path) -> dict:
    """What the run's ``training_data.json`` records ({} for runs saved without one); a file that
    is not JSON or holds values of the wrong type is a damaged run folder (CheckpointError)."""
    from clevrgen.config import validate_training_record

    file = input_file(Path(run_dir) / DATA_FILE)
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable or not JSON ({first_line(exc)}); the run folder is damaged: "
                              "restore it, or delete it (the model then does not warn about large scenes)") from None
    problems = validate_training_record(record)
    if problems:
        raise CheckpointError(f"{file} is not a valid training record: {'; '.join(problems)}; the run folder is "
                              "damaged: restore it, or delete it (the model then does not warn about large scenes)")
    return record


def max_objects_of(labels: torch.Tensor) -> int:
    """The most objects in one image of a multi-hot label set [N, 24]."""
    return int(labels.sum(dim=1).max().item()) if len(labels) else 0


def artifact_dir(path: Path) -> Path:
    """The run folder of ``path`` (a run folder, or its ``unet`` folder)."""
    path = Path(path)
    if path.name == UNET_DIR and any((path.parent / n).exists() for n in (LABEL_ENCODER_DIR, LABEL_PROJ_FILE)):
        return path.parent
    return path


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


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
    input_file(file)
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load {what}: {file} is unreadable or not JSON ({first_line(exc)}); "
                              "the run folder is damaged or not from clevrgen") from None
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
        from clevrgen.integrity import verify_shipped

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


def describe_chain(stages: list[dict]) -> str:
    """The steps of a chain of stages, "12,000 + 7,000 steps"; where the stages' batch sizes
    differ, each run of equal batches says its own: "12,000 + 7,000 steps of 32 + 4,250 steps of 64"."""
    def batch(stage: dict) -> int:
        return stage.get("images", 0) // stage["steps"] if stage.get("steps") else 0

    groups = [(size, [f"{st.get('steps', 0):,}" for st in run]) for size, run in groupby(stages, key=batch)]
    if len(groups) == 1:
        return " + ".join(groups[0][1]) + " steps"
    return " + ".join(" + ".join(steps) + f" steps of {size}" for size, steps in groups)


def describe_model(run_dir: Path) -> str:
    """One line naming the model a command uses and what it was trained on."""
    record = training_data_of(run_dir)
    name = "the shipped model" if is_shipped(run_dir) else str(run_dir)
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
    its model's chain of training stages (``clevrgen.report.with_stage``)."""
    model, config = load_artifact(run)
    if sample is not None:
        config = config.model_copy(update={"sample": sample})
    if half:
        model.unet.half()  # the label encoder is tiny and stays fp32
    training_data = training_data_of(artifact_dir(run)) or None
    if stage and training_data is not None:
        from clevrgen.report import with_stage

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
