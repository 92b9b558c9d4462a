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
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from sundae.errors import InputError

Depth = Union[int, tuple]  # an int (a flat stack) or (pre, valley, post) where valley is a Depth

C = TypeVar("C", bound="ConfigBase")

# Upper bounds for sizes that allocate memory: generous for any real model (the largest public
# VQ-GANs have 16384 codes and 512 channels), small enough that a config file can never ask for
# terabytes before its weights are even read.
MAX_CODEBOOK_SIZE = 2**24
MAX_WIDTH = 2**16  # channels, dim, heads * head_dim, z_channels, embed_dim
MAX_RESOLUTION = 2**16
MAX_LATENT_SIDE = 2**12
MAX_LAYERS = 1024
MAX_PARAMETERS = 2**32  # a rough per-model parameter estimate, checked before anything is allocated


def check_parameter_budget(owner: str, estimate: int, knobs: str) -> None:
    """Refuse a config whose rough parameter count is absurd before anything is allocated."""
    if estimate > MAX_PARAMETERS:
        raise ConfigError(f"{owner} describes about {estimate:.3g} parameters, more than the {MAX_PARAMETERS:.3g} "
                          f"this code accepts; check {knobs}")
MAX_INT = 2**63  # every int field must fit in 64 bits (torch and numpy take int64 at most)


class ConfigError(InputError):
    """A config value is out of range or inconsistent; the message says what to change.

    ``field`` names the offending config field when there is one (for callers that map fields
    to their own spelling, e.g. a yaml key or a command-line flag).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


MAX_CONFIG_NODES = 100_000  # list items in all of one config (yaml aliases can make a small file a huge DAG)


def _to_tuple(value: Any, budget: list[int] | None = None) -> Any:
    if isinstance(value, list):
        budget = [MAX_CONFIG_NODES] if budget is None else budget
        budget[0] -= len(value)
        if budget[0] < 0:
            raise ConfigError(f"a config value holds more than {MAX_CONFIG_NODES} list items")
        return tuple(_to_tuple(v, budget) for v in value)
    return value


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` for error messages, cut so that a hostile value cannot flood the message."""
    text = repr(value) if not isinstance(value, (list, tuple, dict)) or len(value) <= 16 else None
    if text is None:
        text = f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Mismatch(Exception):
    """Internal: a value does not conform to a type annotation."""


def _describe(hint: Any) -> str:
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is tuple or hint is tuple:
        if not args:
            return "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(arm) for arm in args)})"
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is list or hint is list:
        return "a list"
    name = getattr(hint, "__name__", str(hint))
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(name, name)


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, f"({_describe(hint)})")


