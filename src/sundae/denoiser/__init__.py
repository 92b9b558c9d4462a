"""The SUNDAE denoiser: a 2D-aware hourglass transformer over VQ token grids (paper §3.2)."""

from sundae.denoiser.hourglass import Hourglass, count_parameters, describe, level_layouts
from sundae.denoiser.rotary import apply_rotary, rotary_angles

__all__ = ["Hourglass", "apply_rotary", "count_parameters", "describe", "level_layouts", "rotary_angles"]
