"""VAR's next-scale prediction transformer (spec seed 003; Tian et al. 2024, §3.1 and Fig. 4).

The sequence is every scale's token map, coarsest first. Scale 1 is predicted from the class (the
start token); scale k+1 from the coarser scales' code maps summed and resized to its side (the
tokenizer's :meth:`~sundae.var.tokenizer.MultiScaleQuantizer.scale_input`), all positions of a scale
at once. Attention is block-causal: a position sees its own scale and every coarser one, so one
teacher-forced forward pass trains every scale, and sampling runs one pass per scale with the keys
and values of the coarser scales cached.

Positions: a learned embedding per scale, and the hourglass's 2D rotary embeddings with every
scale's tokens placed at their centres in units of the finest grid, so a token and the finer tokens
it covers sit at the same place. Layers are the hourglass's pre-norm transformer layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sundae.checkpoint import PretrainedMixin
from sundae.config import NextScaleConfig, scale_lengths
from sundae.denoiser.hourglass import KeyValueCache, TransformerLayer, _init_weights, values_are_checkable
from sundae.denoiser.rotary import Rotation
from sundae.errors import InputError
from sundae.var.tokenizer import scales_in_prefix


def scale_positions(side: int, finest: int, device: torch.device | str | None = None) -> Tensor:
    """Centres of a ``side`` x ``side`` token map in units of the ``finest`` grid: (side², 2) float32."""
    axis = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) * (finest / side) - 0.5
    rows, columns = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack((rows, columns), dim=-1).reshape(side * side, 2)


def scale_of_positions(scales: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """The scale index of every position of the packed sequence: (L,) long."""
    lengths = torch.tensor(scale_lengths(scales), device=device)
    return torch.repeat_interleave(torch.arange(len(scales), device=device), lengths)


def block_causal_mask(scales: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """(L, L) bool, True where a query may attend to a key: the key's scale is not finer than the query's."""
    scale = scale_of_positions(scales, device)
    return scale[:, None] >= scale[None, :]


class NextScaleTransformer(nn.Module, PretrainedMixin):
    """inputs (B, L - s_1², embed_dim) of scales 2..k and class labels -> logits (B, s_1² + ... + s_k², v)."""

    config_class = NextScaleConfig

    def __init__(self, config: NextScaleConfig) -> None:
        super().__init__()
        self.config = config
        self.input_projection = nn.Linear(config.embed_dim, config.dim)
        self.start = nn.Parameter(torch.zeros(config.scales[0] ** 2, config.dim))
        self.class_embedding = nn.Embedding((config.num_classes or 0) + 1, config.dim)  # the last row: no class
        self.scale_embedding = nn.Embedding(len(config.scales), config.dim)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.codebook_size)
        self.apply(_init_weights)
        nn.init.normal_(self.start, std=0.02)

    def class_rows(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """(B,) class indices, the null class where ``class_labels`` is None; checked on CPU."""
        null_class = self.config.num_classes or 0
        if class_labels is None:
            return torch.full((batch,), null_class, dtype=torch.long, device=device)
        if self.config.num_classes is None:
            raise InputError("class_labels were given to an unconditional model (config.num_classes is None)")
        if class_labels.shape != (batch,) or class_labels.dtype.is_floating_point:
            raise InputError(f"class_labels must be an integer tensor of shape ({batch},), got "
                             f"{tuple(class_labels.shape)} {class_labels.dtype}")
        if values_are_checkable(class_labels) and class_labels.numel() and \
                (class_labels.min() < 0 or class_labels.max() > null_class):
            raise InputError(f"class_labels must lie in [0, {null_class}] ({null_class} = null class), got "
                             f"[{int(class_labels.min())}, {int(class_labels.max())}]")
        return class_labels

    def embed_scale(self, scale: int, inputs: Tensor | None, classes: Tensor) -> Tensor:
        """The embeddings (B, s², dim) of one scale: the start token at scale 0, else the projected inputs."""
        if scale == 0:
            x = self.start.expand(classes.shape[0], -1, -1)
        else:
            x = self.input_projection(inputs)
        return x + self.scale_embedding.weight[scale] + self.class_embedding(classes)[:, None]

    def rotation(self, scales: range, device: torch.device) -> Rotation:
        positions = torch.cat([scale_positions(self.config.scales[k], self.config.scales[-1], device) for k in scales])
        return Rotation.at(positions, self.config.head_dim)

    def logits(self, x: Tensor) -> Tensor:
        return self.to_logits(self.final_norm(x))

    def forward(self, inputs: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Teacher-forced logits of the first k scales, where ``inputs`` (B, s_2² + ... + s_k², embed_dim)
        holds the inputs of scales 2..k (k = 1: zero rows); one block-causal pass."""
        lengths = scale_lengths(self.config.scales)
        count = self._scales_covered(inputs)
        classes = self.class_rows(class_labels, inputs.shape[0], inputs.device)
        pieces = inputs.split(lengths[1:count], dim=1)
        x = torch.cat([self.embed_scale(0, None, classes)]
                      + [self.embed_scale(k + 1, piece, classes) for k, piece in enumerate(pieces)], dim=1)
        mask = block_causal_mask(self.config.scales[:count], inputs.device)
        rotation = self.rotation(range(count), inputs.device)
        for layer in self.layers:
            x = layer(x, rotation, mask=mask)
        return self.logits(x)

    def new_caches(self) -> list[KeyValueCache]:
        """One empty key/value cache per layer, for :meth:`forward_scale`."""
        return [KeyValueCache() for _ in self.layers]

    def forward_scale(self, scale: int, inputs: Tensor | None, class_labels: Tensor | None,
                      caches: list[KeyValueCache], batch: int) -> Tensor:
        """Logits (B, s², v) of scale ``scale`` given its inputs (B, s², embed_dim) (None at scale 0),
        attending to the coarser scales held in ``caches``, which it extends; call scales in order."""
        device = self.start.device if inputs is None else inputs.device
        x = self.embed_scale(scale, inputs, self.class_rows(class_labels, batch, device))
        rotation = self.rotation(range(scale, scale + 1), device)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rotation, cache=cache)
        return self.logits(x)

    def _scales_covered(self, inputs: Tensor) -> int:
        """How many scales ``inputs`` (B, rows, embed_dim) give logits for: rows of whole scales 2..k."""
        if inputs.dim() != 3 or inputs.shape[-1] != self.config.embed_dim:
            raise InputError(f"inputs must be (B, rows, {self.config.embed_dim}), got {tuple(inputs.shape)}")
        first = self.config.scales[0] ** 2
        return scales_in_prefix(self.config.scales, first + inputs.shape[1])