def _conform(value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (and normalised: list -> tuple,
    numpy integers -> int); raises :class:`_Mismatch` when it does not fit."""
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _conform(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and -MAX_INT <= value < MAX_INT:
            return int(value)
        raise _Mismatch
    if hint is float:  # an int is a valid float; NaN never is
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch
        if isinstance(value, numbers.Integral):
            if not -MAX_INT <= value < MAX_INT:
                raise _Mismatch
            return int(value)
        value = float(value)  # numpy floats become plain floats (JSON-serialisable)
        if math.isnan(value):
            raise _Mismatch
        return value
    if origin is tuple or hint is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if not args:
            return _to_tuple(list(value))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(item, args[0]) for item in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_conform(item, arm) for item, arm in zip(value, args))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if args:
            pairs = [(_conform(k, args[0]), _conform(v, args[1])) for k, v in value.items()]
            unchanged = all(pair[0] is k and pair[1] is v for pair, (k, v) in zip(pairs, value.items()))
            return value if unchanged else dict(pairs)  # keep the caller's dict when nothing changed
        return value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_conform(item, args[0]) for item in value] if args else list(value)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value  # an annotation we cannot check (a string forward reference, a TypeVar): trust it


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every dataclass field of ``cls`` (cached)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def check_range(owner: str, name: str, value: int, low: int, high: int) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ConfigError(f"{owner}.{name} must be in [{low}, {high}], got {value}", field=name)


@dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Frozen, keyword-only dataclass with JSON round-trip and validation hooks.

    On creation every field is checked against its type annotation (an ``int`` field takes
    no bool, float or string; a ``float`` field takes ints; tuples take lists, which become
    tuples; ``X | None`` takes null), then :meth:`validate` checks ranges and consistency.
    """

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        owner = type(self).__name__
        for name, hint in field_types(type(self)).items():
            value = getattr(self, name)
            try:
                conformed = _conform(value, hint)
            except _Mismatch:
                raise ConfigError(
                    f"{owner}.{name} must be {_describe(hint)}, got {short_repr(_to_jsonable(value))} "
                    f"({'list' if isinstance(value, tuple) else type(value).__name__})",
                    field=name,
                ) from None
            if conformed is not value:
                object.__setattr__(self, name, conformed)  # frozen: normalise in place, once

    def validate(self) -> None:
        """Raise :class:`ConfigError` for out-of-range or inconsistent values."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        """Build from a JSON / yaml mapping; every field is type- and range-checked."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of field names to values, got {short_repr(data)}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {short_repr(unknown, 200)}; known fields are {sorted(known)}",
                field=unknown[0],
            )
        required = [
            f.name for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
        ]
        if required:
            raise ConfigError(f"{cls.__name__}: missing required field(s) {required}", field=required[0])
        budget = [MAX_CONFIG_NODES]
        return cls(**{k: _to_tuple(v, budget) for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes``, checked like :meth:`from_dict` (an unknown field is a :class:`ConfigError`)."""
        return type(self).from_dict({**self.to_dict(), **changes})


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

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        """The shape of one image's tokens: its latent grid (a multi-scale tokenizer packs its scales)."""
        return self.latent_shape(height, width)

    def validate(self) -> None:
        owner = type(self).__name__
        if self.quantizer not in ("vq", "gumbel"):
            raise ConfigError(
                f"quantizer must be 'vq' or 'gumbel', got {short_repr(self.quantizer)}", field="quantizer"
            )
        if not 1 <= len(self.channel_multipliers) <= 16:
            raise ConfigError(
                f"channel_multipliers must have 1 to 16 entries (f = 2^(entries - 1)), "
                f"got {len(self.channel_multipliers)}",
                field="channel_multipliers",
            )
        if min(self.channels, self.z_channels, self.embed_dim, self.codebook_size, self.num_res_blocks) < 1:
            raise ConfigError("channels, z_channels, embed_dim, codebook_size and num_res_blocks must be >= 1")
        for name in ("channels", "z_channels", "embed_dim"):
            check_range(owner, name, getattr(self, name), 1, MAX_WIDTH)
        check_range(owner, "in_channels", self.in_channels, 1, 1024)
        check_range(owner, "out_channels", self.out_channels, 1, 1024)
        check_range(owner, "codebook_size", self.codebook_size, 1, MAX_CODEBOOK_SIZE)
        check_range(owner, "num_res_blocks", self.num_res_blocks, 1, 64)
        check_range(owner, "resolution", self.resolution, 1, MAX_RESOLUTION)
        for multiplier in self.channel_multipliers:
            if not 1 <= self.channels * multiplier <= MAX_WIDTH:
                raise ConfigError(
                    f"{owner}.channel_multipliers: every channels * multiplier must be in [1, {MAX_WIDTH}], got "
                    f"{self.channels} * {multiplier}", field="channel_multipliers",
                )
        if len(self.attention_resolutions) > 64 or any(r < 1 for r in self.attention_resolutions):
            raise ConfigError(
                f"attention_resolutions must be up to 64 feature-map sides >= 1, "
                f"got {short_repr(self.attention_resolutions)}",
                field="attention_resolutions",
            )
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"resolution {self.resolution} is not a multiple of the downsampling factor {self.downsample_factor}",
                field="resolution",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ConfigError(f"beta must be a finite number >= 0, got {self.beta}", field="beta")
        check_parameter_budget(owner, self.parameter_estimate(),
                               "channels, channel_multipliers, num_res_blocks and codebook_size")

    def parameter_estimate(self) -> int:
        """A rough upper estimate of the parameter count (3x3 convs of every residual and attention
        block of encoder and decoder, plus the codebook), used to reject absurd configs early."""
        blocks_per_level = 2 * self.num_res_blocks + 3  # encoder, decoder (one more), mid and resampling
        convs = sum((self.channels * m) ** 2 for m in self.channel_multipliers) * blocks_per_level * 26
        return convs + self.codebook_size * (self.embed_dim + self.z_channels)


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
    # the shipped default's tokenizer: grey 28x28 Fashion-MNIST -> 7x7 tokens of 1024 codes
    "fashion-mnist-f4": VQGANConfig(
        resolution=28, in_channels=1, out_channels=1, channels=64, channel_multipliers=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(7,), z_channels=32, embed_dim=32, codebook_size=1024,
    ),
    # the shipped emoji model's tokenizer: RGB 64x64 emoji -> 16x16 tokens (the paper's FFHQ256 grid)
    "emoji-f4": VQGANConfig(
        resolution=64, channels=32, channel_multipliers=(1, 2, 4), num_res_blocks=1, attention_resolutions=(16,),
        z_channels=32, embed_dim=32, codebook_size=1024,
    ),
    # tiny model for tests
    "tiny-f4": VQGANConfig(
        resolution=32, channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
        z_channels=32, embed_dim=32, codebook_size=256,
    ),
}

# VAR's multi-scale tokenizers (MultiScaleVQGANConfig, defined below) are added to VQGAN_PRESETS there


# ---------------------------------------------------------------------------------------------
# VAR, the rival paradigm (spec seed 003; Tian et al. 2024, "Visual Autoregressive Modeling")
# ---------------------------------------------------------------------------------------------


def check_scales(owner: str, scales: tuple[int, ...]) -> None:
    """A scale schedule: strictly increasing token-grid sides, at least one, each >= 1."""
    if not 1 <= len(scales) <= 64 or scales[0] < 1 or any(b <= a for a, b in zip(scales, scales[1:])):
        raise ConfigError(f"{owner}.scales must be 1 to 64 strictly increasing sides >= 1 (e.g. 1, 2, 3, 4, 5, 7), "
                          f"got {short_repr(scales)}", field="scales")
    check_range(owner, "scales", scales[-1], 1, MAX_LATENT_SIDE)


def scale_lengths(scales: tuple[int, ...]) -> list[int]:
    """Tokens per scale, s²: a multi-scale token sequence is their concatenation, coarsest first."""
    return [side * side for side in scales]


@dataclass(frozen=True, kw_only=True)
class MultiScaleVQGANConfig(VQGANConfig):
    """The VQ-GAN of :class:`VQGANConfig` with VAR's multi-scale residual quantizer: one shared codebook
    quantises the encoder's features at each side of ``scales`` (the last one the latent grid), each
    scale what the coarser ones left; ``residual_ratio`` r mixes each upsampled code map h with its
    3x3 convolution φ(h) as (1 - r)·h + r·φ(h). Tokens are one row of Σ s² codes per image."""

    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 7)
    residual_ratio: float = 0.5

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        grid = self.latent_shape(height, width)
        if grid != (self.scales[-1], self.scales[-1]):
            raise ConfigError(f"a {height}x{width} image gives a {grid[0]}x{grid[1]} latent grid, but the scale "
                              f"schedule {self.scales} ends at {self.scales[-1]}x{self.scales[-1]}; the last scale "
                              "must be the grid size", field="scales")
        return 1, sum(scale_lengths(self.scales))

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_scales(owner, self.scales)
        if self.quantizer != "vq":
            raise ConfigError(f"{owner}: the multi-scale quantizer is a nearest-codeword one; set quantizer to 'vq'",
                              field="quantizer")
        if not 0.0 <= self.residual_ratio <= 1.0:
            raise ConfigError(f"{owner}.residual_ratio must be in [0, 1], got {self.residual_ratio}",
                              field="residual_ratio")
        if self.scales[-1] * self.downsample_factor != self.resolution:
            raise ConfigError(f"{owner}: the scale schedule {self.scales} must end at the latent grid side "
                              f"{self.resolution // self.downsample_factor} (resolution {self.resolution} / f = "
                              f"{self.downsample_factor}), got {self.scales[-1]}", field="scales")


