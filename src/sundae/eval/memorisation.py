"""Memorisation check (the talk's slide 11): are the samples copies of training images?

Every sample gets its nearest training image in pixel space (root-mean-square difference over all
pixels in [-1, 1]); so does every held-out image, which the model never saw. A model that copies
has sample-to-train distances well below the held-out-to-train ones (many near zero); one that
generalises has the two distributions overlap. :func:`save_nearest_pairs` shows each sample beside
its nearest training image, :func:`save_distance_histogram` the two distributions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sundae.checkpoint import atomic_path
from sundae.data.images import save_image_grid

# below this RMS distance (half a grey level of 8-bit images, in [-1, 1] units) two images are the same
COPY_DISTANCE = 1 / 255


@dataclass(frozen=True)
class Neighbours:
    distances: Tensor  # (N,) RMS pixel distance of each query to its nearest reference
    indices: Tensor  # (N,) index of that reference


@torch.no_grad()
def nearest_neighbours(queries: Tensor, references: Tensor, *, batch_size: int = 256) -> Neighbours:
    """The nearest of ``references`` (M, C, H, W) to each of ``queries`` (N, C, H, W), both in [-1, 1]."""
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"queries {tuple(queries.shape[1:])} and references {tuple(references.shape[1:])} differ "
                         "in shape")
    flat_references = references.flatten(1).float()
    size = flat_references.shape[1]
    distances, indices = [], []
    for chunk in queries.flatten(1).float().split(batch_size):
        squared = torch.cdist(chunk, flat_references).square_()
        best = squared.min(dim=1)
        distances.append(best.values.clamp_min(0).div(size).sqrt())
        indices.append(best.indices)
    return Neighbours(torch.cat(distances), torch.cat(indices))


def memorisation_summary(samples: Neighbours, held_out: Neighbours) -> dict[str, float]:
    """Quantiles of both distance distributions, the share of samples closer to the training set than
    all but 5 % of held-out images are, and the share of exact copies."""
    sample_d, held_d = samples.distances.numpy(), held_out.distances.numpy()
    held_out_5th = float(np.quantile(held_d, 0.05))
    return {
        "sample_to_train_median": float(np.median(sample_d)),
        "sample_to_train_5th_percentile": float(np.quantile(sample_d, 0.05)),
        "held_out_to_train_median": float(np.median(held_d)),
        "held_out_to_train_5th_percentile": held_out_5th,
        "share_of_samples_below_held_out_5th_percentile": float((sample_d < held_out_5th).mean()),
        "share_of_samples_that_copy_a_training_image": float((sample_d < COPY_DISTANCE).mean()),
        "samples": len(sample_d), "held_out_images": len(held_d),
    }


def save_nearest_pairs(samples: Tensor, training: Tensor, neighbours: Neighbours, path: str | os.PathLike, *,
                       pairs_per_row: int = 8) -> Path:
    """A grid of rows of samples, each row followed by one of their nearest training images."""
    rows = []
    for start in range(0, len(samples), pairs_per_row):
        chunk = slice(start, start + pairs_per_row)
        picked = samples[chunk]
        nearest = training[neighbours.indices[chunk]]
        padding = pairs_per_row - len(picked)
        if padding:
            blank = torch.ones((padding, *samples.shape[1:]), dtype=samples.dtype)
            picked, nearest = torch.cat((picked, blank)), torch.cat((nearest.to(samples.dtype), blank))
        rows.extend((picked, nearest.to(samples.dtype)))
    path = Path(path)
    save_image_grid(torch.cat(rows), path, nrow=pairs_per_row)
    return path


def save_distance_histogram(samples: Neighbours, held_out: Neighbours, path: str | os.PathLike) -> Path:
    """Histograms of sample-to-train and held-out-to-train distances on shared bins."""
    from matplotlib.figure import Figure

    sample_d, held_d = samples.distances.numpy(), held_out.distances.numpy()
    bins = np.linspace(0, max(sample_d.max(), held_d.max()) * 1.02 + 1e-6, 41)
    figure = Figure(figsize=(6, 3.6), dpi=120)
    axes = figure.add_subplot()
    axes.hist(held_d, bins=bins, density=True, alpha=0.6, label=f"held-out → train (n={len(held_d)})")
    axes.hist(sample_d, bins=bins, density=True, alpha=0.6, label=f"sample → train (n={len(sample_d)})")
    axes.set_xlabel("RMS pixel distance to the nearest training image ([-1, 1] units)")
    axes.set_ylabel("density")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


__all__ = ["COPY_DISTANCE", "Neighbours", "memorisation_summary", "nearest_neighbours", "save_distance_histogram",
           "save_nearest_pairs"]
