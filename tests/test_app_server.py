"""The web app's server (sundae.app): request validation, one queued worker whose results match direct
pipeline calls, cancellation on disconnect, and writes confined to the output folder.

Everything goes over real HTTP to a uvicorn server on a free 127.0.0.1 port, with a tiny random
pixel-token pipeline (grey 8x8 images, f=1).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sundae.app import BackgroundServer, create_app, serve
from sundae.app.server import allowed_hosts_for
from sundae.app.worker import Job, ModelWorker
from sundae.config import HourglassConfig
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
    pipeline = SundaePipeline.from_pretrained(build_tiny_pipeline_dir(root / "model"), device="cpu")
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
    assert info["model"] == {"name": "model", "tokenizer": "pixels", "factor": 1, "codebook_size": 256,
                             "image_size": [8, 8], "channels": 1, "class_names": CLASS_NAMES, "device": "cpu"}
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
    no_sides = client.post("/api/outpaint", json={"image": png_data_url(image)})
    assert no_sides.status_code == 422 and "at least one" in no_sides.json()["error"]
    strength = client.post("/api/refine", json={"image": png_data_url(image), "mask": png_data_url(mask),
                                                 "strength": 1.5})
    assert strength.status_code == 422 and strength.json()["field"] == "strength"


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


def test_a_cancelled_job_stops_at_the_next_forward_and_a_queued_one_never_runs(pipeline):
    worker = ModelWorker(pipeline.prior)
    counter = ForwardCounter(pipeline.prior)
    events: dict[str, list] = {"running": [], "queued": []}
    ran_queued = []

    def cancel_after_three_steps(job: Job) -> dict:
        return {"taken": pipeline(1, seed=0, steps=100, early_stop=False,
                                  callback=lambda step, *_: job.cancel() if step == 2 else None).steps_taken.tolist()}

    running = Job(kind="generate", run=cancel_after_three_steps, emit=events["running"].append)
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
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        serve(tmp_path / "missing")
