"""Reading the web app's JSON requests: every field typed, ranged and named in its error.

Each operation (generate, inpaint, refine, outpaint; paper §3.4, §3.6) is a table of fields. The same
table validates requests (unknown or mistyped fields are an HTTP 422 naming the field, never a
silent default) and is sent to the page by ``/api/info``, which builds its form inputs from it, so
defaults and ranges live in one place.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sundae.pipeline import INPAINT_DEFAULTS

MAX_STEPS = 1000
MAX_IMAGES = 64
MAX_IMAGE_SIDE = 4096
MAX_BATCH_PIXELS = 2**24  # images × pixels per request: 64 at 512², 16 at 1024²; bounds memory
MAX_SEED = 2**53 - 1  # the largest integer a browser's JSON keeps exact
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def shown(value: Any) -> str:
    """A refused value as the client wrote it (JSON: null, true, "50"), cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class RequestError(ValueError):
    """A request the app refuses; ``status`` is the HTTP code and ``field`` the culprit, if one."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field
        self.status = status


@dataclass(frozen=True, kw_only=True)
class Integer:
    label: str
    default: int | None
    minimum: int
    maximum: int
    nullable: bool = False

    def read(self, name: str, value: Any) -> int | None:
        if value is None and self.nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            expected = "an integer or null" if self.nullable else "an integer"
            raise RequestError(f"must be {expected}, got {shown(value)}", field=name)
        if not self.minimum <= value <= self.maximum:
            raise RequestError(f"must be in [{self.minimum}, {self.maximum}], got {value}", field=name)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "integer", "label": self.label, "default": self.default, "minimum": self.minimum,
                "maximum": self.maximum, "nullable": self.nullable}


@dataclass(frozen=True, kw_only=True)
class Number:
    label: str
    default: float
    minimum: float
    maximum: float
    exclusive_minimum: bool = False
    step: float = 0.05  # the page's input granularity

    def read(self, name: str, value: Any) -> float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (isinstance(value, float) and not math.isfinite(value)):
            raise RequestError(f"must be a finite number, got {shown(value)}", field=name)
        too_low = value <= self.minimum if self.exclusive_minimum else value < self.minimum
        if too_low or value > self.maximum:
            bracket = "(" if self.exclusive_minimum else "["
            raise RequestError(f"must be in {bracket}{self.minimum}, {self.maximum}], got {value}", field=name)
        return float(value)

    def describe(self) -> dict[str, Any]:
        return {"type": "number", "label": self.label, "default": self.default, "minimum": self.minimum,
                "maximum": self.maximum, "exclusive_minimum": self.exclusive_minimum, "step": self.step}


@dataclass(frozen=True, kw_only=True)
class Boolean:
    label: str
    default: bool

    def read(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise RequestError(f"must be true or false, got {shown(value)}", field=name)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "boolean", "label": self.label, "default": self.default}


@dataclass(frozen=True, kw_only=True)
class Choice:
    label: str
    default: str
    choices: tuple[str, ...]

    def read(self, name: str, value: Any) -> str:
        if value not in self.choices:
            raise RequestError(f"must be one of {', '.join(self.choices)}; got {shown(value)}", field=name)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "choice", "label": self.label, "default": self.default, "choices": list(self.choices)}


@dataclass(frozen=True, kw_only=True)
class ClassLabel:
    """A class name or index, or null for the null class; checked against the model by the server."""

    label: str
    default: None = None

    def read(self, name: str, value: Any) -> int | str | None:
        if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise RequestError(f"must be a class name, a class index or null, got {shown(value)}", field=name)

    def describe(self) -> dict[str, Any]:
        return {"type": "class", "label": self.label, "default": None}


@dataclass(frozen=True, kw_only=True)
class EncodedImage:
    """An image as a ``data:image/...;base64,`` URL (what ``canvas.toDataURL`` gives) or bare base64."""

    label: str
    default: None = None

    def read(self, name: str, value: Any) -> Image.Image:
        if not isinstance(value, str):
            raise RequestError(f"must be a base64 image (a data: URL), got {type(value).__name__}", field=name)
        return decode_image(name, value)

    def describe(self) -> dict[str, Any]:
        return {"type": "image", "label": self.label, "default": None}


Field = Integer | Number | Boolean | Choice | ClassLabel | EncodedImage


def decode_image(name: str, text: str) -> Image.Image:
    """Data URL -> loaded PIL image; its size is checked from the header before any pixel is decoded."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("is not valid base64 image data", field=name) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            if max(image.size) > MAX_IMAGE_SIDE:
                raise RequestError(f"is {image.width}x{image.height} pixels; the largest side allowed is "
                                   f"{MAX_IMAGE_SIDE}", field=name)
            image.load()
    except RequestError:
        raise
    except Exception:  # PIL raises many types for a corrupt or unknown file; all mean the same to the user
        raise RequestError(f"is not a readable image ({', '.join(UPLOAD_FORMATS)})", field=name) from None
    return image


