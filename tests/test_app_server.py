"""The web app's server (sundae.app): request validation, limits that follow the model, hostile
bodies, one queued worker whose results match direct pipeline calls, cancellation on disconnect (also
mid-encode and mid-decode), writes confined to the output folder, and a seeded request fuzzer.

Everything goes over real HTTP to a uvicorn server on a free 127.0.0.1 port, with a tiny random
pixel-token pipeline (grey 8x8 images, f=1), and for the tokenizer's own paths a tiny VQ-GAN one
(16x16 RGB, f=2).
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import resource
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sundae.app import BackgroundServer, create_app, load_pipeline, serve
from sundae.app.server import allowed_hosts_for, model_name
from sundae.app.validation import MAX_INTEGER_DIGITS, MAX_JSON_DEPTH
from sundae.app.worker import Job, ModelWorker
from sundae.config import HourglassConfig, SamplingOptions
from sundae.errors import InputError
from sundae.denoiser import Hourglass
from sundae.pipeline import SundaePipeline
from sundae.tokenizer.pixels import PixelTokenizer

CLASS_NAMES = ["bars", "dots", "rings"]
FAST = {"steps": 8}  # a few steps keep each request in the tens of milliseconds


def build_tiny_pipeline_dir(directory: Path) -> Path:
    torch.manual_seed(0)
    prior = Hourglass(HourglassConfig(codebook_size=256, dim=32, depth=(1, 1, 1), heads=2, head_dim=16,
                                      latent_shape=(8, 8), num_classes=3))
    return SundaePipeline(prior, PixelTokenizer(), class_names=CLASS_NAMES).save_pretrained(directory)


def png_data_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def events_of(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


class ForwardCounter:
    """Counts the prior's forward passes; ``delay`` slows each one so a job can be caught mid-way."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.delay = 0.0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.count += 1
        time.sleep(self.delay)

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    pipeline = load_pipeline(build_tiny_pipeline_dir(root / "tiny-run" / "model"), device="cpu")
    app = create_app(pipeline, output_dir=root / "outputs", max_body_bytes=64 * 1024)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, pipeline, app, root


@pytest.fixture
def client(served) -> httpx.Client:
    return served[0]


@pytest.fixture
def pipeline(served) -> SundaePipeline:
    return served[1]


