"""Checkpoints: ``config.json`` + ``model.safetensors`` directories, and training state.

* ``save_pretrained(dir)`` / ``from_pretrained(dir)`` (via :class:`PretrainedMixin`) store a
  model as its JSON config plus safetensors weights: nothing is ever unpickled on load.
* Training state (optimizer, scheduler, step, RNG, EMA) lives in ``training_state.pt``, written
  with ``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses
  arbitrary pickled objects.
* Every file is written atomically: to a temporary file in the same folder, fsynced, then
  renamed over the target, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Iterator, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sundae.config import ConfigBase

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_STATE_NAME = "training_state.pt"

M = TypeVar("M", bound="PretrainedMixin")


class CheckpointError(RuntimeError):
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


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the checkpoint is corrupted") from None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers before saving."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap_model(model).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights strictly: any missing, unexpected or mis-shaped tensor is an error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be corrupted") from None
    load_state_dict_strict(model, state, source=str(path))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not match the model built from its config:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        if mismatched:
            lines.append(f"  wrong shape ({len(mismatched)}): {'; '.join(mismatched[:8])}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from ``config_class``.

    Subclasses set ``config_class`` and keep the config in ``self.config``.
    """

    config_class: ClassVar[type[ConfigBase]]
    config: ConfigBase

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (plus ``extra`` entries under their own keys) and ``model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self, directory / WEIGHTS_NAME)  # type: ignore[arg-type]
        payload = {"class": type(self).__name__, "config": self.config.to_dict(), **(extra or {})}
        write_json_atomic(directory / CONFIG_NAME, payload)
        return directory

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> dict[str, Any]:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a checkpoint directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        payload = read_json(directory / CONFIG_NAME)
        if payload.get("class") != cls.__name__:
            raise CheckpointError(
                f"{directory} holds a {payload.get('class')!r} checkpoint, not a {cls.__name__}"
            )
        return payload

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> M:
        payload = cls.read_config(directory)
        model = cls(cls.config_class.from_dict(payload["config"]))  # type: ignore[call-arg]
        load_weights(model, Path(directory) / WEIGHTS_NAME)  # type: ignore[arg-type]
        return model.to(map_location)  # type: ignore[attr-defined,return-value]


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: nothing to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"{path} could not be read ({type(error).__name__}: {error}); it may be corrupted") from None
