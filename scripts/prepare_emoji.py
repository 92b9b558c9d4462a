"""Fetch the Noto and Twemoji npm packagings and convert them to a 64x64 RGB dataset (colour model issue).

    python scripts/prepare_emoji.py [--out-dir data] [--vendors google,twitter] [--held-out 0.15] [--seed 0]

Runs ``npm pack`` for each vendor's ``emoji-datasource-<vendor>@16.0.0`` (only the download: no
install scripts run), converts them with :func:`sundae.data.emoji.convert_emoji_packages` into
``data/emoji.npz`` (images composited on white, one class per category, split by emoji so that
skin-tone variants and the other vendor's drawing stay on the same side), and writes each split as
PNG folders, one sub-folder per category: ``data/emoji/train/`` and ``data/emoji/validation/`` (what
``sundae train-tokenizer`` and ``sundae evaluate --real`` read). Prints the sizes, per-category
counts, sources and licences. Existing outputs are kept (delete them to redo).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sundae.data.emoji import convert_emoji_packages
from sundae.data.latents import SPLIT_CODES
from sundae.data.mnist import export_image_folder, load_pixel_archive
from sundae.data.npm import npm_pack

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
VERSION = "16.0.0"
SUMMARY_TEMPLATE = "  {split} ({total}): {counts}"


def describe(path: Path) -> str:
    archive = load_pixel_archive(path)
    lines = [f"{path}: {path.stat().st_size / 1e6:.1f} MB, {len(archive.images)} images {archive.images.shape[1:]}",
             f"  source: {archive.source}", f"  licence: {archive.licence}"]
    for split, code in SPLIT_CODES.items():
        labels = archive.labels[archive.split == code]
        counts = ", ".join(f"{name}={int((labels == i).sum())}" for i, name in enumerate(archive.class_names))
        lines.append(SUMMARY_TEMPLATE.format(split=split, total=len(labels), counts=counts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPOSITORY_ROOT / "data")
    parser.add_argument("--vendors", default="google,twitter", help="comma-separated: google, twitter")
    parser.add_argument("--held-out", type=float, default=0.15, help="share of each category's emoji held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    arguments = parser.parse_args()
    out_path = arguments.out_dir / "emoji.npz"
    if not out_path.is_file():
        arguments.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as temporary:
            tarballs = [npm_pack(f"emoji-datasource-{vendor.strip()}@{VERSION}", Path(temporary))
                        for vendor in arguments.vendors.split(",")]
            convert_emoji_packages(tarballs, out_path, held_out_fraction=arguments.held_out, seed=arguments.seed)
    print(describe(out_path))
    for split in SPLIT_CODES:
        folder = arguments.out_dir / "emoji" / split
        if not folder.is_dir():
            export_image_folder(out_path, folder, split=split)
        print(f"  {split} images: {folder}/<category>/*.png")


if __name__ == "__main__":
    main()
