"""The denoising video (talk slide 9): token grids after every step, decoded, as an animated GIF."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from sundae.data.images import grid_array
from sundae.errors import InputError
from sundae.pipeline import decode_tokens_to_images


def save_trajectory_gif(frames: list[Tensor], tokenizer: nn.Module, path: str | Path, *, nrow: int | None = None,
                        frame_ms: int = 80, hold_last_ms: int = 1500) -> Path:
    """Decode each step's tokens (B, h, w) and write one grid per frame to an animated GIF."""
    from PIL import Image

    if not frames:
        raise InputError("no trajectory frames to write")
    pictures = [Image.fromarray(grid_array(decode_tokens_to_images(tokens, tokenizer), nrow=nrow)) for tokens in frames]
    durations = [frame_ms] * (len(pictures) - 1) + [hold_last_ms]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return path
