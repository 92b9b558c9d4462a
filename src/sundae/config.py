"""Typed configs for every network, with the paper's settings as named presets.

A model is always rebuilt from its config (``VQGAN(VQGANConfig(...))``,
``Hourglass(HourglassConfig(...))``); configs are validated when created and round-trip
through JSON (``to_dict`` / ``from_dict``), which is how checkpoints store them.

Presets: the paper's Table 3 (SUNDAE priors) and Table 4 (the 1024² VQ-GAN), the public
taming-transformers / latent-diffusion first stages, and tiny configs for tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, TypeVar, Union

Depth = Union[int, tuple]  # an int (a flat stack) or (pre, valley, post) where valley is a Depth

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message says what to change."""


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


@dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Frozen, keyword-only dataclass with JSON round-trip and validation hooks."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for out-of-range or inconsistent values."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**{k: _to_tuple(v) for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Stage 1: VQ-GAN tokenizer (paper §3.1, §3.5, Table 4; taming-transformers hyper-parameters)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VQGANConfig(ConfigBase):
    """Hyper-parameters of the VQ-GAN, named as taming's ``ddconfig`` + quantizer settings.

    ``channels * channel_multipliers[i]`` is the width of encoder level ``i``; there are
    ``len(channel_multipliers) - 1`` downsamplings, so the downsampling factor is
    ``f = 2 ** (len(channel_multipliers) - 1)``.
    """

    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 1024
    quantizer: str = "vq"  # "vq" (VectorQuantizer2) or "gumbel" (taming's GumbelQuantize)
    beta: float = 0.25  # commitment weight
    quantizer_legacy: bool = True  # taming's legacy=True places beta on the codebook term

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsample_factor
        if height % f or width % f:
            raise ConfigError(
                f"image size {height}x{width} is not a multiple of the tokenizer's downsampling factor f={f}; "
                f"resize or crop to a multiple of {f}"
            )
        return height // f, width // f

    def validate(self) -> None:
        if self.quantizer not in ("vq", "gumbel"):
            raise ConfigError(f"quantizer must be 'vq' or 'gumbel', got {self.quantizer!r}")
        if not self.channel_multipliers:
            raise ConfigError("channel_multipliers must have at least one entry")
        if min(self.channels, self.z_channels, self.embed_dim, self.codebook_size, self.num_res_blocks) < 1:
            raise ConfigError("channels, z_channels, embed_dim, codebook_size and num_res_blocks must be >= 1")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"resolution {self.resolution} is not a multiple of the downsampling factor {self.downsample_factor}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # taming-transformers public first stages (configs/*.yaml of the CompVis release)
    "taming-imagenet-f16-1024": VQGANConfig(codebook_size=1024),
    "taming-imagenet-f16-16384": VQGANConfig(codebook_size=16384),
    "taming-ffhq-f16-1024": VQGANConfig(codebook_size=1024),
    "taming-celebahq-f16-1024": VQGANConfig(codebook_size=1024),
    "taming-gumbel-f8-8192": VQGANConfig(
        channel_multipliers=(1, 1, 2, 4), attention_resolutions=(32,), z_channels=256,
        embed_dim=256, codebook_size=8192, quantizer="gumbel",
    ),
    # latent-diffusion VQ first stages (models/first_stage_models/vq-f*)
    "ldm-vq-f4": VQGANConfig(
        channel_multipliers=(1, 2, 4), attention_resolutions=(), z_channels=3, embed_dim=3, codebook_size=8192,
    ),
    "ldm-vq-f8": VQGANConfig(
        channel_multipliers=(1, 2, 2, 4), attention_resolutions=(32,), z_channels=4, embed_dim=4,
        codebook_size=16384,
    ),
    "ldm-vq-f16": VQGANConfig(
        channel_multipliers=(1, 1, 2, 2, 4), attention_resolutions=(16,), z_channels=8, embed_dim=8,
        codebook_size=16384,
    ),
    # the paper's own 1024² model (Table 4): f=32, 8192 codes, 1 residual block, attention <= 64
    "paper-ffhq1024-f32": VQGANConfig(
        resolution=1024, channels=128, channel_multipliers=(1, 1, 2, 2, 4, 4), num_res_blocks=1,
        attention_resolutions=(64, 32), z_channels=256, embed_dim=256, codebook_size=8192,
    ),
    # the shipped default's tokenizer: 28x28 Fashion-MNIST -> 7x7 tokens of 512 codes
    "fashion-mnist-f4": VQGANConfig(
        resolution=28, channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,),
        z_channels=32, embed_dim=32, codebook_size=512,
    ),
    # tiny model for tests
    "tiny-f4": VQGANConfig(
        resolution=32, channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
        z_channels=32, embed_dim=32, codebook_size=256,
    ),
}


# ---------------------------------------------------------------------------------------------
# Stage 2: the hourglass denoiser (paper §3.2, Table 3)
# ---------------------------------------------------------------------------------------------


def depth_layers(depth: Depth) -> int:
    """Total number of transformer layers in a (possibly nested) depth spec."""
    if isinstance(depth, int):
        return depth
    pre, valley, post = depth
    return pre + depth_layers(valley) + post


def depth_levels(depth: Depth) -> int:
    """Number of downsamplings in a depth spec: 0 for a flat stack, 1 for (2, 8, 2), ..."""
    return 0 if isinstance(depth, int) else 1 + depth_levels(depth[1])


