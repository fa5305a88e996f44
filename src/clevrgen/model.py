"""The denoiser: a diffusers UNet whose class embedding (and, with cross-attention, per-object
tokens) comes from a multi-hot label; built from an architecture config by :func:`build_model`.

Saving, loading and exporting it is :mod:`clevrgen.artifact`'s; what it was trained on,
:mod:`clevrgen.record`'s.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from clevrgen.config import ModelConfig
from clevrgen.labels import COLORS, NUM_CLASSES, SHAPES


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
