"""The local web app: generate and watch the denoising, paint a mask, inpaint / refine / outpaint.

Fast sampling (paper §1, §3.4; talk slides 1, 9) makes interactive use possible: a user can watch
a batch form from noise, mask a broken region and draw many fills of it (§3.6; slides 20-23).

Stack. Starlette + uvicorn serve one static page written in plain JavaScript (``static/``: no CDN,
no build step, nothing fetched at run time, so it works offline). They are two small, well-kept
pure-Python packages without heavy dependencies, and the ASGI app object can be tested in-process
with Starlette's TestClient. Gradio was the alternative: it also runs offline, but it is a large
dependency, and its mask editor is hard to drive from a browser test; here the mask is a plain
``<canvas>`` brush. Progress is streamed as JSON lines (``application/x-ndjson``) over one POST
response rather than Server-Sent Events, because ``EventSource`` can only GET (the request carries
images), and lines of JSON are read just as easily by ``fetch`` in the page and by httpx in tests.

Behaviour. The server binds 127.0.0.1 unless told otherwise and then answers only requests
addressed to that host (no DNS rebinding); requests must be JSON (so another web site cannot post
to it without a CORS pre-flight it will not get). Every field is validated (HTTP 422 naming the
field; a body over the limit is HTTP 413, malformed JSON HTTP 400), and sizes follow the model: an
image or outpainted canvas is at most ``max_canvas_scale`` times the model's image size per side.
One worker thread runs the model, so concurrent requests queue and never mix; a client that
disconnects cancels its job: sampling stops after its current step, encoding or decoding within one
module's forward pass. Results are written only into the output folder, under names the server makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from torch import nn

import sundae.app.operations as operations
from sundae.app.validation import (DEFAULT_MAX_CANVAS_SCALE, MAX_IMAGES, MAX_JSON_DEPTH, MAX_STEPS, OPERATIONS,
                                   CanvasLimit, RequestError, describe_fields, operation_fields, parse_json,
                                   read_fields)
from sundae.app.worker import Event, Job, ModelWorker
from sundae.checkpoint import CheckpointError, read_json
from sundae.errors import InputError
from sundae.models import SHIPPED_MODELS, model_directory, shipped_name
from sundae.pipeline import MODEL_INDEX_NAME, VAR_PIPELINE_KIND, SundaePipeline
from sundae.pipelines import load_pipeline as load_either
from sundae.tokenizer.pixels import PixelTokenizer

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 10 * 2**20
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# names of the folder a trainer exports its model into, which say nothing about the model
GENERIC_MODEL_NAMES = ("model", "checkpoint", "pipeline")
# The page loads nothing but its own files; images are data: URLs.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"


def model_facts(pipeline: SundaePipeline) -> dict[str, Any]:
    config = pipeline.prior.config
    num_classes = config.num_classes
    class_names = pipeline.class_names or (None if num_classes is None else [str(i) for i in range(num_classes)])
    return {
        "name": pipeline.name,
        "paradigm": "VAR" if pipeline.kind == VAR_PIPELINE_KIND else "SUNDAE",
        "tokenizer": "pixels" if isinstance(pipeline.tokenizer, PixelTokenizer) else
                     "multi-scale VQ-GAN" if pipeline.kind == VAR_PIPELINE_KIND else "VQ-GAN",
        "factor": pipeline.factor,
        "codebook_size": pipeline.tokenizer.config.codebook_size,
        "image_size": list(pipeline.image_size),
        "channels": pipeline.channels,
        "class_names": class_names,
        "device": str(pipeline.device),
    }


def body_too_large(max_bytes: int) -> RequestError:
    return RequestError(f"the request is larger than {max_bytes / 2**20:.3g} MB; upload a smaller image", status=413)


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refusing bodies over ``max_bytes`` before (Content-Length) or while reading them,
    and anything not sent as JSON; it is parsed by :func:`~sundae.app.validation.parse_json`."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise RequestError("send the request as JSON (Content-Type: application/json)", status=415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise body_too_large(max_bytes)
    return bytes(body)


def json_line(event: Event) -> bytes:
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


def stream_job(worker: ModelWorker, kind: str, run: Callable[[Job], dict[str, Any]], *,
               watched: tuple[nn.Module, ...] = ()) -> StreamingResponse:
    """Queue the job and stream its events; the job is cancelled when the stream ends early (disconnect)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event | None] = asyncio.Queue()

    def emit(event: Event | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(kind=kind, run=run, emit=emit, watched=watched)

    async def body() -> AsyncIterator[bytes]:
        try:  # submitted here, so a response that never starts (client gone) queues nothing
            yield json_line({"event": "queued", "job": job.id, "ahead": worker.submit(job)})
            while (event := await events.get()) is not None:
                yield json_line(event)
        finally:
            job.cancel()  # a no-op once the job has finished

    return StreamingResponse(body(), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def operation_endpoint(kind: str, max_body_bytes: int) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        state = request.app.state
        try:
            body = await read_json_body(request, max_body_bytes)
            # parsing, loading a model the first time it is asked for and decoding images take a while; a
            # thread keeps the event loop streaming others' previews
            payload = await run_in_threadpool(parse_json, body)
            served = await run_in_threadpool(state.catalogue.get, pop_model_name(payload))
            if kind not in served.fields:
                raise RequestError(f"{served.pipeline.name} is a VAR model, which does not {kind} (its coarse-to-fine "
                                   "sampler cannot re-sample from current tokens); use inpaint", status=422)
            values = await run_in_threadpool(read_fields, payload, served.fields[kind])
            prepared = await run_in_threadpool(operations.prepare, served.pipeline, kind, values, served.canvas)
        except RequestError:
            raise
        except Exception as error:  # answered here: Starlette's last-resort handler re-raises, and uvicorn then
            logger.exception("a %s request failed", kind)  # drops the connection after the response
            return internal_error_response(error)
        work = operations.generate if kind == "generate" else operations.edit
        return stream_job(state.worker, kind, partial(work, served.pipeline, prepared, folder=state.folder),
                          watched=served.watched)

    return endpoint


def pop_model_name(payload: Any) -> str | None:
    """The optional ``model`` of a request body (taken out of it: the operation's fields do not have it)."""
    if not isinstance(payload, dict) or "model" not in payload:
        return None
    name = payload.pop("model")
    if not isinstance(name, str):
        raise RequestError(f"must be a model's name (a string), got {type(name).__name__}", field="model")
    return name


async def info(request: Request) -> JSONResponse:
    state = request.app.state
    served = await run_in_threadpool(state.catalogue.get, request.query_params.get("model"))
    return JSONResponse({
        "model": model_facts(served.pipeline),
        "models": state.catalogue.names,
        "limits": {"max_body_bytes": state.max_body_bytes, "max_canvas": list(served.canvas.max_size),
                   "max_canvas_scale": served.canvas.scale, "max_images": MAX_IMAGES, "max_steps": MAX_STEPS,
                   "max_batch_pixels": operations.request_pixel_budget(served.pipeline),
                   "max_json_depth": MAX_JSON_DEPTH},
        "operations": {kind: describe_fields(fields) for kind, fields in served.fields.items()},
        "examples": served.examples,
        "saving": state.folder is not None,
        "unfinished_jobs": state.worker.unfinished,
    })


async def index(_: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


async def favicon(_: Request) -> FileResponse:
    """Browsers ask for /favicon.ico whatever the page links; the page's own icon answers."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


async def request_error(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(error), "field": error.field}, status_code=error.status)


def internal_error_response(error: Exception) -> JSONResponse:
    """A bug still answers in one JSON line (the traceback goes to the log, not to the client)."""
    return JSONResponse({"error": f"internal error ({type(error).__name__}); see the server log", "field": None},
                        status_code=500)


async def internal_error(_: Request, error: Exception) -> JSONResponse:
    return internal_error_response(error)


@dataclass(frozen=True)
class ServedModel:
    """A model as the app serves it: its pipeline, the canvas bound and field tables that follow from it,
    and the modules a cancelled job is stopped in (sampling stops through its step callback,
    :meth:`Job.wanted`; encoding and decoding, long for a large canvas, check the cancel flag before the
    forward of every tokenizer module, once a job: the checks cost nothing)."""

    pipeline: SundaePipeline
    canvas: CanvasLimit
    fields: dict[str, dict[str, Any]]
    watched: tuple[nn.Module, ...]
    examples: list[dict[str, Any]]  # editing examples of its directory (operations.read_examples)

    @classmethod
    def of(cls, pipeline: SundaePipeline, max_canvas_scale: float, directory: Path | None) -> "ServedModel":
        canvas = CanvasLimit(tuple(pipeline.image_size), max_canvas_scale)
        pipeline.set_progress_bar_config(disable=True)  # the server logs; previews show the progress
        fields = operation_fields(canvas, pipeline.factor, pipeline.sampling_options(),
                                  pipeline.sampling_options(edit=True), refines=pipeline.kind != VAR_PIPELINE_KIND)
        return cls(pipeline, canvas, fields, tuple(pipeline.tokenizer.modules()), operations.read_examples(directory))


class ModelCatalogue:
    """The models the page can switch between, by name: the one the app was started with (the default of
    a request that names none; ``first_directory``, where it was loaded from, may hold editing examples)
    and the ``others`` (name -> model directory), each loaded the first time it is asked for, on the
    first model's device and in its precision."""

    def __init__(self, first: SundaePipeline, others: Mapping[str, str | os.PathLike], max_canvas_scale: float,
                 first_directory: Path | None = None) -> None:
        self._max_canvas_scale = max_canvas_scale
        self._first = first.name
        self._loaded = {first.name: ServedModel.of(first, max_canvas_scale, first_directory)}
        same = (lambda path: first_directory is not None and Path(path).resolve() == first_directory.resolve())
        self._directories = {name: Path(path) for name, path in others.items()
                             if name != first.name and not same(path)}
        self._device, self._precision = first.device, first.precision
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [self._first, *self._directories]

    def get(self, name: str | None) -> ServedModel:
        """The served model called ``name`` (None: the first), loading it on first use."""
        name = self._first if name is None else name
        with self._lock:  # two first requests for one model load it once
            if name not in self._loaded:
                if name not in self._directories:
                    raise RequestError(f"unknown model {name!r}; this app serves {', '.join(self.names)}",
                                       field="model")
                try:
                    pipeline = load_either(self._directories[name], device=self._device,
                                           precision=self._precision)
                except InputError as error:  # a model directory gone or broken since the app started
                    raise RequestError(f"model {name!r} could not be loaded: {error}", field="model",
                                       status=500) from None
                pipeline.name = name
                self._loaded[name] = ServedModel.of(pipeline, self._max_canvas_scale, self._directories[name])
                logger.info("loaded model %s from %s", name, self._directories[name])
            return self._loaded[name]


def shipped_model_directories() -> dict[str, Path]:
    return {name: model.directory for name, model in SHIPPED_MODELS.items()}


def create_app(pipeline: SundaePipeline, *, output_dir: str | os.PathLike | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_canvas_scale: float = DEFAULT_MAX_CANVAS_SCALE,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               models: Mapping[str, str | os.PathLike] | None = None,
               model_dir: str | os.PathLike | None = None) -> Starlette:
    """The ASGI app over ``pipeline``; results are also saved in ``output_dir`` when it is given.

    ``max_canvas_scale``: an uploaded image or an outpainted canvas may be at most this many times the
    model's image size on each side. ``allowed_hosts`` are the Host header values answered (``["*"]``: any).
    ``models`` (name -> model directory; default: the shipped models) are the others the page can switch
    to; a request names its model in a ``model`` field, and one without it uses ``pipeline``, loaded from
    ``model_dir`` (where its editing examples are, if it has any).
    """
    folder = None
    if output_dir is not None:
        directory = Path(output_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        folder = operations.ResultFolder(directory)
    catalogue = ModelCatalogue(pipeline, shipped_model_directories() if models is None else models,
                               max_canvas_scale, None if model_dir is None else Path(model_dir))
    worker = ModelWorker()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    routes = [Route("/", index), Route("/favicon.ico", favicon), Route("/api/info", info),
              *(Route(f"/api/{kind}", operation_endpoint(kind, max_body_bytes), methods=["POST"])
                for kind in OPERATIONS),
              Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={RequestError: request_error, Exception: internal_error},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))])
    app.state.catalogue, app.state.worker, app.state.folder = catalogue, worker, folder
    app.state.max_body_bytes = max_body_bytes
    return app


def allowed_hosts_for(host: str) -> list[str]:
    if host in ("0.0.0.0", "::", ""):
        return ["*"]  # reachable under any name of this machine
    return list(dict.fromkeys([*LOOPBACK_HOSTS, host]))


def model_name(directory: Path) -> str:
    """What the page calls a model: the ``name`` in its model_index.json if it has one, else its folder's name,
    or the run's folder for a trainer's ``<run>/model`` export (so two trained models are not both "model")."""
    try:
        config = read_json(directory / MODEL_INDEX_NAME)
    except CheckpointError:  # loading the model says what is wrong with it; here a name is all
        config = {}
    name = config.get("name") if isinstance(config, dict) else None
    if isinstance(name, str) and name.strip():
        return name.strip()
    directory = directory.resolve()
    if directory.name in GENERIC_MODEL_NAMES and directory.parent.name:
        return directory.parent.name
    return directory.name


def load_pipeline(model_dir: str | os.PathLike | None, device: str | None = None,
                  precision: str = "auto") -> SundaePipeline:
    """The model in ``model_dir``, or the shipped default model; a shipped model goes by its registry name,
    any other by :func:`model_name`."""
    directory = model_directory(model_dir)
    pipeline = load_either(directory, device=device, precision=precision)
    pipeline.name = shipped_name(directory) or model_name(directory)
    return pipeline


def serve(model_dir: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 7860,
          output_dir: str | os.PathLike | None = None, device: str | None = None, precision: str = "auto",
          max_canvas_scale: float = DEFAULT_MAX_CANVAS_SCALE) -> None:
    """Run the web app until interrupted (CUDA when available, in bf16 there by default). Binds loopback unless
    ``host`` says otherwise; ``max_canvas_scale`` bounds images and canvases (see :func:`create_app`)."""
    import uvicorn

    pipeline = load_pipeline(model_dir, device, precision)
    app = create_app(pipeline, output_dir=output_dir, max_canvas_scale=max_canvas_scale,
                     allowed_hosts=allowed_hosts_for(host), model_dir=model_directory(model_dir))
    if host not in LOOPBACK_HOSTS:
        logger.warning("serving on %s: anyone who can reach this address can use the model (there is no login)", host)
    logger.info("sundae app for model %s on %s: http://%s:%d", pipeline.name, pipeline.device,
                "127.0.0.1" if host in ("0.0.0.0", "") else host, port)
    # streams still open two seconds after Ctrl-C are closed, which cancels their jobs
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


class BackgroundServer:
    """Serve an app on a daemon thread (tests, notebooks): ``with BackgroundServer(app) as server: server.url``.

    ``port=0`` takes a free port; the socket is bound before the thread starts, so there is no race.
    """

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._socket = socket.create_server((host, port))
        bound_host, bound_port = self._socket.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        for _ in range(500):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self._server.started:
            raise RuntimeError(f"the app did not start on {self.url}")
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
