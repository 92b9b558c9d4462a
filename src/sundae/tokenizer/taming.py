"""Import of public taming-transformers / latent-diffusion VQ-GAN checkpoints (paper §3.1).

The paper encodes its 256² datasets with the pretrained VQ-GANs of Esser et al. (2021). This
module reads their PyTorch-Lightning ``.ckpt`` files into :class:`~sundae.tokenizer.vqgan.VQGAN`,
whose module names match taming's, so the weights map key for key.

Supported public files:

* taming VQGAN ImageNet f16-1024 and f16-16384 (``VQModel``, ``last.ckpt``);
* the FFHQ and CelebA-HQ ``Net2NetTransformer`` checkpoints: only their ``first_stage_model.*``
  weights are kept (``transformer.*`` and ``cond_stage_model.*`` are ignored);
* taming's Gumbel f8 8192 (``GumbelVQ``, OpenImages);
* latent-diffusion's vq-f4 / vq-f8 / vq-f16 first stages (``model.ckpt``).

``loss.*`` weights (the LPIPS net and discriminator) are always dropped.

Safety: a ``.ckpt`` is a pickle, and unpickling runs whatever callables the file names. We
first try ``torch.load(weights_only=True)``; if the file names other globals (Lightning
callbacks, ``argparse.Namespace`` hyper-parameters, OmegaConf configs) we re-read it with
:data:`restricted_pickle`, whose ``find_class`` returns real objects only for tensor
rebuild functions, storages, dtypes, ``collections.OrderedDict`` and builtin containers.
Globals that can run commands or touch the system (``os``, ``subprocess``, ``builtins.eval``,
...) make the load fail with :class:`UnsafeCheckpointError`; every other global becomes an
inert placeholder class that only stores its arguments, so no code from the file is ever run.
Only tensors are returned; everything else in the file is discarded.
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import Tensor

from sundae.checkpoint import CheckpointError, load_state_dict_strict
from sundae.config import VQGAN_PRESETS, ConfigError, VQGANConfig, preset as lookup_preset
from sundae.tokenizer.vqgan import VQGAN

NET2NET_PREFIX = "first_stage_model."
IGNORED_PREFIXES = ("loss.",)
NOMINAL_RESOLUTION = 256


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint names a global that could run code; it was refused, nothing was executed."""


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------

TORCH_REBUILD_FUNCTIONS = {
    ("torch._utils", name): getattr(torch._utils, name)
    for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage",
    )
    if hasattr(torch._utils, name)
} | {("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2}

SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **TORCH_REBUILD_FUNCTIONS,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    **{
        (module, value.__name__): value
        for module in ("builtins", "__builtin__")
        for value in (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex, bool)
    },
}

# Modules whose globals mean the file tries to run commands or touch the system. Refusing them
# is a loud signal, not the safety mechanism: any global not in SAFE_GLOBALS is inert anyway.
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle", "_pickle",
    "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal", "builtins",
    "__builtin__",
})


def is_storage_class(module: str, name: str) -> bool:
    value = getattr(torch, name, None) if module == "torch" and name.endswith("Storage") else None
    return isinstance(value, type) and issubclass(value, (torch.storage.TypedStorage, torch.storage.UntypedStorage))


class InertGlobal:
    """Stand-in for a global the checkpoint names but we do not trust.

    Constructing, ``__setstate__``, item and list updates (everything pickle can do to an
    object) only store their arguments; no method of the original class is looked up or run.
    """

    module: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertGlobal:
        instance = object.__new__(cls)
        instance.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, elements=[])
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were stored by ``__new__``; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["elements"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["elements"].extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.name}>"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`SAFE_GLOBALS`; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.placeholders: dict[tuple[str, str], type[InertGlobal]] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in SAFE_GLOBALS:
            return SAFE_GLOBALS[key]
        if is_storage_class(module, name):
            return getattr(torch, name)
        if module.split(".")[0] in REFUSED_MODULES:
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint references {module}.{name}, which could run code on this "
                f"machine; nothing from the file was executed. Only load checkpoints from sources you trust."
            )
        if key not in self.placeholders:
            self.placeholders[key] = type(f"Inert[{module}.{name}]", (InertGlobal,), {"module": module, "name": name})
        return self.placeholders[key]


def restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


restricted_pickle = types.SimpleNamespace(
    __name__="sundae_restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=restricted_load,
    UnpicklingError=pickle.UnpicklingError,
)
"""A ``pickle_module`` for ``torch.load`` that never runs code from the file."""


