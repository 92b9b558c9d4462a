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

import torch
from einops import rearrange
from torch import Tensor


def rotary_angles(positions: Tensor, head_dim: int, *, base: float = 10_000.0) -> Tensor:
    """Rotation angle of every (position, pair): ``(..., N, axes)`` -> ``(..., N, head_dim // 2)``.

    ``positions[..., n, a]`` is the coordinate of token ``n`` along axis ``a`` (row, column for
    a grid; the index for a sequence). Angles are float32 whatever the input dtype, so that
    large positions keep their precision under autocast.
    """
    axes = positions.shape[-1]
    if head_dim % (2 * axes):
        raise ValueError(
            f"head_dim {head_dim} cannot be split into rotation pairs for {axes} position axes; "
            f"use a head_dim divisible by {2 * axes}"
        )
    pairs_per_axis = head_dim // (2 * axes)
    exponents = torch.arange(pairs_per_axis, device=positions.device, dtype=torch.float32) / pairs_per_axis
    inverse_frequencies = base ** -exponents
    angles = positions.float()[..., None] * inverse_frequencies  # (..., N, axes, pairs_per_axis)
    return rearrange(angles, "... n axes pairs -> ... n (axes pairs)")


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive pairs of the last axis of ``x`` (..., N, head_dim) by ``angles``.

    ``angles`` (..., N, head_dim // 2) broadcasts against ``x`` without its last axis; every
    dimension of every head is rotated. The rotation runs in float32 and returns ``x.dtype``.
    """
    if 2 * angles.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"angles give {angles.shape[-1]} rotation pairs but x has {x.shape[-1]} features "
            f"({x.shape[-1] // 2} pairs); compute the angles with rotary_angles(positions, head_dim={x.shape[-1]})"
        )
    first, second = rearrange(x.float(), "... (pairs two) -> two ... pairs", two=2)
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rearrange(rotated, "... pairs two -> ... (pairs two)").to(x.dtype)


__all__ = ["apply_rotary", "rotary_angles"]
