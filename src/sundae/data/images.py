"""Image folders and image <-> tensor helpers: the pixels x of paper §3.1 before tokenisation.

:class:`ImageFolder` lists every image under a root folder (recursively, in sorted order) and
returns each one resized so that it covers the target resolution, centre-cropped to it, as a
float tensor in [-1, 1] with shape (3, H, W): the input range of the VQ-GAN encoder E of Eq. 3.
Class labels come from the first-level sub-folder names, sorted, as in torchvision's
``ImageFolder``.

Unreadable files are handled lazily: nothing is decoded at construction (listing a million
ImageNet files must stay cheap), and an item whose file cannot be decoded is logged, recorded
in :attr:`ImageFolder.skipped`, and replaced by the next readable item (wrapping around), so a
single corrupt file never stops an epoch and the replacement is the same every time.
:meth:`ImageFolder.load` raises instead, for callers (the latent encoder) that must skip the
file rather than substitute another.

:func:`grid_array`, :func:`save_image_grid`, :func:`tensor_to_pil` and :func:`pil_to_tensor`
convert between tensors in [-1, 1] and PIL images / PNG files without torchvision.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from sundae.checkpoint import atomic_path
from sundae.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "bmp", "webp", "gif", "tif", "tiff")


class DatasetError(InputError):
    """A dataset folder or file is missing, empty, inconsistent or was made by something else."""


class UnreadableImageError(DatasetError):
    """An image file could not be opened or decoded."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


def as_height_width(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """``r`` -> ``(r, r)``; ``(h, w)`` stays; anything not positive is rejected."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(side, int) and side >= 1 for side in size):
        raise DatasetError(f"resolution must be a positive int or an (height, width) pair of them, got {resolution!r}")
    return size  # type: ignore[return-value]


def resize_and_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` (keeping its aspect ratio) until it covers ``size`` = (h, w), then crop the centre.

    For a square target this is "short side = resolution, then centre crop".
    """
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_width = max(width, round(image.width * scale))
    new_height = max(height, round(image.height * scale))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = (new_width - width) // 2
    top = (new_height - height) // 2
    return image.crop((left, top, left + width, top + height))


def pil_to_tensor(image: Image.Image) -> Tensor:
    """An 8-bit PIL image -> float tensor in [-1, 1] of shape (C, H, W) (C = 1 for "L", 3 for "RGB")."""
    if image.mode not in ("L", "RGB"):
        raise InputError(f"pil_to_tensor expects an 'L' or 'RGB' image, got mode {image.mode!r}; convert it first")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    if pixels.ndim == 2:
        pixels = rearrange(pixels, "h w -> 1 h w")
    else:
        pixels = rearrange(pixels, "h w c -> c h w")
    return pixels.float() / 127.5 - 1.0


def tensor_to_uint8(images: Tensor) -> np.ndarray:
    """Tensors in [-1, 1] (..., C, H, W) -> uint8 numpy array (..., H, W, C), values clamped and rounded."""
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "... c h w -> ... h w c").numpy()


def tensor_to_pil(image: Tensor) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] with C = 1 or 3 -> PIL image ("L" or "RGB")."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InputError(f"tensor_to_pil expects one (C, H, W) image with C = 1 or 3, got shape {tuple(image.shape)}")
    pixels = tensor_to_uint8(image)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def grid_array(images: Tensor, nrow: int | None = None, *, padding: int = 2) -> np.ndarray:
    """A batch of images in [-1, 1] (B, C, H, W) -> one uint8 grid, (H', W', 3) for RGB or (H', W') for grey.

    ``nrow`` images per row (default: ceil(sqrt(B))); ``padding`` black pixels between and around them.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise InputError(
            f"expected a non-empty (B, C, H, W) batch of images with C = 1 or 3, got shape {tuple(images.shape)}"
        )
    count = images.shape[0]
    columns = math.ceil(math.sqrt(count)) if nrow is None else nrow
    if columns < 1:
        raise InputError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(count / columns)
    pixels = tensor_to_uint8(images)  # (B, H, W, C)
    blanks = np.zeros((rows * columns - count, *pixels.shape[1:]), dtype=np.uint8)
    tiles = np.pad(np.concatenate([pixels, blanks]), ((0, 0), (padding, 0), (padding, 0), (0, 0)))
    grid = rearrange(tiles, "(r k) h w c -> (r h) (k w) c", r=rows, k=columns)
    grid = np.pad(grid, ((0, padding), (0, padding), (0, 0)))
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, *, padding: int = 2) -> Path:
    """Write :func:`grid_array` of ``images`` as a PNG, atomically (a viewer never sees half a file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid_array(images, nrow, padding=padding)).save(tmp, format="PNG")
    return path