def read_checkpoint_payload(path: Path) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy format) without running code from it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # foreign globals or a damaged file; the restricted reader tells which
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{path}: {error}") from None
    except Exception as error:  # torch raises many types for truncated or corrupted files
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(error).__name__}: {error}); "
            f"it is probably truncated or corrupted, download it again"
        ) from None


def load_taming_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The raw ``state_dict`` of a Lightning ``.ckpt`` (or of a flat dict of tensors), read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    payload = read_checkpoint_payload(path)
    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path} holds no state_dict (found {type(payload).__name__}); expected a taming/Lightning .ckpt"
        )
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{path}: the state_dict has non-tensor entries {not_tensors[:8]}; this is not a model checkpoint"
        )
    return {str(k): v.detach() for k, v in state.items()}  # detach drops any pickled hooks


def convert_taming_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a taming state dict onto :class:`VQGAN` keys.

    A ``Net2NetTransformer`` (or latent-diffusion model) keeps its VQ-GAN under
    ``first_stage_model.``: only those keys are kept, with the prefix stripped. ``loss.*``
    keys (LPIPS, discriminator) are dropped. Every other key is kept unchanged so that the
    strict load reports anything unexpected.
    """
    if any(key.startswith(NET2NET_PREFIX) for key in state):
        state = {key[len(NET2NET_PREFIX):]: value for key, value in state.items() if key.startswith(NET2NET_PREFIX)}
    return {key: value for key, value in state.items() if not key.startswith(IGNORED_PREFIXES)}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def nested_item(data: Any, keys: tuple[str, ...], source: str) -> Any:
    for depth, key in enumerate(keys):
        if not isinstance(data, Mapping) or key not in data:
            raise ConfigError(f"{source}: missing '{'.'.join(keys[: depth + 1])}'; is this a taming model config?")
        data = data[key]
    return data


def nested_section(data: Any, keys: tuple[str, ...], source: str) -> Mapping[str, Any]:
    section = nested_item(data, keys, source)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: '{'.'.join(keys)}' should be a mapping, got {type(section).__name__}")
    return section


def config_from_taming_yaml(path: str | os.PathLike) -> VQGANConfig:
    """Read a taming / latent-diffusion ``*-project.yaml`` / ``config.yaml`` into a :class:`VQGANConfig`.

    Uses ``model.params`` (or ``model.params.first_stage_config.params`` for a
    ``Net2NetTransformer``): ``ddconfig``, ``n_embed`` and ``embed_dim``; a target class whose
    name contains "Gumbel" selects the gumbel quantizer.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    source = str(path)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML ({error})") from None
    model = nested_section(document, ("model",), source)
    params = nested_section(model, ("params",), source)
    target = str(model.get("target", ""))
    if "first_stage_config" in params:
        target = str(nested_item(params, ("first_stage_config", "target"), source))
        params = nested_section(params, ("first_stage_config", "params"), source)
    ddconfig = nested_section(params, ("ddconfig",), source)
    if ddconfig.get("double_z", True):
        raise ConfigError(f"{source}: ddconfig.double_z is true, which is a KL autoencoder, not a VQ model")
    if params.get("remap") is not None:
        raise ConfigError(f"{source}: index remapping (params.remap) is not supported")
    return VQGANConfig(
        resolution=int(nested_item(ddconfig, ("resolution",), source)),
        in_channels=int(nested_item(ddconfig, ("in_channels",), source)),
        out_channels=int(nested_item(ddconfig, ("out_ch",), source)),
        channels=int(nested_item(ddconfig, ("ch",), source)),
        channel_multipliers=tuple(int(m) for m in nested_item(ddconfig, ("ch_mult",), source)),
        num_res_blocks=int(nested_item(ddconfig, ("num_res_blocks",), source)),
        attention_resolutions=tuple(int(r) for r in nested_item(ddconfig, ("attn_resolutions",), source)),
        dropout=float(ddconfig.get("dropout", 0.0)),
        z_channels=int(nested_item(ddconfig, ("z_channels",), source)),
        embed_dim=int(nested_item(params, ("embed_dim",), source)),
        codebook_size=int(nested_item(params, ("n_embed",), source)),
        quantizer="gumbel" if "Gumbel" in target else "vq",
    )


