"""The memorisation check: nearest training images in pixel space, the summary and its pictures."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sundae.eval.memorisation import (memorisation_summary, nearest_neighbours, save_distance_histogram,
                                      save_nearest_pairs)


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand((count, 3, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_copies_are_found_at_distance_zero_and_fresh_images_far_away():
    training = images(50, seed=0)
    copies = training[[7, 3, 41]]
    fresh = images(20, seed=1)
    found = nearest_neighbours(torch.cat((copies, fresh)), training, batch_size=4)
    assert found.indices[:3].tolist() == [7, 3, 41]
    assert found.distances[:3].max() < 1e-3
    # uniform noise in [-1, 1]: the nearest of 50 others is still a long way off
    assert found.distances[3:].min() > 0.5
    brute = ((fresh[:, None] - training[None]) ** 2).flatten(2).mean(2)
    torch.testing.assert_close(found.distances[3:], brute.min(1).values.sqrt(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found.indices[3:], brute.argmin(1))


def test_the_summary_tells_a_copying_model_from_a_generalising_one():
    training, held_out = images(60, seed=0), images(30, seed=2)
    held = nearest_neighbours(held_out, training)
    copying = memorisation_summary(nearest_neighbours(training[:20], training), held)
    assert copying["share_of_samples_that_copy_a_training_image"] == 1.0
    assert copying["share_of_samples_below_held_out_5th_percentile"] == 1.0
    fresh = memorisation_summary(nearest_neighbours(images(20, seed=3), training), held)
    assert fresh["share_of_samples_that_copy_a_training_image"] == 0.0
    assert fresh["share_of_samples_below_held_out_5th_percentile"] < 0.3
    assert abs(fresh["sample_to_train_median"] - fresh["held_out_to_train_median"]) < 0.05


def test_the_pictures_show_each_sample_above_its_nearest_training_image(tmp_path):
    training = images(10, seed=0)
    samples = training[[4, 5, 6]]
    found = nearest_neighbours(samples, training)
    path = save_nearest_pairs(samples, training, found, tmp_path / "pairs.png", pairs_per_row=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape[0] > 4 * 8 and grid.shape[1] > 2 * 8  # 2 groups of (samples row, neighbours row)
    histogram = save_distance_histogram(found, nearest_neighbours(images(5, seed=9), training), tmp_path / "h.png")
    assert Image.open(histogram).size[0] > 300
