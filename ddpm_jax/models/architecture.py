"""What a UNet is built from: `Architecture`, the fields of `config.model` (and the image
size and channel counts), spelled out once, and the checks that it can be built."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ddpm_jax.core import augment as core_augment
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice

LAYOUTS = ("ddpm", "mirror")
ATTENTION_TYPES = ("ddpm", "transformer")
TIME_PROJECTIONS = ("silu_linear", "linear")
# (before, after) zero padding of the stride-2 downsample conv on each spatial axis:
# "same" is TensorFlow's 'SAME' on an even map (Ho et al.), "symmetric" PyTorch's padding=1.
DOWNSAMPLE_PADDINGS = {"same": (0, 1), "symmetric": (1, 1)}
RESAMPLES = ("conv", "resblock")
DECODER_ATTENTIONS = ("every_block", "last_block")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A UNet: `layout` picks the net (``ddpm``: Ho et al., `ddpm.py`; ``mirror``: the PyTorch
    project's, `mirror.py`); `attention_type` and `time_projection` the block variants;
    `downsample_padding` the padding of the stride-2 convs (`DOWNSAMPLE_PADDINGS`);
    `norm_eps` the GroupNorm epsilon; `time_embedding_width` (0: `base_channels`),
    `time_embedding_freq_shift` and `time_embedding_cos_first` the sinusoidal embedding
    (`blocks.timestep_embedding`); `dtype` the compute dtype (parameters stay float32);
    `remat` recomputes residual blocks in the backward pass; `num_classes` > 0 adds a class
    embedding (`blocks.ClassEmbedding`, 0: unconditional); `augment_dim` > 0 (from
    `data.augment`) the map of the augmentation vector (`blocks.augment_map`).

    The block options of the nets after Ho et al.'s (ADM, Dhariwal & Nichol 2021; DDPM++,
    Song et al. 2021 and EDM), `ddpm` layout only, each changing only its own blocks:
    `scale_shift_norm` (the embedding scales and shifts the second GroupNorm's output),
    `resample` ("resblock": BigGAN-style residual blocks that average-pool or repeat, for the
    strided conv and the nearest-x2 conv), `resample_projection` (a 1x1 conv on those
    blocks' skip, DDPM++), `skip_scale` (residual and attention outputs times it; DDPM++
    1/sqrt(2)), `head_channels` (a fixed head width: heads = channels / head_channels, for
    `num_heads`; ADM 64) and `decoder_attention` ("last_block": on the up path only the last
    block of an attended level attends, DDPM++). The defaults are Ho et al.'s CIFAR-10 net.
    Checked when made: a message names the config field to change.
    """

    image_size: int
    base_channels: int = 128
    channel_mults: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    attention_type: str = "ddpm"
    num_heads: int = 1
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    norm_groups: int = 32
    layout: str = "ddpm"
    time_embedding_width: int = 0
    time_projection: str = "silu_linear"
    downsample_padding: str = "same"
    norm_eps: float = 1e-6
    time_embedding_freq_shift: float = 1.0
    time_embedding_cos_first: bool = False
    in_channels: int = 3
    out_channels: int = 3
    dtype: str = "float32"
    remat: bool = False
    num_classes: int = 0
    augment_dim: int = 0  # entries of the augmentation vector (data.augment); 0: no input
    scale_shift_norm: bool = False
    resample: str = "conv"
    resample_projection: bool = False
    skip_scale: float = 1.0
    head_channels: int = 0
    decoder_attention: str = "every_block"

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        validate_architecture(self.image_size, self.channel_mults, self.attention_resolutions,
                              self.attention_type, self.base_channels, self.num_heads,
                              self.layout, self.time_projection, self.norm_groups,
                              self.downsample_padding)
        self._check_block_options()

    def _check_block_options(self) -> None:
        check_choice("model.resample", self.resample, RESAMPLES)
        check_choice("model.decoder_attention", self.decoder_attention, DECODER_ATTENTIONS)
        changed = [name for name, default in BLOCK_OPTION_DEFAULTS.items()
                   if getattr(self, name) != default]
        if changed and self.layout != "ddpm":
            raise UserError(f"model.{changed[0]} is an option of the ddpm layout's blocks; the "
                            f"{self.layout} layout has none: use model.layout='ddpm' or the default")
        if not self.skip_scale > 0:
            raise UserError(f"model.skip_scale must be positive (1: none; DDPM++: 1/sqrt(2)), got "
                            f"{self.skip_scale}")
        if self.head_channels:
            widths = [self.base_channels * m for m in self.channel_mults]
            if self.head_channels < 0 or any(w % self.head_channels for w in widths):
                raise UserError(f"model.head_channels={self.head_channels} must divide every "
                                f"level width {widths} (0: model.num_heads heads)")

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        """The net of `config.model` for images of `config.data.image_size` (6 output channels
        with learned variances: the prediction, then the variance values)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {key: value for key, value in config.model.items() if key in fields}
        learned = config.diffusion.get("variance") == "learned_range"
        return cls(**{**given, "image_size": config.data.image_size,
                      "out_channels": 6 if learned else 3,
                      "augment_dim": augment_dim(config.data.get("augment"))})

    @property
    def widths(self) -> list[int]:
        """Channels of each level."""
        return [self.base_channels * mult for mult in self.channel_mults]

    @property
    def temb_width(self) -> int:
        """Width of the sinusoidal timestep embedding."""
        return self.time_embedding_width or self.base_channels

    def attends(self, resolution: int) -> bool:
        """Whether the net has attention at feature maps of side `resolution`."""
        return resolution in self.attention_resolutions


# The block options and the values that keep Ho et al.'s blocks.
BLOCK_OPTION_DEFAULTS = {"scale_shift_norm": False, "resample": "conv",
                         "resample_projection": False, "skip_scale": 1.0, "head_channels": 0,
                         "decoder_attention": "every_block"}


def validate_architecture(
    image_size: int,
    channel_mults: Sequence[int],
    attention_resolutions: Sequence[int],
    attention_type: str,
    base_channels: int,
    num_heads: int,
    layout: str = "ddpm",
    time_projection: str = "silu_linear",
    norm_groups: int = 1,
    downsample_padding: str = "same",
) -> None:
    """Checks that the net can be built for this image size; messages name the field to change."""
    check_choice("model.layout", layout, LAYOUTS)
    check_choice("model.time_projection", time_projection, TIME_PROJECTIONS)
    check_choice("model.attention_type", attention_type, ATTENTION_TYPES)
    check_choice("model.downsample_padding", downsample_padding, tuple(DOWNSAMPLE_PADDINGS))
    if not channel_mults:
        raise UserError("model.channel_mults must name at least one level")
    downsamples = len(channel_mults) - (1 if layout == "ddpm" else 0)
    factor = 2**downsamples
    if image_size % factor:
        raise UserError(
            f"data.image_size={image_size} must be divisible by {factor} (the {layout} layout "
            f"downsamples {downsamples} times for model.channel_mults={tuple(channel_mults)})"
        )
    first = 0 if layout == "ddpm" else 1  # the mirror layout attends after each downsample
    resolutions = {image_size // 2**level for level in range(first, downsamples + 1)}
    unknown = sorted(set(attention_resolutions) - resolutions)
    if unknown:
        raise UserError(
            f"model.attention_resolutions has {unknown}, but at data.image_size={image_size} "
            f"the net only has resolutions {sorted(resolutions, reverse=True)}"
        )
    widths = [base_channels * m for m in channel_mults]
    for field, value, divided in (("num_heads", num_heads, widths),
                                  ("norm_groups", norm_groups, [base_channels, *widths])):
        if any(width % value for width in divided):
            raise UserError(
                f"model.{field}={value} must divide every level width "
                f"(base_channels={base_channels} x channel_mults={tuple(channel_mults)})"
            )



def augment_dim(augment: Any) -> int:
    """Entries of the augmentation vector the net takes for `data.augment` (None or
    probability 0: none)."""
    settings = core_augment.settings_of(augment or {})
    return settings.label_dim if settings is not None else 0