def tokenizer_config_from_dict(fields: dict[str, Any]) -> VQGANConfig:
    """A tokenizer config from its fields: multi-scale when they give a scale schedule."""
    config_class = MultiScaleVQGANConfig if isinstance(fields, dict) and "scales" in fields else VQGANConfig
    return config_class.from_dict(fields)


@dataclass(frozen=True, kw_only=True)
class NextScaleConfig(ConfigBase):
    """VAR's next-scale prediction transformer over the scales of a :class:`MultiScaleVQGANConfig`.

    ``embed_dim`` is the tokenizer's codeword width: the input of scale k+1 is the sum of the coarser
    scales' code maps, resized to its side. ``depth`` pre-norm layers of ``heads`` x ``head_dim``
    attention, block-causal (a scale sees itself and every coarser one). A class-conditional model has
    ``num_classes`` + 1 class embeddings (the last the null class for classifier-free guidance); the
    class is the start token and is added to every position.
    """

    codebook_size: int = 1024
    embed_dim: int = 32
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 7)
    dim: int = 256
    depth: int = 8
    heads: int = 4
    head_dim: int = 64
    ff_multiplier: int = 4
    dropout: float = 0.0
    num_classes: int | None = None

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    @property
    def sequence_length(self) -> int:
        return sum(scale_lengths(self.scales))

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.scales[-1], self.scales[-1]

    def validate(self) -> None:
        owner = type(self).__name__
        check_scales(owner, self.scales)
        check_range(owner, "codebook_size", self.codebook_size, 2, MAX_CODEBOOK_SIZE)
        for name in ("embed_dim", "dim", "head_dim"):
            check_range(owner, name, getattr(self, name), 1, MAX_WIDTH)
        check_range(owner, "depth", self.depth, 1, MAX_LAYERS)
        check_range(owner, "heads", self.heads, 1, 1024)
        check_range(owner, "ff_multiplier", self.ff_multiplier, 1, 64)
        if self.head_dim % 4:
            raise ConfigError(f"2D rotary embeddings need head_dim divisible by 4, got {self.head_dim}",
                              field="head_dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if self.num_classes is not None:
            check_range(owner, "num_classes", self.num_classes, 1, MAX_CODEBOOK_SIZE)
        check_parameter_budget(owner, self.depth * (4 * self.dim * self.heads * self.head_dim
                                                    + 2 * self.ff_multiplier * self.dim ** 2)
                               + (self.codebook_size + (self.num_classes or 0)) * self.dim,
                               "dim, depth, heads, head_dim, ff_multiplier and codebook_size")


NEXT_SCALE_PRESETS: dict[str, NextScaleConfig] = {
    # sized to train on 2 CPU cores beside the shipped Fashion-MNIST SUNDAE prior (the VAR comparison)
    "fashion-mnist": NextScaleConfig(codebook_size=1024, embed_dim=32, scales=(1, 2, 3, 4, 5, 7), dim=256, depth=8,
                                     heads=4, head_dim=64, num_classes=10),
    "tiny": NextScaleConfig(codebook_size=64, embed_dim=32, scales=(1, 2, 4), dim=64, depth=2, heads=4, head_dim=16),
}

VQGAN_PRESETS.update({
    # the VAR comparison's tokenizer: the shipped default's VQ-GAN with scales 1, 2, 3, 4, 5, 7 on its 7x7 grid
    "fashion-mnist-msvq": MultiScaleVQGANConfig(**VQGAN_PRESETS["fashion-mnist-f4"].to_dict(), scales=(1, 2, 3, 4, 5, 7)),
    "tiny-msvq": MultiScaleVQGANConfig(**{**VQGAN_PRESETS["tiny-f4"].to_dict(), "codebook_size": 64,
                                          "resolution": 16, "attention_resolutions": (4,)}, scales=(1, 2, 4)),
})


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
        owner = type(self).__name__
        if self.resample not in ("2d", "1d"):
            raise ConfigError(f"resample must be '2d' or '1d', got {short_repr(self.resample)}", field="resample")
        if min(self.dim, self.heads, self.head_dim) < 1:
            raise ConfigError("dim, heads and head_dim must be >= 1")
        check_range(owner, "dim", self.dim, 1, MAX_WIDTH)
        check_range(owner, "heads", self.heads, 1, 1024)
        check_range(owner, "head_dim", self.head_dim, 1, MAX_WIDTH)
        if self.heads * self.head_dim > MAX_WIDTH:
            raise ConfigError(
                f"{owner}: heads * head_dim must be <= {MAX_WIDTH}, got {self.heads} * {self.head_dim}", field="heads"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"2D rotary embeddings need head_dim divisible by 4 (half the rotary dims per axis, "
                f"in pairs), got {self.head_dim}", field="head_dim",
            )
        if self.shorten_factor < 1:
            raise ConfigError(f"shorten_factor must be >= 1, got {self.shorten_factor}", field="shorten_factor")
        check_range(owner, "shorten_factor", self.shorten_factor, 1, 1024)
        if self.resample == "2d" and math.isqrt(self.shorten_factor) ** 2 != self.shorten_factor:
            raise ConfigError(
                f"2d resampling needs a perfect-square shorten_factor (√k×√k blocks), got {self.shorten_factor}",
                field="shorten_factor",
            )
        self._validate_depth(self.depth, nesting=0)
        if depth_layers(self.depth) > MAX_LAYERS:
            raise ConfigError(
                f"depth has {depth_layers(self.depth)} layers in all, more than {MAX_LAYERS}", field="depth"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be None or >= 1, got {self.num_classes}", field="num_classes")
        if self.num_classes is not None:
            check_range(owner, "num_classes", self.num_classes, 1, MAX_CODEBOOK_SIZE)
        if self.codebook_size < 2:
            raise ConfigError(f"codebook_size must be >= 2, got {self.codebook_size}", field="codebook_size")
        check_range(owner, "codebook_size", self.codebook_size, 2, MAX_CODEBOOK_SIZE)
        check_range(owner, "ff_multiplier", self.ff_multiplier, 1, 64)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if len(self.latent_shape) != 2 or min(self.latent_shape) < 1:
            raise ConfigError(
                f"latent_shape must be (h, w) with h, w >= 1, got {self.latent_shape}", field="latent_shape"
            )
        if max(self.latent_shape) > MAX_LATENT_SIDE:
            raise ConfigError(
                f"latent_shape sides must be <= {MAX_LATENT_SIDE}, got {self.latent_shape}", field="latent_shape"
            )
        check_parameter_budget(owner, self.parameter_estimate(),
                               "dim, depth, heads, head_dim, ff_multiplier and codebook_size")

    def parameter_estimate(self) -> int:
        """A rough upper estimate of the parameter count, used to reject absurd configs early."""
        per_layer = 4 * self.dim * self.heads * self.head_dim + 2 * self.ff_multiplier * self.dim**2
        resampling = depth_levels(self.depth) * 2 * self.shorten_factor * self.dim**2
        embeddings = (2 * self.codebook_size + (self.num_classes or 0) + 1) * self.dim
        return depth_layers(self.depth) * per_layer + resampling + embeddings

    def _validate_depth(self, depth: Depth, nesting: int) -> None:
        if nesting > 16:
            raise ConfigError("depth is nested more than 16 levels deep", field="depth")
        if isinstance(depth, int) and not isinstance(depth, bool):
            if not 0 <= depth <= MAX_LAYERS:
                raise ConfigError(f"depth entries must be in [0, {MAX_LAYERS}], got {depth}", field="depth")
            return
        if not (
            isinstance(depth, tuple) and len(depth) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) for d in (depth[0], depth[2]))
        ):
            raise ConfigError(
                f"depth must be an int or (pre, valley, post) with int pre/post, got {short_repr(depth)}", field="depth"
            )
        self._validate_depth(depth[0], nesting + 1)
        self._validate_depth(depth[1], nesting + 1)
        self._validate_depth(depth[2], nesting + 1)


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
    # the shipped emoji model's prior: 16x16 tokens, 2x2 shortening to an 8x8 valley, sized for 2 CPU cores
    "emoji": HourglassConfig(codebook_size=1024, dim=192, depth=(2, 4, 2), heads=3, head_dim=64, shorten_factor=4,
                             latent_shape=(16, 16), num_classes=9),
    "tiny": HourglassConfig(codebook_size=64, dim=64, depth=(1, 2, 1), heads=4, head_dim=16, latent_shape=(8, 8)),
    "tiny-nested": HourglassConfig(codebook_size=64, dim=64, depth=(1, (1, 2, 1), 1), heads=4, head_dim=16,
                                   latent_shape=(8, 8)),
}

