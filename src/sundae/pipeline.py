"""``SundaePipeline``: prior + tokenizer behind one object (diffusers-style), for sampling,
inpainting, outpainting and refinement (paper §3.4, §3.6; talk slides 20-23).

A model directory describes itself (diffusers' layout), so one path is all a user needs::

    model_index.json     format + version, kind ("sundae-pipeline"), components and their classes,
                         the sundae version that wrote it (and optionally a "name", which the web app shows)
    prior/               config.json (with its "data": class names, codebook, grid) + model.safetensors
    tokenizer/           config.json + model.safetensors of the VQ-GAN (absent for pixel tokens, §4.2:
                         the index names PixelTokenizer, which has no weights)
    scheduler/           config.json: the SamplingOptions chosen for this model, every field

:meth:`SundaePipeline.from_pretrained` keeps the scheduler as ``sampling_defaults``: every sampling
call starts from them (inpaint, refine and outpaint with ``INPAINT_DEFAULTS``' low temperature on
top) and explicit arguments override them. The earlier layout (the prior's files at the top) is
refused with the command that converts it, :func:`convert_model_directory`.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

import sundae
from sundae.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_json, replace_directory_atomically,
                               staging_directory, write_json_atomic)
from sundae.config import INPAINT_DEFAULTS, ConfigError, KnobOptions, short_repr
from sundae.denoiser import Hourglass
from sundae.data.images import loose_class_name
from sundae.data.latents import tokenizer_identity
from sundae.errors import InputError
from sundae.models import model_directory
from sundae.sampler import (SampleOutput, SamplingOptions, StepCallback, bits_below, random_bits, sample,
                            seeds_from_generator)
from sundae.runtime import autocast, cast_decoder, cast_linear_weights, resolve_device, resolve_precision
from sundae.tokenizer.pixels import PixelTokenizer
from sundae.tokenizer.vqgan import decode_in_tiles

ImageInput = Image.Image | Tensor | np.ndarray | str | os.PathLike
ImageInputs = ImageInput | list[ImageInput] | tuple[ImageInput, ...]  # a list or tuple is a batch
ClassLabels = Sequence[int | str] | int | str | None  # one per result, or one for all; names or indices
Seeds = Sequence[int] | Tensor
MODEL_INDEX_NAME = "model_index.json"
MODEL_FORMAT, MODEL_FORMAT_VERSION, PIPELINE_KIND = "sundae-model", 1, "sundae-pipeline"
VAR_PIPELINE_KIND = "var-pipeline"  # VAR's next-scale prior and multi-scale tokenizer (sundae.var.pipeline)
PRIOR_SUBDIR, TOKENIZER_SUBDIR, SCHEDULER_SUBDIR = "prior", "tokenizer", "scheduler"
COMPONENT_CLASSES = {"prior": ("Hourglass",), "tokenizer": ("VQGAN", "PixelTokenizer"),
                     "scheduler": ("SamplingOptions",)}
KIND_COMPONENTS = {PIPELINE_KIND: COMPONENT_CLASSES,
                   VAR_PIPELINE_KIND: {"prior": ("NextScaleTransformer",), "tokenizer": ("MultiScaleVQGAN",),
                                       "scheduler": ("NextScaleOptions",)}}


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
    from sundae.var.tokenizer import load_vqgan

    return load_vqgan(directory, map_location=device)


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
    """The ``data`` entry of a prior's config.json (what it was trained on), checked by type."""
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


# --- the model directory (module docstring) -----------------------------------------------------


def read_model_index(directory: Path) -> dict[str, Any]:
    """The checked ``model_index.json`` of a model directory; a directory in the old layout (the
    prior's config.json at the top) is refused in one line naming the command that converts it."""
    path = directory / MODEL_INDEX_NAME
    if not path.is_file():
        if (directory / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory} is a model directory in the old layout (the prior's config.json at "
                                  f"the top, no {MODEL_INDEX_NAME}); convert it with `sundae convert-model "
                                  f"{directory} NEW_DIR`")
        raise CheckpointError(f"{directory} is not a sundae model directory (no {MODEL_INDEX_NAME})")
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != MODEL_FORMAT or index.get("kind") not in KIND_COMPONENTS:
        raise CheckpointError(f"{path} is not the index of a sundae model (it needs \"format\": {MODEL_FORMAT!r} and "
                              f"\"kind\": {' or '.join(map(repr, KIND_COMPONENTS))})")
    if index.get("format_version") != MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {short_repr(index.get('format_version'))}; sundae "
                              f"{sundae.__version__} reads version {MODEL_FORMAT_VERSION} (a newer sundae wrote it?)")
    components, expected_classes = index.get("components"), KIND_COMPONENTS[index["kind"]]
    if not isinstance(components, dict) or set(components) != set(expected_classes) or any(
            components[name] not in classes for name, classes in expected_classes.items()):
        expected = "; ".join(f"{name}: {' or '.join(classes)}" for name, classes in expected_classes.items())
        raise CheckpointError(f"{path}: \"components\" must be {{{expected}}}, got {short_repr(components, 200)}")
    return index


