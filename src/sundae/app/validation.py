"""Reading the web app's JSON requests: every field typed, ranged and named in its error.

Each operation (generate, inpaint, refine, outpaint; paper §3.4, §3.6) is a table of fields, made for
the served model by :func:`operation_fields`: its sampler fields are built from the knobs of
:class:`~sundae.config.SamplingOptions` (label, range, choices) with the model's own defaults (its
``scheduler/``). The same table validates requests (unknown or mistyped fields are an HTTP 422 naming
the field, never a silent default) and is sent to the page by ``/api/info``, which builds its form
inputs from it, so defaults and ranges live in one place.

A request is small but may ask for a lot of work, so every size follows the model: an image or an
outpainted canvas is at most :class:`CanvasLimit` (a few times the model's image size per side), its
header is checked before a pixel is decoded, and the body itself is parsed with bounded nesting and
number lengths (:func:`parse_json`), so a hostile body is a one-line 400, never a server error.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, ClassVar

from PIL import Image

from sundae.config import Knob, KnobOptions, SamplingOptions
from sundae.errors import InputError

MAX_STEPS = 1000
MAX_IMAGES = 64
MAX_IMAGE_SIDE = 4096  # whatever the model
MAX_BATCH_PIXELS = 2**24  # images × pixels per request: 64 at 512², 16 at 1024²; bounds memory
MAX_SEED = 2**53 - 1  # the largest integer a browser's JSON keeps exact
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_CANVAS_SCALE = 4.0
MAX_JSON_DEPTH = 8  # requests are flat objects; this leaves room for list-valued fields
MAX_INTEGER_DIGITS = 30  # the largest field (seed) has 16; Python refuses over 4300 (a ValueError)
GREY_MODES = ("1", "L", "LA", "I", "F")  # and I;16*
MAX_CLASS_NAME = 200


def shown(value: Any) -> str:
    """A refused value as the client wrote it (JSON: null, true, "50"), cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class RequestError(InputError):
    """A request the app refuses; ``status`` is the HTTP code and ``field`` the culprit, if one."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field
        self.status = status


@dataclass(frozen=True)
class CanvasLimit:
    """The largest image a request may send or make: ``scale`` × the model's image size on each side.

    The encoder's attention grows with the square of the area and the sampler's work with the area,
    so without this an 84-byte outpaint request could ask a 28² model for a 4028² canvas (gigabytes,
    minutes of work).
    """

    image_size: tuple[int, int]  # the model's (height, width) in pixels
    scale: float = DEFAULT_MAX_CANVAS_SCALE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 1):
            raise ValueError(f"max_canvas_scale must be a number >= 1, got {self.scale}")

    @property
    def max_size(self) -> tuple[int, int]:
        """(height, width)."""
        height, width = (min(MAX_IMAGE_SIDE, math.floor(side * self.scale)) for side in self.image_size)
        return height, width

    def check(self, size: tuple[int, int], *, what: str, field: str) -> None:
        """Refuse a (height, width) over the limit, naming the limit and the option that sets it."""
        (height, width), (max_height, max_width) = size, self.max_size
        if height > max_height or width > max_width:
            model_height, model_width = self.image_size
            raise RequestError(f"{what} {width}x{height} pixels; this model allows at most {max_width}x{max_height} "
                               f"({self.scale:g} × its {model_width}x{model_height} images; the server's "
                               "max_canvas_scale option sets this)", field=field)


@dataclass(frozen=True, kw_only=True)
class Number:
    """A finite number in [minimum, maximum] (``(minimum, maximum]`` with ``exclusive_minimum``), or
    null when ``nullable``; :class:`Integer` narrows it to integers."""

    kind: ClassVar[str] = "number"
    expected: ClassVar[str] = "a finite number"

    label: str
    default: float | None
    minimum: float
    maximum: float
    exclusive_minimum: bool = False
    nullable: bool = False
    placeholder: str | None = None  # what an empty (null) input means, shown in it
    step: float = 0.05  # the page's input granularity

    def accepts(self, value: Any) -> bool:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return is_number and not (isinstance(value, float) and not math.isfinite(value))

    def read(self, name: str, value: Any) -> float | None:
        if value is None and self.nullable:
            return None
        if not self.accepts(value):
            raise RequestError(f"must be {self.expected}{' or null' if self.nullable else ''}, got {shown(value)}",
                               field=name)
        too_low = value <= self.minimum if self.exclusive_minimum else value < self.minimum
        if too_low or value > self.maximum:
            bracket = "(" if self.exclusive_minimum else "["
            raise RequestError(f"must be in {bracket}{self.minimum}, {self.maximum}], got {value}", field=name)
        return value if self.kind == "integer" else float(value)

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, **{spec.name: getattr(self, spec.name) for spec in dataclass_fields(self)}}


@dataclass(frozen=True, kw_only=True)
class Integer(Number):
    kind: ClassVar[str] = "integer"
    expected: ClassVar[str] = "an integer"

    default: int | None
    minimum: int
    maximum: int
    step: int = 1

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


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
        if isinstance(value, str) and len(value) > MAX_CLASS_NAME:
            raise RequestError(f"is a {len(value)}-character name; class names are at most {MAX_CLASS_NAME}",
                               field=name)
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
    canvas: CanvasLimit | None = None  # None: only MAX_IMAGE_SIDE

    def read(self, name: str, value: Any) -> Image.Image:
        if not isinstance(value, str):
            raise RequestError(f"must be a base64 image (a data: URL), got {type(value).__name__}", field=name)
        return decode_image(name, value, self.canvas)

    def describe(self) -> dict[str, Any]:
        return {"type": "image", "label": self.label, "default": None}


Field = Integer | Number | Boolean | Choice | ClassLabel | EncodedImage


def decode_image(name: str, text: str, canvas: CanvasLimit | None = None) -> Image.Image:
    """Data URL -> loaded PIL image in mode L or RGB; its size is checked from the header (against
    ``canvas`` when given) before any pixel is decoded."""
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
            if canvas is not None:
                canvas.check((image.height, image.width), what="is", field=name)
            image.load()
            if image.mode not in ("L", "RGB"):  # the pipeline reads L or RGB; odd modes fail here, as unreadable
                grey = image.mode in GREY_MODES or image.mode.startswith("I;16")
                image = image.convert("L" if grey else "RGB")
    except RequestError:
        raise
    except Exception:  # PIL raises many types for a corrupt or unknown file; all mean the same to the user
        raise RequestError(f"is not a readable image ({', '.join(UPLOAD_FORMATS)})", field=name) from None
    return image


def _bounded_integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise RequestError(f"the request body holds an integer of {len(digits.lstrip('-'))} digits; no field takes "
                           f"more than {MAX_INTEGER_DIGITS}", status=400)
    return int(digits)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar: 0), counted without recursion and
    only until it passes ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(body: bytes) -> Any:
    """A request body -> its JSON value; anything malformed or hostile (bad UTF-8, nesting deeper than
    ``MAX_JSON_DEPTH``, integers longer than ``MAX_INTEGER_DIGITS``) is a one-line HTTP 400."""
    too_deep = RequestError(f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep",
                            status=400)
    try:
        value = json.loads(body, parse_int=_bounded_integer)
    except RequestError:
        raise
    except RecursionError:  # the C parser's own guard, far deeper than the limit
        raise too_deep from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a float too long to parse
        message = " ".join(str(error).split())[:200]
        raise RequestError(f"the request body is not valid JSON ({message})", status=400) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


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


# A knob whose size is work gets the app's own bound (SamplingOptions has none); any other integer knob
# without an upper bound, one that fits every integer type on the way to the sampler.
WORK_LIMITS = {"steps": MAX_STEPS}
MAX_KNOB_INTEGER = 2**31 - 1
def form_knobs(options_class: type[KnobOptions] = SamplingOptions) -> tuple[str, ...]:
    """The sampler knobs the form shows for a model whose options are ``options_class`` (SUNDAE's or VAR's)."""
    return tuple(name for name, knob in options_class.knobs().items() if knob.form)


def knob_field(name: str, knob: Knob, default: Any, options_class: type[KnobOptions] = SamplingOptions) -> Field:
    """The form field of one sampler knob, built from its :class:`~sundae.config.Knob` (label, range,
    choices), with ``default`` the served model's."""
    kind, nullable = options_class.knob_type(name)
    if knob.choices is not None:
        return Choice(label=knob.label, default=default, choices=knob.choices)
    if kind is bool:
        return Boolean(label=knob.label, default=default)
    if kind is int:
        maximum = WORK_LIMITS.get(name, MAX_KNOB_INTEGER if knob.maximum is None else int(knob.maximum))
        return Integer(label=knob.label, default=default, minimum=int(knob.minimum), maximum=maximum,
                       nullable=nullable, placeholder=knob.none, step=int(knob.step or 1))
    return Number(label=knob.label, default=default, minimum=knob.minimum, maximum=knob.maximum,
                  exclusive_minimum=knob.exclusive_minimum, nullable=nullable, placeholder=knob.none,
                  step=knob.step or 0.05)


