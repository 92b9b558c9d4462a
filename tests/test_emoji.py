"""Emoji conversion (the colour model's data): category labels, the by-emoji split, alpha compositing,
licences, and the PNG export, on tiny tarballs built here with the real packages' layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sundae.data.emoji import CATEGORIES, convert_emoji_packages, group_split
from sundae.data.images import DatasetError, ImageFolder
from sundae.data.latents import SPLIT_CODES
from sundae.data.mnist import export_image_folder, load_pixel_archive

SKIN_TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def rgba_png(colour: tuple[int, int, int], alpha: int) -> bytes:
    """A 64x64 RGBA image: the left half opaque ``colour``, the right half ``colour`` at ``alpha``."""
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[..., :3] = colour
    pixels[:, :32, 3] = 255
    pixels[:, 32:, 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def emoji_entries(count_per_category: int) -> list[dict]:
    """``count_per_category`` emoji in every category, every second one with five skin tones, plus a
    Component swatch that must be dropped and one emoji the vendor does not draw."""
    entries = []
    for c, category in enumerate(CATEGORIES):
        for k in range(count_per_category):
            code = f"1F{c:01X}{k:02X}"
            entry = {"unified": code, "image": f"{code.lower()}.png", "category": category,
                     "has_img_google": True, "has_img_twitter": True}
            if k % 2 == 0:
                entry["skin_variations"] = {
                    tone: {"unified": f"{code}-{tone}", "image": f"{code.lower()}-{tone.lower()}.png",
                           "has_img_google": True, "has_img_twitter": True} for tone in SKIN_TONES}
            entries.append(entry)
    entries.append({"unified": "1F3FB", "image": "1f3fb.png", "category": "Component", "has_img_google": True,
                    "has_img_twitter": True})
    entries.append({"unified": "1FAFF", "image": "1faff.png", "category": "Objects", "has_img_google": False,
                    "has_img_twitter": False})
    return entries


def write_emoji_tarball(path: Path, vendor: str, entries: list[dict], licence: str) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        add_member(archive, "package/package.json", json.dumps(
            {"name": f"emoji-datasource-{vendor}", "version": "16.0.0", "license": "MIT"}).encode())
        add_member(archive, "package/LICENSE", licence.encode())
        add_member(archive, "package/emoji.json", json.dumps(entries).encode())
        add_member(archive, "package/index.js", b"throw new Error('package code must never run');")
        for entry in entries:
            images = [entry, *entry.get("skin_variations", {}).values()]
            for index, variant in enumerate(images):
                if variant.get(f"has_img_{vendor}"):
                    colour = (200, 10 * index, 100 if vendor == "google" else 50)
                    add_member(archive, f"package/img/{vendor}/64/{variant['image']}", rgba_png(colour, 64))
    return path


@pytest.fixture
def tarballs(tmp_path: Path) -> list[Path]:
    entries = emoji_entries(8)
    return [write_emoji_tarball(tmp_path / "google.tgz", "google", entries, "The MIT License (MIT) google"),
            write_emoji_tarball(tmp_path / "twitter.tgz", "twitter", entries, "The MIT License (MIT) twitter")]


def test_the_split_keeps_every_variant_and_vendor_of_an_emoji_on_one_side(tarballs: list[Path], tmp_path: Path):
    path = convert_emoji_packages(tarballs, tmp_path / "emoji.npz", held_out_fraction=0.25, seed=3)
    with np.load(path, allow_pickle=False) as archive:
        groups, split, labels = archive["groups"], archive["split"], archive["labels"]
        vendors = archive["vendors"]
    # 9 categories x 8 emoji; 4 of each 8 have 5 skin tones: 8 + 4 * 5 = 28 images per category per vendor
    assert len(groups) == 2 * len(CATEGORIES) * 28
    assert sorted(set(vendors.tolist())) == [0, 1]
    for group in set(groups.tolist()):
        sides = set(split[groups == group].tolist())
        assert len(sides) == 1, f"emoji {group} is on both sides of the split"
        assert (groups == group).sum() in (2, 12)  # the base image (+ 5 tones) from both vendors
    for label in range(len(CATEGORIES)):
        held_out = {g for g in groups[(labels == label) & (split == SPLIT_CODES["validation"])].tolist()}
        assert len(held_out) == 2  # round(8 * 0.25) emoji of every category
    assert not any(g == "1f3fb" for g in groups.tolist())  # the Component swatch is dropped
    assert "1faff" not in groups.tolist()  # not drawn by the vendor


def test_the_split_depends_on_the_seed_and_not_on_the_order(tmp_path: Path):
    groups = [f"g{k}" for k in range(40)]
    categories = ["Objects"] * 40
    split = group_split(groups, categories, held_out_fraction=0.25, seed=0)
    reversed_split = group_split(groups[::-1], categories, held_out_fraction=0.25, seed=0)
    np.testing.assert_array_equal(split, reversed_split[::-1])
    assert (split == SPLIT_CODES["validation"]).sum() == 10
    assert not np.array_equal(split, group_split(groups, categories, held_out_fraction=0.25, seed=1))


def test_images_are_composited_on_white_with_sources_and_licences(tarballs: list[Path], tmp_path: Path):
    path = convert_emoji_packages(tarballs, tmp_path / "emoji.npz")
    archive = load_pixel_archive(path)
    assert archive.images.shape[1:] == (64, 64, 3) and archive.images.dtype == np.uint8
    first = archive.images[0].astype(int)  # colour (200, 0, 100): left opaque, right at alpha 64 over white
    np.testing.assert_array_equal(first[0, 0], [200, 0, 100])
    expected = [round(255 + (channel - 255) * 64 / 255) for channel in (200, 0, 100)]
    np.testing.assert_allclose(first[0, 40], expected, atol=1)
    assert archive.class_names == list(CATEGORIES)
    assert "google images Apache-2.0" in archive.licence and "twitter images CC-BY-4.0" in archive.licence
    assert "emoji-datasource-google@16.0.0" in archive.source and "sha256" in archive.source
    with np.load(path, allow_pickle=False) as raw:
        assert "google" in str(raw["licence_text"]) and "twitter" in str(raw["licence_text"])
        assert list(raw["vendor_names"]) == ["google", "twitter"]


def test_the_exported_folders_read_back_as_rgb_with_category_labels(tarballs: list[Path], tmp_path: Path):
    path = convert_emoji_packages(tarballs[:1], tmp_path / "emoji.npz")
    archive = load_pixel_archive(path)
    folder = export_image_folder(path, tmp_path / "validation", split="validation")
    dataset = ImageFolder(folder, resolution=64)
    rows = np.flatnonzero(archive.split == SPLIT_CODES["validation"])
    assert len(dataset) == len(rows)
    assert dataset.classes == sorted(dataset.classes) and len(dataset.classes) == len(CATEGORIES)
    image, label = dataset[0]
    assert image.shape == (3, 64, 64)
    first = rows[archive.labels[rows] == label][0]
    np.testing.assert_allclose((image.permute(1, 2, 0).numpy() + 1) * 127.5, archive.images[first], atol=0.51)


def test_bad_packages_are_refused_with_one_clear_error(tarballs: list[Path], tmp_path: Path):
    with pytest.raises(DatasetError, match="given twice"):
        convert_emoji_packages([tarballs[0], tarballs[0]], tmp_path / "twice.npz")
    other = tmp_path / "other.tgz"
    with tarfile.open(other, "w:gz") as archive:
        add_member(archive, "package/package.json", json.dumps({"name": "left-pad"}).encode())
    with pytest.raises(DatasetError, match="left-pad"):
        convert_emoji_packages([other], tmp_path / "other.npz")
    assert not (tmp_path / "twice.npz").exists() and not (tmp_path / "other.npz").exists()