def read_scheduler(path: str | os.PathLike, options_class: type[KnobOptions] = SamplingOptions) -> KnobOptions:
    """The options of a scheduler ``config.json`` (``{"class": "SamplingOptions", "config": {...}}``, or
    another ``options_class``; fields it leaves out take the library defaults), every field type- and
    range-checked."""
    payload = read_json(path)
    name = options_class.__name__
    if not isinstance(payload, dict) or payload.get("class") != name or not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"{path} must hold {{\"class\": \"{name}\", \"config\": {{...}}}}")
    try:
        return options_class.from_dict(payload["config"])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}", field=error.field) from None


def _write_component(component: nn.Module | Path, target: Path, extra: dict[str, Any] | None = None,
                     weights_dtype: torch.dtype | None = None) -> str | None:
    """Save a module into ``target``, or copy a component folder's config.json and model.safetensors
    unchanged (bit for bit); returns the component's class name (None if its config.json has none:
    :func:`read_model_index` then refuses the directory)."""
    if isinstance(component, nn.Module):
        component.save_pretrained(target, extra=extra, weights_dtype=weights_dtype)
        return type(component).__name__
    target.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(component / name, target / name)
    payload = read_json(target / CONFIG_NAME)
    return payload.get("class") if isinstance(payload, dict) else None


def with_tokenizer_record(prior_extra: dict[str, Any] | None, written: Path, final: Path) -> dict[str, Any] | None:
    """``prior_extra`` whose ``data`` section (when it has one) says which tokenizer's codes the prior models:
    the record it has (a training run's: the tokenizer its latents were encoded with), else that of the
    tokenizer saved beside it (``written``, to live at ``final``). Without it, ``--init-from`` the saved
    model refuses latents encoded by the model's own tokenizer."""
    data = (prior_extra or {}).get("data")
    if not isinstance(data, dict) or "tokenizer" in data:
        return prior_extra
    return {**prior_extra, "data": {**data, "tokenizer": {**tokenizer_identity(written), "path": str(final.resolve())}}}


def write_model_directory(directory: str | os.PathLike, *, prior: nn.Module | Path, tokenizer: nn.Module | Path | None,
                          scheduler: KnobOptions, prior_extra: dict[str, Any] | None = None,
                          weights_dtype: torch.dtype | None = None, kind: str = PIPELINE_KIND) -> Path:
    """Write a model directory (module docstring) into ``<directory>.staging`` and swap it in whole, so an
    interrupted save leaves the previous one intact.

    ``prior`` and ``tokenizer`` are modules to save or component folders to copy unchanged; a tokenizer
    that is None or a :class:`PixelTokenizer` gets no folder. ``prior_extra`` goes into a saved prior's
    config.json, its ``data`` section completed by :func:`with_tokenizer_record`; ``weights_dtype`` (e.g. ``torch.float16``) stores saved modules' floating-point
    weights in that precision; ``kind`` says which paradigm it is (:data:`KIND_COMPONENTS`). Saving replaces the
    whole folder, so an existing ``directory`` must be
    empty or a model directory (it holds a model_index.json or, in the old layout, a config.json).
    """
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and \
            not any((directory / name).is_file() for name in (MODEL_INDEX_NAME, CONFIG_NAME)):
        raise CheckpointError(f"{directory} holds other files and no model; save into a new or empty folder "
                              "(saving replaces the whole folder)")
    staging = staging_directory(directory)
    tokenizer_class = PixelTokenizer.__name__
    if tokenizer is not None and not isinstance(tokenizer, PixelTokenizer):
        tokenizer_class = _write_component(tokenizer, staging / TOKENIZER_SUBDIR, None, weights_dtype)
        prior_extra = with_tokenizer_record(prior_extra, staging / TOKENIZER_SUBDIR, directory / TOKENIZER_SUBDIR)
    components = {"prior": _write_component(prior, staging / PRIOR_SUBDIR, prior_extra, weights_dtype),
                  "tokenizer": tokenizer_class, "scheduler": type(scheduler).__name__}
    write_json_atomic(staging / SCHEDULER_SUBDIR / CONFIG_NAME,
                      {"class": type(scheduler).__name__, "config": scheduler.to_dict()})
    write_json_atomic(staging / MODEL_INDEX_NAME, {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                                                   "kind": kind, "library_version": sundae.__version__,
                                                   "components": components})
    replace_directory_atomically(staging, directory)
    return directory


