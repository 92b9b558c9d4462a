"""Latent datasets: an image folder encoded once by the VQ-GAN, with horizontal flips (paper §3.1, Eq. 3).

    L = { C(E(x)) | x in X },  X = the images and their horizontal flips

:func:`encode_folder` writes a directory that the prior trains on without touching pixels:

* ``tokens.bin``   raw ``np.memmap`` of shape (rows, h, w), uint16 when the codebook has at most
  65 536 entries, else int32. Row ``2i`` encodes source image ``i``, row ``2i + 1`` encodes the
  horizontally flipped *image* (the flip is applied before the encoder: a VQ-GAN is not
  flip-equivariant, so flipping the token grid would not give the flipped image's tokens).
* ``labels.npy``   per-row class index (int16, or int32 beyond 32 767 classes); -1 without classes.
* ``split.npy``    per-row split, uint8: 0 = train, 1 = validation. An image goes to validation
  when sha256(seed, relative path) falls below ``validation_fraction``, so an image and its flip
  always share a split and adding images never moves the others.
* ``flipped.npy``  per-row bool, True for the flipped rows.
* ``manifest.json`` format version, grid shape, codebook size, dtype, row count, tokenizer
  identity, class names, source files (one per image), skipped files and the split settings.

Encoding is resumable: after every batch the rows are flushed and the manifest records how many
images are done (written atomically), so re-running the same call continues where it stopped and
produces the same bytes as an uninterrupted run. A rerun against output made by another tokenizer,
another folder listing or other settings is refused. Unreadable images are skipped and listed.

:class:`LatentDataset` reads the result memory-mapped, read-only, with a fast ``batch(indices)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sundae.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_path, read_json, read_weights,
                               write_json_atomic)
from sundae.data.images import DatasetError, ImageFolder, UnreadableImageError, as_height_width
from sundae.errors import InputError
from sundae.tokenizer.vqgan import codes_content_hash

logger = logging.getLogger(__name__)

FORMAT = "sundae-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.bin"
LABELS_NAME = "labels.npy"
SPLIT_NAME = "split.npy"
FLIPPED_NAME = "flipped.npy"
SPLIT_CODES = {"train": 0, "validation": 1}
SPLIT_NAMES = (*SPLIT_CODES, "all")
ROW_LAYOUT = "row 2i encodes sources[i]; row 2i+1 encodes the horizontally flipped image sources[i]"

# Manifest entries that must agree before an interrupted encoding may be continued.
IDENTITY_KEYS = (
    "format", "format_version", "resolution", "grid_shape", "codebook_size", "dtype", "class_names",
    "listed_images", "listing_sha256", "validation_fraction", "split_seed",
)


class TokenizerConfig(Protocol):
    downsample_factor: int
    codebook_size: int
    in_channels: int
    # optional: token_shape(height, width) -> the shape of one image's tokens (default: the latent grid)


class Tokenizer(Protocol):
    """What :func:`encode_folder` needs from a VQ-GAN: its config and ``encode`` (images -> indices)."""

    config: TokenizerConfig

    def encode(self, images: Tensor) -> Tensor:
        """(B, in_channels, H, W) in [-1, 1] -> (B, H/f, W/f) int64 codebook indices."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_identity(directory: str | os.PathLike) -> dict[str, Any]:
    """Identify a saved tokenizer: absolute ``path``, ``sha256`` of its weights file, ``codes_sha256`` of the
    weights that decide the codes (:func:`~sundae.tokenizer.vqgan.codes_content_hash`) and its ``config``.

    The path is informational (a moved tokenizer is the same tokenizer); :func:`same_codes` compares the
    hashes (before an encoding resumes, before a prior trains on latents).
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory} is not a saved tokenizer: {WEIGHTS_NAME} is missing")
    return {
        "path": str(directory.resolve()),
        "sha256": sha256_file(weights),
        "codes_sha256": codes_content_hash(read_weights(weights)),
        "config": read_json(directory / CONFIG_NAME),
    }


def same_codes(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> bool:
    """Whether two :func:`tokenizer_identity` records give every image the same codes: by ``codes_sha256``
    when both have it (a decoder-only fine-tune keeps it), else by the weights file's ``sha256`` (records
    written before ``codes_sha256`` existed). Two empty records (pixel tokens, no tokenizer) are the same."""
    saved, current = saved or {}, current or {}
    key = "codes_sha256" if "codes_sha256" in saved and "codes_sha256" in current else "sha256"
    return saved.get(key) == current.get(key)


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16 if codebook_size <= 1 << 16 else np.int32)


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes < 1 << 15 else np.int32)


def split_code(relative_path: str, *, seed: int, validation_fraction: float) -> int:
    """0 (train) or 1 (validation) from a hash of the path alone, so other files never change it."""
    digest = hashlib.sha256(f"{seed}\0{relative_path}".encode()).digest()
    uniform = int.from_bytes(digest[:8], "big") / 2**64
    return SPLIT_CODES["validation"] if uniform < validation_fraction else SPLIT_CODES["train"]


def split_rows(row_splits: np.ndarray, split: str) -> np.ndarray:
    """Row indices of ``split`` ("train", "validation" or "all") given per-row split codes."""
    if split not in SPLIT_NAMES:
        raise InputError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    return np.arange(len(row_splits)) if split == "all" else np.flatnonzero(row_splits == SPLIT_CODES[split])


def listing_sha256(folder: ImageFolder) -> str:
    listing = "\n".join(f"{path}\t{folder.label(position)}" for position, path in enumerate(folder.relative_paths))
    return hashlib.sha256(listing.encode()).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _comparable(manifest: Mapping[str, Any]) -> dict[str, Any]:
    identity = {key: manifest.get(key) for key in IDENTITY_KEYS}
    identity["tokenizer architecture"] = ((manifest.get("tokenizer") or {}).get("config") or {}).get("config")
    return identity


def _check_same_job(saved: Mapping[str, Any], current: Mapping[str, Any], out_dir: Path) -> None:
    before, now = _comparable(saved), _comparable(current)
    differences = [key for key in now if before[key] != now[key]]
    if not same_codes(saved.get("tokenizer"), current.get("tokenizer")):
        differences.append("tokenizer")
        before["tokenizer"], now["tokenizer"] = saved.get("tokenizer"), current.get("tokenizer")
    if differences:
        details = "; ".join(
            f"{key}: existing {str(before[key])[:120]} vs now {str(now[key])[:120]}" for key in differences
        )
        raise DatasetError(
            f"{out_dir} holds latents made with other settings ({details}); use another output directory, "
            "or delete this one to re-encode"
        )


def _read_or_error(folder: ImageFolder, position: int) -> Tensor | UnreadableImageError:
    try:
        return folder.load(position)
    except UnreadableImageError as error:
        return error


def _loaded_batches(
    folder: ImageFolder, batches: Iterable[range], num_workers: int
) -> Iterator[tuple[range, list[Tensor | UnreadableImageError]]]:
    """Decode batches on ``num_workers`` threads, one batch ahead of the encoder (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        in_flight: deque[tuple[range, list[Future]]] = deque()
        for positions in batches:
            in_flight.append((positions, [pool.submit(_read_or_error, folder, p) for p in positions]))
            if len(in_flight) > 1:
                ready, futures = in_flight.popleft()
                yield ready, [future.result() for future in futures]
        while in_flight:
            ready, futures = in_flight.popleft()
            yield ready, [future.result() for future in futures]


def _skipped_entries(
    folder: ImageFolder, positions: range, loaded: list[Tensor | UnreadableImageError]
) -> list[dict[str, str]]:
    entries = []
    for position, item in zip(positions, loaded):
        if isinstance(item, UnreadableImageError):
            path, reason = folder.relative_paths[position], str(item.__cause__ or item)
            logger.warning("skipping unreadable image %s (%s)", folder.root / path, reason)
            entries.append({"path": path, "reason": reason})
    return entries


def _encode_with_flips(
    tokenizer: Tokenizer, images: list[Tensor], device: torch.device, manifest: Mapping[str, Any]
) -> np.ndarray:
    """(b images) -> (2b, h, w) rows: each image then its horizontal flip, both through the encoder."""
    batch = torch.stack(images)
    pairs = rearrange(torch.stack([batch, batch.flip(-1)], dim=1), "b pair c h w -> (b pair) c h w")
    with torch.no_grad():
        tokens = tokenizer.encode(pairs.to(device))
    expected = (pairs.shape[0], *manifest["grid_shape"])
    if tuple(tokens.shape) != expected:
        raise DatasetError(
            f"tokenizer.encode returned shape {tuple(tokens.shape)} but {expected} was expected "
            f"(resolution {manifest['resolution']} / downsample factor {manifest['downsample_factor']})"
        )
    low, high, size = int(tokens.min()), int(tokens.max()), manifest["codebook_size"]
    if low < 0 or high >= size:
        raise DatasetError(f"tokenizer.encode returned indices in [{low}, {high}], outside the codebook [0, {size})")
    return tokens.cpu().numpy().astype(manifest["dtype"])


class _Encoding:
    """The state of one (possibly resumed) encoding run, committed to the manifest after each batch."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.row_shape = tuple(manifest["grid_shape"])
        self.dtype = np.dtype(manifest["dtype"])

    @property
    def tokens_path(self) -> Path:
        return self.out_dir / TOKENS_NAME

    def open_tokens(self) -> np.memmap:
        capacity = (2 * self.manifest["listed_images"], *self.row_shape)
        expected_bytes = int(np.prod(capacity)) * self.dtype.itemsize
        if self.manifest["images_done"] == 0:
            return np.memmap(self.tokens_path, dtype=self.dtype, mode="w+", shape=capacity)
        if not self.tokens_path.is_file() or self.tokens_path.stat().st_size != expected_bytes:
            raise DatasetError(
                f"{self.tokens_path} is missing or has the wrong size for the recorded progress; "
                f"delete {self.out_dir} and encode again"
            )
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r+", shape=capacity)

    def commit(self, tokens: np.memmap, rows: np.ndarray, images_done: int, skipped: list[dict[str, str]]) -> None:
        start = self.manifest["rows_written"]
        tokens[start : start + len(rows)] = rows
        tokens.flush()  # rows must be on disk before the manifest says they exist
        self.manifest["rows_written"] = start + len(rows)
        self.manifest["images_done"] = images_done
        self.manifest["skipped"] = self.manifest["skipped"] + skipped
        write_json_atomic(self.out_dir / MANIFEST_NAME, self.manifest)

    def encode_remaining(
        self, tokenizer: Tokenizer, folder: ImageFolder, *, batch_size: int, num_workers: int, device: torch.device,
        progress: bool,
    ) -> None:
        start, total = self.manifest["images_done"], len(folder)
        tokens = self.open_tokens()
        batches = (range(first, min(first + batch_size, total)) for first in range(start, total, batch_size))
        with tqdm(total=total, initial=start, unit="image", desc="encoding", disable=not progress) as bar:
            for positions, loaded in _loaded_batches(folder, batches, num_workers):
                readable = [item for item in loaded if isinstance(item, Tensor)]
                skipped = _skipped_entries(folder, positions, loaded)
                rows = (
                    _encode_with_flips(tokenizer, readable, device, self.manifest)
                    if readable
                    else np.empty((0, *self.row_shape), dtype=self.dtype)
                )
                self.commit(tokens, rows, positions.stop, skipped)
                bar.update(len(positions))

    def finish(self, folder: ImageFolder) -> None:
        """Write the per-row arrays, trim the preallocated token file, and mark the manifest complete."""
        skipped = {entry["path"] for entry in self.manifest["skipped"]}
        kept = [position for position, path in enumerate(folder.relative_paths) if path not in skipped]
        rows = self.manifest["rows_written"]
        if not kept:
            raise DatasetError(f"none of the {len(folder)} images under {folder.root} could be read; nothing to encode")
        if rows != 2 * len(kept):
            raise DatasetError(
                f"{self.out_dir}: {rows} rows written for {len(kept)} images; delete it and encode again"
            )
        sources = [folder.relative_paths[position] for position in kept]
        image_labels = np.array([folder.label(position) for position in kept])
        image_splits = np.array([
            split_code(path, seed=self.manifest["split_seed"], validation_fraction=self.manifest["validation_fraction"])
            for path in sources
        ])
        splits = np.repeat(image_splits, 2).astype(np.uint8)
        _save_npy(self.out_dir / LABELS_NAME, np.repeat(image_labels, 2).astype(label_dtype(len(folder.classes))))
        _save_npy(self.out_dir / SPLIT_NAME, splits)
        _save_npy(self.out_dir / FLIPPED_NAME, np.tile(np.array([False, True]), len(kept)))
        os.truncate(self.tokens_path, rows * int(np.prod(self.row_shape)) * self.dtype.itemsize)
        self.manifest.update(
            complete=True,
            count=rows,
            row_layout=ROW_LAYOUT,
            sources=sources,
            split_counts={name: int((splits == code).sum()) for name, code in SPLIT_CODES.items()},
            files={"tokens": TOKENS_NAME, "labels": LABELS_NAME, "split": SPLIT_NAME, "flipped": FLIPPED_NAME},
        )
        write_json_atomic(self.out_dir / MANIFEST_NAME, self.manifest)


def _new_manifest(
    tokenizer: Tokenizer, folder: ImageFolder, tokenizer_id: Mapping[str, Any], *,
    validation_fraction: float, split_seed: int,
) -> dict[str, Any]:
    factor, codebook_size = tokenizer.config.downsample_factor, tokenizer.config.codebook_size
    height, width = folder.resolution
    if height % factor or width % factor:
        raise DatasetError(
            f"resolution {height}x{width} is not a multiple of the tokenizer's downsample factor {factor}"
        )
    token_shape = getattr(tokenizer.config, "token_shape", None)  # a multi-scale tokenizer packs its scales
    grid_shape = token_shape(height, width) if token_shape is not None else (height // factor, width // factor)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "tokenizer": dict(tokenizer_id),
        "folder": str(folder.root.resolve()),
        "resolution": [height, width],
        "downsample_factor": factor,
        "grid_shape": list(grid_shape),
        "codebook_size": codebook_size,
        "dtype": token_dtype(codebook_size).name,
        "class_names": list(folder.classes),
        "listed_images": len(folder),
        "listing_sha256": listing_sha256(folder),
        "validation_fraction": validation_fraction,
        "split_seed": split_seed,
        "images_done": 0,
        "rows_written": 0,
        "skipped": [],
    }


def encode_folder(
    tokenizer: Tokenizer,
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resolution: int | tuple[int, int],
    tokenizer_id: Mapping[str, Any],
    batch_size: int = 32,
    validation_fraction: float = 0.05,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 4,
    classes_from_folders: bool = True,
    progress: bool = True,
) -> Path:
    """Encode every image under ``folder`` and its horizontal flip into a latent dataset in ``out_dir``.

    ``tokenizer_id`` identifies the tokenizer (see :func:`tokenizer_identity`); it is stored and
    checked when resuming. ``batch_size`` images (so ``2 * batch_size`` encoder inputs) are encoded
    per step; ``num_workers`` threads decode images meanwhile. An ``nn.Module`` tokenizer is put in
    eval mode. Returns ``out_dir``; calling again on a finished directory returns it unchanged.
    """
    if batch_size < 1 or num_workers < 1:
        raise InputError(f"batch_size and num_workers must be >= 1, got {batch_size} and {num_workers}")
    if not 0.0 <= validation_fraction < 1.0:
        raise InputError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    out_dir = Path(out_dir)
    images = ImageFolder(folder, resolution=as_height_width(resolution), classes_from_folders=classes_from_folders,
                         channels=tokenizer.config.in_channels)
    manifest = _resume_or_start(
        out_dir,
        _new_manifest(tokenizer, images, tokenizer_id, validation_fraction=validation_fraction, split_seed=split_seed),
    )
    if manifest["complete"]:
        logger.info("%s is already complete (%d rows)", out_dir, manifest["count"])
        return out_dir
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.eval()
    encoding = _Encoding(out_dir, manifest)
    if manifest["images_done"] < len(images):
        encoding.encode_remaining(tokenizer, images, batch_size=batch_size, num_workers=num_workers,
                                  device=torch.device(device), progress=progress)
    encoding.finish(images)
    return out_dir


def _resume_or_start(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: the saved one if it describes the same job, else ``manifest``, written."""
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        saved = read_json(manifest_path)
        _check_same_job(saved, manifest, out_dir)
        if not saved["complete"]:
            logger.info("resuming %s at image %d of %d", out_dir, saved["images_done"], saved["listed_images"])
        return saved
    if (out_dir / TOKENS_NAME).exists():
        raise DatasetError(
            f"{out_dir} has a {TOKENS_NAME} but no {MANIFEST_NAME}; delete it or choose another output directory"
        )
    write_json_atomic(manifest_path, manifest)
    return manifest


class TokenDataset(Dataset):
    """Token grids with labels and a train/validation split: the data a SUNDAE prior trains on.

    Items are ``(tokens LongTensor (h, w), label int)`` (label -1 without classes);
    ``batch(indices)`` gathers many at once for loops that bypass DataLoader.
    Subclasses supply the rows (any integer array of shape (rows, h, w)) and per-row metadata;
    ``keep_rows`` (a boolean per row) leaves the others out of every split.
    """

    def __init__(
        self, *, tokens: np.ndarray, row_labels: np.ndarray, row_splits: np.ndarray, split: str,
        codebook_size: int, class_names: Sequence[str], keep_rows: np.ndarray | None = None,
    ) -> None:
        if not len(row_labels) == len(row_splits) == len(tokens):
            raise DatasetError(
                f"{len(tokens)} token rows but {len(row_labels)} labels and {len(row_splits)} split entries"
            )
        self.split = split
        self.codebook_size = codebook_size
        self.class_names = list(class_names)
        self._tokens = tokens
        self._row_labels = row_labels
        self.rows = split_rows(row_splits, split)
        if keep_rows is not None:
            self.rows = self.rows[keep_rows[self.rows]]
        self.labels = row_labels[self.rows].astype(np.int64)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self._tokens.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for an unlabelled dataset (HourglassConfig's convention)."""
        return len(self.class_names) if self.class_names else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        tokens, labels = self.batch([index])
        return tokens[0], int(labels[0])

    def batch(self, indices: Sequence[int] | np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """Items at ``indices`` (positions within this split) -> (tokens (B, h, w), labels (B,)), both int64."""
        positions = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        if positions.ndim != 1:
            raise InputError(f"batch expects a 1-D list of indices, got shape {positions.shape}")
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"indices must lie in [-{len(self)}, {len(self)}) for the {self.split!r} split")
        rows = self.rows[positions]
        tokens = torch.from_numpy(np.asarray(self._tokens[rows]).astype(np.int64))
        return tokens, torch.from_numpy(self._row_labels[rows].astype(np.int64))


class LatentDataset(TokenDataset):
    """A directory written by :func:`encode_folder`, memory-mapped read-only.

    ``split`` is "train", "validation" or "all"; ``flips=False`` leaves out the rows of flipped images
    (for data whose orientation is fixed: Fashion-MNIST's shoes all point left, so a mirrored shoe is
    a sample unlike any real one). Exposes ``grid_shape``, ``codebook_size``,
    ``class_names`` / ``num_classes``, ``tokenizer`` (the identity stored at encoding time),
    ``labels`` and ``flipped`` (for this split's items), ``sources`` (one per image) and the
    whole ``manifest``.
    """

    def __init__(self, directory: str | os.PathLike, *, split: str = "train", flips: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = self._read_manifest()
        self.tokenizer: dict[str, Any] = self.manifest["tokenizer"]
        self.sources: list[str] = self.manifest["sources"]
        row_splits = self._load_row_array(SPLIT_NAME)
        row_flipped = self._load_row_array(FLIPPED_NAME).astype(bool)
        super().__init__(
            tokens=self._open_tokens(),
            row_labels=self._load_row_array(LABELS_NAME),
            row_splits=row_splits,
            split=split,
            codebook_size=self.manifest["codebook_size"],
            class_names=self.manifest["class_names"],
            keep_rows=None if flips else ~row_flipped,
        )
        self.flipped = row_flipped[self.rows]

    def _read_manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            raise DatasetError(
                f"{self.directory} is not a latent dataset (no {MANIFEST_NAME}); create one with encode_folder"
            )
        manifest = read_json(path)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                f"this sundae reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        if not manifest.get("complete"):
            raise DatasetError(
                f"{self.directory} is still being encoded ({manifest.get('images_done')} of "
                f"{manifest.get('listed_images')} images done); re-run encode_folder with the same arguments "
                "to finish it"
            )
        return manifest

    def _open_tokens(self) -> np.memmap:
        path = self.directory / TOKENS_NAME
        shape = (self.manifest["count"], *self.manifest["grid_shape"])
        dtype = np.dtype(self.manifest["dtype"])
        expected_bytes = int(np.prod(shape)) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected_bytes:
            raise DatasetError(
                f"{path} is missing or not {expected_bytes} bytes ({shape} {dtype}); the dataset is damaged"
            )
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    def _load_row_array(self, name: str) -> np.ndarray:
        path = self.directory / name
        if not path.is_file():
            raise DatasetError(f"{path} is missing; the dataset is damaged")
        array = np.load(path, allow_pickle=False)
        if array.shape != (self.manifest["count"],):
            raise DatasetError(f"{path} has shape {array.shape}, expected ({self.manifest['count']},)")
        return array

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its whole content; DataLoader workers reopen the file instead.
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tokens = self._open_tokens()
