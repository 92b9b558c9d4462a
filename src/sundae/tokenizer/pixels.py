"""Grey pixels as tokens (paper §4.2): the identity "tokenizer" of the MNIST-style experiments.

Each 8-bit grey level is one of v = 256 codebook indices and each pixel is one token (f = 1),
so the same sampler, pipeline and inpainting code serve pixel-level and latent-level priors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PixelTokenizerConfig:
    codebook_size: int = 256
    downsample_factor: int = 1
    out_channels: int = 1


class PixelTokenizer(nn.Module):
    """images in [-1, 1] (B, C, H, W) <-> grey-level tokens (B, H, W) in [0, 255]."""

    def __init__(self) -> None:
        super().__init__()
        self.config = PixelTokenizerConfig()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def encode(self, images: Tensor) -> Tensor:
        grey = images.float().mean(dim=1) if images.shape[1] > 1 else images[:, 0].float()
        return ((grey.clamp(-1, 1) + 1) * 127.5).round().long()

    def decode(self, tokens: Tensor) -> Tensor:
        return (tokens.float() / 127.5 - 1.0).unsqueeze(1)