def count_indexed(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many consecutive i from 0 have ``pattern.format(i)`` in ``state``."""
    count = 0
    while pattern.format(count) in state:
        count += 1
    return count


def shape_of(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a taming VQ-GAN state dict: missing {key!r}")
    return tuple(state[key].shape)


def infer_config_from_state_dict(state: Mapping[str, Tensor]) -> VQGANConfig:
    """Read the architecture off tensor shapes of a converted taming state dict.

    The training resolution is not stored in the weights; attention levels are expressed
    against a nominal resolution of 256 (or 2**levels when that is larger), which yields the
    same network because taming places attention by level.
    """
    channels, in_channels = shape_of(state, "encoder.conv_in.weight")[:2]
    levels = count_indexed(state, "encoder.down.{}.block.0.conv1.weight")
    num_res_blocks = count_indexed(state, "encoder.down.0.block.{}.conv1.weight")
    if levels == 0 or num_res_blocks == 0:
        raise CheckpointError("not a taming VQ-GAN state dict: no encoder.down.0.block.0 weights")
    widths = [shape_of(state, f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
    if any(width % channels for width in widths):
        raise CheckpointError(f"encoder widths {widths} are not multiples of channels={channels}")
    resolution = max(NOMINAL_RESOLUTION, 2 ** (levels - 1))
    attention_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    z_channels = shape_of(state, "decoder.conv_in.weight")[1]
    encoder_out = shape_of(state, "encoder.conv_out.weight")[0]
    if encoder_out == 2 * z_channels:
        raise CheckpointError(
            "encoder.conv_out has 2 * z_channels outputs (double_z): this is a KL autoencoder, not a VQ model"
        )
    if encoder_out != z_channels:
        raise CheckpointError(f"encoder.conv_out has {encoder_out} outputs but decoder.conv_in takes {z_channels}")
    gumbel = "quantize.proj.weight" in state
    codebook_key = "quantize.embed.weight" if gumbel else "quantize.embedding.weight"
    return VQGANConfig(
        resolution=resolution,
        in_channels=in_channels,
        out_channels=shape_of(state, "decoder.conv_out.weight")[0],
        channels=channels,
        channel_multipliers=tuple(width // channels for width in widths),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(resolution // 2**i for i in attention_levels),
        z_channels=z_channels,
        embed_dim=shape_of(state, "quant_conv.weight")[0],
        codebook_size=shape_of(state, codebook_key)[0],
        quantizer="gumbel" if gumbel else "vq",
    )


# ---------------------------------------------------------------------------------------------
# Loading and conversion
# ---------------------------------------------------------------------------------------------


def load_taming_vqgan(
    checkpoint_path: str | os.PathLike, *, config_path: str | os.PathLike | None = None, preset: str | None = None,
) -> VQGAN:
    """Build a :class:`VQGAN` from a taming ``.ckpt``, in eval mode.

    The architecture comes from ``config_path`` (the release's yaml) when given, else from the
    named ``preset`` (:data:`sundae.config.VQGAN_PRESETS`), else it is inferred from the weights.
    Loading is strict: a :class:`CheckpointError` lists missing, unexpected and mis-shaped keys.
    """
    if config_path is not None and preset is not None:
        raise ConfigError("give either config_path or preset, not both")
    state = convert_taming_state_dict(load_taming_state_dict(checkpoint_path))
    if config_path is not None:
        config = config_from_taming_yaml(config_path)
    elif preset is not None:
        config = lookup_preset(preset, VQGAN_PRESETS)
    else:
        config = infer_config_from_state_dict(state)
    model = VQGAN(config)
    load_state_dict_strict(model, state, source=str(checkpoint_path))
    return model.eval()


def convert_taming(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, config_path: str | os.PathLike | None = None,
    preset: str | None = None,
) -> Path:
    """Convert a taming ``.ckpt`` to a ``save_pretrained`` directory (``config.json`` +
    ``model.safetensors``) that :meth:`VQGAN.from_pretrained` reads; returns ``out_dir``."""
    model = load_taming_vqgan(checkpoint_path, config_path=config_path, preset=preset)
    return model.save_pretrained(out_dir, extra={"converted_from": Path(checkpoint_path).name})


__all__ = [
    "UnsafeCheckpointError", "InertGlobal", "restricted_pickle", "load_taming_state_dict", "convert_taming_state_dict",
    "config_from_taming_yaml", "infer_config_from_state_dict", "load_taming_vqgan", "convert_taming",
]