# Table 3's "Unroll Steps" row: the training unroll T that goes with each preset.
UNROLL_STEPS: dict[str, int] = {
    "ffhq256": 3, "ffhq1024": 3, "celeba": 3, "mnist": 2, "fashion-mnist": 2, "imagenet": 3, "emoji": 2,
    "tiny": 2, "tiny-nested": 2,
}


def preset(name: str, presets: dict[str, C]) -> C:
    """Look a preset up by name, with a message that lists the known names."""
    try:
        return presets[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(presets))}") from None


# ---------------------------------------------------------------------------------------------
# Sampling (paper §3.4, §3.6)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Knob:
    """What the CLI and the web app show of one :class:`SamplingOptions` field, and its range.

    ``help`` is the flag's help and ``label`` the form's; ``minimum`` / ``maximum`` (None: no bound;
    ``exclusive_minimum``: the minimum itself is refused) or ``choices`` are checked by
    :meth:`SamplingOptions.validate`; ``none`` says what None means for an optional knob; ``flag``
    is the CLI's spelling when it is not ``--field-name``; ``step`` is the form's input granularity
    (None: 1 for integers, 0.05 for numbers); ``form``: whether the web app's form shows it.
    """

    help: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] | None = None
    none: str | None = None
    flag: str | None = None
    step: float | None = None
    form: bool = True

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`ConfigError` (naming the field) unless ``value`` is in this knob's range."""
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{name} must be one of {', '.join(self.choices)}, got {short_repr(value)}",
                                  field=name)
            return
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        if low_ok and (self.maximum is None or value <= self.maximum):
            return
        if self.maximum is None:
            bound = f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        else:
            bound = f"in {'(' if self.exclusive_minimum else '['}{self.minimum:g}, {self.maximum:g}]"
        raise ConfigError(f"{name} must be {bound}, got {value}", field=name)


