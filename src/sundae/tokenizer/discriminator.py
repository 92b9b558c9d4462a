"""The VQ-GAN patch discriminator D of the adversarial term in Eq. 7 (paper §3.5).

This is taming-transformers' ``NLayerDiscriminator``, the pix2pix PatchGAN (Isola et al.,
2017): a 4x4 stride-2 convolution with LeakyReLU(0.2), ``layers - 1`` more stride-2
convolution-BatchNorm-LeakyReLU blocks, one stride-1 block, and a stride-1 convolution to one
logit per overlapping patch. Widths grow as ``channels * min(2**n, 8)``. Initialisation follows
taming's ``weights_init``: convolution weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02).

The layers live in one ``nn.Sequential`` called ``main`` with taming's indices, so the state
dict keys equal taming's ``loss.discriminator.main.*`` once that prefix is stripped.

BatchNorm under DDP: statistics are per process, as in taming. A training loop that wants
synchronised statistics converts the module with ``nn.SyncBatchNorm.convert_sync_batchnorm``;
this module does not do it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sundae.checkpoint import PretrainedMixin
from sundae.config import ConfigBase, ConfigError
from sundae.errors import InputError

KERNEL_SIZE = 4
MAX_WIDTH_MULTIPLIER = 8


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig(ConfigBase):
    """PatchGAN discriminator settings (taming's ``disc_in_channels``, ``disc_ndf``, ``disc_num_layers``)."""

    in_channels: int = 3
    channels: int = 64
    layers: int = 3  # Table 4: "Number of Discriminator Layers 3"

    @property
    def downsample_factor(self) -> int:
        return 2**self.layers

    @property
    def minimum_size(self) -> int:
        """Smallest image side that still gives a 1x1 logit map (two final stride-1 4x4 convs eat 3 pixels)."""
        return 3 * self.downsample_factor

    def validate(self) -> None:
        if min(self.in_channels, self.channels, self.layers) < 1:
            raise ConfigError(
                f"in_channels, channels and layers must be >= 1, got {self.in_channels}, {self.channels}, {self.layers}"
            )


def _width_multiplier(index: int) -> int:
    return min(2**index, MAX_WIDTH_MULTIPLIER)


def _normalised_block(in_channels: int, out_channels: int, *, stride: int) -> list[nn.Module]:
    # No bias: BatchNorm's shift makes it redundant (taming sets use_bias=False with BatchNorm).
    return [
        nn.Conv2d(in_channels, out_channels, KERNEL_SIZE, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2),
    ]


def initialise_weights(module: nn.Module) -> None:
    """taming's ``weights_init``: convolutions ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(PretrainedMixin, nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, H', W'), H' = H // 2**layers - 2."""

    config_class = DiscriminatorConfig

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.channels
        sequence: list[nn.Module] = [
            nn.Conv2d(config.in_channels, width, KERNEL_SIZE, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for index in range(1, config.layers):
            sequence += _normalised_block(
                width * _width_multiplier(index - 1), width * _width_multiplier(index), stride=2
            )
        last_width = width * _width_multiplier(config.layers)
        sequence += _normalised_block(width * _width_multiplier(config.layers - 1), last_width, stride=1)
        sequence.append(nn.Conv2d(last_width, 1, KERNEL_SIZE, stride=1, padding=1))
        self.main = nn.Sequential(*sequence)
        self.apply(initialise_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 1, H // 2**layers - 2, W // 2**layers - 2) logits."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise InputError(
                f"discriminator expects images of shape (B, {self.config.in_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )
        if min(images.shape[-2:]) < self.config.minimum_size:
            raise InputError(
                f"images of size {tuple(images.shape[-2:])} are too small for a {self.config.layers}-layer "
                f"discriminator: each side must be >= {self.config.minimum_size}; use fewer layers or larger images"
            )
        return self.main(images)


__all__ = ["DiscriminatorConfig", "PatchDiscriminator", "initialise_weights"]