def load_components(prior_dir: Path, tokenizer_dir: Path | None,
                    device: torch.device | str) -> tuple[Hourglass, nn.Module, dict[str, Any]]:
    """The prior, its tokenizer (pixel tokens when ``tokenizer_dir`` is None) and the prior's ``data``
    section, checked to agree on the codebook."""
    prior = Hourglass.from_pretrained(prior_dir, map_location=device)
    tokenizer = load_tokenizer(tokenizer_dir, device)
    data = model_data_section(prior_dir)
    if data.get("codebook_size", prior.config.codebook_size) != tokenizer.config.codebook_size:
        raise CheckpointError(f"{prior_dir}: the prior's codebook ({prior.config.codebook_size}) does not match "
                              f"its tokenizer's ({tokenizer.config.codebook_size})")
    return prior, tokenizer, data


def convert_model_directory(old: str | os.PathLike, new: str | os.PathLike,
                            scheduler: SamplingOptions | None = None) -> Path:
    """Write the old-layout model in ``old`` (the prior's config.json + model.safetensors at the top,
    its tokenizer in ``tokenizer/``) to ``new`` in the current layout, with ``scheduler`` (default:
    :class:`SamplingOptions`' defaults) as its sampling defaults.

    ``old`` is loaded first (every config, weight and content hash checked), its files are then
    copied unchanged, and it is never modified; ``new`` must not exist or be empty.
    """
    old, new = Path(old), Path(new)
    if (old / MODEL_INDEX_NAME).is_file():
        raise CheckpointError(f"{old} is already in the current layout (it has a {MODEL_INDEX_NAME})")
    if not (old / CONFIG_NAME).is_file():
        raise CheckpointError(f"{old} is not an old-layout sundae model directory (no {CONFIG_NAME})")
    if new.exists() and (not new.is_dir() or any(new.iterdir())):
        raise CheckpointError(f"{new} already exists and is not empty; give a new folder")
    if new.resolve() == old.resolve() or old.resolve() in new.resolve().parents:
        raise CheckpointError(f"{new} is inside {old}; write the converted model somewhere else")
    tokenizer_dir = old / TOKENIZER_SUBDIR if (old / TOKENIZER_SUBDIR).is_dir() else None
    load_components(old, tokenizer_dir, "cpu")  # a broken model fails here, before anything is written
    return write_model_directory(new, prior=old, tokenizer=tokenizer_dir, scheduler=scheduler or SamplingOptions())


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


def as_batch(items: ImageInputs) -> list[ImageInput]:
    """A list or tuple of images or masks as a list; any other input as a batch of one."""
    return list(items) if isinstance(items, (list, tuple)) else [items]


