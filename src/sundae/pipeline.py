"""``SundaePipeline``: prior + tokenizer behind one object (diffusers-style), for sampling,
inpainting, outpainting and refinement (paper §3.4, §3.6; talk slides 20-23).

A pipeline directory is the prior's ``config.json`` + ``model.safetensors`` with its tokenizer in
``tokenizer/`` (absent for pixel-token priors, paper §4.2), so one path is all a user needs.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sundae.checkpoint import CheckpointError, read_json
from sundae.config import INPAINT_DEFAULTS
from sundae.denoiser import Hourglass
from sundae.data.images import loose_class_name
from sundae.errors import InputError
from sundae.models import model_directory
from sundae.sampler import SampleOutput, SamplingOptions, sample, seeds_from_generator, uniform_noise
from sundae.runtime import autocast, cast_decoder, cast_linear_weights, resolve_device, resolve_precision
from sundae.tokenizer.pixels import PixelTokenizer
from sundae.tokenizer.vqgan import decode_in_tiles

ImageInput = Image.Image | Tensor | np.ndarray | str | os.PathLike
TOKENIZER_SUBDIR = "tokenizer"



@dataclass
class PipelineOutput:
    # "pil": PIL images; "pt": a (B, C, H, W) tensor in [-1, 1]; "np": a (B, H, W, C) float32 array in
    # [0, 1] (diffusers' convention); "latent": None (nothing is decoded; the tokens are the result)
    images: list[Image.Image] | Tensor | np.ndarray | None
    tokens: Tensor  # (B, h, w)
    steps_taken: Tensor  # (B,)
    trajectory: list[Tensor] | None = None


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither)."""
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return torch.device("cpu") if tensor is None else tensor.device


def cast_copy(module: nn.Module, cast: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``cast`` (an in-place conversion such as :func:`~sundae.runtime.cast_linear_weights`) applied
    to a copy of ``module``, which is left exactly as it was.

    The copy's parameters are new ``Parameter`` objects on the same storage (for inference: they need
    no gradient) and its buffers are the same tensors, so whatever ``cast`` leaves alone is shared
    rather than duplicated, while what it converts (``Module.to`` rebinds a parameter's data and
    replaces a buffer) changes in the copy only.
    """
    shared: dict[int, Any] = {id(buffer): buffer for buffer in module.buffers()}
    shared.update({id(parameter): nn.Parameter(parameter.detach(), requires_grad=False)
                   for parameter in module.parameters()})
    return cast(copy.deepcopy(module, shared))


def load_tokenizer(directory: Path | None, device: torch.device | str = "cpu") -> nn.Module:
    """The VQ-GAN saved in ``directory``, or the pixel tokenizer when there is none."""
    if directory is None:
        return PixelTokenizer().to(device)
    from sundae.tokenizer import VQGAN

    return VQGAN.from_pretrained(directory, map_location=device).eval()


def load_decoder_for(dataset, device: torch.device | str) -> nn.Module:
    """The tokenizer that made a token dataset (its ``tokenizer`` identity), for decoding samples."""
    identity = getattr(dataset, "tokenizer", None)
    if not identity:
        return PixelTokenizer().to(device)
    return load_tokenizer(Path(identity["path"]), device)


@torch.inference_mode()
def decode_tokens_to_images(tokens: Tensor, tokenizer: nn.Module, batch_size: int = 32,
                            tiles: int | None = None) -> Tensor:
    """Decode (B, h, w) tokens into images (B, C, H, W) in [-1, 1], in chunks (and optionally
    ``tiles × tiles`` tiles, :func:`~sundae.tokenizer.vqgan.decode_in_tiles`) to bound memory."""
    device = module_device(tokenizer)
    chunks = [decode_in_tiles(tokenizer, chunk.to(device), tiles=tiles).float().clamp(-1, 1).cpu()
              for chunk in tokens.split(batch_size)]
    return torch.cat(chunks)


OUTPUT_TYPES = ("pil", "pt", "np", "latent")


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def format_images(images: Tensor, output_type: str) -> list[Image.Image] | Tensor | np.ndarray:
    """Decoded images (B, C, H, W) in [-1, 1] as ``output_type`` (see :class:`PipelineOutput`)."""
    if output_type == "pil":
        return to_pil(images)
    if output_type == "np":
        return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return images


def to_pil(images: Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


def model_data_section(directory: Path) -> dict[str, Any]:
    """The ``data`` entry of a model's config.json (what it was trained on), checked by type."""
    data = read_json(directory / "config.json").get("data", {})
    where = f"{directory / 'config.json'}: \"data\""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be an object, got {type(data).__name__}")
    names = data.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise CheckpointError(f"{where}.class_names must be a list of strings or null")
    size = data.get("codebook_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise CheckpointError(f"{where}.codebook_size must be an integer, got {size!r}")
    return data


def open_image_file(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode an image file; a missing, empty or non-image file is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{what} file {path} is not a readable image ({type(error).__name__}: {error})") from None


def image_to_tensor(image: ImageInput, channels: int) -> Tensor:
    """Any image input -> (1, channels, H, W) float in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image, "image")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        array = array[..., None] if array.ndim == 2 else array
        tensor = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    else:
        tensor = image.float()
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[1] != channels:
        tensor = tensor.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else tensor
    return tensor.contiguous()


def mask_to_tensor(mask: ImageInput, size: tuple[int, int]) -> Tensor:
    """A pixel mask (True/white = regenerate) -> (H, W) bool; its size must equal the image's."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image_file(mask, "mask")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L")) >= 128
    mask = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).bool()
    if mask.dim() == 3:
        mask = mask.any(dim=0)
    if tuple(mask.shape) != tuple(size):
        raise InputError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is {size[1]}x{size[0]}; "
                         "give a mask of the same size as the image")
    return mask