@dataclass(frozen=True, kw_only=True)
class HourglassConfig(ConfigBase):
    """The 2D-aware hourglass transformer that maps tokens (B, h, w) to logits (B, h, w, v).

    ``depth`` is ``(pre, valley, post)`` as written "2-12-2" in Table 3; ``valley`` may itself
    be such a triple (nested hourglass). ``shorten_factor`` k is the number of tokens merged at
    each downsampling; in ``"2d"`` resampling it must be a perfect square (√k×√k blocks), in
    ``"1d"`` resampling (the original hourglass, kept for the paper's ablation) k consecutive
    raster tokens are merged.
    """

    codebook_size: int = 1024
    dim: int = 1024
    depth: Depth = (2, 12, 2)
    heads: int = 8
    head_dim: int = 64  # attention width is heads * head_dim, decoupled from dim (Table 3: ImageNet 12 heads, dim 1024)
    shorten_factor: int = 4
    resample: str = "2d"  # "2d" (paper §3.2) or "1d" (Nawrot et al. 2021, for the ablation)
    num_classes: int | None = None  # None: unconditional; else a learned class embedding + null class
    ff_multiplier: int = 4
    dropout: float = 0.0
    latent_shape: tuple[int, int] = (16, 16)  # the grid it is trained on (models accept other sizes)

    @property
    def null_class(self) -> int | None:
        """Index of the extra 'no class' embedding used for classifier-free guidance."""
        return self.num_classes

    def validate(self) -> None:
        if self.resample not in ("2d", "1d"):
            raise ConfigError(f"resample must be '2d' or '1d', got {self.resample!r}")
        if min(self.dim, self.heads, self.head_dim) < 1:
            raise ConfigError("dim, heads and head_dim must be >= 1")
        if self.head_dim % 4:
            raise ConfigError(
                f"2D rotary embeddings need head_dim divisible by 4 (half the rotary dims per axis, "
                f"in pairs), got {self.head_dim}"
            )
        if self.shorten_factor < 1:
            raise ConfigError(f"shorten_factor must be >= 1, got {self.shorten_factor}")
        if self.resample == "2d" and math.isqrt(self.shorten_factor) ** 2 != self.shorten_factor:
            raise ConfigError(
                f"2d resampling needs a perfect-square shorten_factor (√k×√k blocks), got {self.shorten_factor}"
            )
        self._validate_depth(self.depth)
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if self.codebook_size < 2:
            raise ConfigError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if len(self.latent_shape) != 2 or min(self.latent_shape) < 1:
            raise ConfigError(f"latent_shape must be (h, w) with h, w >= 1, got {self.latent_shape}")

    def _validate_depth(self, depth: Depth) -> None:
        if isinstance(depth, int):
            if depth < 0:
                raise ConfigError(f"depth entries must be >= 0, got {depth}")
            return
        if not (isinstance(depth, tuple) and len(depth) == 3 and isinstance(depth[0], int) and isinstance(depth[2], int)):
            raise ConfigError(f"depth must be an int or (pre, valley, post) with int pre/post, got {depth!r}")
        self._validate_depth(depth[0])
        self._validate_depth(depth[1])
        self._validate_depth(depth[2])


def _table3(codebook_size: int, latent_shape: tuple[int, int], depth: Depth, heads: int = 8,
            num_classes: int | None = None) -> HourglassConfig:
    return HourglassConfig(codebook_size=codebook_size, latent_shape=latent_shape, depth=depth, dim=1024,
                           heads=heads, shorten_factor=4, num_classes=num_classes)


HOURGLASS_PRESETS: dict[str, HourglassConfig] = {
    # Table 3 of the paper, one per column
    "ffhq256": _table3(1024, (16, 16), (3, 16, 3)),
    "ffhq1024": _table3(8192, (32, 32), (2, 12, 2)),
    "celeba": _table3(1024, (16, 16), (2, 12, 2)),
    "mnist": _table3(256, (28, 28), (2, 8, 2), num_classes=10),
    "fashion-mnist": _table3(256, (28, 28), (2, 8, 2), num_classes=10),
    "imagenet": _table3(1024, (16, 16), (3, 14, 3), heads=12, num_classes=1000),
    # tiny configs for tests and CPU experiments
    "tiny": HourglassConfig(codebook_size=64, dim=64, depth=(1, 2, 1), heads=4, head_dim=16, latent_shape=(8, 8)),
    "tiny-nested": HourglassConfig(codebook_size=64, dim=64, depth=(1, (1, 2, 1), 1), heads=4, head_dim=16,
                                   latent_shape=(8, 8)),
}

# Table 3's "Unroll Steps" row: the training unroll T that goes with each preset.
UNROLL_STEPS: dict[str, int] = {
    "ffhq256": 3, "ffhq1024": 3, "celeba": 3, "mnist": 2, "fashion-mnist": 2, "imagenet": 3,
    "tiny": 2, "tiny-nested": 2,
}


def preset(name: str, presets: dict[str, C]) -> C:
    """Look a preset up by name, with a message that lists the known names."""
    try:
        return presets[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(presets))}") from None


__all__ = [
    "ConfigBase", "ConfigError", "VQGANConfig", "HourglassConfig", "VQGAN_PRESETS", "HOURGLASS_PRESETS",
    "UNROLL_STEPS", "depth_layers", "depth_levels", "preset",
]
