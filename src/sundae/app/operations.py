"""What each web-app request does on the model thread (paper §3.4, §3.6; talk slides 9, 20-23).

Generation streams previews of the denoising as it happens: the sampler's per-step callback decodes
the current tokens, but only as often as keeps decoding under a quarter of the wall time (decoding
a VQ-GAN batch on a CPU can cost more than a sampling step). Inpainting, refinement and outpainting
draw several fills of one mask at once, each with its own seed. Results travel as PNG data URLs,
and are also written to the output folder when the app has one, under names the server makes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from sundae.app.validation import MAX_BATCH_PIXELS, MAX_IMAGES, SIDES, CanvasLimit, RequestError
from sundae.app.worker import Job
from sundae.config import NextScaleOptions, SamplingOptions
from sundae.pipeline import PipelineOutput, SundaePipeline, to_pil

logger = logging.getLogger(__name__)

RANDOM_SEED_BOUND = 2**31  # seeds the server draws stay short enough to copy by hand


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class PreviewSchedule:
    """Decides when a preview is worth decoding: at most ``share`` of the wall time goes to decoding,
    and previews are at least ``min_interval`` seconds apart (a browser needs no more)."""

    def __init__(self, *, share: float = 0.25, min_interval: float = 0.1) -> None:
        self.share = share
        self.min_interval = min_interval
        self._next_at = 0.0  # the first step is always shown

    def due(self) -> bool:
        return time.perf_counter() >= self._next_at

    def record(self, started: float) -> None:
        finished = time.perf_counter()
        cost = finished - started
        self._next_at = finished + max(self.min_interval, cost * (1 - self.share) / self.share)


# --- checks that need the model -------------------------------------------------------------


def request_pixel_budget(pipeline: SundaePipeline) -> int:
    """Images × pixels one request may make: a full batch of the model's own images (``MAX_IMAGES``),
    and never over ``MAX_BATCH_PIXELS``; so a large canvas takes fewer fills."""
    height, width = pipeline.image_size
    return min(MAX_BATCH_PIXELS, MAX_IMAGES * height * width)


def check_sampling(pipeline: SundaePipeline, request: dict[str, Any], image_size: tuple[int, int], *,
                   edit: bool) -> dict[str, Any]:
    """Resolve the class and seed and check the options against the model; returns the request completed.

    Without a class, the model's default guidance (the form's) does not apply, as in the pipeline
    (:meth:`~sundae.pipeline.SundaePipeline.sampling_options`): the request samples unguided."""
    label = request["class_label"]
    if label is not None:
        try:
            label = pipeline.class_index(label)
        except ValueError as error:
            raise RequestError(str(error), field="class_label") from None
    if label is None and request["guidance_scale"] == pipeline.sampling_options(edit=edit).guidance_scale:
        request = {**request, "guidance_scale": 1.0}
    conditional = pipeline.prior.config.num_classes is not None
    if request["guidance_scale"] != 1.0 and (not conditional or label is None):
        raise RequestError("classifier-free guidance needs a class-conditional model and a class_label; "
                           "set it to 1 or choose a class", field="guidance_scale")
    pixels, budget = request["num_images"] * image_size[0] * image_size[1], request_pixel_budget(pipeline)
    if pixels > budget:
        raise RequestError(f"{request['num_images']} images of {image_size[1]}x{image_size[0]} pixels exceed this "
                           f"model's budget of {budget} pixels per request ({MAX_IMAGES} images of its own size); "
                           "ask for fewer or a smaller canvas", field="num_images")
    seed = request["seed"] if request["seed"] is not None else secrets.randbelow(RANDOM_SEED_BOUND)
    return {**request, "class_label": label, "seed": seed}


def sampling_options(request: dict[str, Any]) -> dict[str, Any]:
    """The sampler knobs of a request read with its model's fields (SUNDAE's or VAR's knobs)."""
    return {key: request[key] for key in (*SamplingOptions.knobs(), *NextScaleOptions.knobs()) if key in request}


def check_image(pipeline: SundaePipeline, image: Image.Image, name: str = "image") -> None:
    factor = pipeline.factor
    if image.width % factor or image.height % factor:
        raise RequestError(f"is {image.width}x{image.height} pixels; both sides must be multiples of the tokenizer "
                           f"factor f={factor}", field=name)


def mask_array(image: Image.Image, mask: Image.Image) -> np.ndarray:
    """White (>= 128 grey) = regenerate; the mask must have the image's size and mark something."""
    if mask.size != image.size:
        raise RequestError(f"is {mask.width}x{mask.height} pixels but the image is {image.width}x{image.height}; "
                           "paint the mask on the image itself", field="mask")
    array = np.asarray(mask.convert("L")) >= 128
    if not array.any():
        raise RequestError("is empty; paint the region to regenerate", field="mask")
    return array


def outpainted_size(pipeline: SundaePipeline, image: Image.Image, request: dict[str, Any],
                    canvas: CanvasLimit) -> tuple[int, int]:
    sides = {side: request[side] for side in SIDES}
    for side, value in sides.items():
        if value % pipeline.factor:
            raise RequestError(f"must be a multiple of the tokenizer factor f={pipeline.factor}, got {value}",
                               field=side)
    if not any(sides.values()):
        raise RequestError("outpainting needs at least one of left/top/right/bottom > 0", field="left")
    size = (image.height + sides["top"] + sides["bottom"], image.width + sides["left"] + sides["right"])
    widest = max(SIDES, key=lambda side: sides[side])
    canvas.check(size, what="the extended canvas would be", field=widest)
    return size