def list_images(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``root`` (recursively), as paths relative to it, sorted by their POSIX form."""
    suffixes = {"." + extension.lower().lstrip(".") for extension in extensions}
    found = (path.relative_to(root) for path in root.rglob("*") if path.suffix.lower() in suffixes and path.is_file())
    return sorted(found, key=lambda relative: relative.as_posix())


def loose_class_name(name: str) -> str:
    """A class name without case, a leading "<index>_" folder prefix, or punctuation: "1_trouser",
    "Trouser" and "trouser" are one class; so are "0_t-shirt-top" and "T-shirt/top"."""
    name = name.lower()
    head, _, tail = name.partition("_")
    if head.isdigit() and tail:
        name = tail
    return "".join(character for character in name if character.isalnum())


class ImageFolder(Dataset):
    """Images under ``root`` as ((3, H, W) float tensors in [-1, 1], label) pairs.

    Labels: when every image lies in a first-level sub-folder, the sorted sub-folder names are
    the classes (``classes``) and an image's label is its folder's index; when images lie
    directly in ``root`` there are no classes (``labels`` is None, items carry label -1). Pass
    ``classes_from_folders=False`` for folders whose sub-folders are not classes (FFHQ's
    ``00000/``, ``01000/``, ... shards).

    Unreadable files: see the module docstring (lazy, deterministic replacement, listed in
    ``skipped``). With DataLoader workers each worker keeps its own ``skipped`` list; the log
    warning is the record that always reaches the user.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        resolution: int | tuple[int, int],
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        classes_from_folders: bool = True,
        channels: int = 3,
    ) -> None:
        if channels not in (1, 3):
            raise DatasetError(f"an image folder reads 1 (grey) or 3 (RGB) channels, not {channels}")
        self.root = Path(root)
        self.resolution = as_height_width(resolution)
        self.mode = "L" if channels == 1 else "RGB"
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a directory")
        self.files = list_images(self.root, extensions)
        self.relative_paths = [path.as_posix() for path in self.files]
        if not self.files:
            raise DatasetError(
                f"no images found under {self.root} (searched recursively for extensions {', '.join(extensions)})"
            )
        self.classes, self.labels = self._classes_and_labels(classes_from_folders)
        self.skipped: list[SkippedFile] = []

    def _classes_and_labels(self, classes_from_folders: bool) -> tuple[list[str], list[int] | None]:
        in_root = [path for path in self.files if len(path.parts) == 1]
        if not classes_from_folders or len(in_root) == len(self.files):
            return [], None
        if in_root:
            raise DatasetError(
                f"{self.root} holds images both directly inside it (e.g. {in_root[0]}) and in sub-folders, so the "
                "sub-folders cannot be classes; move the loose images into a class folder, or pass "
                "classes_from_folders=False to ignore the sub-folders"
            )
        classes = sorted({path.parts[0] for path in self.files})
        index = {name: position for position, name in enumerate(classes)}
        return classes, [index[path.parts[0]] for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def label(self, index: int) -> int:
        return -1 if self.labels is None else self.labels[index]

    def load(self, index: int) -> Tensor:
        """The image at ``index`` as (C, H, W) in [-1, 1]; raises :class:`UnreadableImageError`."""
        path = self.root / self.files[index]
        try:
            with Image.open(path) as opened:
                # Camera JPEGs store their rotation in EXIF; apply it so "up" is the same for every image.
                image = ImageOps.exif_transpose(opened).convert(self.mode)
        except Exception as error:  # PIL signals bad files with OSError, SyntaxError, EOFError, zlib.error, ...
            raise UnreadableImageError(f"{path}: {type(error).__name__}: {error}") from error
        return pil_to_tensor(resize_and_center_crop(image, self.resolution))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            try:
                return self.load(position), self.label(position)
            except UnreadableImageError as error:
                self._record_skipped(position, error)
        raise DatasetError(f"none of the {len(self)} files under {self.root} could be read as an image")

    def _record_skipped(self, position: int, error: UnreadableImageError) -> None:
        path = self.relative_paths[position]
        if all(skipped.path != path for skipped in self.skipped):
            self.skipped.append(SkippedFile(path, str(error.__cause__ or error)))
        logger.warning("skipping unreadable image %s (%s)", self.root / path, error.__cause__ or error)
