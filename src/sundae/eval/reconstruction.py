"""How well a tokenizer reconstructs images (paper §3.5, Table 4): L1 and PSNR with pixels in
[0, 1], the perplexity and used share of the codebook, and the inputs-over-reconstructions grid
that ``sundae reconstruct`` and the tokenizer's training loop write.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sundae.data.images import DatasetError, ImageFolder, UnreadableImageError, save_image_grid
from sundae.tokenizer import VQGAN
from sundae.tokenizer.vqgan import codebook_statistics

log = logging.getLogger(__name__)

GRID_IMAGES = 16  # images in the grid of a measurement, spread evenly over the folder


@torch.no_grad()
def save_reconstruction_grid(vqgan: VQGAN, images: Tensor, path: Path) -> Path:
    """``images`` (B, C, H, W) in [-1, 1] as the top row, their reconstructions below, in ``path``."""
    was_training = vqgan.training
    vqgan.eval()
    reconstructions = vqgan(images).reconstruction.float().clamp(-1, 1)
    vqgan.train(was_training)
    count = images.shape[0]
    save_image_grid(torch.cat([images.float().cpu(), reconstructions.cpu()]), path, nrow=count)
    return path


@torch.no_grad()
def reconstruction_metrics(vqgan: VQGAN, images: Tensor) -> dict[str, float]:
    """L1 and PSNR (images mapped to [0, 1]) of the tokenizer on ``images``, plus codebook use."""
    was_training = vqgan.training
    vqgan.eval()
    output = vqgan(images)
    vqgan.train(was_training)
    reconstructions = output.reconstruction.float().clamp(-1, 1)
    l1 = (reconstructions - images).abs().mean().item() / 2.0
    mse = (((reconstructions - images) / 2.0) ** 2).flatten(1).mean(dim=1)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    return {"l1": l1, "psnr": psnr, "perplexity": output.perplexity.item(), "codebook_usage": output.codebook_usage.item()}


@torch.no_grad()
def measure_reconstructions(vqgan: VQGAN, folder: ImageFolder, *, limit: int, batch_size: int,
                            progress: bool = False) -> dict[str, Any]:
    """L1 / PSNR / codebook statistics over up to ``limit`` readable images spread evenly over the
    (class-sorted) folder. Unreadable files are skipped and counted, never replaced by a neighbour.

    Returns the JSON-able figures and ``grid_images``, a (≤ 16, C, H, W) tensor of inputs spread
    over every class, for :func:`save_reconstruction_grid`.
    """
    from tqdm.auto import tqdm

    device = next(vqgan.parameters()).device
    step = max(1, len(folder) // max(1, min(limit, len(folder))))
    positions = list(range(0, len(folder), step))[:limit]
    totals: dict[str, float] = {"l1": 0.0, "psnr": 0.0}
    shown = set(positions[:: max(1, len(positions) // GRID_IMAGES)][:GRID_IMAGES])
    codes, grid, count, unreadable = [], [], 0, []
    with tqdm(total=len(positions), unit="image", desc="reconstruct", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(positions), batch_size):
            batch = []
            for position in positions[start:start + batch_size]:
                try:
                    batch.append(folder.load(position))
                    if position in shown:
                        grid.append(batch[-1])
                except UnreadableImageError as error:
                    unreadable.append(folder.relative_paths[position])
                    log.warning("skipping unreadable image %s", error)
            bar.update(len(positions[start:start + batch_size]))
            if not batch:
                continue
            images = torch.stack(batch).to(device)
            measured = reconstruction_metrics(vqgan, images)
            for name in totals:
                totals[name] += measured[name] * len(images)
            count += len(images)
            codes.append(vqgan.encode(images).cpu())
    if not count:
        raise DatasetError(f"none of the {len(positions)} images tried under {folder.root} could be read")
    perplexity, usage = codebook_statistics(torch.cat(codes), vqgan.config.codebook_size)
    return {"images": count, "unreadable": len(unreadable), **{k: round(v / count, 4) for k, v in totals.items()},
            "perplexity": round(perplexity.item(), 4), "codebook_usage": round(usage.item(), 4),
            "grid_images": torch.stack(grid)}


__all__ = ["measure_reconstructions", "reconstruction_metrics", "save_reconstruction_grid"]
