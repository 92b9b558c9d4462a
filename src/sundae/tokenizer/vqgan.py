"""The VQ-GAN tokenizer network (paper §3.1 and §3.5; Esser et al. 2021, "Taming Transformers").

Images in [-1, 1] are encoded to a grid of codebook indices (the latent dataset of Eq. 3) and
indices are decoded back to images (the last step of sampling, §3.4). The paper uses the public
taming-transformers VQ-GANs for 256² data and trains its own f=32 model for 1024² (Table 4).

The architecture reproduces taming's ``Encoder`` / ``Decoder`` (``diffusionmodules/model.py``),
``VectorQuantizer2`` and ``GumbelQuantize`` with identical module attribute names, so a taming
``state_dict`` maps onto :class:`VQGAN` key for key (see :mod:`sundae.tokenizer.taming`).
Attention uses ``scaled_dot_product_attention``: one head over the h·w positions with scale
c^-1/2, mathematically identical to taming's bmm/softmax.

Quantization (distances, argmin, losses) always runs in fp32, also under ``torch.autocast``:
in bf16 near-tied distances pick different codes and the codebook loss loses its small terms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sundae.checkpoint import PretrainedMixin, content_hash
from sundae.config import ConfigError, VQGANConfig
from sundae.errors import InputError

GROUP_NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """taming's ``Normalize``: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=GROUP_NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def validate_group_norm_widths(config: VQGANConfig) -> None:
    """Reject widths that GroupNorm(32) cannot split into 32 groups.

    We keep taming's fixed 32 groups rather than shrinking the group count for narrow
    models, so every model built here has the normalisation the public checkpoints were
    trained with; tiny test models use ``channels=32``.
    """
    widths = sorted({config.channels} | {config.channels * m for m in config.channel_multipliers})
    bad = [w for w in widths if w % GROUP_NORM_GROUPS]
    if bad:
        raise ConfigError(
            f"GroupNorm({GROUP_NORM_GROUPS}) needs every layer width divisible by {GROUP_NORM_GROUPS}, but "
            f"channels={config.channels} with channel_multipliers={config.channel_multipliers} gives widths {bad}; "
            f"use channels that are a multiple of {GROUP_NORM_GROUPS}"
        )


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a residual; a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions, with 1x1-conv q, k, v and output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(layer(h), "b c h w -> b 1 (h w) c") for layer in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)  # default scale c^-1/2, as taming
        attended = rearrange(attended, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only (taming's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResidualStack(nn.Module):
    """The residual blocks of one resolution, each followed by attention where configured."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_blocks: int, attention: bool, dropout: float
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], widths[i + 1], dropout=dropout) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def run_blocks(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class DownLevel(ResidualStack):
    """One encoder resolution (taming's ``down[i]``): blocks, then ``downsample`` except at the last."""

    def __init__(self, in_channels: int, out_channels: int, *, num_blocks: int, attention: bool, dropout: float,
                 downsample: bool) -> None:
        super().__init__(in_channels, out_channels, num_blocks=num_blocks, attention=attention, dropout=dropout)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.run_blocks(x))


class UpLevel(ResidualStack):
    """One decoder resolution (taming's ``up[i]``): blocks, then ``upsample`` except at level 0."""

    def __init__(self, in_channels: int, out_channels: int, *, num_blocks: int, attention: bool, dropout: float,
                 upsample: bool) -> None:
        super().__init__(in_channels, out_channels, num_blocks=num_blocks, attention=attention, dropout=dropout)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(self.run_blocks(x))


class MiddleBlock(nn.Module):
    """res - attention - res at the lowest resolution (taming's ``mid``)."""

    def __init__(self, channels: int, *, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def level_has_attention(config: VQGANConfig, level: int) -> bool:
    # taming decides by the nominal training resolution, not the size of the current input
    return config.resolution // 2**level in config.attention_resolutions


class Encoder(nn.Module):
    """images (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in (1, *config.channel_multipliers)]
        last = len(config.channel_multipliers) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.channels, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(
                widths[i], widths[i + 1], num_blocks=config.num_res_blocks, dropout=config.dropout,
                attention=level_has_attention(config, i), downsample=i != last,
            )
            for i in range(last + 1)
        )
        self.mid = MiddleBlock(widths[-1], dropout=config.dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, kernel_size=3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.conv_in(images)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """features (B, z_channels, h, w) -> images (B, out_channels, h·f, w·f).

    ``up[i]`` is level ``i`` (the same resolution as ``encoder.down[i]``) and runs from the
    last level to the first, as taming's prepend-built ModuleList.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MiddleBlock(widths[-1], dropout=config.dropout)
        # level i receives the output of level i+1 (the mid block for the last level)
        level_inputs = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            UpLevel(
                level_inputs[i], widths[i], num_blocks=config.num_res_blocks + 1, dropout=config.dropout,
                attention=level_has_attention(config, i), upsample=i != 0,
            )
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    """``quantized`` (B, embed_dim, h, w) fp32 with straight-through gradients to the encoder,
    ``loss`` the quantizer's scalar fp32 loss, ``indices`` (B, h, w) long."""

    quantized: Tensor
    loss: Tensor
    indices: Tensor


def fp32_region(tensor: Tensor) -> torch.autocast:
    """A context in which autocast is off on ``tensor``'s device, so quantization stays fp32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through estimator (taming's
    ``VectorQuantizer2``; the paper's k-means VQ loss of Eq. 7).

    loss = ||sg[z_q] - z||² + β ||z_q - sg[z]||² with ``legacy=True`` (taming's default, β on the
    codebook term), else β ||sg[z_q] - z||² + ||z_q - sg[z]||² (β on the commitment term).
    """

    def __init__(self, codebook_size: int, embed_dim: int, *, beta: float, legacy: bool) -> None:
        super().__init__()
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def assign(self, z: Tensor) -> Tensor:
        """z (B, embed_dim, h, w) -> indices (B, h, w) of the nearest codewords."""
        with fp32_region(z):
            z_flat = rearrange(z.float(), "b d h w -> (b h w) d")
            codebook = self.embedding.weight.float()
            # ||z - e||² expanded as taming does, so ties resolve the same way
            distances = (
                z_flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * z_flat @ codebook.t()
            )
            indices = distances.argmin(dim=1)
        return rearrange(indices, "(b h w) -> b h w", b=z.shape[0], h=z.shape[2], w=z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, h, w) -> codewords (B, embed_dim, h, w) in fp32."""
        return rearrange(F.embedding(indices, self.embedding.weight.float()), "b h w d -> b d h w")

    def forward(self, z: Tensor) -> QuantizerOutput:
        indices = self.assign(z)
        with fp32_region(z):
            z = z.float()
            z_q = self.lookup(indices)
            commitment = F.mse_loss(z, z_q.detach())
            codebook = F.mse_loss(z_q, z.detach())
            if self.legacy:
                loss = commitment + self.beta * codebook
            else:
                loss = self.beta * commitment + codebook
            quantized = z + (z_q - z).detach()  # straight-through: forward z_q, gradient to z
        return QuantizerOutput(quantized=quantized, loss=loss, indices=indices)


class GumbelQuantizer(nn.Module):
    """taming's ``GumbelQuantize``: a 1x1 ``proj`` to codebook logits, then codewords ``embed``.

    Training: hard Gumbel-softmax samples at ``temperature`` (straight-through gradients)
    and loss ``kl_weight`` · KL(softmax(logits) || uniform). Evaluation and :meth:`assign`:
    the deterministic argmax of the logits.
    """

    def __init__(
        self, z_channels: int, codebook_size: int, embed_dim: int, *, kl_weight: float = 5e-4,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.kl_weight = kl_weight
        self.temperature = temperature  # public so a trainer can anneal it
        self.proj = nn.Conv2d(z_channels, codebook_size, kernel_size=1)
        self.embed = nn.Embedding(codebook_size, embed_dim)

    def logits(self, z: Tensor) -> Tensor:
        """z (B, z_channels, h, w) -> fp32 logits (B, codebook_size, h, w)."""
        with fp32_region(z):
            return F.conv2d(z.float(), self.proj.weight.float(), self.proj.bias.float())

    def assign(self, z: Tensor) -> Tensor:
        """z (B, z_channels, h, w) -> indices (B, h, w), the argmax code (no sampling)."""
        return self.logits(z).argmax(dim=1)

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, h, w) -> codewords (B, embed_dim, h, w) in fp32."""
        return rearrange(F.embedding(indices, self.embed.weight.float()), "b h w d -> b d h w")

    def forward(self, z: Tensor) -> QuantizerOutput:
        logits = self.logits(z)
        with fp32_region(logits):
            if self.training:
                one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)
            else:
                one_hot = F.one_hot(logits.argmax(dim=1), self.codebook_size).permute(0, 3, 1, 2).float()
            quantized = torch.einsum("b n h w, n d -> b d h w", one_hot, self.embed.weight.float())
            probabilities = logits.softmax(dim=1)
            kl_to_uniform = (probabilities * torch.log(probabilities * self.codebook_size + 1e-10)).sum(dim=1)
            loss = self.kl_weight * kl_to_uniform.mean()
        return QuantizerOutput(quantized=quantized, loss=loss, indices=one_hot.argmax(dim=1))


@torch.no_grad()
def codebook_statistics(indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(perplexity, usage): exp(entropy) of the code histogram and the fraction of codes used."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    probabilities = counts / counts.sum()
    entropy = -(probabilities * torch.log(probabilities + 1e-10)).sum()
    return entropy.exp(), (counts > 0).float().mean()


@dataclass
class VQGANOutput:
    """What one training forward pass returns.

    reconstruction (B, out_channels, H, W); quantizer_loss scalar fp32 (the L_VQ of Eq. 7,
    or the Gumbel KL term); indices (B, h, w) long; perplexity and codebook_usage scalars
    (the latter the fraction of the codebook used in this batch), without gradients.
    """

    reconstruction: Tensor
    quantizer_loss: Tensor
    indices: Tensor
    perplexity: Tensor
    codebook_usage: Tensor


def codes_content_hash(state: dict[str, Tensor]) -> str:
    """:func:`content_hash` of every weight outside :attr:`VQGAN.decode_path`: two tokenizers with the same
    value give every image the same codes (a decoder-only fine-tune keeps it), so latents encoded by one
    and a prior trained on them stay valid with the other. Unknown names count as code-deciding."""
    return content_hash({name: tensor for name, tensor in state.items()
                         if name.split(".", 1)[0] not in VQGAN.decode_path})


class VQGAN(nn.Module, PretrainedMixin):
    """Encoder, quantizer and decoder, built only from a :class:`VQGANConfig`.

    Attribute names follow taming's ``VQModel`` / ``GumbelVQ``: ``encoder``, ``decoder``,
    ``quant_conv``, ``post_quant_conv`` and ``quantize``.
    """

    config_class = VQGANConfig
    #: the submodules that only turn codes into pixels; every other weight (encoder, ``quant_conv``,
    #: codebook) has a say in which code an image gets
    decode_path = ("post_quant_conv", "decoder")

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        validate_group_norm_widths(config)
        if config.quantizer == "gumbel" and config.embed_dim != config.z_channels:
            raise ConfigError(
                f"the gumbel quantizer projects quant_conv's output (embed_dim={config.embed_dim}) with a "
                f"z_channels={config.z_channels} input conv, as taming does; set embed_dim == z_channels"
            )
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)
        self.quantize = self.build_quantizer(config)

    @staticmethod
    def build_quantizer(config: VQGANConfig) -> nn.Module:
        """The quantizer of ``config`` (a subclass may build another kind, e.g. VAR's multi-scale one)."""
        if config.quantizer == "gumbel":
            return GumbelQuantizer(config.z_channels, config.codebook_size, config.embed_dim)
        return VectorQuantizer(config.codebook_size, config.embed_dim, beta=config.beta, legacy=config.quantizer_legacy)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last conv weight, G_{-1} of the adaptive GAN weight λ in Eq. 7."""
        return self.decoder.conv_out.weight

    def encode_latents(self, images: Tensor) -> Tensor:
        """images (B, in_channels, H, W) in [-1, 1] -> continuous latents (B, embed_dim, H/f, W/f)
        before quantization. H and W must be multiples of f."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, in_channels, H, W) in [-1, 1] -> codebook indices (B, H/f, W/f) long."""
        return self.quantize.assign(self.encode_latents(images))

    def decode_codes(self, z_q: Tensor) -> Tensor:
        """quantized latents (B, embed_dim, h, w) -> images (B, out_channels, h·f, w·f)."""
        # codewords come out in fp32; a model cast to half precision needs them in its own dtype
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    def decode(self, indices: Tensor) -> Tensor:
        """codebook indices (B, h, w) -> images (B, out_channels, h·f, w·f), roughly in [-1, 1]."""
        self.check_indices(indices)
        return self.decode_codes(self.quantize.lookup(indices))

    def forward(self, images: Tensor) -> VQGANOutput:
        """Reconstruct ``images`` (B, in_channels, H, W) for training; see :class:`VQGANOutput`."""
        quantized = self.quantize(self.encode_latents(images))
        perplexity, usage = codebook_statistics(quantized.indices, self.config.codebook_size)
        return VQGANOutput(
            reconstruction=self.decode_codes(quantized.quantized), quantizer_loss=quantized.loss,
            indices=quantized.indices, perplexity=perplexity, codebook_usage=usage,
        )

    def check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise InputError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        self.config.latent_shape(images.shape[2], images.shape[3])

    def check_indices(self, indices: Tensor) -> None:
        if indices.ndim != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise InputError(f"expected integer indices of shape (B, h, w), got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.config.codebook_size):
            raise InputError(
                f"indices must lie in [0, {self.config.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]; were they made with a different codebook?"
            )


def decode_in_tiles(tokenizer: nn.Module, tokens: Tensor, *, tiles: int | None, overlap: int = 2) -> Tensor:
    """Decode ``tokens`` (B, h, w) as ``tiles × tiles`` pieces, each with ``overlap`` tokens of context
    on every inner side; ``tiles`` None or 1 is the plain ``tokenizer.decode``.

    Bounds the decoder's activation memory by one tile's (a 1024² image in 2 × 2 tiles needs about
    a quarter of the memory). Approximate: attention and GroupNorm statistics see only a tile and
    its margin, so faint seams may show; use it when memory is short, not by default.
    """
    if tiles is None or tiles == 1:
        return tokenizer.decode(tokens)
    height, width = tokens.shape[1:]
    if not 1 <= tiles <= min(height, width):
        raise InputError(f"decode tiles must be between 1 and {min(height, width)} for a {height}x{width} "
                         f"token grid, got {tiles}")
    factor = tokenizer.config.downsample_factor
    rows = [round(height * i / tiles) for i in range(tiles + 1)]
    columns = [round(width * i / tiles) for i in range(tiles + 1)]
    bands = []
    for top, bottom in zip(rows, rows[1:]):
        band = []
        for left, right in zip(columns, columns[1:]):
            top_margin, left_margin = min(overlap, top), min(overlap, left)
            piece = tokens[:, top - top_margin:min(height, bottom + overlap),
                           left - left_margin:min(width, right + overlap)]
            image = tokenizer.decode(piece)
            y, x = top_margin * factor, left_margin * factor
            band.append(image[..., y:y + (bottom - top) * factor, x:x + (right - left) * factor])
        bands.append(torch.cat(band, dim=-1))
    return torch.cat(bands, dim=-2)
