"""Colour emoji as a 64 x 64 RGB image dataset, one class per emoji category (issue: the colour model).

The images come from the npm packagings of two emoji sets (packaging MIT; read as ``npm pack``
tarballs with tarfile, json and PIL only, none of their JavaScript is run):

* ``emoji-datasource-google``: Google's Noto Emoji, images under the Apache License 2.0;
* ``emoji-datasource-twitter``: Twitter's Twemoji, images under CC-BY 4.0.

Each tarball holds ``package/emoji.json`` (one entry per emoji: ``image`` file name, ``category``,
``unified`` code, ``has_img_<vendor>``, and ``skin_variations`` with their own images) and the
RGBA PNGs under ``package/img/<vendor>/64/``. :func:`convert_emoji_packages` composites every image
on white, labels it by category ("Component", the bare skin-tone and hair swatches, is dropped)
and by vendor, and splits it deterministically by *emoji*, not by image: every skin-tone variant
of an emoji, and the same emoji drawn by the other vendor, land on the same side, so the held-out
images share no near-duplicate with the training ones.

The ``.npz`` archive has the fields of :func:`sundae.data.mnist.load_pixel_archive` (``images``
uint8 (N, 64, 64, 3), ``labels``, ``split``, ``class_names``, ``source``, ``licence``) plus
``vendors`` (N,) with ``vendor_names``, ``groups`` (each image's base emoji code), ``split_rule``
and each vendor's licence text; it loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from sundae.checkpoint import atomic_path
from sundae.data.images import DatasetError
from sundae.data.latents import SPLIT_CODES

EMOJI_SIDE = 64
DROPPED_CATEGORIES = ("Component",)
CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
              "Activities", "Objects", "Symbols", "Flags")  # emoji.json's categories, in Unicode's order


@dataclass(frozen=True)
class EmojiVendor:
    package: str  # npm package name
    vendor: str  # the image folder and the has_img_<vendor> key
    artwork: str
    licence: str  # of the images (the packaging itself is MIT)


EMOJI_VENDORS: dict[str, EmojiVendor] = {
    vendor.package: vendor for vendor in (
        EmojiVendor("emoji-datasource-google", "google", "Noto Emoji by Google", "Apache-2.0"),
        EmojiVendor("emoji-datasource-twitter", "twitter", "Twemoji by Twitter", "CC-BY-4.0"),
    )
}


@dataclass(frozen=True)
class EmojiImage:
    group: str  # the base emoji's code: every variant of one emoji shares it
    category: str
    file_name: str


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    try:
        member = archive.extractfile(name)
    except KeyError:
        raise DatasetError(f"{archive.name} has no {name}; is it an npm tarball of an emoji-datasource package?") \
            from None
    if member is None:
        raise DatasetError(f"{name} in {archive.name} is not a regular file")
    return member.read()


def listed_images(entries: list[dict[str, Any]], vendor: str) -> Iterator[EmojiImage]:
    """Every image ``vendor`` draws, base emoji and skin variations, with its category and group."""
    key = f"has_img_{vendor}"
    for entry in entries:
        category = entry.get("category")
        if category in DROPPED_CATEGORIES:
            continue
        if category not in CATEGORIES:
            raise DatasetError(f"emoji {entry.get('unified')!r} has an unknown category {category!r}")
        group = str(entry["unified"]).lower()
        variants = [entry, *(entry.get("skin_variations") or {}).values()]
        for variant in variants:
            if variant.get(key):
                yield EmojiImage(group, category, str(variant["image"]))


def composite_on_white(png: bytes, *, source: str) -> np.ndarray:
    """An RGBA (or any-mode) PNG -> (64, 64, 3) uint8 RGB, transparent pixels white."""
    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception as error:  # PIL raises several types for a broken file
        raise DatasetError(f"{source}: not a readable image ({error})") from None
    if image.size != (EMOJI_SIDE, EMOJI_SIDE):
        raise DatasetError(f"{source}: expected {EMOJI_SIDE}x{EMOJI_SIDE}, got {image.size[0]}x{image.size[1]}")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"), dtype=np.uint8)


def group_split(groups: list[str], categories: list[str], *, held_out_fraction: float, seed: int) -> np.ndarray:
    """Split codes per image: per category, the emoji (groups) ordered by sha256 of (seed, group), the
    first round(n * fraction) held out. Independent of file order, vendors and what else is in the set."""
    split = np.full(len(groups), SPLIT_CODES["train"], dtype=np.uint8)
    for category in sorted(set(categories)):
        members = sorted({g for g, c in zip(groups, categories) if c == category},
                         key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        held_out = set(members[: round(len(members) * held_out_fraction)])
        for row, (group, row_category) in enumerate(zip(groups, categories)):
            if row_category == category and group in held_out:
                split[row] = SPLIT_CODES["validation"]
    return split


@dataclass
class _Collected:
    images: list[np.ndarray]
    groups: list[str]
    categories: list[str]
    vendors: list[int]


def _read_vendor(tarball: Path, collected: _Collected, vendor_index: int) -> tuple[EmojiVendor, str, str]:
    with tarfile.open(tarball, "r:gz") as archive:
        package = json.loads(_member_bytes(archive, "package/package.json"))
        layout = EMOJI_VENDORS.get(package.get("name"))
        if layout is None:
            raise DatasetError(f"{tarball} is the npm package {package.get('name')!r}; supported: "
                               f"{sorted(EMOJI_VENDORS)}")
        entries = json.loads(_member_bytes(archive, "package/emoji.json"))
        for item in listed_images(entries, layout.vendor):
            member = f"package/img/{layout.vendor}/{EMOJI_SIDE}/{item.file_name}"
            collected.images.append(composite_on_white(_member_bytes(archive, member), source=f"{tarball}:{member}"))
            collected.groups.append(item.group)
            collected.categories.append(item.category)
            collected.vendors.append(vendor_index)
        licence_text = _member_bytes(archive, "package/LICENSE").decode("utf-8", "replace")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    source = (f"npm package {layout.package}@{package.get('version')} ({layout.artwork}; images {layout.licence}, "
              f"packaging {package.get('license', 'unknown')}); tarball sha256 {digest}")
    return layout, source, licence_text


def convert_emoji_packages(tarballs: list[str | os.PathLike], out_path: str | os.PathLike, *,
                           held_out_fraction: float = 0.15, seed: int = 0) -> Path:
    """Convert ``npm pack`` tarballs of emoji-datasource-<vendor> packages into one ``.npz``; returns its path."""
    if not tarballs:
        raise DatasetError("give at least one emoji-datasource tarball")
    if not 0 < held_out_fraction < 1:
        raise DatasetError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    collected = _Collected([], [], [], [])
    layouts, sources, licence_texts = [], [], []
    for index, tarball in enumerate(Path(path) for path in tarballs):
        layout, source, licence_text = _read_vendor(tarball, collected, index)
        if layout in layouts:
            raise DatasetError(f"{tarball}: the package {layout.package} is given twice")
        layouts.append(layout)
        sources.append(source)
        licence_texts.append(licence_text)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            images=np.stack(collected.images),
            labels=np.array([CATEGORIES.index(c) for c in collected.categories], dtype=np.uint8),
            split=group_split(collected.groups, collected.categories, held_out_fraction=held_out_fraction,
                              seed=seed),
            class_names=np.array(CATEGORIES),
            vendors=np.array(collected.vendors, dtype=np.uint8),
            vendor_names=np.array([layout.vendor for layout in layouts]),
            groups=np.array(collected.groups),
            source=np.array("; ".join(sources)),
            licence=np.array(", ".join(f"{layout.vendor} images {layout.licence}" for layout in layouts)
                             + "; packagings MIT"),
            licence_text=np.array("\n\n".join(licence_texts)),
            split_rule=np.array(f"per category, emoji ordered by sha256('{seed}:<base code>'); the first "
                                f"round(n * {held_out_fraction:.6g}) emoji, with all their variants and "
                                f"vendors -> validation, the rest -> train"),
        )
    return out_path


__all__ = ["CATEGORIES", "EMOJI_VENDORS", "EmojiVendor", "composite_on_white", "convert_emoji_packages",
           "group_split", "listed_images"]
