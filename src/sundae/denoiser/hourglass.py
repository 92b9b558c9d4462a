"""The 2D-aware hourglass transformer: tokens (B, h, w) -> logits (B, h, w, codebook_size).

Paper §3.2 ("Multidimensional Hourglass Transformer") and Table 3. An hourglass level runs
``pre`` layers at its own resolution, shortens the sequence ``shorten_factor`` (k) times, runs
its ``valley`` (a flat stack or another level) on the short sequence, brings it back to full
length and runs ``post`` layers. Differences from the original hourglass (Nawrot et al., 2021):

* 2D-aware resampling (Fig. 5, Eq. 4): the grid is cut into √k×√k blocks (space-to-depth), the
  k vectors of a block are concatenated and mapped by one linear layer to a single vector.
  ``resample="1d"`` keeps the original merge of k consecutive raster tokens for the ablation.
* Every resampling is followed by a post-resampling attention layer (Eq. 4's ``A``), aligned
  with the blocks; see :class:`Downsample` and :class:`Upsample` for the exact choice.
* 2D axial rotary position embeddings on every head's queries and keys (:mod:`.rotary`), with
  each level's positions given in full-resolution units so shortened tokens sit at the centre of
  their block (:class:`Layout`).
* No causal masking or shifting: the model is non-autoregressive ("Removal of Causal
  Constraints").

Grids that √k does not divide are zero-padded at the bottom/right before each downsampling; the
padding is masked out of the downsampling attention and cropped off after upsampling
(:class:`Blocks`), so any ``h, w >= 1`` works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sundae.checkpoint import PretrainedMixin
from sundae.config import Depth, HourglassConfig, NextScaleConfig, depth_layers, depth_levels
from sundae.denoiser.rotary import Rotation, apply_rotary
from sundae.errors import InputError


@dataclass(frozen=True)
class Layout:
    """Where the tokens of one hourglass level sit, in full-resolution units.

    ``shape`` is ``(h, w)`` for a 2D grid in raster order or ``(n,)`` for a 1D raster sequence;
    ``stride`` is how many full-resolution tokens (per axis) one token of this level spans.
    Token ``i`` of an axis sits at ``i * stride + (stride - 1) / 2``: the centre of the block it
    was merged from. With positions in common units, the rotary score between a shortened query
    and the full-resolution keys of its block reflects where each key lies inside the block, and
    distances between shortened tokens keep their true scale at every level.
    """

    shape: tuple[int, ...]
    stride: int = 1

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def positions(self, device: torch.device | str | None = None) -> Tensor:
        """Coordinates of every token in raster order: ``(num_tokens, len(shape))`` float32."""
        axes = [
            torch.arange(size, device=device, dtype=torch.float32) * self.stride + (self.stride - 1) / 2
            for size in self.shape
        ]
        coordinates = torch.meshgrid(*axes, indexing="ij")
        return torch.stack(coordinates, dim=-1).reshape(self.num_tokens, len(self.shape))


@dataclass(frozen=True)
class Blocks:
    """How the tokens of one level are cut into groups of k = ``shorten_factor`` for resampling.

    ``"2d"``: √k×√k blocks of the grid (paper Fig. 5, bottom). ``"1d"``: runs of k consecutive
    tokens in raster order (Nawrot et al., 2021; Fig. 5, top); a 2D grid is flattened first and
    every shorter level is a 1D sequence with 1D rotary positions (the raster index).

    A grid whose sides √k does not divide (or a sequence whose length k does not divide) is
    padded with zero vectors at the bottom/right (or end). Zeros rather than a learned pad vector:
    they add nothing to the merge projection, and the pad positions are masked out of the
    downsampling attention (:meth:`group_mask`) and cropped off after upsampling
    (:meth:`ungroup`), so no extra parameter is needed. Every shortened token still contains at
    least one real token, so no mask is needed at the shorter level.
    """

    fine: Layout
    shorten_factor: int
    resample: str

    def __post_init__(self) -> None:
        if self.resample == "2d" and len(self.fine.shape) != 2:
            raise InputError(f"2d resampling needs a 2D grid, got a layout of shape {self.fine.shape}")
        if self.resample == "1d" and len(self.fine.shape) == 2 and self.fine.stride != 1:
            raise InputError("1d resampling flattens only the full-resolution grid (stride 1) into raster order")

    @property
    def side(self) -> int:
        """Block side √k in 2D mode."""
        return math.isqrt(self.shorten_factor)

    @property
    def padded(self) -> Layout:
        """The fine layout padded up to whole blocks (a raster sequence in 1D mode)."""
        if self.resample == "2d":
            height, width = (-(-size // self.side) * self.side for size in self.fine.shape)
            return Layout((height, width), self.fine.stride)
        length = -(-self.fine.num_tokens // self.shorten_factor) * self.shorten_factor
        return Layout((length,), self.fine.stride)

    @property
    def coarse(self) -> Layout:
        """The layout of the shortened level: one token per block, at the block's centre."""
        if self.resample == "2d":
            height, width = self.padded.shape
            return Layout((height // self.side, width // self.side), self.fine.stride * self.side)
        return Layout((self.padded.num_tokens // self.shorten_factor,), self.fine.stride * self.shorten_factor)

    @property
    def has_padding(self) -> bool:
        return self.padded.num_tokens != self.fine.num_tokens

    def group(self, tensor: Tensor) -> Tensor:
        """``(..., N, c)`` in raster order -> ``(..., blocks, k, c)``, zero-padding partial blocks."""
        return self._split(self._pad(tensor))

    def ungroup(self, tensor: Tensor) -> Tensor:
        """``(..., blocks, k, c)`` -> ``(..., N, c)`` in raster order, cropping the padding."""
        if self.resample == "2d":
            height, width = self.fine.shape
            grid = rearrange(
                tensor, "... (h w) (p q) c -> ... (h p) (w q) c", h=self.coarse.shape[0], p=self.side, q=self.side
            )  # depth-to-space
            return rearrange(grid[..., :height, :width, :], "... h w c -> ... (h w) c")
        return rearrange(tensor, "... n k c -> ... (n k) c")[..., : self.fine.num_tokens, :]

    def group_positions(self, device: torch.device | str | None = None) -> Tensor:
        """Positions of the tokens of every block, padding included: ``(blocks, k, axes)``."""
        return self._split(self.padded.positions(device))

    def group_mask(self, device: torch.device | str | None = None) -> Tensor | None:
        """``(blocks, k)``, True at real tokens and False at padding; None when nothing is padded."""
        if not self.has_padding:
            return None
        real = torch.ones(self.fine.num_tokens, 1, device=device)
        return self.group(real)[..., 0] > 0

    def _pad(self, tensor: Tensor) -> Tensor:
        if self.resample == "2d":
            height, width = self.fine.shape
            padded_height, padded_width = self.padded.shape
            grid = rearrange(tensor, "... (h w) c -> ... h w c", h=height)
            grid = F.pad(grid, (0, 0, 0, padded_width - width, 0, padded_height - height))
            return rearrange(grid, "... h w c -> ... (h w) c")
        return F.pad(tensor, (0, 0, 0, self.padded.num_tokens - self.fine.num_tokens))

    def _split(self, tensor: Tensor) -> Tensor:
        if self.resample == "2d":
            height, width = self.coarse.shape
            return rearrange(
                tensor, "... (h p w q) c -> ... (h w) (p q) c", h=height, w=width, p=self.side, q=self.side
            )  # space-to-depth, one row per block
        return rearrange(tensor, "... (n k) c -> ... n k c", k=self.shorten_factor)


class Context(NamedTuple):
    """Keys and values for attention other than the queries' own sequence: in shortening, each merged
    token attends to itself and the tokens of its group (paper §3.2, Eq. 4)."""

    tokens: Tensor  # (..., M, dim)
    rotation: Rotation  # (..., M, head_dim), broadcast over the batch
    mask: Tensor | None  # (..., M), True where a key may be attended to; None: every key


class KeyValueCache:
    """One layer's rotated keys and values of the positions decoded so far (VAR's blockwise decoding,
    :mod:`sundae.var`): each call appends the new positions' keys and values and attends to all."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append (..., heads, n, e) keys and values; return every cached one."""
        if self.keys is not None and self.values is not None:
            keys, values = torch.cat((self.keys, keys), dim=-2), torch.cat((self.values, values), dim=-2)
        self.keys, self.values = keys, values
        return keys, values


class Attention(nn.Module):
    """Non-causal multi-head attention with rotary queries and keys, via ``scaled_dot_product_attention``.

    Inputs may carry extra leading axes (``(B, blocks, L, dim)``) so that attention restricted to
    each block is a single batched call. The attention width is ``heads * head_dim``, independent
    of ``dim`` (Table 3's ImageNet model has 12 heads at dim 1024).
    """

    def __init__(self, *, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_query = nn.Linear(dim, heads * head_dim)
        self.to_key_value = nn.Linear(dim, 2 * heads * head_dim)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rotation: Rotation, context: Context | None = None, *, mask: Tensor | None = None,
                cache: KeyValueCache | None = None) -> Tensor:
        """Queries from ``x`` (..., L, dim) rotated by ``rotation`` (..., L, head_dim, broadcast over the
        batch); keys and values from ``context``, or from ``x`` itself when it is None. ``mask`` (L, M)
        bool, True where a query may attend to a key (e.g. VAR's block-causal mask); ``cache`` adds
        these keys and values to those of earlier calls, which the queries also attend to."""
        if context is None:
            context = Context(x, rotation, None)
        query = rearrange(self.to_query(x), "... n (heads e) -> ... heads n e", heads=self.heads)
        key, value = rearrange(
            self.to_key_value(context.tokens), "... n (two heads e) -> two ... heads n e", two=2, heads=self.heads
        )
        query = apply_rotary(query, rotation.per_head())  # same rotation for every head
        key = apply_rotary(key, context.rotation.per_head())
        if cache is not None:
            key, value = cache.extend(key, value)
        batch_shape = query.shape[:-3]
        if context.mask is not None:
            key_mask = context.mask[..., None, None, :].expand(*batch_shape, 1, 1, -1).flatten(0, -4)
            mask = key_mask if mask is None else key_mask & mask
        attended = F.scaled_dot_product_attention(
            query.flatten(0, -4), key.flatten(0, -4), value.flatten(0, -4), attn_mask=mask
        ).unflatten(0, batch_shape)
        return self.dropout(self.to_out(rearrange(attended, "... heads n e -> ... n (heads e)")))


class TransformerLayer(nn.Module):
    """Pre-norm residual block: LayerNorm -> attention, LayerNorm -> GELU feed-forward (also VAR's layer)."""

    def __init__(self, config: HourglassConfig | NextScaleConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim)
        self.attention = Attention(
            dim=config.dim, heads=config.heads, head_dim=config.head_dim, dropout=config.dropout
        )
        self.feed_forward_norm = nn.LayerNorm(config.dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(config.dim, config.ff_multiplier * config.dim),
            nn.GELU(),
            nn.Linear(config.ff_multiplier * config.dim, config.dim),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: Tensor, rotation: Rotation, context: Context | None = None, *, mask: Tensor | None = None,
                cache: KeyValueCache | None = None) -> Tensor:
        """``x`` (..., L, dim) attends to itself, or to ``context`` (normalised by the same LayerNorm);
        ``mask`` and ``cache`` as in :meth:`Attention.forward`."""
        if context is not None:
            context = context._replace(tokens=self.attention_norm(context.tokens))
        x = x + self.attention(self.attention_norm(x), rotation, context, mask=mask, cache=cache)
        return x + self.feed_forward(self.feed_forward_norm(x))


class TransformerStack(nn.Module):
    """``layers`` full self-attention layers at one resolution, sharing that level's rotation."""

    def __init__(self, config: HourglassConfig, layers: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(layers))

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """``x`` (B, N, dim) in raster order of ``layout`` -> (B, N, dim)."""
        if not self.layers:
            return x
        return self.run(x, Rotation.at(layout.positions(x.device), self.head_dim))

    def run(self, x: Tensor, rotation: Rotation) -> Tensor:
        """The layers with a rotation computed by the caller (shared with the level's other layers)."""
        for layer in self.layers:
            x = layer(x, rotation)
        return x


class Downsample(nn.Module):
    """Eq. 4 with r = 0: merge each block linearly, then attend within the block.

    The merge is space-to-depth + ``Linear(k·dim -> dim)`` (:meth:`merge`). The post-resampling
    attention is block-local: the merged token of a block is the only query, and its keys/values
    are the k full-resolution tokens of that same block plus the merged token itself (padding
    masked out), with a residual to the merged token and a feed-forward after it. This is the
    attention-resampling of Nawrot et al. (2021) aligned to 2D blocks: the query can re-weight
    the block's content beyond the fixed linear merge, and a shortened token never mixes tokens
    of another block (unlike grouping raster runs, which would pair tokens from different rows
    of different blocks). Rotary positions place the query at the block centre, so each key is
    seen at its offset inside the block.
    """

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.merge_projection = nn.Linear(config.shorten_factor * config.dim, config.dim)  # W of Eq. 4
        self.attention_layer = TransformerLayer(config)

    def merge(self, groups: Tensor) -> Tensor:
        """Linear merge of grouped tokens ``(B, blocks, k, dim)`` -> ``(B, blocks, dim)``, before attention."""
        return self.merge_projection(rearrange(groups, "b n k d -> b n (k d)"))

    def forward(self, x: Tensor, blocks: Blocks) -> Tensor:
        """``x`` (B, N, dim) on ``blocks.fine`` -> (B, blocks, dim) on ``blocks.coarse``."""
        groups = blocks.group(x)  # (B, blocks, k, dim)
        merged = self.merge(groups)[:, :, None]  # (B, blocks, 1, dim)
        context = torch.cat((merged, groups), dim=2)  # (B, blocks, 1 + k, dim)
        query_positions = blocks.coarse.positions(x.device)[:, None]  # (blocks, 1, axes)
        key_positions = torch.cat((query_positions, blocks.group_positions(x.device)), dim=1)  # (blocks, 1 + k, axes)
        mask = blocks.group_mask(x.device)
        if mask is not None:
            mask = torch.cat((torch.ones_like(mask[:, :1]), mask), dim=1)  # the merged token is always real
        attended = self.attention_layer(merged, Rotation.at(query_positions, self.head_dim),
                                        Context(context, Rotation.at(key_positions, self.head_dim), mask))
        return attended[:, :, 0]


class Upsample(nn.Module):
    """Eq. 4 with r = the pre-valley activations: linear expansion, depth-to-space, attention.

    ``Linear(dim -> k·dim)`` gives each shortened token the k vectors of its block, which are put
    back in place (depth-to-space), cropped to the real grid and added to the hourglass residual.
    The post-resampling attention is then full self-attention over the whole upsampled sequence
    with the level's 2D rotary positions. Why global rather than within each block: the k tokens
    of a block all come from a single shortened vector, so attention restricted to the block could
    only re-mix the residual stream locally; the paper motivates the resampling attention as
    "global context and aggregation", and full self-attention is what it uses everywhere. It is
    block-aligned in the sense that matters: queries and keys carry their true 2D positions (no
    raster-run grouping), and padding was cropped before it, so it needs no mask. Cost: one
    full-resolution attention layer per level.
    """

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        self.shorten_factor = config.shorten_factor
        self.expand_projection = nn.Linear(config.dim, config.shorten_factor * config.dim)
        self.attention_layer = TransformerLayer(config)

    def forward(self, shortened: Tensor, residual: Tensor, blocks: Blocks, rotation: Rotation) -> Tensor:
        """``shortened`` (B, blocks, dim) and ``residual`` (B, N, dim) -> (B, N, dim) on ``blocks.fine``,
        whose rotation the level passes in."""
        expanded = rearrange(self.expand_projection(shortened), "b n (k d) -> b n k d", k=self.shorten_factor)
        x = blocks.ungroup(expanded) + residual  # (B, N, dim)
        return self.attention_layer(x, rotation)


class HourglassLevel(nn.Module):
    """``pre`` layers, downsample, ``valley`` (stack or nested level), upsample, ``post`` layers."""

    def __init__(self, config: HourglassConfig, depth: tuple[int, Depth, int]) -> None:
        super().__init__()
        pre, valley, post = depth
        self.head_dim = config.head_dim
        self.shorten_factor = config.shorten_factor
        self.resample = config.resample
        self.pre = TransformerStack(config, pre)
        self.downsample = Downsample(config)
        self.valley = build_body(config, valley)
        self.upsample = Upsample(config)
        self.post = TransformerStack(config, post)

    def forward(self, x: Tensor, layout: Layout) -> Tensor:
        """``x`` (B, N, dim) in raster order of ``layout`` -> (B, N, dim)."""
        rotation = Rotation.at(layout.positions(x.device), self.head_dim)  # pre, upsample and post share it
        x = self.pre.run(x, rotation)
        blocks = Blocks(fine=layout, shorten_factor=self.shorten_factor, resample=self.resample)
        shortened = self.valley(self.downsample(x, blocks), blocks.coarse)
        x = self.upsample(shortened, x, blocks, rotation)
        return self.post.run(x, rotation)


def build_body(config: HourglassConfig, depth: Depth) -> TransformerStack | HourglassLevel:
    """A flat stack for an int depth, an hourglass level for a ``(pre, valley, post)`` triple."""
    if isinstance(depth, int):
        return TransformerStack(config, depth)
    return HourglassLevel(config, depth)


def values_are_checkable(tensor: Tensor) -> bool:
    """Whether checking ``tensor``'s values is free: a range check reads them back to the host, a
    device sync on an accelerator and a graph break under ``torch.compile``, so only eager CPU checks."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Hourglass(nn.Module, PretrainedMixin):
    """The SUNDAE denoiser ``f_θ``: token grid (B, h, w) -> logits (B, h, w, codebook_size).

    Built from :class:`~sundae.config.HourglassConfig`; accepts any grid size ``h, w >= 1``
    (not only ``config.latent_shape``). A class-conditional model (``num_classes`` set) adds a
    learned class embedding to every token embedding (paper §4.2); its last row is the null class
    used for classifier-free guidance.
    """

    config_class = HourglassConfig

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.codebook_size, config.dim)
        self.class_embedding = None
        if config.num_classes is not None:
            self.class_embedding = nn.Embedding(config.num_classes + 1, config.dim)
        self.body = build_body(config, config.depth)
        self.final_norm = nn.LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.codebook_size)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``tokens`` (B, h, w) integer codes, ``class_labels`` (B,) or None -> logits (B, h, w, v).

        ``class_labels=None`` on a conditional model means the null class for every sample.
        Logits are float32, or the autocast dtype (e.g. bfloat16) when run under autocast.
        Token and label ranges are checked on CPU only: on an accelerator the check would cost a
        device sync every step, and an out-of-range index fails in the embedding lookup instead.
        """
        self._check_tokens(tokens)
        batch, height, width = tokens.shape
        x = self.token_embedding(rearrange(tokens, "b h w -> b (h w)"))  # (B, N, dim)
        if self.class_embedding is not None:
            x = x + self.class_embedding(self._class_indices(class_labels, batch, tokens.device))[:, None]
        elif class_labels is not None:
            raise InputError(
                "class_labels were given to an unconditional model (config.num_classes is None); "
                "pass class_labels=None or build the model with num_classes set"
            )
        x = self.body(x, Layout((height, width)))
        logits = self.to_logits(self.final_norm(x))
        return rearrange(logits, "b (h w) v -> b h w v", h=height)

    def _check_tokens(self, tokens: Tensor) -> None:
        integer = not (tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool)
        if tokens.dim() != 3 or not integer:
            raise InputError(
                f"tokens must be an integer tensor of shape (B, h, w), got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if values_are_checkable(tokens) and tokens.numel() and not self._tokens_in_range(tokens):
            raise InputError(
                f"tokens must lie in [0, {self.config.codebook_size}) (the codebook size), "
                f"got values in [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _tokens_in_range(self, tokens: Tensor) -> bool:
        return bool(tokens.min() >= 0) and bool(tokens.max() < self.config.codebook_size)

    def _class_indices(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        null_class = self.config.null_class
        if class_labels is None:
            return torch.full((batch,), null_class, dtype=torch.long, device=device)
        if class_labels.shape != (batch,) or class_labels.dtype.is_floating_point:
            raise InputError(
                f"class_labels must be an integer tensor of shape ({batch},), got {tuple(class_labels.shape)} "
                f"{class_labels.dtype}"
            )
        if values_are_checkable(class_labels) and (class_labels.min() < 0 or class_labels.max() > null_class):
            raise InputError(
                f"class_labels must lie in [0, {self.config.num_classes}] ({self.config.num_classes} classes, "
                f"{null_class} = null class), got values in [{int(class_labels.min())}, {int(class_labels.max())}]"
            )
        return class_labels


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(parameter.numel() for parameter in model.parameters())


def level_layouts(config: HourglassConfig, latent_shape: tuple[int, int] | None = None) -> list[Layout]:
    """The token layout of every hourglass level, full resolution first, for ``latent_shape``."""
    height, width = config.latent_shape if latent_shape is None else latent_shape
    layouts = [Layout((height, width))]
    for _ in range(depth_levels(config.depth)):
        blocks = Blocks(fine=layouts[-1], shorten_factor=config.shorten_factor, resample=config.resample)
        layouts.append(blocks.coarse)
    return layouts


def describe(config: HourglassConfig) -> dict[str, Any]:
    """Size summary for ``sundae describe``: parameters, layers, levels, tokens per level.

    The model is built on the meta device, so describing a paper-size preset allocates nothing.
    """
    with torch.device("meta"):
        model = Hourglass(config)
    layouts = level_layouts(config)
    levels = depth_levels(config.depth)
    return {
        "parameters": count_parameters(model),
        "layers": depth_layers(config.depth),
        "resampling_layers": 2 * levels,
        "levels": levels,
        "latent_shape": list(config.latent_shape),
        "resample": config.resample,
        "shape_per_level": [list(layout.shape) for layout in layouts],
        "tokens_per_level": [layout.num_tokens for layout in layouts],
        "attention_width": config.heads * config.head_dim,
    }


__all__ = [
    "Attention", "Blocks", "Downsample", "Hourglass", "HourglassLevel", "Layout", "TransformerLayer",
    "TransformerStack", "Upsample", "build_body", "count_parameters", "describe", "level_layouts",
]