def read_fields(body: Any, fields: dict[str, Field]) -> dict[str, Any]:
    """Validate a JSON object against a field table; absent optional fields take their defaults."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unknown field; this request takes {', '.join(fields)}", field=unknown[0])
    values = {}
    for name, spec in fields.items():
        if name not in body:
            if isinstance(spec, EncodedImage):
                raise RequestError("is required", field=name)
            values[name] = spec.default
        else:
            values[name] = spec.read(name, body[name])
    return values


def describe_fields(fields: dict[str, Field]) -> list[dict[str, Any]]:
    return [{"name": name, **spec.describe()} for name, spec in fields.items()]


def _sampling_fields(*, steps: int, temperature: float, end_temperature: float, num_images: int,
                     images_label: str) -> dict[str, Field]:
    return {
        "num_images": Integer(label=images_label, default=num_images, minimum=1, maximum=MAX_IMAGES),
        "steps": Integer(label="Steps", default=steps, minimum=1, maximum=MAX_STEPS),
        "temperature": Number(label="Temperature (start)", default=temperature, minimum=0.0, maximum=10.0,
                              exclusive_minimum=True),
        "end_temperature": Number(label="Temperature (end)", default=end_temperature, minimum=0.0, maximum=10.0,
                                  exclusive_minimum=True),
        "proportion": Number(label="Proportion updated per step", default=0.8, minimum=0.0, maximum=1.0,
                             exclusive_minimum=True),
        "class_label": ClassLabel(label="Class"),
        "guidance_scale": Number(label="Guidance", default=1.0, minimum=0.0, maximum=50.0, step=0.5),
        "seed": Integer(label="Seed (empty: random)", default=None, minimum=0, maximum=MAX_SEED, nullable=True),
        "early_stop": Boolean(label="Stop each sample once it stops changing", default=True),
    }


_EDIT_SAMPLING = _sampling_fields(steps=50, num_images=4, images_label="Fills", **INPAINT_DEFAULTS)
_MASK_FIELDS: dict[str, Field] = {
    "mask": EncodedImage(label="Mask (white = regenerate)"),
    "mask_rule": Choice(label="Token mask rule", default="any", choices=("any", "all")),
    "paste_back": Boolean(label="Paste unmasked pixels back", default=True),
}

OPERATION_FIELDS: dict[str, dict[str, Field]] = {
    "generate": _sampling_fields(steps=50, temperature=1.0, end_temperature=0.6, num_images=4, images_label="Images"),
    "inpaint": {"image": EncodedImage(label="Image"), **_EDIT_SAMPLING, **_MASK_FIELDS},
    "refine": {"image": EncodedImage(label="Image"),
               **{**_EDIT_SAMPLING, "steps": Integer(label="Steps", default=30, minimum=1, maximum=MAX_STEPS)},
               "strength": Number(label="Strength (share of masked tokens reset)", default=0.5, minimum=0.0,
                                  maximum=1.0),
               **_MASK_FIELDS},
    "outpaint": {"image": EncodedImage(label="Image"),
                 **{side: Integer(label=f"Extend {side} (px)", default=0, minimum=0, maximum=MAX_IMAGE_SIDE)
                    for side in ("left", "top", "right", "bottom")},
                 **_EDIT_SAMPLING},
}