def repeat_to(batch: Tensor, count: int) -> Tensor:
    """A batch of one repeated ``count`` times; a batch of ``count`` as it is."""
    return batch.expand(count, *batch.shape[1:]) if len(batch) == 1 else batch


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
    :meth:`to` makes them afresh from the masters on another device (the masters stay where they
    are); after changing the masters' weights, call it again or build a new pipeline.

    ``sampling_defaults`` are the options every sampling call starts from (:meth:`sampling_options`;
    default: :class:`SamplingOptions`' own); a model directory keeps them in ``scheduler/``.
    """

    kind = PIPELINE_KIND
    options_class: type[KnobOptions] = SamplingOptions
    edit_defaults: dict[str, Any] = INPAINT_DEFAULTS  # what inpaint, refine and outpaint change of the defaults

    def __init__(self, prior: nn.Module, tokenizer: nn.Module, *, class_names: list[str] | None = None,
                 name: str = "sundae", sampling_defaults: KnobOptions | None = None, precision: str = "auto",
                 compile: bool = False, decode_tiles: int | None = None) -> None:
        self.master_prior, self.master_tokenizer = prior, tokenizer
        self.class_names = class_names
        self.sampling_defaults = sampling_defaults or self.options_class()
        self.name = name
        self.precision, self.compile = precision, compile
        self._progress_bar_config: dict[str, Any] = {}
        self.to(module_device(prior))
        height, width = prior.config.latent_shape
        if decode_tiles is not None and not 1 <= decode_tiles <= min(height, width):
            raise InputError(f"decode_tiles must be between 1 and {min(height, width)} for this model's "
                             f"{height}x{width} token grid, got {decode_tiles}")
        self.decode_tiles = decode_tiles

    # --- persistence ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        **runtime: Any) -> "SundaePipeline":
        """Load a model directory (module docstring), or a shipped model by name (:mod:`sundae.models`),
        with its scheduler as ``sampling_defaults``; ``runtime``: ``precision``, ``compile``,
        ``decode_tiles`` (see the class)."""
        directory = model_directory(directory)
        index = read_model_index(directory)
        if index["kind"] != cls.kind:
            raise CheckpointError(f"{directory} is a {index['kind']} model, not a {cls.kind} one; load it with "
                                  "sundae.pipelines.load_pipeline, which reads either")
        tokenizer_dir = directory / TOKENIZER_SUBDIR if index["components"]["tokenizer"] == "VQGAN" else None
        prior, tokenizer, data = load_components(directory / PRIOR_SUBDIR, tokenizer_dir, resolve_device(device))
        return cls(prior, tokenizer, class_names=data.get("class_names"), name=directory.name,
                   sampling_defaults=read_scheduler(directory / SCHEDULER_SUBDIR / CONFIG_NAME), **runtime)

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None, *,
                        weights_dtype: torch.dtype | None = None) -> Path:
        """Write the model directory (:func:`write_model_directory`: staged and swapped in whole): the
        master weights (as given, whatever the precision the pipeline runs in; stored in ``weights_dtype``
        when given, e.g. ``torch.float16`` to ship at half the size) and ``sampling_defaults`` as its
        scheduler; ``extra`` entries go into the prior's config.json."""
        payload = {"data": {"codebook_size": self.prior.config.codebook_size, "class_names": self.class_names,
                            "grid_shape": list(self.prior.config.latent_shape)}}
        return write_model_directory(directory, prior=self.master_prior, tokenizer=self.master_tokenizer,
                                     scheduler=self.sampling_defaults, prior_extra={**payload, **(extra or {})},
                                     weights_dtype=weights_dtype, kind=self.kind)

    def sampling_options(self, options: SamplingOptions | Mapping[str, Any] | None = None, *, edit: bool = False,
                         has_class: bool = True, **overrides: Any) -> SamplingOptions:
        """The options a sampling call uses: ``options`` when it is a :class:`SamplingOptions`, else this
        model's ``sampling_defaults`` with, for ``edit`` (inpaint, refine, outpaint), the low temperature of
        :data:`~sundae.config.INPAINT_DEFAULTS` on top; then the fields given in a mapping ``options`` and
        in ``overrides`` replace theirs (an unknown field name is a :class:`~sundae.config.ConfigError`).

        Guidance needs a class, so for a call without one (``has_class`` False) the model's default
        guidance does not apply; guidance asked for explicitly still does (and the sampler refuses it)."""
        if isinstance(options, KnobOptions):
            base, options = options, None
        else:
            base = self.sampling_defaults.replace(**self.edit_defaults) if edit and self.edit_defaults \
                else self.sampling_defaults
            if not has_class:
                base = base.replace(guidance_scale=1.0)
        changes = {**(options or {}), **overrides}
        foreign = sorted(set(changes) - set(self.options_class.knobs()))
        if foreign:
            raise InputError(f"{', '.join(foreign)}: unknown field(s), not options of this {self.kind} model; it "
                             f"takes {', '.join(self.options_class.knobs())}")
        return base.replace(**changes) if changes else base

    def forward_passes(self, options: KnobOptions) -> int:
        """Prior forward passes per image at most: SUNDAE's steps (VAR: its scales)."""
        return options.steps

    # --- facts --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return module_device(self.prior)

    def to(self, device: str | torch.device) -> "SundaePipeline":
        """Run on ``device`` from now on: the running copies are made again from the masters there, in
        the dtype ``precision`` gives on that device (and compiled for it, with ``compile``). The
        master modules are not moved or changed, so :meth:`save_pretrained` writes what was loaded."""
        device = resolve_device(device)
        self.dtype = resolve_precision(self.precision, device)
        self.prior = cast_copy(self.master_prior,
                               lambda prior: cast_linear_weights(prior.to(device), self.dtype)).eval()
        self.tokenizer = cast_copy(self.master_tokenizer, lambda tokenizer: cast_decoder(
            tokenizer.to(device), self.dtype, channels_last=device.type == "cuda")).eval()
        self.compile_mode = ("reduce-overhead" if device.type == "cuda" else "default") if self.compile else None
        return self

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

    def set_progress_bar_config(self, **config: Any) -> None:
        """Keyword arguments for the tqdm progress bar of every sampling call (diffusers' method):
        ``disable=True`` turns it off; by default (``disable=None``) it shows on a terminal only."""
        self._progress_bar_config = config

    @staticmethod
    def _count(num_images: int | None, seeds: Seeds | None, inputs: int = 1) -> int:
        """How many results a call makes: ``num_images`` per input; by default one, or as many as ``seeds``."""
        if num_images is None:
            num_images = 1 if seeds is None else max(len(seeds) // inputs, 1)
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        return num_images * inputs

    @staticmethod
    def _seeds(count: int, seed: int | None, seeds: Seeds | None, generator: torch.Generator | None) -> Tensor:
        """One seed per result: ``seeds`` as given, else ``seed + i``, else drawn from ``generator``."""
        if seeds is None:
            return seeds_from_generator(count, generator) if seed is None else torch.arange(count) + seed
        if seed is not None:
            raise InputError("give seed or seeds, not both")
        values = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        if any(isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < 2**63
               for value in values):
            raise InputError(f"seeds must be integers in [0, 2**63), got {short_repr(values)}")
        if len(values) != count:
            raise InputError(f"seeds must hold one seed per result ({count}), got {len(values)}")
        return torch.tensor([int(value) for value in values], dtype=torch.int64)

    def _labels(self, class_labels: ClassLabels, count: int) -> Tensor | None:
        if class_labels is None:
            return None
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * count
        if len(class_labels) != count:
            raise InputError(f"got {len(class_labels)} class labels for {count} images")
        return torch.tensor([self.class_index(label) for label in class_labels], dtype=torch.long)

    def _sample(self, options: SamplingOptions, callback: StepCallback | None, **inputs: Any) -> SampleOutput:
        """The sampler, in this pipeline's precision and compile mode, with the progress bar."""
        bar_config = {"disable": None, "unit": "step", "desc": "sampling", **self._progress_bar_config}
        with autocast(self.device, self.dtype), tqdm(total=options.steps, **bar_config) as bar:
            def step_done(step: int, tokens: Tensor, finished: Tensor) -> bool | None:
                bar.update()
                return None if callback is None else callback(step, tokens, finished)

            hook = None if bar.disable and callback is None else step_done  # no callback: no per-step copies
            return sample(self.prior, options=options, compile_mode=self.compile_mode, callback=hook, **inputs)

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

    def __call__(self, num_images: int | None = None, *, class_labels: ClassLabels = None, seed: int | None = None,
                 seeds: Seeds | None = None, generator: torch.Generator | None = None,
                 grid_shape: tuple[int, int] | None = None, output_type: str = "pil",
                 callback: StepCallback | None = None, return_trajectory: bool = False,
                 options: SamplingOptions | None = None, **overrides: Any) -> PipelineOutput:
        """Generate ``num_images`` images (default: one per seed of ``seeds``, else one).

        The sampling options are ``options`` (default: the model's ``sampling_defaults``) with the
        :class:`SamplingOptions` fields given as keywords replacing theirs. ``seeds`` gives every image
        its seed; ``seed`` gives image ``i`` the seed ``seed + i`` (the same image whatever the batch
        size); otherwise seeds come from ``generator``. ``callback(step, tokens, finished)`` is
        called after every step with a copy of the tokens; returning False stops sampling there.
        """
        count = self._count(num_images, seeds)
        check_output_type(output_type)
        output = self._sample(self.sampling_options(options, has_class=class_labels is not None, **overrides),
                              callback, num_samples=count,
                              grid_shape=grid_shape or tuple(self.prior.config.latent_shape),
                              class_labels=self._labels(class_labels, count),
                              seeds=self._seeds(count, seed, seeds, generator), return_trajectory=return_trajectory)
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

    def _encode_all(self, images: list[ImageInput]) -> tuple[Tensor, Tensor]:
        """Images of one size -> pixels (N, C, H, W) and tokens (N, h, w), each encoded on its own
        (so that a result never depends on the batch it came in)."""
        pixels = self._read_all(images)
        return pixels, torch.cat([self.encode(one[None])[1] for one in pixels])

    def _read_all(self, images: list[ImageInput]) -> Tensor:
        """Images of one size -> pixels (N, C, H, W) in [-1, 1]."""
        pixels = [image_to_tensor(image, self.channels) for image in images]
        sizes = sorted({tuple(one.shape[-2:]) for one in pixels})
        if len(sizes) > 1:
            listed = ", ".join(f"{width}x{height}" for height, width in sizes)
            raise InputError(f"the images of one call must have one size, got {listed}; make a call per size")
        return torch.cat(pixels)

    def _prepare_masks(self, image: ImageInputs, mask: ImageInputs,
                       rule: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images and masks, one or a list of each (a single one goes with every item of the other) ->
        pixels (N, C, H, W), tokens (N, h, w), pixel masks (N, H, W), token masks (N, h, w)."""
        images, masks = as_batch(image), as_batch(mask)
        if len(images) > 1 and len(masks) > 1 and len(images) != len(masks):
            raise InputError(f"got {len(images)} images and {len(masks)} masks; give one mask, or one per image")
        pixels, tokens = self._encode_all(images)
        pixel_mask = torch.stack([mask_to_tensor(one, tuple(pixels.shape[-2:])) for one in masks])
        token_mask = torch.stack([token_mask_from_pixels(one, self.factor, rule) for one in pixel_mask])
        count = max(len(images), len(masks))
        return tuple(repeat_to(batch, count) for batch in (pixels, tokens, pixel_mask, token_mask))

    def _edit(self, pixels: Tensor, tokens: Tensor, pixel_mask: Tensor, token_mask: Tensor, *, strength: float,
              paste_back: bool, num_images: int | None, class_labels: ClassLabels, seed: int | None,
              seeds: Seeds | None, generator: torch.Generator | None, output_type: str,
              callback: StepCallback | None, return_trajectory: bool, options: SamplingOptions | None,
              overrides: dict[str, Any]) -> PipelineOutput:
        """Sample each of the N inputs ``num_images`` times (input-major) with the ``token_mask`` (N, h, w)
        free and every other token pinned; ``strength`` of the free tokens start from noise, the rest
        from ``tokens``. ``paste_back`` puts the known pixels back into the decoded images."""
        check_output_type(output_type)
        count = self._count(num_images, seeds, len(tokens))
        pixels, tokens, pixel_mask, token_mask = (batch.repeat_interleave(count // len(tokens), dim=0)
                                                  for batch in (pixels, tokens, pixel_mask, token_mask))
        seeds = self._seeds(count, seed, seeds, generator)
        reset = (random_bits(seeds, -2, 0, tuple(token_mask.shape[1:])) < bits_below(strength)) & token_mask
        options = self.sampling_options(options, edit=True, has_class=class_labels is not None, **overrides)
        output = self._sample(options, callback, tokens=tokens,
                              randomize_mask=reset, keep_mask=~token_mask, seeds=seeds,
                              class_labels=self._labels(class_labels, count), return_trajectory=return_trajectory)

        def paste(images: Tensor) -> Tensor:
            return torch.where(pixel_mask[:, None].to(images.device), images, pixels.to(images.device))

        return self._finish(output, output_type, paste if paste_back else None)

    def inpaint(self, image: ImageInputs, mask: ImageInputs, *, num_images: int | None = None, mask_rule: str = "any",
                paste_back: bool = True, class_labels: ClassLabels = None, seed: int | None = None,
                seeds: Seeds | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                callback: StepCallback | None = None, return_trajectory: bool = False,
                options: SamplingOptions | None = None, **overrides: Any) -> PipelineOutput:
        """Regenerate the masked region (True/white = regenerate) from noise; the rest is kept (§3.6).

        ``image`` and ``mask`` may be lists (one mask for all images, or one per image): the results
        are ``num_images`` per image, image by image, each the same as when its image comes alone
        with its seeds. ``options`` start from the model's ``sampling_defaults`` at the low
        temperature of :data:`~sundae.config.INPAINT_DEFAULTS`; the other arguments are as in
        :meth:`__call__`.
        """
        pixels, tokens, pixel_mask, token_mask = self._prepare_masks(image, mask, mask_rule)
        return self._edit(pixels, tokens, pixel_mask, token_mask, strength=1.0, paste_back=paste_back,
                          num_images=num_images, class_labels=class_labels, seed=seed, seeds=seeds,
                          generator=generator, output_type=output_type, callback=callback,
                          return_trajectory=return_trajectory, options=options, overrides=overrides)

    def refine(self, image: ImageInputs, mask: ImageInputs, *, strength: float = 0.5, num_images: int | None = None,
               mask_rule: str = "any", paste_back: bool = True, class_labels: ClassLabels = None,
               seed: int | None = None, seeds: Seeds | None = None, generator: torch.Generator | None = None,
               output_type: str = "pil", callback: StepCallback | None = None, return_trajectory: bool = False,
               options: SamplingOptions | None = None, **overrides: Any) -> PipelineOutput:
        """Re-sample a masked region starting from its current tokens (slide 22, "fixing a broken eye").

        ``strength`` in [0, 1] is the share of the masked tokens reset to noise before sampling
        (0: start exactly from the current tokens; 1: the same as inpainting). Batches and the other
        arguments are as in :meth:`inpaint`.
        """
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"strength must be in [0, 1], got {strength}")
        pixels, tokens, pixel_mask, token_mask = self._prepare_masks(image, mask, mask_rule)
        return self._edit(pixels, tokens, pixel_mask, token_mask, strength=strength, paste_back=paste_back,
                          num_images=num_images, class_labels=class_labels, seed=seed, seeds=seeds,
                          generator=generator, output_type=output_type, callback=callback,
                          return_trajectory=return_trajectory, options=options, overrides=overrides)

    def _canvas_tokens(self, canvas: Tensor, pixels: Tensor, token_mask: Tensor, row: int, column: int) -> Tensor:
        """The tokens an outpainting starts from: the known region keeps the tokens of the original
        images ``pixels`` (not of the padded canvas), at (``row``, ``column``) of the canvas's token grid."""
        _, known_tokens = self._encode_all(list(pixels[:, None]))
        tokens = torch.zeros(len(known_tokens), *token_mask.shape, dtype=torch.long)
        tokens[:, row:row + known_tokens.shape[1], column:column + known_tokens.shape[2]] = known_tokens
        return tokens

    def outpaint(self, image: ImageInputs, *, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                 num_images: int | None = None, class_labels: ClassLabels = None, seed: int | None = None,
                 seeds: Seeds | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                 callback: StepCallback | None = None, return_trajectory: bool = False,
                 options: SamplingOptions | None = None, **overrides: Any) -> PipelineOutput:
        """Extend the canvas by the given number of pixels on each side (multiples of f) and fill it.

        ``image`` may be a list of images of one size; batches and the other arguments are as in
        :meth:`inpaint`.
        """
        for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
            if value < 0 or value % self.factor:
                raise InputError(f"{name}={value}: extensions must be >= 0 and multiples of the tokenizer factor "
                                 f"f={self.factor}")
        if left == top == right == bottom == 0:
            raise InputError("outpainting needs at least one of left/top/right/bottom > 0")
        pixels = self._read_all(as_batch(image))
        canvas = F.pad(pixels, (left, right, top, bottom), value=0.0)
        pixel_mask = torch.ones(canvas.shape[-2:], dtype=torch.bool)
        pixel_mask[top:top + pixels.shape[-2], left:left + pixels.shape[-1]] = False
        token_mask = token_mask_from_pixels(pixel_mask, self.factor, "any")
        tokens = self._canvas_tokens(canvas, pixels, token_mask, top // self.factor, left // self.factor)
        return self._edit(canvas, tokens, repeat_to(pixel_mask[None], len(tokens)),
                          repeat_to(token_mask[None], len(tokens)), strength=1.0, paste_back=True,
                          num_images=num_images, class_labels=class_labels, seed=seed, seeds=seeds,
                          generator=generator, output_type=output_type, callback=callback,
                          return_trajectory=return_trajectory, options=options, overrides=overrides)
