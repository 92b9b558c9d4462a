"""Rotary position embeddings (Su et al., 2021) for 1D sequences and 2D grids (paper §3.2).

The paper extends rotary embeddings to the multidimensional case (Biderman et al., 2021) to
give the hourglass an explicit notion of 2D neighbourhood. Here the ``head_dim / 2`` rotation
pairs of every head are split evenly between the position axes: for a 2D grid the first
``head_dim / 4`` pairs rotate with the row, the last ``head_dim / 4`` with the column; for a
1D sequence all pairs rotate with the sequence index. Within an axis, pair ``i`` of ``P``
turns at the frequency ``base ** (-i / P)``, the standard RoPE spectrum.

Because a query and a key are rotated by their own positions, their dot product depends only
on the offset between them, separately along each axis. Positions may be fractional (a
shortened token sits at the centre of its block, see ``hourglass.Layout``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from sundae.errors import InputError


def rotary_angles(positions: Tensor, head_dim: int, *, base: float = 10_000.0) -> Tensor:
    """Rotation angle of every (position, pair): ``(..., N, axes)`` -> ``(..., N, head_dim // 2)``.

    ``positions[..., n, a]`` is the coordinate of token ``n`` along axis ``a`` (row, column for
    a grid; the index for a sequence). Angles are float32 whatever the input dtype, so that
    large positions keep their precision under autocast.
    """
    axes = positions.shape[-1]
    if head_dim % (2 * axes):
        raise InputError(
            f"head_dim {head_dim} cannot be split into rotation pairs for {axes} position axes; "
            f"use a head_dim divisible by {2 * axes}"
        )
    pairs_per_axis = head_dim // (2 * axes)
    exponents = torch.arange(pairs_per_axis, device=positions.device, dtype=torch.float32) / pairs_per_axis
    inverse_frequencies = base ** -exponents
    angles = positions.float()[..., None] * inverse_frequencies  # (..., N, axes, pairs_per_axis)
    return rearrange(angles, "... n axes pairs -> ... n (axes pairs)")


class Rotation(NamedTuple):
    """The rotation of every feature, ``(..., N, head_dim)``: ``cos`` of its pair's angle, and ``sin``
    negated on the first feature of each pair, so that rotating is ``x·cos + swap_pairs(x)·sin``.

    Built once per level from :func:`rotary_angles` and shared by all of its layers' queries and
    keys; applying it then costs four element-wise ops (paper §3.2 applies RoPE at every layer).
    """

    cos: Tensor
    sin: Tensor

    @classmethod
    def at(cls, positions: Tensor, head_dim: int) -> "Rotation":
        """The rotation of tokens at ``positions`` (..., N, axes), see :func:`rotary_angles`."""
        return cls.from_angles(rotary_angles(positions, head_dim))

    @classmethod
    def from_angles(cls, angles: Tensor) -> "Rotation":
        cos, sin = angles.cos(), angles.sin()
        return cls(cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2))

    def per_head(self) -> "Rotation":
        """Broadcast over a heads axis before the token axis: the same rotation for every head."""
        return Rotation(self.cos.unsqueeze(-3), self.sin.unsqueeze(-3))


def apply_rotary(x: Tensor, rotation: Rotation) -> Tensor:
    """Rotate consecutive pairs of the last axis of ``x`` (..., N, head_dim) by ``rotation``.

    Pair ``(a, b)`` at angle θ becomes ``(a·cosθ − b·sinθ, b·cosθ + a·sinθ)``; ``rotation``
    broadcasts against ``x``, and every dimension of every head is rotated. The rotation runs in
    float32 and returns ``x.dtype``.
    """
    if rotation.cos.shape[-1] != x.shape[-1]:
        raise InputError(
            f"the rotation covers {rotation.cos.shape[-1]} features but x has {x.shape[-1]}; build it with "
            f"Rotation.from_angles(rotary_angles(positions, head_dim={x.shape[-1]}))"
        )
    x32 = x.float()
    swapped = rearrange(x32, "... (pairs two) -> ... pairs two", two=2).flip(-1).flatten(-2)  # (b, a) per pair
    return (x32 * rotation.cos + swapped * rotation.sin).to(x.dtype)


__all__ = ["Rotation", "apply_rotary", "rotary_angles"]
