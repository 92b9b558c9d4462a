"""Checkpoints: ``config.json`` + ``model.safetensors`` directories, and training state.

* ``save_pretrained(dir)`` / ``from_pretrained(dir)`` (via :class:`PretrainedMixin`) store a
  model as its JSON config plus safetensors weights: nothing is ever unpickled on load.
* Training state (optimizer, scheduler, step, RNG, EMA) lives in ``training_state.pt``, written
  with ``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses
  arbitrary pickled objects.
* Every file is written atomically: to a temporary file in the same folder, fsynced, then
  renamed over the target, so an interrupted save never leaves a half-written checkpoint; a
  directory of several files is written into ``<dir>.staging`` and swapped in
  (:func:`replace_directory_atomically`, undone by :func:`recover_interrupted_checkpoint`).
* Weights carry a SHA-256 of their tensors (names, dtypes, shapes and bytes) in the safetensors
  metadata, checked on load: a flipped bit is a clear error, not silently different outputs.
  Files saved before this (no hash in their metadata) still load.
* A ``config.json`` is size-bounded, must hold a ``config`` mapping, and the config is type- and
  range-checked (:class:`~sundae.config.ConfigBase`); the weights' shapes are compared with the
  model the config describes (built on the meta device) before any real memory is allocated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Iterator, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sundae.config import ConfigBase, ConfigError, short_repr
from sundae.errors import InputError
from sundae.runtime import unwrap_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONTENT_HASH_KEY = "sundae.content_sha256"  # safetensors metadata entry written by save_weights
MAX_JSON_BYTES = 16 * 2**20  # a config.json is a few KB; refuse to read more than this

M = TypeVar("M", bound="PretrainedMixin")
log = logging.getLogger(__name__)


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, corrupted, or does not match the model it is loaded into."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def staging_directory(target: Path) -> Path:
    """A fresh, empty ``<target>.staging`` folder beside ``target``, to be swapped in by
    :func:`replace_directory_atomically` once it is fully written."""
    staging = target.with_name(target.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def replace_directory_atomically(staging: Path, target: Path) -> None:
    """Swap a fully written ``staging`` directory into ``target`` so a crash never leaves half a checkpoint.

    The old checkpoint is moved aside first and deleted only once the new one is in place.
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def recover_interrupted_checkpoint(target: Path) -> None:
    """If a crash hit between the two renames of :func:`replace_directory_atomically`, restore the old copy."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        os.replace(old, target)
        log.warning("restored %s from an interrupted checkpoint swap", target)
    elif old.exists():  # killed while deleting the previous copy, after the new one was in place
        shutil.rmtree(old)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file, turning every way it can be unreadable into a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path} is {size} bytes, more than the {max_bytes} a JSON file here may have")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, too-long ints, deep nesting
        detail = f"{type(error).__name__}: {short_repr(str(error), 200)}"
        raise CheckpointError(f"{path} is not valid JSON ({detail})") from None


def content_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (one pass, no copies
    of contiguous CPU tensors; ~1 GB/s, far below the cost of reading or writing the file)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)  # bf16 and bool as bytes
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None, *,
                 dtype: torch.dtype | None = None) -> None:
    """Write the model's ``state_dict`` as safetensors, with its :func:`content_hash` in the metadata.

    ``dtype`` (e.g. ``torch.float16``) stores the floating-point tensors in that precision, to halve
    a shipped model's size; loading casts them back to the model's own dtype."""
    state = {k: _stored(v.detach().contiguous().cpu(), dtype) for k, v in unwrap_model(model).state_dict().items()}
    metadata = {**(metadata or {}), CONTENT_HASH_KEY: content_hash(state)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def read_weights_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, read from its header (no tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return shapes, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be corrupted") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, checked against the content hash in its metadata (if any)."""
    path = Path(path)
    _, metadata = read_weights_header(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be corrupted") from None
    expected = metadata.get(CONTENT_HASH_KEY)
    if expected is not None and content_hash(state) != expected:
        raise CheckpointError(
            f"{path} is corrupted: content hash mismatch (its tensors are not the ones that were saved, e.g. a "
            f"flipped bit on disk or an incomplete copy); restore it from a good copy"
        )
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights strictly: any missing, unexpected or mis-shaped tensor is an error."""
    path = Path(path)
    state = read_weights(path)
    load_state_dict_strict(model, state, source=str(path))


def check_state_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *, source: str,
) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped entries."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not match the model built from its config:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            shown = ", ".join(str(k)[:80] for k in unexpected[:8])  # names from a file: keep messages short
            lines.append(f"  unexpected ({len(unexpected)}): {shown}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            lines.append(f"  wrong shape ({len(mismatched)}): {'; '.join(mismatched[:8])}")
        raise CheckpointError("\n".join(lines))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, source=source)
    model.load_state_dict(state, strict=True)


def shapes_on_meta(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]] | None:
    """The ``state_dict`` shapes of ``build()`` constructed on the meta device (no memory), or None
    when the model cannot be built there; lets a config be checked against weights before allocating."""
    try:
        with torch.device("meta"):
            probe = build()
    except Exception:  # noqa: BLE001 - an optional early check; the real load stays strict
        return None
    return {k: tuple(v.shape) for k, v in probe.state_dict().items()}


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from ``config_class``.

    Subclasses set ``config_class`` and keep the config in ``self.config``.
    """

    config_class: ClassVar[type[ConfigBase]]
    config: ConfigBase

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None, *,
                        weights_dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` (plus ``extra`` entries under their own keys) and ``model.safetensors``
        (floating-point tensors stored in ``weights_dtype`` when given, see :func:`save_weights`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self, directory / WEIGHTS_NAME, dtype=weights_dtype)  # type: ignore[arg-type]
        payload = {"class": type(self).__name__, "config": self.config.to_dict(), **(extra or {})}
        write_json_atomic(directory / CONFIG_NAME, payload)
        return directory

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> dict[str, Any]:
        """The parsed ``config.json`` of ``directory``: a mapping with this class's name under
        ``class`` and a mapping under ``config`` (anything else is a :class:`CheckpointError`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"{directory} is not a checkpoint directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})"
            )
        path = directory / CONFIG_NAME
        payload = read_json(path)
        if not isinstance(payload, dict):
            raise CheckpointError(f"{path} should hold a JSON object, got {type(payload).__name__}")
        if payload.get("class") != cls.__name__:
            raise CheckpointError(f"{path} holds a {short_repr(payload.get('class'))} checkpoint, not a {cls.__name__}")
        if not isinstance(payload.get("config"), dict):
            found = "no 'config' entry" if "config" not in payload else f"'config': {short_repr(payload['config'])}"
            raise CheckpointError(
                f"{path} has {found}; expected the {cls.config_class.__name__} fields as a JSON object"
            )
        return payload

    @classmethod
    def config_from_payload(cls, payload: dict[str, Any], source: str | os.PathLike) -> ConfigBase:
        """``payload["config"]`` as a validated config; a bad field is a :class:`ConfigError` naming ``source``."""
        try:
            return cls.config_class.from_dict(payload["config"])
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}", field=error.field) from None

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> M:
        directory = Path(directory)
        config = cls.config_from_payload(cls.read_config(directory), directory / CONFIG_NAME)
        weights = directory / WEIGHTS_NAME
        shapes, _ = read_weights_header(weights)
        expected = shapes_on_meta(lambda: cls(config))  # type: ignore[call-arg]
        if expected is not None:  # a config that disagrees with the weights fails before allocating
            check_state_shapes(expected, shapes, source=str(weights))
        model = cls(config)  # type: ignore[call-arg]
        load_weights(model, weights)  # type: ignore[arg-type]
        return model.to(map_location)  # type: ignore[attr-defined,return-value]