def box_mask(size: tuple[int, int], box: Sequence[int]) -> Tensor:
    """A (H, W) mask that is True inside the pixel box (x0, y0, x1, y1), end-exclusive."""
    height, width = size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InputError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def token_mask_from_pixels(pixel_mask: Tensor, factor: int, rule: str = "any") -> Tensor:
    """Pixel mask (H, W) -> token mask (H/f, W/f).

    ``"any"`` (default): a token is regenerated when any pixel of its f×f patch is masked, so every
    masked pixel is regenerated. ``"all"``: only when all its pixels are (the paper's logical AND,
    §3.6), so no unmasked pixel changes but masked pixels at the border may stay.
    """
    if rule not in ("any", "all"):
        raise InputError(f"mask rule must be 'any' or 'all', got {rule!r}")
    height, width = pixel_mask.shape
    if height % factor or width % factor:
        raise InputError(f"mask size {width}x{height} is not a multiple of the tokenizer factor {factor}")
    patches = pixel_mask.reshape(height // factor, factor, width // factor, factor)
    return patches.any(dim=(1, 3)) if rule == "any" else patches.all(dim=(1, 3))


class SundaePipeline:
    """Sampling, inpainting, outpainting and refinement with a prior and its tokenizer.

    How it runs (:mod:`sundae.runtime`): ``precision`` "auto" is bf16 on CUDA (the prior under
    autocast with bf16 Linear weights, the decoder with bf16 weights, channels-last) and fp32
    elsewhere; ``compile`` compiles the whole sampling step, replayed as a CUDA graph on CUDA (same
    tokens; the first call pays the compilation, about a minute, and once more when finished
    samples first shrink the batch); ``decode_tiles`` decodes in n × n tiles when memory is short
    (approximate at the seams).

    Precision never touches the weights given: ``master_prior`` and ``master_tokenizer`` are the
    modules passed in, left as they were, and are what :meth:`save_pretrained` writes; ``prior`` and
    ``tokenizer`` are the copies that run, cast once at construction (:func:`cast_copy`: they share
    every tensor the cast leaves alone, so fp32 costs no memory and bf16 adds only the bf16 weights).
    They are made once: after changing the masters' weights, build a new pipeline.
    """

    def __init__(self, prior: Hourglass, tokenizer: nn.Module, *, class_names: list[str] | None = None,
                 name: str = "sundae", precision: str = "auto", compile: bool = False,
                 decode_tiles: int | None = None) -> None:
        self.master_prior, self.master_tokenizer = prior, tokenizer
        self.class_names = class_names
        self.name = name
        device = module_device(prior)
        self.dtype = resolve_precision(precision, device)
        self.prior = cast_copy(prior, partial(cast_linear_weights, dtype=self.dtype)).eval()
        self.tokenizer = cast_copy(tokenizer, partial(cast_decoder, dtype=self.dtype,
                                                      channels_last=device.type == "cuda")).eval()
        self.compile_mode = ("reduce-overhead" if self.device.type == "cuda" else "default") if compile else None
        height, width = prior.config.latent_shape
        if decode_tiles is not None and not 1 <= decode_tiles <= min(height, width):
            raise InputError(f"decode_tiles must be between 1 and {min(height, width)} for this model's "
                             f"{height}x{width} token grid, got {decode_tiles}")
        self.decode_tiles = decode_tiles

    # --- persistence ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        **runtime: Any) -> "SundaePipeline":
        """Load a pipeline directory, or a shipped model by name (:mod:`sundae.models`); ``runtime``:
        ``precision``, ``compile``, ``decode_tiles`` (see the class)."""
        directory = model_directory(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} is not a sundae model directory (no config.json)")
        device = resolve_device(device)
        prior = Hourglass.from_pretrained(directory, map_location=device)
        tokenizer_dir = directory / TOKENIZER_SUBDIR
        tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir.is_dir() else None, device)
        data = model_data_section(directory)
        if data.get("codebook_size", prior.config.codebook_size) != tokenizer.config.codebook_size:
            raise CheckpointError(f"{directory}: the prior's codebook ({prior.config.codebook_size}) does not match "
                                  f"its tokenizer's ({tokenizer.config.codebook_size})")
        return cls(prior, tokenizer, class_names=data.get("class_names"), name=directory.name, **runtime)

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the master weights (as given, whatever the precision the pipeline runs in)."""
        directory = Path(directory)
        payload = {"data": {"codebook_size": self.prior.config.codebook_size, "class_names": self.class_names,
                            "grid_shape": list(self.prior.config.latent_shape)}}
        self.master_prior.save_pretrained(directory, extra={**payload, **(extra or {})})
        if not isinstance(self.master_tokenizer, PixelTokenizer):
            target = directory / TOKENIZER_SUBDIR
            if target.exists():
                shutil.rmtree(target)
            self.master_tokenizer.save_pretrained(target)
        return directory

    # --- facts --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return module_device(self.prior)

    @property
    def factor(self) -> int:
        return self.tokenizer.config.downsample_factor

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.prior.config.latent_shape
        return h * self.factor, w * self.factor

    @property
    def channels(self) -> int:
        return self.tokenizer.config.out_channels

    def class_index(self, label: int | str) -> int:
        """A class given by index or by name -> its index, with a clear error for unknown classes."""
        num_classes = self.prior.config.num_classes
        if num_classes is None:
            raise InputError("this model is unconditional: it takes no class")
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            names = self.class_names or []
            if label in names:
                return names.index(label)
            loose = [loose_class_name(name) for name in names]  # "Trouser" finds "1_trouser" or "trouser"
            if loose_class_name(label) not in loose:
                raise InputError(f"unknown class {label!r}; known classes: {', '.join(names)}")
            return loose.index(loose_class_name(label))
        index = int(label)
        if not 0 <= index < num_classes:
            raise InputError(f"class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return index

    # --- sampling -----------------------------------------------------------------------------

    def _seeds(self, count: int, seed: int | None, generator: torch.Generator | None) -> Tensor:
        if seed is not None:
            return torch.arange(count, dtype=torch.int64) + seed
        return seeds_from_generator(count, generator)

    def _labels(self, class_labels: Sequence[int | str] | int | str | None, count: int) -> Tensor | None:
        if class_labels is None:
            return None
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * count
        if len(class_labels) != count:
            raise InputError(f"got {len(class_labels)} class labels for {count} images")
        return torch.tensor([self.class_index(label) for label in class_labels], dtype=torch.long)

    def _sample(self, options: SamplingOptions, **inputs: Any) -> SampleOutput:
        """The sampler, in this pipeline's precision and compile mode."""
        with autocast(self.device, self.dtype):
            return sample(self.prior, options=options, compile_mode=self.compile_mode, **inputs)

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, h, w) -> images (B, C, H, W) in [-1, 1] on the CPU, tiled as configured."""
        return decode_tokens_to_images(tokens, self.tokenizer, tiles=self.decode_tiles)

    def _finish(self, output: SampleOutput, output_type: str,
                paste: Callable[[Tensor], Tensor] | None = None) -> PipelineOutput:
        """Decode (unless ``output_type`` is "latent"), apply ``paste`` to the decoded images, and format."""
        images = None
        if output_type != "latent":
            images = self.decode(output.tokens)
            images = format_images(images if paste is None else paste(images), output_type)
        return PipelineOutput(images=images, tokens=output.tokens.cpu(), steps_taken=output.steps_taken.cpu(),
                              trajectory=output.trajectory)

    def __call__(self, num_images: int = 1, *, class_labels: Sequence[int | str] | int | str | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 grid_shape: tuple[int, int] | None = None, output_type: str = "pil",
                 callback: Callable | None = None, return_trajectory: bool = False, **options: Any) -> PipelineOutput:
        """Generate ``num_images`` images; ``options`` are :class:`SamplingOptions` fields.

        ``seed`` gives image ``i`` the seed ``seed + i`` (same image whatever the batch size);
        otherwise seeds come from ``generator``.
        """
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        check_output_type(output_type)
        output = self._sample(SamplingOptions(**options), num_samples=num_images,
                              grid_shape=grid_shape or tuple(self.prior.config.latent_shape),
                              class_labels=self._labels(class_labels, num_images),
                              seeds=self._seeds(num_images, seed, generator), callback=callback,
                              return_trajectory=return_trajectory)
        return self._finish(output, output_type)

    @torch.inference_mode()
    def encode(self, image: ImageInput) -> tuple[Tensor, Tensor]:
        """Image -> (pixels (1, C, H, W) in [-1, 1], tokens (1, h, w)); sides must be multiples of f."""
        pixels = image_to_tensor(image, self.channels)
        height, width = pixels.shape[-2:]
        if height % self.factor or width % self.factor:
            raise InputError(f"the image is {width}x{height} pixels; both sides must be multiples of the "
                             f"tokenizer factor f={self.factor}")
        return pixels, self.tokenizer.encode(pixels.to(self.device)).cpu()

    def _masked_sampling(self, tokens: Tensor, token_mask: Tensor, randomize: Tensor, seeds: Tensor, *,
                         class_labels, output_type: str, pixels: Tensor, pixel_mask: Tensor, paste_back: bool,
                         options: dict[str, Any], callback: Callable | None = None) -> PipelineOutput:
        """Sample with ``token_mask`` free and everything else pinned; optionally paste known pixels back."""
        check_output_type(output_type)
        num_images = seeds.shape[0]
        tokens = tokens.expand(num_images, -1, -1)
        output = self._sample(SamplingOptions(**{**INPAINT_DEFAULTS, **options}), tokens=tokens,
                              randomize_mask=randomize.expand_as(tokens), keep_mask=~token_mask.expand_as(tokens),
                              class_labels=self._labels(class_labels, num_images), seeds=seeds, callback=callback)
        def paste(images: Tensor) -> Tensor:
            return torch.where(pixel_mask.to(images.device), images, pixels.to(images.device).expand_as(images))

        return self._finish(output, output_type, paste if paste_back else None)

    def _prepare_mask(self, image: ImageInput, mask: ImageInput, rule: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pixels, tokens = self.encode(image)
        pixel_mask = mask_to_tensor(mask, tuple(pixels.shape[-2:]))
        return pixels, tokens, pixel_mask, token_mask_from_pixels(pixel_mask, self.factor, rule)

    def inpaint(self, image: ImageInput, mask: ImageInput, *, num_images: int = 1, mask_rule: str = "any",
                paste_back: bool = True, class_labels=None, seed: int | None = None,
                generator: torch.Generator | None = None, output_type: str = "pil", callback: Callable | None = None,
                **options: Any) -> PipelineOutput:
        """Regenerate the masked region (True/white = regenerate) from noise; the rest is kept (§3.6)."""
        pixels, tokens, pixel_mask, token_mask = self._prepare_mask(image, mask, mask_rule)
        return self._masked_sampling(tokens, token_mask, token_mask, self._seeds(num_images, seed, generator),
                                     class_labels=class_labels, output_type=output_type, pixels=pixels,
                                     pixel_mask=pixel_mask, paste_back=paste_back, options=options, callback=callback)

    def refine(self, image: ImageInput, mask: ImageInput, *, strength: float = 0.5, num_images: int = 1,
               mask_rule: str = "any", paste_back: bool = True, class_labels=None, seed: int | None = None,
               generator: torch.Generator | None = None, output_type: str = "pil", callback: Callable | None = None,
                **options: Any) -> PipelineOutput:
        """Re-sample a masked region starting from its current tokens (slide 22, "fixing a broken eye").

        ``strength`` in [0, 1] is the share of the masked tokens reset to noise before sampling
        (0: start exactly from the current tokens; 1: the same as inpainting).
        """
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"strength must be in [0, 1], got {strength}")
        pixels, tokens, pixel_mask, token_mask = self._prepare_mask(image, mask, mask_rule)
        seeds = self._seeds(num_images, seed, generator)
        reset = (uniform_noise(seeds, -2, 0, tuple(token_mask.shape)) < strength) & token_mask
        return self._masked_sampling(tokens, token_mask, reset, seeds, class_labels=class_labels,
                                     output_type=output_type, pixels=pixels, pixel_mask=pixel_mask,
                                     paste_back=paste_back, options=options, callback=callback)

    def outpaint(self, image: ImageInput, *, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                 num_images: int = 1, class_labels=None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", callback: Callable | None = None,
                **options: Any) -> PipelineOutput:
        """Extend the canvas by the given number of pixels on each side (multiples of f) and fill it."""
        pixels, known_tokens = self.encode(image)
        for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
            if value < 0 or value % self.factor:
                raise InputError(f"{name}={value}: extensions must be >= 0 and multiples of the tokenizer factor "
                                 f"f={self.factor}")
        if left == top == right == bottom == 0:
            raise InputError("outpainting needs at least one of left/top/right/bottom > 0")
        canvas = F.pad(pixels, (left, right, top, bottom), value=0.0)
        pixel_mask = torch.ones(canvas.shape[-2:], dtype=torch.bool)
        pixel_mask[top:top + pixels.shape[-2], left:left + pixels.shape[-1]] = False
        token_mask = token_mask_from_pixels(pixel_mask, self.factor, "any")
        # the known region keeps the tokens of the original image, not of the padded canvas
        tokens = torch.zeros(1, *token_mask.shape, dtype=torch.long)
        row, column = top // self.factor, left // self.factor
        tokens[:, row:row + known_tokens.shape[1], column:column + known_tokens.shape[2]] = known_tokens
        return self._masked_sampling(tokens, token_mask, token_mask, self._seeds(num_images, seed, generator),
                                     class_labels=class_labels, output_type=output_type, pixels=canvas,
                                     pixel_mask=pixel_mask, paste_back=True, options=options, callback=callback)