def knob(default: Any, help: str, **facts: Any) -> Any:
    """A :class:`SamplingOptions` field with its :class:`Knob` (the CLI's and the app's view of it)."""
    return dataclasses.field(default=default, metadata={"knob": Knob(help=help, **facts)})


SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True, kw_only=True)
class KnobOptions(ConfigBase):
    """Options whose every field is a :func:`knob`: the CLI's flags and the web app's form are built from them."""

    @classmethod
    def knobs(cls) -> dict[str, Knob]:
        """Every field's :class:`Knob`, in field order."""
        return {field.name: field.metadata["knob"] for field in dataclasses.fields(cls)}

    @classmethod
    def knob_type(cls, name: str) -> tuple[type, bool]:
        """A field's value type and whether it takes None (``int | None`` -> ``(int, True)``)."""
        hint = field_types(cls)[name]
        arms = typing.get_args(hint)
        return next((arm for arm in arms if arm is not type(None)), hint), type(None) in arms

    def validate(self) -> None:
        for name, spec in self.knobs().items():
            value = getattr(self, name)
            if value is not None:
                spec.check(name, value)


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(KnobOptions):
    """Sampler knobs (:mod:`sundae.sampler`), the one definition of their names, types, ranges, help
    and library defaults: the CLI's flags and the web app's form are built from these fields
    (:meth:`knobs`), and a model directory's ``scheduler/config.json`` holds one instance, the
    defaults chosen for that model. The library defaults follow the paper's recommendations
    (§3.4, Figs. 8, 12, 13) and the sweeps of the shipped model (README).

    Steps count from 1. With ``early_stop`` a sample stops after the first step that updated at
    least one of its free positions and left all of them unchanged; ``min_steps`` is the earliest
    step it may stop at (``min_steps=3``: steps 1 and 2 always run, a sample may stop at step 3;
    0 and 1 both let it stop at step 1). ``steps_taken`` of :class:`SampleOutput` is that step.
    """

    steps: int = knob(50, "Sampling steps T.", label="Steps", minimum=1)
    temperature: float = knob(1.0, "Temperature at the first step.", label="Temperature (start)", minimum=0.0,
                              maximum=10.0, exclusive_minimum=True)
    end_temperature: float = knob(0.6, "Temperature at the last step (annealed; Fig. 13: 0.5-0.7 works well).",
                                  label="Temperature (end)", minimum=0.0, maximum=10.0, exclusive_minimum=True)
    temperature_schedule: str = knob("linear", "Temperature schedule from start to end.", flag="--schedule",
                                     label="Temperature schedule", choices=SCHEDULES)
    proportion: float = knob(0.8, "Share of tokens updated per step (0.5-0.8 for T <= 50).",
                             label="Proportion updated per step", minimum=0.0, maximum=1.0, exclusive_minimum=True)
    end_proportion: float | None = knob(None, "Proportion at the last step.", none="constant",
                                        label="Proportion (end)", minimum=0.0, maximum=1.0, exclusive_minimum=True)
    proportion_schedule: str = knob("linear", "Proportion schedule from start to end.", label="Proportion schedule",
                                    choices=SCHEDULES)
    top_k: int | None = knob(None, "Sample among the k most likely codes.", none="off", label="Top-k", minimum=1)
    top_p: float | None = knob(None, "Nucleus sampling threshold.", none="off", label="Top-p", minimum=0.0,
                               maximum=1.0, exclusive_minimum=True)
    guidance_scale: float = knob(1.0, "Classifier-free guidance scale (1 = plain conditional, 0 = unconditional).",
                                 flag="--guidance", label="Guidance", minimum=0.0, maximum=50.0, step=0.5)
    early_stop: bool = knob(True, "Let each sample stop once a step leaves it unchanged (off: run every step).",
                            label="Stop each sample once it stops changing")
    min_steps: int = knob(0, "Earliest step (from 1) at which a sample may stop on its own.",
                          label="Earliest stop step", minimum=0)
    compaction_interval: int = knob(1, "Steps between removals of finished samples from the batch (each costs "
                                       "one device sync; the samples do not change).",
                                    label="Compaction interval", minimum=1, form=False)

    def temperature_at(self, step: int) -> float:
        return _schedule(self.temperature, self.end_temperature, step, self.steps, self.temperature_schedule)

    def proportion_at(self, step: int) -> float:
        end = self.proportion if self.end_proportion is None else self.end_proportion
        return _schedule(self.proportion, end, step, self.steps, self.proportion_schedule)


