"""LPIPS-style perceptual distance, the perceptual term L_PER of Eq. 7 (paper §3.5).

LPIPS (Zhang et al., 2018): both images go through a frozen VGG16; at each of the five taps
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) the features are normalised to unit length along
channels, their squared difference is weighted per channel by a non-negative 1x1 "lin" layer,
averaged over space, and the five layer values are summed into one distance per sample.

Weights come from public files, chosen by :meth:`PerceptualLoss.from_source`; nothing is ever
downloaded and every file is read with ``torch.load(weights_only=True)``.

``"lpips-vgg"`` -- what taming-transformers (and so the paper) uses. Two files the user provides:

* torchvision's ImageNet VGG16, ``vgg16-397923af.pth``
  (https://download.pytorch.org/models/vgg16-397923af.pth): a plain state dict whose
  ``features.{i}.weight`` / ``features.{i}.bias`` for i in
  ``TORCHVISION_CONV_INDICES`` = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 are the 13
  convolutions, in order, of our ``features.stages.{stage}.{conv}``; its ``classifier.*``
  entries are not needed and are ignored.
* LPIPS v0.1's ``vgg.pth`` (``lpips/weights/v0.1/vgg.pth`` in richzhang/PerceptualSimilarity,
  the same file taming downloads as ``vgg.pth``): ``lin{k}.model.1.weight`` of shape
  (1, C_k, 1, 1), k = 0..4, becomes our ``heads.{k}.weight``.

``"stlpips-vgg"`` -- shift-tolerant LPIPS (Ghildyal & Liu, 2022), whose single file
``stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth`` ships inside the PyPI package
``stlpips-pytorch`` (found with ``importlib.util.find_spec``, without running its code). Its
VGG16 replaces every 2x2 max-pool by a stride-1 2x2 max-pool followed by an anti-aliasing
blur-pool (Zhang, 2019): reflect padding of 2, the [1, 2, 1] x [1, 2, 1] / 16 filter, stride 2.
Its ``net.slice{s}.{i}`` keys (``STLPIPS_CONV_KEYS``) map in order to our convolutions, its
``lin{k}.model.1.weight`` to ``heads.{k}.weight``; its fixed ``scaling_layer.*`` and blur
``filt`` buffers are checked against our constants. Note: ST-LPIPS is a different metric from
the LPIPS the paper trained with; use ``"lpips-vgg"`` to reproduce the paper.

``"none"`` -- no weights: the distance is 0 for every pair (the perceptual term is disabled), and
a warning says so. ``"auto"`` picks ``"lpips-vgg"`` when both of its files are given, else
``"stlpips-vgg"`` when the package's file is installed, else ``"none"``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from sundae.checkpoint import CheckpointError, load_state_dict_strict
from sundae.errors import InputError

logger = logging.getLogger(__name__)

PERCEPTUAL_SOURCES = ("auto", "lpips-vgg", "stlpips-vgg", "none")

# (width, number of 3x3 convolutions) of the VGG16 stages up to each LPIPS tap.
VGG16_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

# LPIPS v0.1 input normalisation: ImageNet statistics expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # LPIPS' normalize_tensor epsilon

TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
STLPIPS_CONV_KEYS = (
    "net.slice1.0", "net.slice1.2", "net.slice2.6", "net.slice2.8", "net.slice3.12", "net.slice3.14",
    "net.slice3.16", "net.slice4.20", "net.slice4.22", "net.slice4.24", "net.slice5.28", "net.slice5.30",
    "net.slice5.32",
)
STLPIPS_BLUR_KEYS = ("net.slice2.5.filt", "net.slice3.11.filt", "net.slice4.19.filt", "net.slice5.27.filt")
STLPIPS_WEIGHTS = Path("weights") / "vST0.0" / "vgg_shift_tolerant.pth"

TORCHVISION_VGG16_FILE = "torchvision's vgg16-397923af.pth (keys features.{i}.weight/bias)"
LPIPS_LIN_FILE = "LPIPS v0.1 vgg.pth (keys lin0.model.1.weight ... lin4.model.1.weight)"
STLPIPS_FILE = "stlpips-pytorch's weights/vST0.0/vgg_shift_tolerant.pth (keys net.slice*, lin*, scaling_layer.*)"


def _per_channel(values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values).view(1, 3, 1, 1)


def _binomial_blur_kernel() -> torch.Tensor:
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = torch.outer(taps, taps)
    return (kernel / kernel.sum())[None, None]  # (1, 1, 3, 3)


class BlurMaxPool(nn.Module):
    """Shift-tolerant 2x downsampling: 2x2 max-pool at stride 1, then blur-pool at stride 2.

    The reflect padding of 2 (ST-LPIPS' ``pad_more``) is wider than the usual 1; it keeps the
    filter's border handling symmetric and makes an H-pixel map H // 2 + 1 pixels wide.
    """

    padding = 2

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", _binomial_blur_kernel(), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        channels = features.shape[1]
        pooled = F.max_pool2d(features, kernel_size=2, stride=1)
        padded = F.pad(pooled, (self.padding,) * 4, mode="reflect")
        return F.conv2d(padded, self.kernel.expand(channels, 1, 3, 3), stride=2, groups=channels)


class VGG16Features(nn.Module):
    """The VGG16 convolution trunk up to relu5_3; returns the five LPIPS taps."""

    def __init__(self, *, shift_tolerant: bool) -> None:
        super().__init__()
        stages = []
        in_channels = 3
        for width, count in VGG16_STAGES:
            convolutions = nn.ModuleList()
            for _ in range(count):
                convolutions.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
                in_channels = width
            stages.append(convolutions)
        self.stages = nn.ModuleList(stages)
        self.downsample = BlurMaxPool() if shift_tolerant else nn.MaxPool2d(kernel_size=2, stride=2)
        # Max-pooling needs 1 pixel left at the last stage; the blur-pool's reflect padding needs 3.
        self.minimum_size = 18 if shift_tolerant else 16

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W), already LPIPS-scaled -> five maps (B, C_k, H_k, W_k)."""
        taps = []
        hidden = images
        for index, convolutions in enumerate(self.stages):
            if index > 0:
                hidden = self.downsample(hidden)
            for convolution in convolutions:
                hidden = F.relu(convolution(hidden))
            taps.append(hidden)
        return taps


def _convolution_names() -> list[str]:
    return [
        f"features.stages.{stage}.{index}" for stage, (_, count) in enumerate(VGG16_STAGES) for index in range(count)
    ]


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    norm = features.pow(2).sum(dim=1, keepdim=True).sqrt()
    return features / (norm + LPIPS_EPS)


def find_stlpips_weights() -> Path | None:
    """Path of the shift-tolerant VGG weights inside an installed ``stlpips-pytorch``, or None.

    ``find_spec`` of a top-level package only locates it; none of the package's code runs.
    """
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / STLPIPS_WEIGHTS
        if candidate.is_file():
            return candidate
    return None


def _read_state_dict(path: str | os.PathLike, *, expected: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; expected {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign, truncated or unsafe files
        raise CheckpointError(
            f"{path} could not be read as a weights-only torch file ({type(error).__name__}: {error}); "
            f"expected {expected}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors; expected {expected}")
    return dict(state)


def _renamed(
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    *,
    path: str | os.PathLike,
    expected: str,
    ignored: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """``{our_name: state[their_name]}``; any missing or unaccounted-for key is an error."""
    missing = [name for name in names if name not in state]
    unexpected = [key for key in state if key not in names and not key.startswith(ignored)]
    if missing or unexpected:
        found = ", ".join(list(state)[:6]) + (" ..." if len(state) > 6 else "")
        raise CheckpointError(
            f"{path} is not {expected}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} (its keys: {found}). "
            f"Check that the files are not swapped."
        )
    return {ours: state[theirs] for theirs, ours in names.items()}


def _check_constant(
    state: Mapping[str, torch.Tensor], key: str, expected: torch.Tensor, *, path: str | os.PathLike
) -> None:
    value = state[key]
    if value.shape != expected.shape or not torch.allclose(value.float(), expected, atol=1e-6):
        raise CheckpointError(
            f"{path}: {key} differs from the constant this implementation assumes "
            f"(expected {expected.flatten()[:9].tolist()}); it is not the published ST-LPIPS VGG file"
        )


def _head_names() -> dict[str, str]:
    return {f"lin{k}.model.1.weight": f"heads.{k}.weight" for k in range(len(VGG16_STAGES))}


def lpips_vgg_state_dict(vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Our state dict from torchvision's ``vgg16-397923af.pth`` and LPIPS v0.1's ``vgg.pth``."""
    vgg = _read_state_dict(vgg_path, expected=TORCHVISION_VGG16_FILE)
    conv_names = {
        f"features.{index}.{parameter}": f"{ours}.{parameter}"
        for index, ours in zip(TORCHVISION_CONV_INDICES, _convolution_names())
        for parameter in ("weight", "bias")
    }
    state = _renamed(vgg, conv_names, path=vgg_path, expected=TORCHVISION_VGG16_FILE, ignored=("classifier.",))
    lin = _read_state_dict(lin_path, expected=LPIPS_LIN_FILE)
    state.update(_renamed(lin, _head_names(), path=lin_path, expected=LPIPS_LIN_FILE))
    return state


def stlpips_vgg_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Our state dict from ST-LPIPS' ``vgg_shift_tolerant.pth``, after checking its fixed buffers."""
    stlpips = _read_state_dict(path, expected=STLPIPS_FILE)
    names = {
        f"{theirs}.{parameter}": f"{ours}.{parameter}"
        for theirs, ours in zip(STLPIPS_CONV_KEYS, _convolution_names())
        for parameter in ("weight", "bias")
    }
    names.update(_head_names())
    constants = {
        "scaling_layer.shift": _per_channel(LPIPS_SHIFT),
        "scaling_layer.scale": _per_channel(LPIPS_SCALE),
    }
    widths = [width for width, _ in VGG16_STAGES[:-1]]  # the blur before stage k+1 filters stage k's width
    constants.update(
        {key: _binomial_blur_kernel().expand(width, 1, 3, 3) for key, width in zip(STLPIPS_BLUR_KEYS, widths)}
    )
    state = _renamed(stlpips, names, path=path, expected=STLPIPS_FILE, ignored=tuple(constants))
    for key, expected in constants.items():
        if key not in stlpips:
            raise CheckpointError(f"{path} lacks {key}; expected {STLPIPS_FILE}")
        _check_constant(stlpips, key, expected, path=path)
    return state


class PerceptualLoss(nn.Module):
    """Frozen LPIPS-style distance between two image batches in [-1, 1], one value per sample.

    Build it with :meth:`from_source`; the constructor takes a state dict already in this
    module's key names, so a network is never left with random weights. ``.source`` names the
    features in use (``"lpips-vgg"``, ``"stlpips-vgg"`` or ``"none"``) for training logs.
    """

    def __init__(self, *, source: str, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if source not in ("lpips-vgg", "stlpips-vgg", "none"):
            raise InputError(
                f"source must be 'lpips-vgg', 'stlpips-vgg' or 'none', got {source!r} (use from_source for 'auto')"
            )
        if (source == "none") != (state_dict is None):
            requirement = "takes no" if source == "none" else "needs a"
            raise InputError(f"source {source!r} {requirement} state_dict; build it with PerceptualLoss.from_source")
        self.source = source
        self.features: VGG16Features | None = None
        self.heads: nn.ModuleList | None = None
        if state_dict is None:
            return
        self.features = VGG16Features(shift_tolerant=source == "stlpips-vgg")
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False) for width, _ in VGG16_STAGES)
        self.register_buffer("shift", _per_channel(LPIPS_SHIFT), persistent=False)
        self.register_buffer("scale", _per_channel(LPIPS_SCALE), persistent=False)
        load_state_dict_strict(self, dict(state_dict), source=f"the {source} weight files")
        if any(bool((head.weight < 0).any()) for head in self.heads):
            raise CheckpointError(
                f"{source}: the lin layer weights must be non-negative (LPIPS clamps them at 0 during training); "
                f"these are not LPIPS lin weights"
            )
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_source(
        cls,
        source: str = "auto",
        *,
        vgg_path: str | os.PathLike | None = None,
        lin_path: str | os.PathLike | None = None,
        stlpips_path: str | os.PathLike | None = None,
    ) -> PerceptualLoss:
        """Build from ``"auto"``, ``"lpips-vgg"`` (``vgg_path`` + ``lin_path``), ``"stlpips-vgg"`` or ``"none"``.

        ``stlpips_path`` overrides the file found inside an installed ``stlpips-pytorch``.
        """
        if source not in PERCEPTUAL_SOURCES:
            raise InputError(f"perceptual source must be one of {PERCEPTUAL_SOURCES}, got {source!r}")
        if (vgg_path is None) != (lin_path is None):
            raise InputError(
                "the 'lpips-vgg' perceptual loss needs both vgg_path (torchvision's vgg16-397923af.pth) "
                "and lin_path (LPIPS v0.1 vgg.pth); only one was given"
            )
        if source == "auto":
            source = cls._available_source(has_lpips_files=vgg_path is not None, stlpips_path=stlpips_path)
            if source == "none":  # Eq. 7 has a perceptual term: never drop it without being asked
                raise InputError(
                    "no perceptual weights found for --perceptual auto: `pip install --no-deps stlpips-pytorch` "
                    "(shift-tolerant LPIPS), or give --perceptual-vgg vgg16-397923af.pth and --perceptual-lin "
                    "vgg.pth (LPIPS), or pass --perceptual none to train without the perceptual term"
                )
        if source == "lpips-vgg":
            if vgg_path is None or lin_path is None:
                raise InputError(
                    "the 'lpips-vgg' perceptual loss needs vgg_path (torchvision's vgg16-397923af.pth) "
                    "and lin_path (LPIPS v0.1 vgg.pth)"
                )
            logger.info("perceptual loss: LPIPS v0.1 on VGG16 (features %s, lin layers %s)", vgg_path, lin_path)
            return cls(source=source, state_dict=lpips_vgg_state_dict(vgg_path, lin_path))
        if source == "stlpips-vgg":
            path = stlpips_path if stlpips_path is not None else find_stlpips_weights()
            if path is None:
                raise InputError(
                    "the 'stlpips-vgg' perceptual loss needs the weights of the PyPI package stlpips-pytorch: "
                    "`pip install --no-deps stlpips-pytorch`, or pass stlpips_path"
                )
            logger.info("perceptual loss: shift-tolerant LPIPS on anti-aliased VGG16 (%s)", path)
            return cls(source=source, state_dict=stlpips_vgg_state_dict(path))
        logger.warning(
            "perceptual loss off (--perceptual none): the tokenizer trains on L1 + adversarial + VQ terms only, "
            "not the full Eq. 7"
        )
        return cls(source="none")

    @staticmethod
    def _available_source(*, has_lpips_files: bool, stlpips_path: str | os.PathLike | None) -> str:
        if has_lpips_files:
            return "lpips-vgg"
        if stlpips_path is not None or find_stlpips_weights() is not None:
            return "stlpips-vgg"
        return "none"

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Two (B, 3, H, W) batches in [-1, 1] -> (B,) distances, 0 for identical pairs.

        Grey batches (B, 1, H, W) are compared as RGB images with three equal channels."""
        if images.shape != reconstructions.shape or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InputError(
                f"perceptual loss expects two grey or RGB batches of equal shape (B, 1 or 3, H, W), "
                f"got {tuple(images.shape)} and {tuple(reconstructions.shape)}"
            )
        images, reconstructions = images.expand(-1, 3, -1, -1), reconstructions.expand(-1, 3, -1, -1)
        if self.features is None or self.heads is None:
            return images.new_zeros(images.shape[0])
        if min(images.shape[-2:]) < self.features.minimum_size:
            raise InputError(
                f"images of size {tuple(images.shape[-2:])} are too small for the {self.source} perceptual "
                f"network: each side must be >= {self.features.minimum_size}"
            )
        both = torch.cat([images, reconstructions])  # one trunk pass for the pair: (2B, 3, H, W)
        taps = self.features((both - self.shift) / self.scale)
        distance = images.new_zeros(images.shape[0])
        for tap, head in zip(taps, self.heads):
            first, second = _unit_normalise(tap).chunk(2)
            distance = distance + reduce(head((first - second).pow(2)), "b 1 h w -> b", "mean")
        return distance


__all__ = [
    "PERCEPTUAL_SOURCES", "PerceptualLoss", "VGG16Features", "BlurMaxPool", "find_stlpips_weights",
    "lpips_vgg_state_dict", "stlpips_vgg_state_dict",
]
