"""The run configuration: pydantic models, the one home of every default and every range.

A config is built in one step (:func:`load_config`): the TOML file's table, with each ``--set
dotted.key=value`` merged in (:mod:`clevrgen.config_file`), validated once by
:meth:`Config.model_validate`. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clevrgen.config_file import find_config, merge_overrides, override_origins, problem_lines, read_toml
from clevrgen.config_file import to_toml  # noqa: F401  (writing a config is part of its public face)
from clevrgen.errors import ConfigError


def _object_range(value: tuple[int, int]) -> tuple[int, int]:
    if not 1 <= value[0] <= value[1] <= 5:
        raise ValueError("must be [MIN, MAX] with 1 <= MIN <= MAX <= 5 (the renderer draws at most 5)")
    return value


ObjectRange = Annotated[tuple[int, int], AfterValidator(_object_range)]
"""(MIN, MAX) objects per rendered scene."""


MAX_SEED = 2**53
"""Seeds are 0..2^53: image i of a pass uses seed + i, which stays exact (as JSON and as a float)
and within a 64-bit torch generator seed."""
MAX_STEPS = 10**9
MAX_SAMPLE_STEPS = 10_000
MAX_GUIDANCE = 100.0
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _admits_bool(annotation: Any) -> bool:
    return annotation is bool or any(_admits_bool(a) for a in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(_holds_bool(v) for v in value))


class Section(BaseModel):
    # inf and nan are refused everywhere: every number has a finite range
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _a_boolean_is_not_a_number(cls, value: Any, info) -> Any:
        """The value rule: a boolean is only a boolean. Pydantic would read ``true`` as 1 (or 1.0),
        so ``--set train.lr=true`` trained at lr 1; only on/off settings take true or false."""
        if _holds_bool(value) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            shown = str(value).lower() if isinstance(value, bool) else str(value).replace("True", "true").replace(
                "False", "false")
            raise ValueError(f"a boolean is not a number or a name (got {shown}): give a value of this setting's type")
        return value


class DataConfig(Section):
    path: Path | None = None
    """An i-CLEVR layout folder (train.json, objects.json, iclevr/*.png). None: the embedded
    renderer's dataset, rendered once from the official train.json and cached."""
    cache_dir: Path | None = None
    """Where decoded uint8 caches live. None: ``<path>/.clevrgen-cache``, or the user cache
    folder when that is not writable (and for rendered data)."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of whole scenes (all _k images of a scene number) held out for validation."""
    split_seed: Seed = 0
    render_seed: Seed = 0
    """Seed of the embedded dataset's renders."""
    fresh: float = Field(0.0, ge=0.0, le=1.0)
    """Share of every training batch drawn as new scenes, rendered on the training device at
    each step (0: off; 1: every image is new). The held-out scenes still come from the dataset."""
    fresh_objects: ObjectRange = (1, 3)
    """(MIN, MAX) objects of a fresh scene, each count equally likely (i-CLEVR: 1-3)."""
    extra_pairs: Path | None = None
    """An editor's second folder of sequences, all trained on (``clevrgen data render --objects 3-5``)."""
    extra_share: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of every editor batch drawn from ``extra_pairs`` (0: off)."""

    @model_validator(mode="after")
    def _extra_pairs(self) -> "DataConfig":
        if (self.extra_pairs is None) != (self.extra_share == 0):
            raise ValueError("data.extra_pairs and data.extra_share go together (a folder of pairs, the share of "
                             "each batch drawn from it) or not at all")
        return self


class ModelConfig(Section):
    block_out_channels: list[int] = [128, 128, 256, 256]
    layers_per_block: int = Field(2, ge=1, le=16)
    attention: list[bool] = [False, False, False, True]
    """Self-attention per resolution level, highest resolution first."""
    attention_head_dim: int = Field(8, ge=1, le=4096)
    norm_num_groups: int = Field(32, ge=1, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    image_size: int = Field(64, ge=8, le=64)
    """The resolution the model draws at. Below 64 the data is downsampled and samples are
    upsampled back to 64x64, which caps accuracy (real held-out images through a 32x32 path score
    0.554 top-k; see benchmarks/resolution_path.py): training and sampling warn. Use patch_size."""
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    """How the time and label embedding reach each residual block: "default" adds it to the
    features; "scale_shift" scales and shifts the group norm with it (AdaGN, as in guided diffusion)."""
    cross_attention: list[bool] = []
    """Per level (highest resolution first): attend to one token per object of the scene (a
    ``UNet2DConditionModel``); empty or all false: the label is pooled only (a ``UNet2DModel``)."""
    token_dim: int = Field(128, ge=8, le=1024)
    """Width of an object token (with ``cross_attention``)."""
    cross_attention_head_dim: int = Field(32, ge=4, le=4096)
    """Width of one head of the cross-attention blocks (which get channels / this many heads)."""
    patch_size: Literal[1, 2, 4] = 1
    """Pixel-unshuffle each p x p patch into channels before the UNet and shuffle back after it:
    the UNet works on (image_size / p)^2 positions with 3 p^2 channels, and every pixel of the
    full-size image is still predicted. 2 is ~5x cheaper than 1 on the CPU."""
    source_image: bool = False
    """An editor: the UNet also sees a source scene (after the same pixel-unshuffle as the noisy
    image, as extra input channels) and draws it with the objects of its label added. Trained on
    i-CLEVR's own sequences (image k -> k + 1); an empty (all-zero) source is no source at all."""

    @field_validator("block_out_channels")
    @classmethod
    def _channels(cls, value: list[int]) -> list[int]:
        if not value or any(c <= 0 for c in value):
            raise ValueError("must be a non-empty list of positive channel counts")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"model.attention has {len(self.attention)} entries but block_out_channels has "
                f"{len(self.block_out_channels)}: give one flag per level"
            )
        if self.cross_attention and len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(
                f"model.cross_attention has {len(self.cross_attention)} entries but block_out_channels has "
                f"{len(self.block_out_channels)}: give one flag per level (or none)"
            )
        bad = [c for c, x in zip(self.block_out_channels, self.cross_attention) if x and c % self.cross_attention_head_dim]
        if bad:
            raise ValueError(f"block_out_channels {bad} with cross-attention are not multiples of cross_attention_head_dim")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not multiples of norm_num_groups")
        if self.image_size % (self.patch_size * 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError("image_size must be divisible by patch_size * 2^(levels - 1)")
        return self


class DiffusionConfig(Section):
    num_train_timesteps: int = Field(1000, ge=2, le=100_000)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float = Field(0.0, ge=0.0, le=1e4)
    """Min-SNR loss weighting (Hang et al. 2023): each timestep's loss is weighted so that
    low-noise steps, whose SNR is above gamma, count no more than SNR = gamma. 0: off (plain MSE)."""
    weighting: Literal["min_snr", "edm"] = "min_snr"
    """The loss weight of a noise level: "min_snr" (with ``min_snr_gamma``; 0 is plain MSE) or
    "edm", EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error."""
    edm_sigma_data: float = Field(0.5, gt=0.0, le=10.0)
    timesteps: Literal["uniform", "lognormal"] = "uniform"
    """How training noise levels are drawn: uniform over the timesteps, or EDM's log-normal
    ln sigma ~ N(lognormal_mean, lognormal_std^2) (mapped to the nearest timestep)."""
    lognormal_mean: float = Field(-1.2, ge=-10.0, le=10.0)
    lognormal_std: float = Field(1.2, gt=0.0, le=10.0)
    immiscible: bool = False
    """Immiscible diffusion: assign the batch's noise samples to its images by a linear assignment
    of least total distance before noising (needs scipy)."""


Sampler = Literal["ddpm", "ddim", "dpm++"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]


class TrainConfig(Section):
    steps: int = Field(170_000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(32, ge=1, le=65_536)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    warmup_steps: int = Field(500, ge=0, le=MAX_STEPS)
    lr_decay_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """The last this many of ``steps`` cool the lr down (cosine) to ``lr_final`` x lr; 0: constant.
    Set on a resume (``--set train.steps=N --set train.lr_decay_steps=M``) to end a run."""
    lr_final: float = Field(0.1, ge=0.0, le=1.0)
    init: str = ""
    """Start from the weights of a trained model instead of at random (fine-tuning): a run
    folder, an exported model, or "shipped". Its architecture must be this config's ``[model]``.
    The optimizer starts afresh (with ``warmup_steps``); a resume reads only its own checkpoint."""
    grad_clip: float = Field(1.0, gt=0.0, le=1e6)
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: bool = True
    ema_sigma_rels: list[Annotated[float, Field(gt=0.0, lt=0.28)]] = []
    """EDM2's power-function EMAs instead of ``ema_decay``: their lengths relative to the run
    (e.g. [0.05, 0.10]). The first is the run's artifact; ``snapshot_every`` keeps all of them, so
    that ``clevrgen export RUN --ema-sigma-rel S`` can build the average of any length S after
    training. Empty: the classic EMA."""
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability that a training label is replaced by the empty (unconditional) label (an
    editor: that the label alone is, its source kept)."""
    source_dropout: float = Field(0.05, ge=0.0, le=1.0)
    """An editor's: probability that the source image alone is replaced by the empty one."""
    joint_dropout: float = Field(0.05, ge=0.0, le=1.0)
    """An editor's: probability that the label and the source are both dropped (InstructPix2Pix:
    5 % each of the three), so that one network gives the predictions that its two guidance
    scales combine."""
    hflip: bool = True
    seed: Seed = 0
    device: Device = "auto"
    precision: Precision = "auto"
    """auto: bf16 autocast on CUDA, fp32 on the CPU (exact to the bit, e.g. for resume tests);
    bf16 is ~1.5-2x faster on CPUs with AVX512-BF16 or AMX (the CPU configs set it). A CPU without
    bf16 (fp16) kernels, such as an AVX2-only one, computes in fp32 instead: emulated there, bf16
    was 24x slower (``clevrgen.runtime.autocast_dtype``)."""
    compile: bool = False
    channels_last: bool = False
    attention_kernel: Literal["auto", "sdpa", "math"] = "auto"
    """How training computes attention: torch's fused scaled_dot_product_attention, or the
    explicit matmul-softmax-matmul of diffusers' AttnProcessor (the same math; ~1.2x faster
    training steps on 2 CPU cores, whose fused backward is slow for short sequences). "auto":
    math on the CPU, sdpa on a GPU, chosen for the device the model trains on; "sdpa" or "math"
    forces one everywhere. Sampling always uses sdpa."""
    log_every: int = Field(50, ge=1, le=MAX_STEPS)
    eval_every: int = Field(5000, ge=1, le=MAX_STEPS)
    """Held-out loss (and, with a judge, sample accuracy) every this many steps."""
    eval_images: int = Field(64, ge=0, le=100_000)
    """Images sampled for the periodic held-out accuracy; 0 turns it off."""
    eval_splits: list[str] = []
    """Splits (e.g. ["test", "new_test"]) whose label sets are also sampled and scored by the
    shipped judge every ``eval_every`` steps (seed ``sample.seed``): accuracy against training time."""
    sample_every: int = Field(5000, ge=1, le=MAX_STEPS)
    checkpoint_every: int = Field(2000, ge=1, le=MAX_STEPS)
    tensorboard: bool = False
    """Also write the logged numbers and the sample grids to ``RUN/tensorboard/`` (needs
    ``pip install 'clevrgen[tensorboard]'``); ``metrics.jsonl`` stays the record."""
    snapshot_every: int = Field(0, ge=0, le=MAX_STEPS)
    """Also keep the EMA weights of every this many steps, as fp16, in ``RUN/snapshots/step-N``
    (each a model folder for ``--checkpoint``): the checkpoint of a run is overwritten, these
    are not. 0: off."""


class SampleConfig(Section):
    sampler: Sampler = "dpm++"
    steps: int = Field(25, ge=1, le=MAX_SAMPLE_STEPS)
    guidance: float = Field(1.0, ge=0.0, le=MAX_GUIDANCE)
    """Classifier-free guidance scale; 1 is plain conditional sampling, 0 unconditional."""
    image_guidance: float = Field(1.5, ge=0.0, le=MAX_GUIDANCE)
    """An editor's guidance toward its source image (InstructPix2Pix's image_guidance_scale): 1
    follows the source as trained, more keeps more of it; ``guidance`` then weighs the labels."""
    seed: Seed = 0
    batch_size: int = Field(64, ge=1, le=65_536)
    num: int = Field(8, ge=1, le=100_000)
    """Images per scene for ``clevrgen sample``."""
    device: Device = "auto"


class EvaluateConfig(Section):
    split: str = "new_test"
    evaluator: Path | None = None
    """A course-format classifier (.pth with key ``model``) or a clevrgen judge; None: shipped."""


class JudgeConfig(Section):
    epochs: int = Field(30, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=10.0)
    seed: Seed = 0
    device: Device = "auto"
    render_extra: int = Field(0, ge=0, le=10_000_000)
    """Rendered scenes mixed into the judge's training set (drawn by the embedded renderer
    with ``render_objects`` objects each; the real set has at most 3)."""
    render_objects: ObjectRange = (4, 5)
    """(MIN, MAX) objects per rendered scene of ``render_extra``."""
    init: Path | None = None
    """Start from this judge's weights (a course .pth or a clevrgen .safetensors) instead of
    random ones: fine-tuning."""
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    """Decay of an exponential moving average of the weights (0: off). When on, the average,
    with BatchNorm statistics measured afresh on training batches, is what is scored and kept."""
    hflip: bool = True
    translate: int = Field(3, ge=0, le=8)
    """Random shifts of up to this many pixels (edges repeated; objects stay in view)."""
    jitter: float = Field(0.1, ge=0.0, le=0.3)
    """Brightness and contrast jitter, the same on all channels (no hue shift)."""
    precision: Precision = "auto"
    channels_last: bool = False
    minutes: float | None = Field(None, gt=0.0, le=1e6)
    """A wall-clock budget: the LR schedule runs over this time instead of over ``epochs``
    (which then only caps training). For shared machines whose speed is unknown up front."""


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    judge: JudgeConfig = JudgeConfig()

    @model_validator(mode="after")
    def _editor_settings(self) -> "Config":
        t = self.train
        if self.data.extra_pairs is not None and not self.model.source_image:
            raise ValueError("data.extra_pairs: only an editor trains on pairs (a generator: data.fresh)")
        if self.model.source_image and t.label_dropout + t.source_dropout + t.joint_dropout > 1:
            raise ValueError("train.label_dropout + source_dropout + joint_dropout are the shares of an editor's "
                             "batch that drop the label, the source or both: together at most 1")
        return self


class CurvePoint(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    step: int = Field(ge=0)
    minutes: float = Field(ge=0.0)


class TrainingStage(BaseModel):
    """One stage of a model's chain of training runs (:func:`clevrgen.record.stage_record`)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    steps: int = Field(ge=0)
    images: int | None = Field(None, ge=0)
    minutes: float | None = Field(None, ge=0.0)
    curve: list[CurvePoint] = []


class TrainingRecord(BaseModel):
    """A run's ``training_data.json`` (what the model saw), read as strictly as any input: a
    hand-edited ``"max_objects": "3"`` is refused, not compared with an int mid-sampling."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    max_objects: int | None = Field(None, ge=0, le=24)
    images: int | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=0)
    data: str | None = None
    init: str | None = None
    ema_sigma_rel: float | None = Field(None, gt=0.0)
    posthoc_ema: dict[str, float] | None = None
    schedule: str | None = None
    stages: list[TrainingStage] = []


class PipelineIndex(BaseModel):
    """A pipeline folder's ``model_index.json`` (what ``save_pretrained`` writes), read as strictly
    as ``training_data.json`` when no ``config.toml`` is beside it: its components come only from
    diffusers and clevrgen, and its sampling defaults have the CLI's ranges."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    unet: tuple[Literal["diffusers"], Literal["UNet2DModel", "UNet2DConditionModel"]]
    label_encoder: tuple[Literal["clevrgen"], Literal["LabelEncoder"]]
    scheduler: tuple[Literal["diffusers"], Annotated[str, Field(pattern=r"^[A-Za-z0-9]+Scheduler$")]]
    num_inference_steps: int = Field(25, ge=1, le=MAX_SAMPLE_STEPS)
    guidance_scale: float = Field(2.0, ge=0.0, le=MAX_GUIDANCE)
    precision: Precision = "fp32"
    max_objects: int | None = Field(None, ge=0, le=24)
    image_guidance_scale: float = Field(1.5, ge=0.0, le=MAX_GUIDANCE)


def validate_pipeline_index(text: str) -> list[str]:
    """The problems of a ``model_index.json``'s text, one ``key: message`` each (none: valid)."""
    try:
        PipelineIndex.model_validate_json(text)
    except ValidationError as exc:
        return [line.removeprefix("config: ") for line in problem_lines(exc, {})[0]]
    return []


def validate_training_record(record: Any) -> list[str]:
    """The problems of a ``training_data.json`` record, one ``key: message`` each (none: valid)."""
    if not isinstance(record, dict):
        return ["expected a JSON object"]
    try:
        TrainingRecord.model_validate(record)
    except ValidationError as exc:
        return problem_lines(exc, {})[0]
    return []


def validate_config(raw: dict[str, Any], source: str | None = None, origins: dict[str, str] | None = None) -> Config:
    """``raw`` as a Config; a problem with a value given by an option or a ``--set`` (``origins``:
    dotted key -> how it was given) names that option, the rest name ``source``."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems, from_file = problem_lines(exc, origins or {})
        raise ConfigError(problems, source=source if from_file else None, what="config" if from_file else "value") from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of ``path`` (or the defaults) with ``overrides`` merged in, validated once."""
    path = find_config(path) if path is not None else None
    raw = read_toml(path) if path is not None else {}
    overrides = list(overrides or [])
    return validate_config(merge_overrides(raw, overrides), source=str(path or ""), origins=override_origins(overrides))
