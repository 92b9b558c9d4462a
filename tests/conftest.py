"""Shared fixtures: tiny, seeded data written to temporary folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

# Tiny test models are dominated by per-op overhead, where OpenMP threads only add spin-waiting
# (30x slower on a loaded 2-core machine); one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


def load_module(path: Path, name: str) -> ModuleType:
    """A Python file that is not an importable module (a script of scripts/, another test file) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pixel_npz(path: Path, *, count: int = 48, side: int = 8, classes: int = 3, seed: int = 0) -> Path:
    """A tiny MNIST-style archive: class c draws a bright bar in row band c, so classes are learnable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    images = rng.integers(0, 40, size=(count, side, side), dtype=np.uint8)
    for index, label in enumerate(labels):
        band = slice(label * side // classes, (label + 1) * side // classes)
        images[index, band, :] = 220
    split = (np.arange(count) % 6 == 5).astype(np.uint8)
    np.savez_compressed(path, images=images, labels=labels.astype(np.uint8), split=split,
                        class_names=np.array([f"class{c}" for c in range(classes)]), source=np.array("test"),
                        licence=np.array("test"))
    return path


@pytest.fixture
def pixel_npz(tmp_path: Path) -> Path:
    return write_pixel_npz(tmp_path / "pixels.npz")


def build_tiny_pipeline(directory: Path, *, num_classes: int | None = 3, sampling_defaults=None):
    """A random two-stage pipeline: VQ-GAN with f=2 on 16x16 RGB images, 8x8 tokens of 16 codes;
    ``sampling_defaults`` (a SamplingOptions) is its scheduler (default: the library's defaults)."""
    from sundae.config import HourglassConfig, VQGANConfig
    from sundae.denoiser import Hourglass
    from sundae.pipeline import SundaePipeline
    from sundae.tokenizer import VQGAN

    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(), z_channels=32, embed_dim=8, codebook_size=16))
    prior = Hourglass(HourglassConfig(codebook_size=16, dim=32, depth=(1, 1, 1), heads=2, head_dim=16,
                                      latent_shape=(8, 8), num_classes=num_classes))
    names = None if num_classes is None else [f"class{c}" for c in range(num_classes)]
    pipeline = SundaePipeline(prior, tokenizer, class_names=names, sampling_defaults=sampling_defaults)
    return pipeline.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "model")


# The sampling defaults of `scheduled_pipeline_dir`, not the library's: 7 steps, every one run, a cooler end,
# and guidance (which only a call with a class uses).
SCHEDULED = {"steps": 7, "early_stop": False, "end_temperature": 0.5, "guidance_scale": 2.0}


@pytest.fixture(scope="session")
def scheduled_pipeline_dir(tmp_path_factory) -> Path:
    """The tiny pipeline, whose scheduler/ says SCHEDULED: what sampling with no options must use."""
    from sundae.config import SamplingOptions

    return build_tiny_pipeline(tmp_path_factory.mktemp("scheduled") / "model",
                               sampling_defaults=SamplingOptions(**SCHEDULED))


@pytest.fixture
def old_layout_dir(tiny_pipeline_dir, tmp_path) -> Path:
    """The tiny pipeline as the old layout wrote it: the prior's config.json + model.safetensors at the top
    and the tokenizer in tokenizer/, no model_index.json and no scheduler."""
    import shutil

    target = tmp_path / "old-model"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_pipeline_dir / "prior" / name, target / name)
    shutil.copytree(tiny_pipeline_dir / "tokenizer", target / "tokenizer")
    return target