# --- the work itself -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultFolder:
    """Writes each job's images and settings under ``directory``, with names made from the job id only."""

    directory: Path

    def save(self, job: Job, images: list[Image.Image], record: dict[str, Any]) -> list[str]:
        names = [f"{job.id}-{index:02d}.png" for index in range(len(images))]
        for name, image in zip(names, images):
            image.save(self.directory / name)
        (self.directory / f"{job.id}.json").write_text(json.dumps({"kind": job.kind, "files": names, **record},
                                                                  indent=2))
        return names


def _finish(job: Job, output: PipelineOutput, request: dict[str, Any], folder: ResultFolder | None) -> dict[str, Any]:
    job.raise_if_cancelled()  # sampling stopped at the cancellation: a cancelled job saves nothing
    seeds = [request["seed"] + index for index in range(len(output.images))]
    record = {"seeds": seeds, "steps_taken": output.steps_taken.tolist()}
    settings = {key: value for key, value in request.items() if not isinstance(value, (Image.Image, np.ndarray))}
    files = [] if folder is None else folder.save(job, output.images, {**record, "settings": settings})
    urls = []
    for image in output.images:
        job.raise_if_cancelled()  # encoding many large PNGs takes a while too
        urls.append(png_data_url(image))
    return {"images": urls, **record, "files": files}


def generate(pipeline: SundaePipeline, request: dict[str, Any], job: Job,
             folder: ResultFolder | None) -> dict[str, Any]:
    """Sample ``num_images`` images, emitting ``preview`` events of the current tokens along the way."""
    schedule = PreviewSchedule()

    def preview(step: int, tokens: Tensor, finished: Tensor) -> bool:
        if job.wanted() and schedule.due():
            started = time.perf_counter()
            images = to_pil(pipeline.decode(tokens))
            job.emit({"event": "preview", "step": step + 1, "finished": finished.tolist(),
                      "images": [png_data_url(image) for image in images]})
            schedule.record(started)
        return job.wanted()

    output = pipeline(request["num_images"], class_labels=request["class_label"], seed=request["seed"],
                      callback=preview, **sampling_options(request))
    return _finish(job, output, request, folder)


def edit(pipeline: SundaePipeline, request: dict[str, Any], job: Job, folder: ResultFolder | None) -> dict[str, Any]:
    """Inpaint, refine or outpaint (``job.kind``) ``request["image"]``: several fills side by side."""
    common = {"num_images": request["num_images"], "class_labels": request["class_label"], "seed": request["seed"],
              "callback": job.wanted, **sampling_options(request)}
    image = request["image"]
    if job.kind == "outpaint":
        output = pipeline.outpaint(image, left=request["left"], top=request["top"], right=request["right"],
                                   bottom=request["bottom"], **common)
    elif job.kind == "refine":
        output = pipeline.refine(image, request["mask"], strength=request["strength"], mask_rule=request["mask_rule"],
                                 paste_back=request["paste_back"], **common)
    else:
        output = pipeline.inpaint(image, request["mask"], mask_rule=request["mask_rule"],
                                  paste_back=request["paste_back"], **common)
    return _finish(job, output, request, folder)


def prepare(pipeline: SundaePipeline, kind: str, request: dict[str, Any], canvas: CanvasLimit) -> dict[str, Any]:
    """All model-dependent checks of a validated request, done before it is queued (so they are 4xx errors)."""
    if kind == "generate":
        size = pipeline.image_size
    else:
        check_image(pipeline, request["image"])
        size = (request["image"].height, request["image"].width)
        if kind == "outpaint":
            size = outpainted_size(pipeline, request["image"], request, canvas)
        else:
            request = {**request, "mask": mask_array(request["image"], request["mask"])}
    request = check_sampling(pipeline, request, size, edit=kind != "generate")
    try:
        pipeline.sampling_options(**sampling_options(request))
    except ValueError as error:
        raise RequestError(str(error)) from None
    return request


EXAMPLES_FILE = "examples/examples.json"


def read_examples(directory: Path | None) -> list[dict[str, Any]]:
    """The editing examples a model directory ships (``examples/examples.json``: a list of ``name``,
    ``image`` and ``mask`` PNG file names in ``examples/``, and an optional ``class_label``), as the page
    shows them: images as PNG data URLs. A missing file means no examples; a broken one is logged and
    skipped, so the app still starts."""
    if directory is None or not (directory / EXAMPLES_FILE).is_file():
        return []
    folder = directory / EXAMPLES_FILE.rsplit("/", 1)[0]
    try:
        listed = json.loads((directory / EXAMPLES_FILE).read_text())
        examples = []
        for entry in listed:
            files = {key: folder / Path(str(entry[key])).name for key in ("image", "mask")}  # no other folder
            with Image.open(files["image"]) as image, Image.open(files["mask"]) as mask:
                examples.append({"name": str(entry["name"]), "class_label": entry.get("class_label"),
                                 "image": png_data_url(image.convert("RGB")), "mask": png_data_url(mask.convert("L"))})
        return examples
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the examples of %s: %s", directory, error)
        return []