def _schedule(start: float, end: float, step: int, steps: int, kind: str) -> float:
    """Value at ``step`` of ``steps``: ``start`` at the first step, ``end`` at the last (end when steps == 1)."""
    progress = step / (steps - 1) if steps > 1 else 1.0
    if kind == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (end - start) * progress


GUIDANCE_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True, kw_only=True)
class NextScaleOptions(KnobOptions):
    """VAR's sampling knobs (:mod:`sundae.var.sampler`): one forward pass per scale, so no step count,
    proportion or self-stopping. A model directory's ``scheduler/config.json`` holds the defaults
    chosen for that model, as it does :class:`SamplingOptions` for a SUNDAE model.

    Guidance g is VAR's linear ramp by default: scale k of K samples with 1 + (g - 1)·k/(K - 1), no
    guidance at the first scale and g at the last (Tian et al. 2024, their sampler's ``cfg`` ratio).
    """

    temperature: float = knob(1.0, "Sampling temperature.", label="Temperature", minimum=0.0, maximum=10.0,
                              exclusive_minimum=True)
    top_k: int | None = knob(None, "Sample among the k most likely codes.", none="off", label="Top-k", minimum=1)
    top_p: float | None = knob(None, "Nucleus sampling threshold.", none="off", label="Top-p", minimum=0.0,
                               maximum=1.0, exclusive_minimum=True)
    guidance_scale: float = knob(1.0, "Classifier-free guidance at the last scale (1 = plain conditional, "
                                      "0 = unconditional).", flag="--guidance", label="Guidance", minimum=0.0,
                                 maximum=50.0, step=0.5)
    guidance_schedule: str = knob("linear", "Guidance over the scales: VAR's linear ramp from 1 or constant.",
                                  label="Guidance schedule", choices=GUIDANCE_SCHEDULES)

    def guidance_at(self, scale: int, scales: int) -> float:
        if self.guidance_schedule == "constant" or scales == 1:
            return self.guidance_scale
        return 1.0 + (self.guidance_scale - 1.0) * scale / (scales - 1)


# Inpainting, outpainting and refinement sample at a low constant temperature (§3.6: 0.3 <= tau <= 0.5):
# these replace the model's own defaults (its scheduler/config.json) for those operations; an explicit
# temperature still wins (SundaePipeline.sampling_options).
INPAINT_DEFAULTS = {"temperature": 0.4, "end_temperature": 0.4}

__all__ = [
    "ConfigBase", "ConfigError", "MAX_CODEBOOK_SIZE", "MAX_PARAMETERS", "field_types", "short_repr", "VQGANConfig",
    "HourglassConfig", "VQGAN_PRESETS", "HOURGLASS_PRESETS", "Knob", "SamplingOptions", "INPAINT_DEFAULTS",
    "UNROLL_STEPS", "depth_layers", "depth_levels", "preset", "MultiScaleVQGANConfig", "NextScaleConfig",
    "NEXT_SCALE_PRESETS", "scale_lengths", "tokenizer_config_from_dict", "NextScaleOptions",
]
