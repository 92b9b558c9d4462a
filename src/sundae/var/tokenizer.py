"""VAR's multi-scale residual tokenizer (spec seed 003; Tian et al. 2024, §3.2 and Algorithms 1-2).

One shared codebook quantises the encoder's features f (B, C, S, S) at growing scales s_1 < ... < s_K = S:
scale k takes what the coarser scales left, r_k = f - Σ_{j<k} h_j, shrinks it to s_k × s_k (area
average), picks the nearest codeword of each position, and adds back h_k = φ_k(up(e)), the code map
upsampled to S × S (bicubic) and mixed with a 3x3 convolution, φ_k(x) = (1 - r)·x + r·conv_k(x). The
decoder sees f̂ = Σ_k h_k, so the residuals of all scales sum to the full-scale reconstruction.

Tokens of one image are a single row of Σ s_k² codes, coarsest scale first (shape (B, 1, L)), so a
multi-scale tokenizer encodes and decodes through the same :class:`~sundae.tokenizer.vqgan.VQGAN` calls
as a single-scale one and its token datasets are ordinary latent datasets.

As the single-scale quantizer, all of it runs in fp32, also under autocast.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sundae.checkpoint import CONFIG_NAME, read_json
from sundae.config import MultiScaleVQGANConfig, VQGANConfig, scale_lengths
from sundae.errors import InputError
from sundae.tokenizer.vqgan import VQGAN, QuantizerOutput, VectorQuantizer, fp32_region


def scales_in_prefix(scales: tuple[int, ...], length: int) -> int:
    """How many whole scales the first ``length`` tokens of a packed row hold; else an :class:`InputError`."""
    boundaries = [sum(scale_lengths(scales[:count])) for count in range(1, len(scales) + 1)]
    if length not in boundaries:
        raise InputError(f"multi-scale tokens are rows of {boundaries[-1]} codes per image (scales {scales}), or a "
                         f"prefix of whole scales ({', '.join(map(str, boundaries))}); got {length}")
    return boundaries.index(length) + 1


def resize_features(features: Tensor, side: int) -> Tensor:
    """(B, C, H, W) -> (B, C, side, side) by area averaging (a no-op at the same size)."""
    return features if features.shape[-1] == side else F.interpolate(features, size=(side, side), mode="area")


class MultiScaleQuantizer(VectorQuantizer):
    """The residual quantizer of the module docstring. Its ``assign`` and ``lookup`` speak packed
    multi-scale tokens (B, 1, L); the nearest-codeword search of one scale is :class:`VectorQuantizer`'s."""

    def __init__(self, codebook_size: int, embed_dim: int, *, scales: tuple[int, ...], residual_ratio: float,
                 beta: float, legacy: bool) -> None:
        super().__init__(codebook_size, embed_dim, beta=beta, legacy=legacy)
        self.scales = tuple(scales)
        self.residual_ratio = residual_ratio
        self.phi = nn.ModuleList(nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1) for _ in scales)

    @property
    def side(self) -> int:
        return self.scales[-1]

    def split(self, tokens: Tensor) -> list[Tensor]:
        """Packed tokens (B, 1, L) -> one (B, s_k, s_k) grid per scale; a prefix of the row (the first k
        scales, e.g. a sampling trajectory's frame) gives the first k grids."""
        count = scales_in_prefix(self.scales, tokens.shape[-1])
        pieces = tokens.flatten(1).split(scale_lengths(self.scales[:count]), dim=1)
        return [rearrange(piece, "b (h w) -> b h w", h=side) for piece, side in zip(pieces, self.scales)]

    def join(self, grids: list[Tensor]) -> Tensor:
        """One (B, s_k, s_k) grid per scale -> packed tokens (B, 1, L)."""
        return torch.cat([grid.flatten(1) for grid in grids], dim=1)[:, None]

    def contribution(self, scale: int, indices: Tensor) -> Tensor:
        """h_k: the codewords of ``indices`` (B, s_k, s_k) at scale ``scale``, upsampled to the full grid
        (B, C, S, S) and mixed with φ_k, in fp32."""
        with fp32_region(indices):
            codes = VectorQuantizer.lookup(self, indices)
            if codes.shape[-1] != self.side:
                codes = F.interpolate(codes, size=(self.side, self.side), mode="bicubic")
            phi = self.phi[scale]
            mixed = F.conv2d(codes, phi.weight.float(), phi.bias.float(), padding=1)
            return (1 - self.residual_ratio) * codes + self.residual_ratio * mixed

    def contributions(self, tokens: Tensor) -> list[Tensor]:
        """Every scale's h_k (B, C, S, S) for packed ``tokens``; their sum is what the decoder sees."""
        return [self.contribution(scale, grid) for scale, grid in enumerate(self.split(tokens))]

    def lookup(self, indices: Tensor) -> Tensor:
        """Packed tokens (B, 1, L) -> f̂ (B, C, S, S), the sum of every scale's contribution (of the
        first k scales for a prefix: VAR's coarse preview)."""
        return torch.stack(self.contributions(indices)).sum(dim=0)

    def scale_input(self, partial: Tensor, scale: int) -> Tensor:
        """What the next-scale prior reads to predict scale ``scale``: the partial sum of the coarser
        scales' contributions (B, C, S, S) shrunk to s_k × s_k, as (B, s_k², C) rows."""
        return rearrange(resize_features(partial, self.scales[scale]), "b c h w -> b (h w) c")

    @torch.no_grad()
    def teacher_inputs(self, tokens: Tensor) -> Tensor:
        """The prior's inputs for scales 2..K of packed ``tokens`` (B, 1, L), teacher-forced:
        (B, L - s_1², C), scale k's rows made from the true codes of scales 1..k-1."""
        partial = torch.zeros(())
        inputs = []
        for scale, grid in enumerate(self.split(tokens)[:-1]):
            partial = partial + self.contribution(scale, grid)
            inputs.append(self.scale_input(partial, scale + 1))
        if not inputs:
            return torch.zeros(tokens.shape[0], 0, self.embedding.embedding_dim, device=tokens.device)
        return torch.cat(inputs, dim=1)

    def assign(self, z: Tensor) -> Tensor:
        """Encoder features (B, C, S, S) -> packed tokens (B, 1, L) (no gradients)."""
        return self._quantize(z)[0]

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(packed tokens, f̂, the mean over scales of the VQ loss between f̂ so far and f)."""
        if tuple(z.shape[-2:]) != (self.side, self.side):
            raise InputError(f"the scale schedule {self.scales} ends at {self.side}x{self.side}, but the encoder gave "
                             f"a {z.shape[-2]}x{z.shape[-1]} grid; use images of the tokenizer's resolution")
        with fp32_region(z):
            z = z.float()
            residual, reconstruction, loss = z.detach(), torch.zeros_like(z), z.new_zeros(())
            grids = []
            for scale, side in enumerate(self.scales):
                grid = VectorQuantizer.assign(self, resize_features(residual, side))
                contribution = self.contribution(scale, grid)
                reconstruction = reconstruction + contribution
                residual = residual - contribution.detach()
                commitment, codebook = F.mse_loss(z, reconstruction.detach()), F.mse_loss(reconstruction, z.detach())
                loss = loss + (commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook)
                grids.append(grid)
        return self.join(grids), reconstruction, loss / len(self.scales)

    def forward(self, z: Tensor) -> QuantizerOutput:
        tokens, reconstruction, loss = self._quantize(z)
        with fp32_region(z):
            z = z.float()
            quantized = z + (reconstruction - z).detach()  # straight-through to the encoder
        return QuantizerOutput(quantized=quantized, loss=loss, indices=tokens)


class MultiScaleVQGAN(VQGAN):
    """:class:`VQGAN` with the multi-scale residual quantizer: ``encode`` gives packed tokens (B, 1, L)
    and ``decode`` takes them; training, losses and saving are the single-scale model's."""

    config_class = MultiScaleVQGANConfig

    @staticmethod
    def build_quantizer(config: VQGANConfig) -> nn.Module:
        if not isinstance(config, MultiScaleVQGANConfig):
            raise InputError(f"a MultiScaleVQGAN needs a MultiScaleVQGANConfig (with scales), got {type(config).__name__}")
        return MultiScaleQuantizer(config.codebook_size, config.embed_dim, scales=config.scales,
                                   residual_ratio=config.residual_ratio, beta=config.beta,
                                   legacy=config.quantizer_legacy)

    def check_indices(self, indices: Tensor) -> None:
        super().check_indices(indices)
        if indices.shape[1] != 1:
            raise InputError(f"multi-scale tokens are one row per image, shape (B, 1, L); got {tuple(indices.shape)}")
        scales_in_prefix(self.config.scales, indices.shape[2])


def build_tokenizer(config: VQGANConfig) -> VQGAN:
    """The tokenizer network of ``config``: multi-scale when it has a scale schedule."""
    return MultiScaleVQGAN(config) if isinstance(config, MultiScaleVQGANConfig) else VQGAN(config)


def load_vqgan(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> VQGAN:
    """The VQ-GAN saved in ``directory``, single- or multi-scale as its config.json says, in eval mode."""
    payload = read_json(Path(directory) / CONFIG_NAME) if Path(directory).is_dir() else None
    model_class = MultiScaleVQGAN if isinstance(payload, dict) and payload.get("class") == "MultiScaleVQGAN" else VQGAN
    return model_class.from_pretrained(directory, map_location=map_location).eval()