def _sampling_fields(defaults: KnobOptions, *, images_label: str) -> dict[str, Field]:
    knobs = type(defaults).knobs()
    return {
        "num_images": Integer(label=images_label, default=4, minimum=1, maximum=MAX_IMAGES),
        **{name: knob_field(name, knobs[name], getattr(defaults, name), type(defaults))
           for name in form_knobs(type(defaults))},
        "class_label": ClassLabel(label="Class"),
        "seed": Integer(label="Seed", default=None, minimum=0, maximum=MAX_SEED, nullable=True,
                        placeholder="random"),
    }


OPERATIONS = ("generate", "inpaint", "refine", "outpaint")
SIDES = ("left", "top", "right", "bottom")


def default_extension(canvas: CanvasLimit, factor: int) -> int:
    """Outpainting's default extension on the right: half the model's width in whole f-pixel tokens,
    so a first Run does something visible, and never past the canvas limit."""
    width, max_width = canvas.image_size[1], canvas.max_size[1]
    half = -(-width // (2 * factor)) * factor
    return min(half, (max_width - width) // factor * factor)


def operation_fields(canvas: CanvasLimit, factor: int, defaults: KnobOptions, edit_defaults: KnobOptions, *,
                     refines: bool = True) -> dict[str, dict[str, Field]]:
    """The field tables of every operation for a model of ``canvas.image_size`` pixels and tokenizer factor f,
    whose sampling defaults are ``defaults`` (generation) and ``edit_defaults`` (inpaint, refine, outpaint:
    :meth:`~sundae.pipeline.SundaePipeline.sampling_options`); without ``refines`` (a VAR model) there is no
    refine operation."""
    image = EncodedImage(label="Image", canvas=canvas)
    edit_sampling = _sampling_fields(edit_defaults, images_label="Fills")
    mask_fields: dict[str, Field] = {
        "mask": EncodedImage(label="Mask (white = regenerate)", canvas=canvas),
        "mask_rule": Choice(label="Token mask rule", default="any", choices=("any", "all")),
        "paste_back": Boolean(label="Paste unmasked pixels back", default=True),
    }
    extension = default_extension(canvas, factor)
    refine = {"image": image, **edit_sampling,
              "strength": Number(label="Strength (share of masked tokens reset)", default=0.5, minimum=0.0,
                                 maximum=1.0),
              **mask_fields}
    return {
        "generate": _sampling_fields(defaults, images_label="Images"),
        "inpaint": {"image": image, **edit_sampling, **mask_fields},
        **({"refine": refine} if refines else {}),
        "outpaint": {"image": image,
                     **{side: Integer(label=f"Extend {side} (px)", default=extension if side == "right" else 0,
                                      minimum=0, maximum=MAX_IMAGE_SIDE, step=factor)
                        for side in SIDES},
                     **edit_sampling},
    }