def wait_until_idle(app, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while app.state.worker.unfinished:
        assert time.monotonic() < deadline, "the worker did not finish its jobs in time"
        time.sleep(0.01)


def sample_image(pipeline: SundaePipeline) -> np.ndarray:
    return np.asarray(pipeline(1, seed=99, **FAST).images[0])


# --- information and validation ---------------------------------------------------------------


def test_info_describes_the_model_and_the_forms(client):
    info = client.get("/api/info").json()
    # a trainer exports <run>/model: the page names the run, not "model"
    assert info["model"] == {"name": "tiny-run", "paradigm": "SUNDAE", "tokenizer": "pixels", "factor": 1, "codebook_size": 256,
                             "image_size": [8, 8], "channels": 1, "class_names": CLASS_NAMES, "device": "cpu"}
    # what the page needs to tell the user what it did to an upload: f, the model's size and the canvas limit
    assert info["limits"]["max_canvas"] == [32, 32] and info["limits"]["max_canvas_scale"] == 4
    assert info["limits"]["max_batch_pixels"] == 64 * 8 * 8
    steps = next(field for field in info["operations"]["generate"] if field["name"] == "steps")
    assert (steps["minimum"], steps["maximum"], steps["default"]) == (1, 1000, 50)
    assert {field["name"] for field in info["operations"]["refine"]} >= {"image", "mask", "strength"}
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="mask-canvas"' in page.text and client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize(("body", "field", "fragment"), [
    ({"steps": 0}, "steps", "[1, 1000]"),
    ({"steps": 1001}, "steps", "[1, 1000]"),
    ({"steps": "50"}, "steps", "integer"),
    ({"steps": 2.5}, "steps", "integer"),
    ({"num_images": 65}, "num_images", "[1, 64]"),
    ({"num_images": True}, "num_images", "integer"),
    ({"temperature": 0}, "temperature", "(0.0, 10.0]"),
    ({"end_temperature": -1.0}, "end_temperature", "(0.0"),
    ({"proportion": 1.5}, "proportion", "(0.0, 1.0]"),
    ({"proportion": float("nan")}, "proportion", "finite"),
    ({"seed": -1}, "seed", "[0,"),
    ({"early_stop": "yes"}, "early_stop", "true or false"),
    ({"class_label": "zebra"}, "class_label", "known classes: bars, dots, rings"),
    ({"class_label": 7}, "class_label", "out of range"),
    ({"class_label": [1]}, "class_label", "class name"),
    ({"guidance_scale": 3.0}, "guidance_scale", "needs"),
    ({"output_path": "../../evil.png"}, "output_path", "unknown field"),
])
def test_bad_generate_fields_are_422_naming_the_field(client, body, field, fragment):
    # json.dumps writes NaN as the token NaN, which Python's parser (and so the server) reads back
    response = client.post("/api/generate", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert fragment in response.json()["error"]


def test_malformed_requests_are_refused_with_a_message(client):
    not_json = client.post("/api/generate", content=b"{steps: 3", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    form = client.post("/api/generate", content=b"steps=3", headers={"content-type": "text/plain"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    assert client.post("/api/generate", json=[1, 2]).status_code == 422
    assert client.get("/api/generate").status_code == 405
    assert client.get("/api/info", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding


def test_bodies_over_the_limit_are_413(client):
    declared = client.post("/api/inpaint", json={"image": "A" * 70_000})
    assert declared.status_code == 413 and "larger than" in declared.json()["error"]
    chunks = (b'{"image": "' + b"A" * 8192 for _ in range(9))  # no Content-Length: counted while reading
    streamed = client.post("/api/inpaint", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_bad_images_and_masks_are_422(client, pipeline):
    image = sample_image(pipeline)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    cases = [
        ({"mask": png_data_url(mask)}, "image", "required"),
        ({"image": "data:image/png;base64,@@@", "mask": png_data_url(mask)}, "image", "base64"),
        ({"image": base64.b64encode(b"not an image").decode(), "mask": png_data_url(mask)}, "image", "readable"),
        ({"image": png_data_url(np.zeros((8, 4100), np.uint8)), "mask": png_data_url(mask)}, "image", "largest side"),
        ({"image": png_data_url(image), "mask": png_data_url(np.full((8, 16), 255, np.uint8))}, "mask", "16x8"),
        ({"image": png_data_url(image), "mask": png_data_url(np.zeros((8, 8), np.uint8))}, "mask", "empty"),
        ({"image": png_data_url(image), "mask": png_data_url(mask), "mask_rule": "most"}, "mask_rule", "any, all"),
    ]
    for body, field, fragment in cases:
        response = client.post("/api/inpaint", json=body)
        assert response.status_code == 422, (body.keys(), response.text)
        assert response.json()["field"] == field and fragment in response.json()["error"], response.json()
    no_sides = client.post("/api/outpaint", json={"image": png_data_url(image), "right": 0})
    assert no_sides.status_code == 422 and "at least one" in no_sides.json()["error"]
    strength = client.post("/api/refine", json={"image": png_data_url(image), "mask": png_data_url(mask),
                                                 "strength": 1.5})
    assert strength.status_code == 422 and strength.json()["field"] == "strength"


# --- limits that follow the model, hostile bodies --------------------------------------------------


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_oversize_canvases_and_uploads_are_refused_at_once_naming_the_limit(served):
    client, pipeline, app, _ = served
    wait_until_idle(app)
    image = png_data_url(sample_image(pipeline))
    mask = png_data_url(np.full((8, 8), 255, np.uint8))
    counter = ForwardCounter(pipeline.prior)
    rss_before, started = peak_rss_bytes(), time.perf_counter()
    try:
        # the reported request: 84 bytes asking an 8x8 model for a 4008x4008 canvas
        huge = client.post("/api/outpaint", json={"image": image, **dict.fromkeys(("left", "top", "right", "bottom"),
                                                                                    2000)})
        assert huge.status_code == 422, huge.text
        assert "4008x4008 pixels; this model allows at most 32x32 (4 × its 8x8 images" in huge.json()["error"]
        assert "max_canvas_scale" in huge.json()["error"]
        wide = client.post("/api/outpaint", json={"image": image, "right": 32})
        assert wide.status_code == 422 and wide.json()["field"] == "right" and "40x8" in wide.json()["error"]
        # an upload over the limit is refused from its header, before its pixels are decoded
        big = png_data_url(np.zeros((1024, 1024), np.uint8))
        for kind in ("inpaint", "outpaint"):
            response = client.post(f"/api/{kind}", json={"image": big, "mask": mask} if kind == "inpaint"
                                   else {"image": big, "right": 8})
            assert response.status_code == 422 and response.json()["field"] == "image", response.text
            assert "1024x1024 pixels; this model allows at most 32x32" in response.json()["error"]
        # a canvas within the limit, but too many fills of it: the pixel budget is the model's own batch
        many = client.post("/api/outpaint", json={"image": image, "right": 24, "bottom": 24, "num_images": 8})
        assert many.status_code == 422 and many.json()["field"] == "num_images"
        assert "budget of 4096 pixels" in many.json()["error"]
        elapsed = time.perf_counter() - started
    finally:
        counter.remove()
    assert elapsed < 2 and counter.count == 0 and app.state.worker.unfinished == 0  # nothing was queued
    assert peak_rss_bytes() - rss_before < 200 * 2**20
    largest = events_of(client.post("/api/outpaint", json={"image": image, "right": 24, "bottom": 24,
                                                            "num_images": 4, **FAST}))[-1]
    assert largest["event"] == "done" and decode_data_url(largest["images"][0]).shape == (32, 32)


def test_the_canvas_limit_is_a_server_option(pipeline):
    with BackgroundServer(create_app(pipeline, max_canvas_scale=2)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/api/info").json()["limits"]["max_canvas"] == [16, 16]
        image = png_data_url(sample_image(pipeline))
        refused = client.post("/api/outpaint", json={"image": image, "right": 9})
        assert refused.status_code == 422 and "at most 16x16 (2 × its 8x8" in refused.json()["error"]
    with pytest.raises(ValueError, match="max_canvas_scale must be a number >= 1"):
        create_app(pipeline, max_canvas_scale=0.5)


def test_hostile_json_is_a_one_line_400_and_the_connection_serves_on(client):
    digits, too_deep = "1" * 5000, f"more than {MAX_JSON_DEPTH} levels deep"
    bodies = {
        "deep": (b"[" * 60_000, too_deep),  # under the fixture's 64 KiB body limit
        "deep objects": (b'{"a":' * 12_000, too_deep),
        "deep but parseable": (b"[" * 500 + b"]" * 500, too_deep),
        "long integer": (f'{{"steps": {digits}}}'.encode(), "integer of 5000 digits"),
        "long negative seed": (b'{"seed": -' + b"9" * 31 + b"}", f"no field takes more than {MAX_INTEGER_DIGITS}"),
        "not UTF-8": (b'{"steps": "\xff\xfe"}', "not valid JSON"),
        "overflowing float": (b'{"temperature": 1e999}', "finite number"),
    }
    for name, (body, fragment) in bodies.items():
        response = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert "\n" not in error and len(error) < 300 and "Traceback" not in response.text, (name, error)
        assert fragment in error, (name, error)
        assert response.headers.get("connection") != "close", name  # the next request reuses the connection
        done = events_of(client.post("/api/generate", json={"seed": 1, **FAST}))[-1]
        assert done["event"] == "done", name


def test_a_bug_is_a_one_line_500_and_the_connection_serves_on(client, monkeypatch):
    from sundae.app import operations

    def broken(*_: object) -> None:
        raise ZeroDivisionError("division by zero")

    with monkeypatch.context() as patch:
        patch.setattr(operations, "prepare", broken)
        response = client.post("/api/generate", json={"seed": 1})
    assert response.status_code == 500 and response.json()["error"] == \
        "internal error (ZeroDivisionError); see the server log"
    assert response.headers.get("connection") != "close"
    assert events_of(client.post("/api/generate", json={"seed": 1, **FAST}))[-1]["event"] == "done"


def test_favicon_model_names_and_the_outpaint_default(client, tmp_path):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.startswith(b"<svg") and client.get("/static/favicon.svg").content == icon.content
    assert 'rel="icon" href="/static/favicon.svg"' in client.get("/").text
    outpaint = {field["name"]: field for field in client.get("/api/info").json()["operations"]["outpaint"]}
    # a first Run extends the right side by half the model's width, in steps of f
    assert [outpaint[side]["default"] for side in ("left", "top", "right", "bottom")] == [0, 0, 4, 0]
    assert outpaint["right"]["step"] == 1
    for folder, config, expected in [("run-a/model", {}, "run-a"), ("fashion", {}, "fashion"),
                                     ("run-b/model", {"name": "Fashion prior"}, "Fashion prior")]:
        directory = tmp_path / folder
        directory.mkdir(parents=True)
        (directory / "model_index.json").write_text(json.dumps(config))
        assert model_name(directory) == expected


# --- a seeded fuzzer -----------------------------------------------------------------------------


def fuzz_images(rng: random.Random) -> list[str]:
    """Image fields a client might send: valid ones in every upload format and mode, and broken ones."""
    grey = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (8, 8), dtype=np.uint8)

    def encoded(image: Image.Image, fmt: str = "PNG") -> str:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()

    png = encoded(Image.fromarray(grey))
    return [
        png, png_data_url(np.full((8, 8), 255, np.uint8)), png.split(",", 1)[1],  # bare base64
        encoded(Image.fromarray(grey).convert("RGBA")), encoded(Image.fromarray(grey).convert("P")),
        encoded(Image.fromarray(grey).convert("1")), encoded(Image.fromarray(grey.astype(np.uint16) * 200)),  # I;16
        encoded(Image.fromarray(grey).convert("RGB"), "JPEG"), encoded(Image.fromarray(grey), "GIF"),
        encoded(Image.fromarray(grey), "BMP"), encoded(Image.fromarray(grey).convert("RGB"), "WEBP"),
        png_data_url(np.zeros((7, 9), np.uint8)), png_data_url(np.zeros((1, 4000), np.uint8)),
        png_data_url(np.zeros((40, 8), np.uint8)), png[: len(png) // 2], png + "AAAA", "data:image/png;base64,",
        "data:,", "", "@@@", "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode(),
        "data:image/png;base64," + base64.b64encode(rng.randbytes(64)).decode(),
    ]


def fuzz_value(rng: random.Random, images: list[str], depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:  # small valid-looking and huge integers (no mid-size steps: keep accepted jobs short)
        return rng.choice([0, 1, 2, 3, 7, 8, 16, 24, -1, -8, 2**31, 2**53, 2**63, 10**25, -(10**29)])
    if kind == 2:
        return rng.choice([0.0, 0.5, 1.0, -0.1, 1e-300, 1e308, -1e308, 49.9, 50.1, float("nan"), float("inf")])
    if kind == 3:
        return rng.choice(["", "50", "dots", "Dots", "1_dots", "-1", "٣", "²", "any", "all", "x" * 300,
                           "../../etc/passwd", "\u0000", "1" * 50])
    if kind in (4, 5):
        return rng.choice(images)
    if kind in (6, 7):
        return [fuzz_value(rng, images, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["steps", "image", "a", ""]): fuzz_value(rng, images, depth + 1)
            for _ in range(rng.randrange(3))}


def fuzz_request(rng: random.Random, images: list[str]) -> tuple[str, str, bytes, str]:
    """(method, path, body, content type): mostly mutated valid requests, some random values or bytes."""
    kind = rng.choice(["generate", "inpaint", "refine", "outpaint"])
    path = f"/api/{kind}"
    body: dict = {"steps": rng.randrange(1, 4), "num_images": rng.randrange(1, 3), "seed": rng.randrange(100)}
    if kind != "generate":
        body["image"] = images[0]
    if kind in ("inpaint", "refine"):
        body["mask"] = images[1]
    if kind == "outpaint":
        body[rng.choice(["left", "top", "right", "bottom"])] = rng.choice([1, 4, 8, 24, 25, 2000, -3, 10**6])
    fields = ["steps", "num_images", "seed", "temperature", "end_temperature", "proportion", "class_label",
              "guidance_scale", "early_stop", "image", "mask", "mask_rule", "paste_back", "strength", "left", "top",
              "right", "bottom", "unknown", "__proto__"]
    for _ in range(rng.randrange(4)):
        if body and rng.random() < 0.25:
            body.pop(rng.choice(sorted(body)))
        else:
            body[rng.choice(fields)] = fuzz_value(rng, images)
    shape = rng.random()
    if shape < 0.75:
        content = json.dumps(body).encode()
    elif shape < 0.85:
        content = json.dumps(fuzz_value(rng, images)).encode()
    elif shape < 0.95:
        text = json.dumps(body).encode()
        content = rng.choice([text[: rng.randrange(len(text))], rng.randbytes(rng.randrange(1, 200)),
                              b"[" * rng.randrange(1, 5000), b'{"seed": ' + b"7" * rng.randrange(20, 6000) + b"}",
                              text.replace(b"1", b"1" * 40, 1)])
    else:
        method = rng.choice(["GET", "PUT", "DELETE"])
        return method, rng.choice([path, "/api/info", "/api/nothing", "/static/../server.py", "/favicon.ico"]), b"", ""
    content_type = rng.choice(["application/json"] * 12 + ["text/plain", "application/json; charset=utf-8", ""])
    return "POST", path, content, content_type


def test_fuzzed_requests_never_get_a_server_error(served):
    client, pipeline, app, _ = served
    wait_until_idle(app)
    rng = random.Random(1234)
    images = fuzz_images(rng)
    statuses: dict[int, int] = {}
    for index in range(300):
        method, path, content, content_type = fuzz_request(rng, images)
        headers = {"content-type": content_type} if content_type else {}
        with client.stream(method, path, content=content or None, headers=headers) as response:
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case = (index, method, path, content[:200], response.status_code)
            assert response.status_code < 500, (case, response.read()[:300])
            if response.status_code != 200 or not path.startswith("/api/") or method != "POST":
                continue
            if index % 5 == 0:
                continue  # leave mid-stream: the job is cancelled
            events = [json.loads(line) for line in response.iter_lines() if line]
            assert events[0]["event"] == "queued" and events[-1]["event"] in ("done", "error"), (case, events[-1])
            assert not events[-1].get("message", "").startswith("internal error"), (case, events[-1])
    assert statuses.get(200, 0) >= 20 and statuses.get(422, 0) >= 100, statuses  # both sides were exercised
    wait_until_idle(app)
    done = events_of(client.post("/api/generate", json={"seed": 3, **FAST}))[-1]
    assert done["event"] == "done" and len(done["images"]) == 4


# --- the tokenizer's paths: uploads the CLI refuses, cancelling a long encode or decode ---------------


@pytest.fixture(scope="module")
def vq_served(tiny_pipeline_dir):
    """A tiny VQ-GAN pipeline (16x16 RGB, f=2) of its own, so slowing its tokenizer touches no other test."""
    pipeline = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    app = create_app(pipeline)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, pipeline, app


def rgb_data_url(height: int, width: int) -> str:
    return png_data_url(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_an_upload_the_cli_refuses_is_refused_with_the_clis_reason(vq_served):
    client, _, app = vq_served
    info = client.get("/api/info").json()
    assert info["model"]["factor"] == 2 and info["model"]["image_size"] == [16, 16]
    assert info["limits"]["max_canvas"] == [64, 64]
    response = client.post("/api/outpaint", json={"image": rgb_data_url(15, 16), "right": 8})
    assert response.status_code == 422 and response.json()["field"] == "image"
    assert "is 16x15 pixels; both sides must be multiples of the tokenizer factor f=2" in response.json()["error"]
    odd_side = client.post("/api/outpaint", json={"image": rgb_data_url(16, 16), "right": 3})
    assert odd_side.status_code == 422 and odd_side.json()["field"] == "right"


class SlowModules:
    """Makes every Conv2d of ``module`` sleep ``delay`` seconds after its forward; ``entered`` is set at the first."""

    def __init__(self, module: torch.nn.Module, delay: float) -> None:
        self.entered = threading.Event()
        self.delay = delay
        self.convolutions = [sub for sub in module.modules() if isinstance(sub, torch.nn.Conv2d)]
        self._handles = [sub.register_forward_hook(self._hook) for sub in self.convolutions]

    def _hook(self, *_: object) -> None:
        self.entered.set()
        time.sleep(self.delay)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_a_disconnect_stops_a_long_encode_or_decode_within_a_second(vq_served, part):
    client, pipeline, app = vq_served
    wait_until_idle(app)
    slow = SlowModules(getattr(pipeline.tokenizer, part), delay=0.1)
    assert len(slow.convolutions) * slow.delay > 1.5  # one pass alone would outlast the bound below
    mask = png_data_url(np.full((16, 16), 255, np.uint8))
    try:
        with client.stream("POST", "/api/inpaint", json={"image": rgb_data_url(16, 16), "mask": mask,
                                                          "num_images": 1, "steps": 2}) as response:
            assert response.status_code == 200
            assert slow.entered.wait(20), f"the job never reached the {part}"
        left = time.perf_counter()  # the block closed the connection mid-{part}
        wait_until_idle(app, timeout=10)
        freed_after = time.perf_counter() - left
    finally:
        slow.remove()
    assert freed_after < 1.0, f"the worker was busy {freed_after:.2f}s after the client left"
    done = events_of(client.post("/api/inpaint", json={"image": rgb_data_url(16, 16), "mask": mask,
                                                        "num_images": 1, "steps": 2}))[-1]
    assert done["event"] == "done"


# --- results --------------------------------------------------------------------------------------


def test_generate_streams_previews_then_the_pipelines_own_images(client, pipeline):
    events = events_of(client.post("/api/generate", json={"num_images": 3, "seed": 11, **FAST}))
    kinds = [event["event"] for event in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done" and "preview" in kinds
    first_preview = next(event for event in events if event["event"] == "preview")
    assert first_preview["step"] == 1 and len(first_preview["images"]) == 3
    done = events[-1]
    expected = pipeline(3, seed=11, **FAST)
    assert done["seeds"] == [11, 12, 13] and done["steps_taken"] == expected.steps_taken.tolist()
    for url, image in zip(done["images"], expected.images):
        assert np.array_equal(decode_data_url(url), np.asarray(image))


def test_concurrent_requests_queue_and_keep_their_own_results(served):
    client, pipeline, app, _ = served
    slow = {"num_images": 2, "seed": 5, "steps": 60, "early_stop": False}
    quick = {"num_images": 3, "seed": 40, "class_label": "dots", "guidance_scale": 2.0, **FAST}
    results: dict[str, list[dict]] = {}
    first_started = threading.Event()

    def run_slow() -> None:
        with client.stream("POST", "/api/generate", json=slow) as response:
            results["slow"] = []
            for line in response.iter_lines():
                results["slow"].append(json.loads(line))
                first_started.set()

    thread = threading.Thread(target=run_slow)
    thread.start()
    assert first_started.wait(20)
    results["quick"] = events_of(client.post("/api/generate", json=quick))
    thread.join(30)

    assert results["quick"][0]["ahead"] == 1  # queued behind the slow job, not run beside it
    slow_done, quick_done = results["slow"][-1], results["quick"][-1]
    assert slow_done["job"] != quick_done["job"]
    for done, request in ((slow_done, slow), (quick_done, quick)):
        options = {key: value for key, value in request.items() if key not in ("num_images", "seed", "class_label")}
        expected = pipeline(request["num_images"], seed=request["seed"], class_labels=request.get("class_label"),
                            **options)
        assert [np.asarray(image).tolist() for image in expected.images] == \
            [decode_data_url(url).tolist() for url in done["images"]]


def test_inpaint_refine_outpaint_match_the_pipeline_and_keep_known_pixels(client, pipeline):
    image = sample_image(pipeline)
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 2:6] = 255
    common = {"num_images": 3, "seed": 7, **FAST}
    inpainted = events_of(client.post("/api/inpaint", json={"image": png_data_url(image), "mask": png_data_url(mask),
                                                             **common}))[-1]
    expected = pipeline.inpaint(image, mask > 0, num_images=3, seed=7, **FAST)
    fills = [decode_data_url(url) for url in inpainted["images"]]
    assert [fill.tolist() for fill in fills] == [np.asarray(picture).tolist() for picture in expected.images]
    for fill in fills:
        assert np.array_equal(fill[mask == 0], image[mask == 0])
    assert len({fill[mask > 0].tobytes() for fill in fills}) == 3  # three different fills of one mask

    refined = events_of(client.post("/api/refine", json={"image": png_data_url(image), "mask": png_data_url(mask),
                                                          "strength": 0.0, **common}))[-1]
    expected = pipeline.refine(image, mask > 0, strength=0.0, num_images=3, seed=7, **FAST)
    assert [decode_data_url(url).tolist() for url in refined["images"]] == \
        [np.asarray(picture).tolist() for picture in expected.images]

    outpainted = events_of(client.post("/api/outpaint", json={"image": png_data_url(image), "right": 4,
                                                               "top": 2, **common}))[-1]
    extended = decode_data_url(outpainted["images"][0])
    assert extended.shape == (10, 12) and np.array_equal(extended[2:, :8], image)


@pytest.fixture(scope="module")
def scheduled_served(scheduled_pipeline_dir):
    pipeline = load_pipeline(scheduled_pipeline_dir, device="cpu")
    with BackgroundServer(create_app(pipeline)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, pipeline


def test_the_forms_take_the_models_scheduler_and_a_request_without_knobs_samples_as_the_pipeline(scheduled_served):
    client, pipeline = scheduled_served
    forms = {kind: {field["name"]: field for field in fields}
             for kind, fields in client.get("/api/info").json()["operations"].items()}
    knobs = [name for name, knob in SamplingOptions.knobs().items() if knob.form]
    assert all(name in form for form in forms.values() for name in knobs)  # every knob, from the one definition
    generate = forms["generate"]
    assert [generate[name]["default"] for name in ("steps", "end_temperature", "early_stop", "guidance_scale")] \
        == [7, 0.5, False, 2.0]
    assert generate["top_k"]["default"] is None and generate["top_k"]["placeholder"] == "off"
    assert generate["temperature_schedule"]["choices"] == ["linear", "cosine"]
    for kind in ("inpaint", "refine", "outpaint"):  # the model's steps, the low edit temperature on top
        assert [forms[kind][name]["default"] for name in ("steps", "temperature", "end_temperature")] == [7, 0.4, 0.4]

    done = events_of(client.post("/api/generate", json={"num_images": 2, "seed": 5}))[-1]
    expected = pipeline(2, seed=5)
    assert done["steps_taken"] == expected.steps_taken.tolist() == [7, 7]
    assert [decode_data_url(url).tolist() for url in done["images"]] == \
        [np.asarray(i).tolist() for i in expected.images]
    # with a class the model's guidance applies (without one it cannot, as in the pipeline)
    guided = events_of(client.post("/api/generate", json={"num_images": 2, "seed": 5, "class_label": "class1"}))[-1]
    assert [decode_data_url(url).tolist() for url in guided["images"]] == \
        [np.asarray(i).tolist() for i in pipeline(2, seed=5, class_labels="class1").images]
    flagged = events_of(client.post("/api/generate", json={"num_images": 2, "seed": 5, "steps": 3, "top_k": 4}))[-1]
    expected = pipeline(2, seed=5, steps=3, top_k=4)
    assert flagged["steps_taken"] == [3, 3]
    assert [decode_data_url(url).tolist() for url in flagged["images"]] == \
        [np.asarray(i).tolist() for i in expected.images]

    image = np.asarray(pipeline(1, seed=9).images[0])
    mask = np.zeros((16, 16), np.uint8)
    mask[2:10, 4:12] = 255
    filled = events_of(client.post("/api/inpaint", json={"image": png_data_url(image), "mask": png_data_url(mask),
                                                          "num_images": 2, "seed": 7}))[-1]
    expected = pipeline.inpaint(image, mask > 0, num_images=2, seed=7)
    assert filled["steps_taken"] == [7, 7]
    assert [decode_data_url(url).tolist() for url in filled["images"]] == \
        [np.asarray(i).tolist() for i in expected.images]


# --- cancellation -------------------------------------------------------------------------------


def test_a_disconnected_client_stops_its_sampling(served):
    client, pipeline, app, _ = served
    wait_until_idle(app)
    counter = ForwardCounter(pipeline.prior)
    counter.delay = 0.005  # 1000 steps would take over 5 s
    try:
        with client.stream("POST", "/api/generate", json={"steps": 1000, "early_stop": False, "seed": 1}) as response:
            for line in response.iter_lines():
                if json.loads(line)["event"] == "preview":
                    break  # leaving the block closes the connection mid-stream
        wait_until_idle(app, timeout=10)
        stopped_at = counter.count
        time.sleep(0.1)
        assert counter.count == stopped_at, "sampling went on after the job ended"
        assert 1 <= stopped_at < 200, f"the cancelled job ran {stopped_at} of 1000 steps"
    finally:
        counter.remove()
    assert events_of(client.post("/api/generate", json={"seed": 2, **FAST}))[-1]["event"] == "done"


def test_a_disconnected_client_stops_its_inpainting_through_the_step_callback(served):
    """The prior carries no cancellation hooks: the sampler's step callback sees the flag and stops."""
    client, pipeline, app, root = served
    wait_until_idle(app)
    assert not any(module is pipeline.prior for module in app.state.catalogue.get(None).watched)  # no hook
    saved = set(root.rglob("*"))
    counter = ForwardCounter(pipeline.prior)
    counter.delay = 0.005
    mask = png_data_url(np.full((8, 8), 255, np.uint8))
    try:
        with client.stream("POST", "/api/inpaint", json={"image": png_data_url(sample_image(pipeline)), "mask": mask,
                                                          "steps": 1000, "early_stop": False}) as response:
            for line in response.iter_lines():
                if json.loads(line)["event"] == "started":
                    break
        wait_until_idle(app, timeout=10)
        assert 0 <= counter.count < 200, f"the cancelled job ran {counter.count} of 1000 steps"
    finally:
        counter.remove()
    assert set(root.rglob("*")) == saved  # a cancelled job saves nothing


def test_a_cancelled_job_stops_at_the_next_forward_and_a_queued_one_never_runs(pipeline):
    worker = ModelWorker()
    counter = ForwardCounter(pipeline.prior)
    events: dict[str, list] = {"running": [], "queued": []}
    ran_queued = []

    def cancel_after_three_steps(job: Job) -> dict:
        return {"taken": pipeline(1, seed=0, steps=100, early_stop=False,
                                  callback=lambda step, *_: job.cancel() if step == 2 else None).steps_taken.tolist()}

    running = Job(kind="generate", run=cancel_after_three_steps, emit=events["running"].append,
                  watched=(pipeline.prior,))
    queued = Job(kind="generate", run=lambda job: ran_queued.append(job) or {}, emit=events["queued"].append)
    try:
        worker.submit(running)
        queued.cancel()
        worker.submit(queued)
        deadline = time.monotonic() + 10
        while worker.unfinished and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        counter.remove()
        worker.shutdown()
    assert counter.count == 3  # steps 0, 1, 2 ran; the forward of step 3 saw the flag
    assert [event and event["event"] for event in events["running"]] == ["started", "cancelled", None]
    assert events["queued"] == [{"event": "cancelled"}, None] and not ran_queued


# --- files --------------------------------------------------------------------------------------


def test_results_are_written_only_into_the_output_folder(served, monkeypatch, tmp_path):
    client, pipeline, app, root = served
    monkeypatch.chdir(tmp_path)
    wait_until_idle(app)
    before = {path for path in root.rglob("*")}
    image = sample_image(pipeline)
    mask = np.full((8, 8), 255, np.uint8)
    done = events_of(client.post("/api/generate", json={"num_images": 2, "seed": 3, **FAST}))[-1]
    events_of(client.post("/api/inpaint", json={"image": png_data_url(image), "mask": png_data_url(mask),
                                                "num_images": 1, **FAST}))
    refused = client.post("/api/generate", json={"filename": "../model/config.json", **FAST})
    assert refused.status_code == 422
    wait_until_idle(app)

    new = {path for path in root.rglob("*")} - before
    outputs = (root / "outputs").resolve()
    assert new and all(path.resolve().parent == outputs for path in new)
    name = re.compile(r"^\d{8}-\d{6}-(generate|inpaint)-[0-9a-f]{8}(-\d\d\.png|\.json)$")
    assert all(name.match(path.name) for path in new), sorted(path.name for path in new)
    assert len([path for path in new if path.suffix == ".png"]) == 3 and not list(tmp_path.iterdir())
    record = json.loads((outputs / f"{done['job']}.json").read_text())
    assert record["seeds"] == [3, 4] and record["files"] == done["files"]
    assert np.array_equal(np.asarray(Image.open(outputs / done["files"][1])), decode_data_url(done["images"][1]))


def test_serve_binds_loopback_unless_asked_and_names_a_missing_model(tmp_path, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    serve(build_tiny_pipeline_dir(tmp_path / "model"), output_dir=tmp_path / "outputs", device="cpu")
    assert (calls[0]["host"], calls[0]["port"]) == ("127.0.0.1", 7860) and (tmp_path / "outputs").is_dir()
    assert allowed_hosts_for("127.0.0.1") == ["127.0.0.1", "localhost"]
    assert allowed_hosts_for("10.0.0.7") == ["127.0.0.1", "localhost", "10.0.0.7"]
    assert allowed_hosts_for("0.0.0.0") == ["*"]
    with pytest.raises(InputError, match="missing does not exist"):
        serve(tmp_path / "missing")


# --- switching models ---------------------------------------------------------------------------


def build_other_pipeline_dir(directory: Path) -> Path:
    """A second model the page can switch to: another grid (12 x 12), other classes, and one editing
    example (a grey ramp whose right half is to be redone, in class "right")."""
    torch.manual_seed(1)
    prior = Hourglass(HourglassConfig(codebook_size=256, dim=32, depth=(1, 1, 1), heads=2, head_dim=16,
                                      latent_shape=(12, 12), num_classes=2))
    SundaePipeline(prior, PixelTokenizer(), class_names=["left", "right"]).save_pretrained(directory)
    examples = directory / "examples"
    examples.mkdir()
    Image.fromarray(np.tile(np.arange(0, 240, 20, dtype=np.uint8), (12, 1))).save(examples / "ramp.png")
    mask = np.zeros((12, 12), np.uint8)
    mask[:, 6:] = 255
    Image.fromarray(mask).save(examples / "ramp.mask.png")
    (examples / "examples.json").write_text(json.dumps(
        [{"name": "ramp: redo the right half", "image": "ramp.png", "mask": "ramp.mask.png", "class_label": "right"}]))
    return directory


def test_the_app_switches_between_models_by_name_and_loads_each_on_first_use(tmp_path):
    first = load_pipeline(build_tiny_pipeline_dir(tmp_path / "tiny"), device="cpu")
    other_dir = build_other_pipeline_dir(tmp_path / "other")
    app = create_app(first, models={"other": other_dir, "broken": tmp_path / "missing"})
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get("/api/info").json()
        assert info["models"] == ["tiny", "other", "broken"] and info["model"]["name"] == "tiny"
        assert info["model"]["image_size"] == [8, 8]
        other = client.get("/api/info", params={"model": "other"}).json()
        assert other["model"]["name"] == "other" and other["model"]["image_size"] == [12, 12]
        assert other["model"]["class_names"] == ["left", "right"]
        assert info["examples"] == [] and [e["name"] for e in other["examples"]] == ["ramp: redo the right half"]
        example = other["examples"][0]
        assert example["class_label"] == "right" and decode_data_url(example["mask"])[:, 6:].min() == 255
        assert other["limits"]["max_canvas"] != info["limits"]["max_canvas"]  # limits follow the model
        done = events_of(client.post("/api/generate", json={"model": "other", "num_images": 2, "seed": 4,
                                                            "class_label": "right", **FAST}))[-1]
        expected = SundaePipeline.from_pretrained(other_dir, device="cpu")(2, seed=4, class_labels="right", **FAST)
        for url, image in zip(done["images"], expected.images):
            assert decode_data_url(url).shape == (12, 12)
            assert np.array_equal(decode_data_url(url), np.asarray(image))
        # the first model still answers requests that name no model, with its own classes
        plain = events_of(client.post("/api/generate", json={"num_images": 1, "seed": 4, **FAST}))[-1]
        assert decode_data_url(plain["images"][0]).shape == (8, 8)
        refused = client.post("/api/generate", json={"model": "tiny", "class_label": "right", **FAST})
        assert refused.status_code == 422 and refused.json()["field"] == "class_label"
        unknown = client.post("/api/generate", json={"model": "nope", **FAST})
        assert unknown.status_code == 422 and unknown.json()["field"] == "model"
        assert "nope" in unknown.json()["error"] and "tiny, other, broken" in unknown.json()["error"]
        wrong_type = client.post("/api/generate", json={"model": 3, **FAST})
        assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "model"
        broken = client.get("/api/info", params={"model": "broken"})
        assert broken.status_code == 500 and "internal error" not in broken.json()["error"]


def test_broken_examples_are_skipped_and_cannot_reach_outside_their_folder(tmp_path):
    from sundae.app.operations import read_examples

    directory = build_other_pipeline_dir(tmp_path / "other")
    assert len(read_examples(directory)) == 1
    (tmp_path / "secret.png").write_bytes((directory / "examples" / "ramp.png").read_bytes())
    (directory / "examples" / "examples.json").write_text(json.dumps(
        [{"name": "escape", "image": "../../secret.png", "mask": "ramp.mask.png"}]))
    assert read_examples(directory) == []  # only the file name counts: examples/secret.png does not exist
    (directory / "examples" / "examples.json").write_text("{not json")
    assert read_examples(directory) == [] and read_examples(None) == []


def test_the_app_serves_a_var_model_beside_a_sundae_one(tmp_path):
    from sundae.config import NEXT_SCALE_PRESETS, VQGAN_PRESETS, NextScaleOptions
    from sundae.pipelines import load_pipeline as load_either
    from sundae.var import MultiScaleVQGAN, NextScaleTransformer
    from sundae.var.pipeline import VARPipeline

    torch.manual_seed(0)
    var = VARPipeline(NextScaleTransformer(NEXT_SCALE_PRESETS["tiny"].replace(num_classes=2)),
                      MultiScaleVQGAN(VQGAN_PRESETS["tiny-msvq"]), class_names=["left", "right"],
                      sampling_defaults=NextScaleOptions(guidance_scale=2.0))
    var_dir = var.save_pretrained(tmp_path / "var")
    first = load_pipeline(build_tiny_pipeline_dir(tmp_path / "tiny"), device="cpu")
    app = create_app(first, models={"var": var_dir})
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get("/api/info", params={"model": "var"}).json()
        assert info["model"]["paradigm"] == "VAR" and info["model"]["image_size"] == [16, 16]
        assert client.get("/api/info").json()["model"]["paradigm"] == "SUNDAE"
        assert set(info["operations"]) == {"generate", "inpaint", "outpaint"}  # VAR cannot refine
        knobs = {field["name"] for field in info["operations"]["generate"]}
        assert {"temperature", "top_k", "guidance_scale", "guidance_schedule"} <= knobs and "steps" not in knobs
        events = events_of(client.post("/api/generate", json={"model": "var", "num_images": 2, "seed": 4,
                                                              "class_label": "right"}))
        done = events[-1]
        expected = load_either(var_dir, device="cpu")(2, seed=4, class_labels="right")
        for url, image in zip(done["images"], expected.images):
            assert np.array_equal(decode_data_url(url), np.asarray(image))
        assert done["steps_taken"] == [3, 3]  # one forward pass per scale
        image = png_data_url(np.asarray(expected.images[0]))
        mask = png_data_url(np.pad(np.full((16, 8), 255, np.uint8), ((0, 0), (8, 0))))
        inpainted = events_of(client.post("/api/inpaint", json={"model": "var", "image": image, "mask": mask,
                                                                "num_images": 1, "seed": 1}))[-1]
        assert inpainted["event"] == "done"
        refused = client.post("/api/refine", json={"model": "var", "image": image, "mask": mask})
        assert refused.status_code == 422 and "use inpaint" in refused.json()["error"]
        wrong = client.post("/api/generate", json={"model": "var", "steps": 10})
        assert wrong.status_code == 422 and wrong.json()["field"] == "steps"
