"""The ``sundae`` command line: one entry point, subcommands over the library's functions.

Bad input (missing file, wrong size, out-of-range knob, corrupted checkpoint) ends with one
``error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from sundae.config import INPAINT_DEFAULTS, Knob, NextScaleOptions, SamplingOptions
from sundae.errors import InputError
from sundae.models import DEFAULT_MODEL, SHIPPED_MODELS, dataset_classifier, model_directory

# What a user can get wrong: the library's InputError (configs, checkpoints, datasets, options) and missing paths.
USER_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _fail(message: str) -> None:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    click.echo(f"error: {'; '.join(lines)}", err=True)  # always one line, whatever the library wrote
    sys.exit(2)


def user_errors(function: Callable) -> Callable:
    """Turn bad input into one clear line and exit code 2; anything else is a bug: a short
    "internal error" line (exit 1), or the whole traceback under ``sundae -v``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except USER_ERRORS as error:
            _fail(str(error))
        except (KeyboardInterrupt, SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as error:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            click.echo(f"internal error: {type(error).__name__}: {error} (a bug in sundae; run `sundae -v ...` "
                       "for the traceback and report it)", err=True)
            sys.exit(1)

    return wrapper


def configure_threads(threads: int | None) -> None:
    """Make CPU work degrade gracefully on a shared machine.

    OpenMP's default busy-waiting turns oversubscription into a collapse (sampling went from 1.6 s
    to 40 s beside one competing process on 2 cores), so waiting is passive unless the user set
    ``OMP_WAIT_POLICY``; it must be set before torch loads its OpenMP runtime, hence here. Threads:
    ``--threads`` / ``SUNDAE_THREADS``, else the cores this process may run on.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None and os.environ.get("SUNDAE_THREADS"):
        threads = int(os.environ["SUNDAE_THREADS"])
    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)


class OneLineErrors(click.Group):
    """Click's usage errors (a bad flag value, a missing argument) as the one ``error:`` line and
    exit code 2 that every other bad input gets, instead of a usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as error:
            command = f" (see `sundae {error.ctx.info_name} --help`)" if error.ctx and error.ctx.parent else ""
            click.echo(f"error: {error.format_message()}{command}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--verbose", "-v", is_flag=True, help="Debug logging, and tracebacks for internal errors.")
@click.option("--threads", type=int, default=None,
              help="CPU threads (default: the cores available; env SUNDAE_THREADS). OpenMP waits passively "
                   "unless OMP_WAIT_POLICY is set.")
def main(verbose: bool, threads: int | None) -> None:
    """sundae: fast non-autoregressive image generation (VQ-GAN + SUNDAE hourglass prior)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    configure_threads(threads)


# --- sampling options shared by sample / inpaint / outpaint / refine -------------------------


PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
    help="auto: bf16 on CUDA (prior autocast, bf16 decoder), fp32 on CPU.")
RUNTIME_OPTIONS = [
    PRECISION_OPTION,
    click.option("--compile", is_flag=True,
                 help="torch.compile the sampling step (CUDA graphs on CUDA); pays off for many images."),
    click.option("--decode-tiles", type=int, default=None,
                 help="Decode in n x n tiles to save memory (approximate at the seams)."),
]


MODEL_DEFAULT = "the model's scheduler/config.json"

# Every sampler knob of both paradigms: SUNDAE's SamplingOptions, then the ones only VAR's NextScaleOptions has
# (the knobs both have, such as temperature and guidance, are one flag). A model refuses the knobs it lacks.
KNOBS: dict[str, tuple[Knob, type]] = {
    **{name: (knob, SamplingOptions) for name, knob in SamplingOptions.knobs().items()},
    **{name: (knob, NextScaleOptions) for name, knob in NextScaleOptions.knobs().items()
       if name not in SamplingOptions.knobs()},
}


def knob_flag(name: str) -> str:
    """How a sampler knob is spelled on the command line (``guidance_scale`` -> ``--guidance``)."""
    return KNOBS[name][0].flag or "--" + name.replace("_", "-")


def knob_option(name: str, knob: Knob, *, edit: bool) -> Callable:
    """The flag of one sampler knob, built from its :class:`Knob`. Not given, it is None and the model's
    ``scheduler/`` default applies (for ``edit`` commands, INPAINT_DEFAULTS' temperature on top)."""
    kind, _ = KNOBS[name][1].knob_type(name)
    cold = edit and name in INPAINT_DEFAULTS
    default = f"{INPAINT_DEFAULTS[name]:g}: edits sample cold, §3.6" if cold else MODEL_DEFAULT
    help_text = knob.help + (f" Null in the scheduler: {knob.none}." if knob.none else "")
    flag = knob_flag(name)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag.removeprefix('--')}", name, default=None, show_default=default,
                            help=help_text)
    return click.option(flag, name, type=click.Choice(knob.choices) if knob.choices else kind, default=None,
                        show_default=default, help=help_text)


def sampling_options(*, edit: bool = False) -> Callable:
    """The sampler's flags, one per :class:`SamplingOptions` field (the one definition of the knobs), plus
    seed, device and the runtime options; ``edit``: a command that inpaints, refines or outpaints."""

    def decorate(function: Callable) -> Callable:
        options = [
            *(knob_option(name, knob, edit=edit) for name, (knob, _) in KNOBS.items()),
            click.option("--seed", type=click.IntRange(0, 2**62), default=0, show_default=True,
                         help="Image i uses seed + i."),
            click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
            *RUNTIME_OPTIONS,
        ]
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


# How the sampler's (Python) names are spelled on the command line, for error messages.
FLAG_NAMES = {**{name: knob_flag(name) for name in KNOBS}, "class_labels": "--classes"}


FLAG_NAME_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(sorted(FLAG_NAMES, key=len, reverse=True)) + r")(?![\w-])")


def in_flag_names(message: str) -> str:
    """``top_p must be in (0, 1]`` -> ``--top-p must be in (0, 1]``."""
    return FLAG_NAME_PATTERN.sub(lambda match: FLAG_NAMES[match.group(1)], message)


def split_sampling_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the sampler's flags out of a command's arguments: those given (the rest stay the model's
    defaults), checked before any work starts."""
    options = {key: value for key in KNOBS if (value := kwargs.pop(key)) is not None}
    try:
        for name, value in options.items():
            KNOBS[name][0].check(name, value)
    except InputError as error:
        raise InputError(in_flag_names(str(error))) from None
    return options


def model_argument(*, positional: bool) -> Callable:
    """``--model DIR`` on every command that runs a model (and, where it always was, a positional
    ``[MODEL]``), passed to the command as ``model_dir``; default: the shipped model."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def merged(*args: Any, model_positional: str | None = None, model_option: str | None = None,
                   **kwargs: Any) -> Any:
            if model_positional and model_option and model_positional != model_option:
                _fail(f"two models given ({model_positional} and --model {model_option}); give one")
            return function(*args, model_dir=model_positional or model_option, **kwargs)

        merged = click.option("--model", "model_option", default=None, metavar="NAME|DIR",
                              help="A shipped model's name (`sundae models`) or a model directory "
                                   f"(default: {DEFAULT_MODEL}).")(merged)
        if positional:
            merged = click.argument("model_positional", metavar="[MODEL]", required=False)(merged)
        return merged

    return decorate


def load_pipeline(model_dir: str | None, device: str | None, options: dict[str, Any] | None = None, **runtime: Any):
    """The pipeline in ``model_dir`` (default: the shipped model), SUNDAE or VAR as its index says, which
    must take every sampler flag in ``options``; ``runtime``: the RUNTIME_OPTIONS values."""
    from sundae import pipeline
    from sundae.pipelines import load_pipeline as load_either

    directory = model_directory(model_dir)
    loaded = load_either(directory, device=device, **runtime)
    foreign = [name for name in options or {} if name not in loaded.options_class.knobs()]
    if foreign:
        paradigm = "VAR" if loaded.kind == pipeline.VAR_PIPELINE_KIND else "SUNDAE"
        raise InputError(f"{', '.join(map(knob_flag, foreign))}: not a sampling option of {paradigm} models like "
                         f"{directory.name}, which take {', '.join(map(knob_flag, loaded.options_class.knobs()))}")
    if runtime.get("compile"):
        click.echo("--compile: the first step compiles the sampling step (a minute or two; once more when "
                   "finished samples first leave the batch)", err=True)
    return loaded


def parse_classes(value: str | None) -> list[str] | None:
    """``--classes Trouser,8`` -> ["Trouser", "8"]; None when not given."""
    if value is None:
        return None
    names = [item.strip() for item in value.split(",") if item.strip()]
    if not names:
        raise InputError(f"--classes needs class names or indices separated by commas, got {value!r}")
    return names


def save_images(images, out: Path, *, grid: bool, per_image_dir: Path | None, nrow: int | None = None) -> list[Path]:
    from sundae.data.images import save_image_grid
    from sundae.pipeline import image_to_tensor

    written = []
    if grid:
        import torch

        tensors = torch.cat([image_to_tensor(image, 1 if image.mode == "L" else 3) for image in images])
        save_image_grid(tensors, out, nrow=nrow)
        written.append(out)
    if per_image_dir is not None:
        per_image_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            path = per_image_dir / f"{index:04d}.png"
            image.save(path)
            written.append(path)
    return written


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"), show_default=True,
              help="Grid PNG to write.")
@click.option("--num-images", "-n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward batch (default: all at once).")
@click.option("--classes", default=None, help="Comma-separated class names or indices, cycled over the images.")
@click.option("--per-image-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write one PNG per image here.")
@click.option("--trajectory", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the denoising from noise to image as an animated GIF.")
@click.option("--nrow", type=int, default=None, help="Images per grid row.")
@sampling_options()
@model_argument(positional=True)
@user_errors
def sample(model_dir: str | None, out: Path, num_images: int, batch_size: int | None, classes: str | None,
           per_image_dir: Path | None, trajectory: Path | None, nrow: int | None, seed: int, device: str | None,
           **kwargs: Any) -> None:
    """Generate images (default model: the shipped Fashion-MNIST one)."""
    from tqdm.auto import tqdm

    options = split_sampling_kwargs(kwargs)
    labels = parse_classes(classes)
    pipe = load_pipeline(model_dir, device, options, **kwargs)
    pipe.set_progress_bar_config(disable=True)  # one bar below, over all batches
    resolved = pipe.sampling_options(has_class=labels is not None, **options)  # the flags over the model's defaults
    if labels is None and resolved.guidance_scale != 1.0 and pipe.class_names:
        labels = list(pipe.class_names)  # guidance needs a class: give every class in turn
        click.echo(f"--guidance {resolved.guidance_scale:g} without --classes: cycling through the model's "
                   f"{len(labels)} classes", err=True)
    if labels is not None:
        labels = [labels[i % len(labels)] for i in range(num_images)]
    batch_size = batch_size or num_images
    batches = range(0, num_images, batch_size)
    images, steps_taken, frames = [], [], []
    started = time.perf_counter()
    passes = pipe.forward_passes(resolved)
    with tqdm(total=len(batches) * passes, unit="step", desc="sampling", file=sys.stderr) as bar:
        for number, start in enumerate(batches):
            count = min(batch_size, num_images - start)
            result = pipe(count, class_labels=None if labels is None else labels[start:start + count],
                          seed=seed + start, callback=lambda *_: bar.update(1),
                          return_trajectory=trajectory is not None and number == 0, **options)
            images += result.images
            steps_taken += result.steps_taken.tolist()
            frames = frames or result.trajectory
            bar.update((number + 1) * passes - bar.n)  # samples that stopped early skip steps
    elapsed = time.perf_counter() - started
    written = save_images(images, out, grid=True, per_image_dir=per_image_dir, nrow=nrow)
    if trajectory is not None:
        from sundae.video import save_trajectory_gif

        save_trajectory_gif(frames, pipe.tokenizer, trajectory, nrow=nrow)
        written.append(trajectory)
    click.echo(f"wrote {', '.join(str(p) for p in written[:3])}{' ...' if len(written) > 3 else ''}: {num_images} images "
               f"in {elapsed:.2f}s, steps taken: mean {sum(steps_taken) / len(steps_taken):.1f}, "
               f"min {min(steps_taken)}, max {max(steps_taken)}")


def mask_options(function: Callable) -> Callable:
    for option in reversed([
        click.option("--mask", type=click.Path(dir_okay=False), default=None,
                     help="Mask PNG of the image's size: white = regenerate."),
        click.option("--box", default=None, help="Pixel box x0,y0,x1,y1 to regenerate (end-exclusive)."),
        click.option("--mask-rule", type=click.Choice(["any", "all"]), default="any", show_default=True,
                     help="any: a token is redone when any of its pixels is masked; all: only when all are (paper)."),
    ]):
        function = option(function)
    return function


def output_options(function: Callable) -> Callable:
    for option in reversed([
        click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
                     help="Grid PNG of the results."),
        click.option("--num-images", "-n", type=click.IntRange(min=1), default=4, show_default=True, help="Fills to draw."),
        click.option("--classes", default=None, help="Class (name or index) for conditional models."),
        click.option("--per-image-dir", type=click.Path(file_okay=False, path_type=Path), default=None),
    ]):
        function = option(function)
    return function


def resolve_mask(pipe, image: str, mask: str | None, box: str | None):
    from sundae.pipeline import box_mask

    if (mask is None) == (box is None):
        raise InputError("give exactly one of --mask MASK.png or --box x0,y0,x1,y1")
    if mask is not None:
        return mask
    try:
        coordinates = [int(v) for v in box.split(",")]
    except ValueError:
        raise InputError(f"--box must be four integers x0,y0,x1,y1, got {box!r}") from None
    if len(coordinates) != 4:
        raise InputError(f"--box must be four integers x0,y0,x1,y1, got {box!r}")
    pixels, _ = pipe.encode(image)
    return box_mask(tuple(pixels.shape[-2:]), coordinates)


def _labels_for(classes: str | None, count: int):
    labels = parse_classes(classes)
    return None if labels is None else [labels[i % len(labels)] for i in range(count)]


def _report(result, out: Path, per_image_dir: Path | None, elapsed: float) -> None:
    written = save_images(result.images, out, grid=True, per_image_dir=per_image_dir)
    click.echo(f"wrote {written[0]}: {len(result.images)} images in {elapsed:.2f}s, "
               f"steps taken {result.steps_taken.tolist()}")


@main.command()
@click.argument("image", type=click.Path())
@mask_options
@output_options
@sampling_options(edit=True)
@model_argument(positional=False)
@user_errors
def inpaint(image: str, mask: str | None, box: str | None, mask_rule: str, out: Path, num_images: int,
            classes: str | None, per_image_dir: Path | None, model_dir: str | None, seed: int, device: str | None,
            **kwargs: Any) -> None:
    """Regenerate a masked region of IMAGE (several fills side by side)."""
    options = split_sampling_kwargs(kwargs)
    pipe = load_pipeline(model_dir, device, options, **kwargs)
    started = time.perf_counter()
    result = pipe.inpaint(image, resolve_mask(pipe, image, mask, box), num_images=num_images, mask_rule=mask_rule,
                          class_labels=_labels_for(classes, num_images), seed=seed, **options)
    _report(result, out, per_image_dir, time.perf_counter() - started)


@main.command()
@click.argument("image", type=click.Path())
@mask_options
@click.option("--strength", type=float, default=0.5, show_default=True,
              help="Share of masked tokens reset to noise (0: start from the current tokens).")
@output_options
@sampling_options(edit=True)
@model_argument(positional=False)
@user_errors
def refine(image: str, mask: str | None, box: str | None, mask_rule: str, strength: float, out: Path, num_images: int,
           classes: str | None, per_image_dir: Path | None, model_dir: str | None, seed: int, device: str | None,
           **kwargs: Any) -> None:
    """Re-sample a masked region of IMAGE starting from its current content."""
    options = split_sampling_kwargs(kwargs)
    pipe = load_pipeline(model_dir, device, options, **kwargs)
    started = time.perf_counter()
    result = pipe.refine(image, resolve_mask(pipe, image, mask, box), strength=strength, num_images=num_images,
                         mask_rule=mask_rule, class_labels=_labels_for(classes, num_images), seed=seed, **options)
    _report(result, out, per_image_dir, time.perf_counter() - started)


@main.command()
@click.argument("image", type=click.Path())
@click.option("--left", type=int, default=0, help="Pixels to add on the left (multiple of f).")
@click.option("--top", type=int, default=0)
@click.option("--right", type=int, default=0)
@click.option("--bottom", type=int, default=0)
@output_options
@sampling_options(edit=True)
@model_argument(positional=False)
@user_errors
def outpaint(image: str, left: int, top: int, right: int, bottom: int, out: Path, num_images: int,
             classes: str | None, per_image_dir: Path | None, model_dir: str | None, seed: int, device: str | None,
             **kwargs: Any) -> None:
    """Extend IMAGE's canvas on any side and fill the new area."""
    options = split_sampling_kwargs(kwargs)
    pipe = load_pipeline(model_dir, device, options, **kwargs)
    started = time.perf_counter()
    result = pipe.outpaint(image, left=left, top=top, right=right, bottom=bottom, num_images=num_images,
                           class_labels=_labels_for(classes, num_images), seed=seed, **options)
    _report(result, out, per_image_dir, time.perf_counter() - started)


@main.command()
@model_argument(positional=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback unless you ask).")
@click.option("--port", type=int, default=7860, show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Also save every result here (server-made file names only).")
@click.option("--device", default=None)
@PRECISION_OPTION
@click.option("--max-canvas-scale", type=click.FloatRange(min=1), default=4.0, show_default=True,
              help="Largest image or outpaint canvas a request may use, per side, as a multiple of the model's "
                   "image size (bounds memory and time per request).")
@user_errors
def serve(model_dir: str | None, host: str, port: int, output_dir: str | None, device: str | None,
          precision: str, max_canvas_scale: float) -> None:
    """Run the local web app: generate with a live preview, paint masks, inpaint/refine/outpaint."""
    try:
        from sundae.app.server import serve as run_server
    except ImportError as error:
        raise InputError(f"the web app needs its extra dependencies: pip install -e '.[app]' ({error})") from None
    run_server(model_dir, host=host, port=port, output_dir=output_dir, device=device, precision=precision,
               max_canvas_scale=max_canvas_scale)


@main.command()
def models() -> None:
    """List the models that ship inside the package (name, dataset, licence, resolution, size)."""
    for model in SHIPPED_MODELS.values():
        size = sum(path.stat().st_size for path in model.directory.rglob("*.safetensors")) / 1e6
        default = " (default)" if model.name == DEFAULT_MODEL else ""
        click.echo(f"{model.name}{default}: {model.dataset}; {model.resolution}; licence {model.licence}; "
                   f"{size:.1f} MB; {model.directory}")


# --- evaluation ------------------------------------------------------------------------------

def evaluation_options(function: Callable) -> Callable:
    for option in reversed([
        click.option("--real", required=True, type=click.Path(exists=True),
                     help="Real images: a folder or an .npz with an 'images' uint8 array."),
        click.option("--extractor", type=click.Choice(["classifier", "inception"]), default="classifier",
                     show_default=True, help="Feature network; named in the report so numbers are never mixed."),
        click.option("--extractor-path", default=None,
                     help="Classifier folder (default: a shipped model's own dataset classifier, else the "
                          "Fashion-MNIST one) or Inception TorchScript file."),
        click.option("--num-samples", type=click.IntRange(min=2), default=1000, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--nearest-k", type=click.IntRange(min=1), default=5, show_default=True, help="k of density/coverage."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Cache of real-image features (keyed by extractor and dataset hash)."),
    ]):
        function = option(function)
    return function


def build_extractor(kind: str, path: str | None, batch_size: int, device: str | None, model_dir: str | None):
    """The feature network; a classifier without a path is the model's dataset classifier (a shipped
    model's own, else the default model's)."""
    from sundae.eval.features import make_extractor

    if kind == "classifier" and path is None:
        path = str(dataset_classifier(model_dir))
    return make_extractor(kind, path, batch_size=batch_size, device=device)


@main.command()
@evaluation_options
@click.option("--fake", type=click.Path(exists=True), default=None,
              help="Score these generated images (folder or .npz) instead of sampling from a model.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("evaluation.json"),
              show_default=True, help="JSON report.")
@sampling_options()
@model_argument(positional=True)
@user_errors
def evaluate(model_dir: str | None, real: str, extractor: str, extractor_path: str | None, num_samples: int,
             batch_size: int, nearest_k: int, cache_dir: str | None, fake: str | None, out: Path, seed: int,
             device: str | None, **kwargs: Any) -> None:
    """FID, FID-infinity, precision/recall, density/coverage of a model's samples (or of --fake images).

    Under torchrun every process samples its share of the images and rank 0 writes the one report."""
    from sundae.distributed import DistributedContext, run_distributed
    from sundae.eval.evaluate import evaluate as evaluate_model
    from sundae.eval.evaluate import evaluate_images, pipeline_identity

    options = split_sampling_kwargs(kwargs)

    def run(context: DistributedContext) -> dict[str, Any] | None:  # on every rank; rank 0 gets the report
        features = build_extractor(extractor, extractor_path, batch_size, str(context.device), model_dir)
        if fake is not None:  # stored images: nothing to share out, rank 0 scores them
            return evaluate_images(fake, real, features, batch_size=batch_size, nearest_k=nearest_k,
                                   cache_dir=cache_dir) if context.is_main else None
        report = evaluate_model(load_pipeline(model_dir, str(context.device), options, **kwargs), real_images=real,
                                extractor=features, num_samples=num_samples, sampling_options=options, seed=seed,
                                batch_size=batch_size, progress=True, nearest_k=nearest_k, cache_dir=cache_dir,
                                model_id=pipeline_identity(model_directory(model_dir)), context=context)
        return report if context.is_main else None

    report = run_distributed(run, device)
    if report is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    metrics = report["metrics"]
    click.echo(f"wrote {out}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
               + f" ({report['extractor']})")


@main.command()
@evaluation_options
@click.option("--parameter", type=click.Choice(["steps", "temperature", "proportion", "guidance"]), required=True,
              help="What to vary (paper Figs. 12, 13, 8); temperature varies the end temperature, guidance the "
                   "classifier-free guidance scale.")
@click.option("--values", required=True, help="Comma-separated values, e.g. 10,20,50,100.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sweep"), show_default=True,
              help="Writes sweep.csv, sweep.png and sweep.json here.")
@sampling_options()
@model_argument(positional=True)
@user_errors
def sweep(model_dir: str | None, real: str, extractor: str, extractor_path: str | None, num_samples: int,
          batch_size: int, nearest_k: int, cache_dir: str | None, parameter: str, values: str, out_dir: Path,
          seed: int, device: str | None, **kwargs: Any) -> None:
    """Evaluate one sampler setting at several values and plot FID / density / coverage against it.

    Under torchrun every process samples its share of the images and rank 0 writes the files."""
    from sundae.distributed import DistributedContext, run_distributed
    from sundae.eval.evaluate import pipeline_identity, sweep as run_sweep, write_sweep

    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # checked before the work, not after it
        raise InputError("sundae sweep plots with matplotlib, which is not installed: pip install -e '.[eval]'")
    try:
        points = [int(v) if parameter == "steps" else float(v) for v in values.split(",")]
    except ValueError:
        raise InputError(f"--values must be comma-separated numbers, got {values!r}") from None
    options = split_sampling_kwargs(kwargs)

    def run(context: DistributedContext) -> list[dict[str, Any]] | None:  # on every rank; rank 0 gets the results
        results = run_sweep(load_pipeline(model_dir, str(context.device), options, **kwargs), real,
                            build_extractor(extractor, extractor_path, batch_size, str(context.device), model_dir),
                            parameter=parameter, values=points, num_samples=num_samples, base_options=options,
                            seed=seed, batch_size=batch_size, cache_dir=cache_dir, nearest_k=nearest_k, progress=True,
                            model_id=pipeline_identity(model_directory(model_dir)), context=context)
        return results if context.is_main else None

    results = run_distributed(run, device)
    if results is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    write_sweep(results, out_dir / "sweep.csv", out_dir / "sweep.png")
    for row in results:
        metrics = row["metrics"]
        click.echo(f"{parameter}={row['value']}: fid={metrics['fid']:.4g} density={metrics['density']:.4g} "
                   f"coverage={metrics['coverage']:.4g}"
                   + (f" class_accuracy={metrics['class_accuracy']:.4g}" if "class_accuracy" in metrics else ""))
    click.echo(f"wrote {out_dir}/sweep.csv, sweep.png, sweep.json")


@main.command()
@click.option("--preset", "preset_name", default="ffhq256", show_default=True,
              help="Prior preset (ffhq256, ffhq1024, imagenet, tiny ...); random weights.")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--batch-sizes", default="1", show_default=True, help="Comma-separated, e.g. 1,16.")
@click.option("--dtype", "--precision", "dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA, fp32 on CPU; with --train as sundae train "
              "(bf16 where its matmuls are native).")
@click.option("--compile", is_flag=True, help="torch.compile the whole sampling step (forward + sampling arithmetic); "
              "with --train the prior's objective.")
@click.option("--cuda-graphs", is_flag=True, help="With --compile: replay each step as one CUDA graph (CUDA only).")
@click.option("--early-stop", is_flag=True, help="Let samples stop on their own (rare with random weights).")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--no-decode", "decode", flag_value=False, default=True, help="Time the prior only.")
@click.option("--decode-tiles", type=int, default=None, help="Decode in this many tiles per side (less memory).")
@click.option("--device", default=None)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full result here.")
@click.option("--train", type=click.Choice(["prior", "tokenizer"]), is_flag=False, flag_value="prior", default=None,
              help="Time training steps instead: --train, the prior's (forward, unrolled backward, AdamW); "
              "--train tokenizer, the VQ-GAN's generator and discriminator updates.")
@click.option("--model", default=None, help="With --train: a shipped model's name or a model directory, whose "
              "prior (or tokenizer) configuration replaces --preset's.")
@click.option("--tokenizer", default=None, help="A VQ-GAN preset instead of the preset's own (decoding, or --train "
              "tokenizer).")
@click.option("--unroll-steps", type=int, default=None, help="With --train: the unroll T (default: the preset's).")
@click.option("--perceptual", default="auto", show_default=True,
              help="With --train tokenizer: perceptual features of the loss (auto, lpips-vgg, stlpips-vgg, none).")
@user_errors
def bench(preset_name: str, steps: int, batch_sizes: str, json_path: str | None, train: str | None, model: str | None,
          unroll_steps: int | None, perceptual: str, **kwargs: Any) -> None:
    """Time sampling (prior steps + decode) of a paper-size prior with random weights on this machine, or
    with --train its training steps (more figures: benchmarks/speed.py in a source checkout)."""
    from click.core import ParameterSource

    from sundae.speed import time_sampling
    from sundae.training.benchmark import time_prior_training, time_tokenizer_training

    try:
        sizes = tuple(int(v) for v in batch_sizes.split(","))
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    applies = {None: {"steps", "compile", "cuda_graphs", "early_stop", "decode", "decode_tiles", "tokenizer"},
               "prior": {"model", "compile", "unroll_steps"}, "tokenizer": {"model", "tokenizer", "perceptual"}}
    context = click.get_current_context()
    flags = {parameter.name: parameter.opts[0] for parameter in context.command.params}
    misplaced = [flags[name] for name in sorted(set().union(*applies.values()) - applies[train])
                 if context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if misplaced:
        raise InputError(f"{', '.join(misplaced)}: not used by {'--train ' + train if train else 'sampling'}; "
                         "leave out")
    shared = {"batch_sizes": sizes, "precision": kwargs["dtype"], "repeats": kwargs["repeats"],
              "warmup": kwargs["warmup"], "device": kwargs["device"], "model": model,
              "preset": None if model is not None else preset_name}
    if train == "prior":
        result = time_prior_training(compile=kwargs["compile"], unroll_steps=unroll_steps, **shared)
    elif train == "tokenizer":
        result = time_tokenizer_training(tokenizer=kwargs["tokenizer"], perceptual=perceptual, **shared)
    else:
        result = time_sampling(preset=preset_name, steps=steps, batch_sizes=sizes, **kwargs)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(result["summary"])


# --- models, conversion, description ---------------------------------------------------------


@main.command()
@click.argument("preset_name", metavar="[PRESET]", required=False)
@click.option("--time-step/--no-time-step", default=True, show_default=True,
              help="Also time one sampling step (forward pass) at batch 1 on this machine.")
@user_errors
def describe(preset_name: str | None, time_step: bool) -> None:
    """Print a prior preset's configuration, parameter count and step time (Table 3 presets);
    with no PRESET, list the presets."""
    from sundae.config import HOURGLASS_PRESETS, preset
    from sundae.denoiser.hourglass import describe as describe_config
    from sundae.speed import time_forward

    if preset_name is None:
        for name, config in HOURGLASS_PRESETS.items():
            facts = describe_config(config)
            click.echo(f"{name:14s} grid {config.latent_shape[0]}x{config.latent_shape[1]}, v={config.codebook_size}, "
                       f"depth {config.depth}, dim {config.dim}: {facts['parameters'] / 1e6:.1f} M parameters")
        click.echo("sundae describe PRESET prints one in full (and times its forward pass)")
        return
    config = preset(preset_name, HOURGLASS_PRESETS)
    facts = describe_config(config)
    if time_step:
        click.echo(f"timing one forward pass of {preset_name} at batch 1 (warm-up + 3 repeats) ...", err=True)
        facts["forward_ms_batch1"] = round(time_forward(config), 2)
    click.echo(json.dumps({"preset": preset_name, "config": config.to_dict(), **facts}, indent=2, default=str))


@main.command("convert-taming")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(), default=None, help="taming/ldm yaml config.")
@click.option("--preset", "preset_name", default=None, help="Name of a VQ-GAN preset instead of inference.")
@click.option("--resolution", type=click.IntRange(min=1), default=None,
              help="Training image size, when neither --config nor a known preset layout tells it.")
@user_errors
def convert_taming_command(checkpoint: str, out_dir: str, config_path: str | None, preset_name: str | None,
                           resolution: int | None) -> None:
    """Convert a taming-transformers / latent-diffusion VQ checkpoint into sundae's format (no code is unpickled)."""
    from sundae.tokenizer.taming import convert_taming

    target = convert_taming(checkpoint, out_dir, config_path=config_path, preset=preset_name, resolution=resolution)
    click.echo(f"wrote {target}")


@main.command("convert-model")
@click.argument("old_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("new_dir", type=click.Path(file_okay=False))
@click.option("--scheduler-from", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A scheduler config.json (e.g. another model's scheduler/config.json) to use as the model's "
                   "sampling defaults [default: sundae's SamplingOptions defaults].")
@user_errors
def convert_model(old_dir: str, new_dir: str, scheduler_from: str | None) -> None:
    """Write a model directory of the old layout (the prior's config.json at the top) to NEW_DIR in the
    current one (model_index.json, prior/, tokenizer/, scheduler/); OLD_DIR is never modified."""
    from sundae.pipeline import convert_model_directory, read_scheduler

    scheduler = None if scheduler_from is None else read_scheduler(scheduler_from)
    click.echo(f"wrote {convert_model_directory(old_dir, new_dir, scheduler)}")


# --- training and data ---------------------------------------------------------------------


def parse_depth(text: str):
    """"2,8,2" -> (2, 8, 2); "2,(2,8,2),2" -> nested; "6" -> 6."""
    import ast

    try:
        value = ast.literal_eval(f"({text})" if "," in text else text)
    except (ValueError, SyntaxError):
        raise InputError(f"--depth must look like 2,8,2 or 2,(2,8,2),2, got {text!r}") from None
    return value


def parse_integers(text: str, flag: str) -> tuple[int, ...]:
    """"1,2,3" -> (1, 2, 3), or one clear error naming ``flag``."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise InputError(f"{flag} must be integers separated by commas (e.g. 1,2,3,4,5,7), got {text!r}") from None


TRAINING_PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
    help="Autocast dtype of the training step; auto: bf16 where its matmuls are native (CUDA, CPUs with AMX or "
         "AVX-512-BF16), else fp32. Weights, optimizer state and losses stay fp32.")


ALLOW_CHANGED_SETTINGS_OPTION = click.option(
    "--allow-changed-settings", is_flag=True,
    help="Resume even though settings that change the run (steps, lr, seed, batch size, ...) differ from the "
         "checkpoint's.")


def given(**values: Any) -> dict[str, Any]:
    """Only the options the user actually set (None means "not given")."""
    return {key: value for key, value in values.items() if value is not None}


@main.command("train-tokenizer")
@click.argument("images", type=click.Path(exists=True, file_okay=False))
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder; an existing checkpoint there is resumed exactly.")
@click.option("--preset", "preset_name", default="tiny-f4", show_default=True, help="VQ-GAN preset to start from.")
@click.option("--resolution", type=int, default=None, help="Training image size (resize + centre-crop).")
@click.option("--codebook-size", type=int, default=None)
@click.option("--channels", type=int, default=None)
@click.option("--channel-multipliers", default=None, help="e.g. 1,2,2 (f = 2^(len-1)).")
@click.option("--num-res-blocks", type=int, default=None)
@click.option("--embed-dim", type=int, default=None)
@click.option("--scales", default=None,
              help="VAR's multi-scale residual quantizer at these token-grid sides, e.g. 1,2,3,4,5,7 (the last one "
                   "the latent grid); a *-msvq preset has its own.")
@click.option("--steps", type=int, default=20_000, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Per process.")
@click.option("--lr", "learning_rate", type=float, default=1e-4, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "cosine", "linear"]), default="constant", show_default=True,
              help="Learning-rate decay after the warm-up (cosine/linear end at 0.1 x --lr).")
@click.option("--discriminator-start", type=int, default=None,
              help="Step at which the GAN loss starts [default: 3/4 of --steps, at most 15000 (Table 4)].")
@click.option("--discriminator-weight", type=float, default=None)
@click.option("--discriminator-layers", type=int, default=None, help="Patch-GAN depth (default 3, Table 4).")
@click.option("--perceptual", type=click.Choice(["auto", "lpips-vgg", "stlpips-vgg", "none"]), default="auto",
              show_default=True, help="Perceptual features (see README: which weights files).")
@click.option("--perceptual-weight", type=float, default=None)
@click.option("--perceptual-vgg", "perceptual_vgg_path", default=None, help="torchvision vgg16-397923af.pth.")
@click.option("--perceptual-lin", "perceptual_lin_path", default=None, help="LPIPS v0.1 vgg.pth.")
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--image-every", type=int, default=500, show_default=True)
@click.option("--checkpoint-every", type=int, default=1000, show_default=True)
@click.option("--revive-dead-codes-every", type=int, default=200, show_default=True,
              help="Steps between dead-code restarts (0: never, as plain taming training).")
@click.option("--stop-after-steps", type=int, default=None, help="End this run early (resume later).")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from the weights of this tokenizer directory.")
@click.option("--decoder-only", is_flag=True,
              help="With --init-from: train only the decoder, so every image keeps its codes (latents and a prior "
                   "trained on them stay valid).")
@click.option("--num-workers", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@TRAINING_PRECISION_OPTION
@ALLOW_CHANGED_SETTINGS_OPTION
@user_errors
def train_tokenizer_command(images: str, output_dir: str, preset_name: str, resolution, codebook_size, channels,
                            channel_multipliers, num_res_blocks, embed_dim, scales, discriminator_start,
                            discriminator_weight,
                            discriminator_layers,
                            perceptual_weight, perceptual, perceptual_vgg_path, perceptual_lin_path,
                            **kwargs: Any) -> None:
    """Train a VQ-GAN on an image folder (multi-GPU: torchrun --nproc_per_node=N -m sundae.cli ...)."""
    from sundae.config import VQGAN_PRESETS, preset, tokenizer_config_from_dict
    from sundae.training.tokenizer import TokenizerTrainingConfig, train_tokenizer

    multipliers = None if channel_multipliers is None else tuple(int(v) for v in channel_multipliers.split(","))
    model = preset(preset_name, VQGAN_PRESETS).replace(**given(
        resolution=resolution, codebook_size=codebook_size, channels=channels, channel_multipliers=multipliers,
        num_res_blocks=num_res_blocks, embed_dim=embed_dim))
    if embed_dim is not None and model.quantizer == "gumbel":
        model = model.replace(z_channels=embed_dim)
    if scales is not None:
        model = tokenizer_config_from_dict({**model.to_dict(), "scales": parse_integers(scales, "--scales")})
    loss = given(discriminator_start=discriminator_start, discriminator_weight=discriminator_weight,
                 perceptual_weight=perceptual_weight, perceptual=perceptual, perceptual_vgg_path=perceptual_vgg_path,
                 perceptual_lin_path=perceptual_lin_path)
    revive = kwargs.pop("revive_dead_codes_every")
    config = TokenizerTrainingConfig(images=images, output_dir=output_dir, model=model.to_dict(), loss=loss,
                                     discriminator=given(layers=discriminator_layers),
                                     revive_dead_codes_every=revive or None, **kwargs)
    click.echo(train_tokenizer(config).summary("tokenizer"))


@main.command()
@click.argument("tokenizer_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Grid PNG: inputs (top) over reconstructions (bottom).")
@click.option("--limit", type=int, default=1000, show_default=True, help="Images to measure.")
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--device", default=None)
@user_errors
def reconstruct(tokenizer_dir: str, images: str, out: Path | None, limit: int, batch_size: int,
                device: str | None) -> None:
    """Measure a tokenizer's reconstructions on an image folder: L1 and PSNR (pixels in [0, 1]), and
    the perplexity and used share of the codebook over all the images' tokens."""
    from sundae.data.images import ImageFolder
    from sundae.runtime import resolve_device
    from sundae.var.tokenizer import load_vqgan
    from sundae.eval.reconstruction import measure_reconstructions, save_reconstruction_grid

    device = resolve_device(device)
    tokenizer = load_vqgan(tokenizer_dir, map_location=device)
    folder = ImageFolder(images, resolution=tokenizer.config.resolution, channels=tokenizer.config.in_channels)
    measured = measure_reconstructions(tokenizer, folder, limit=limit, batch_size=batch_size, progress=True)
    grid_images = measured.pop("grid_images")
    click.echo(json.dumps({"tokenizer": tokenizer_dir, **measured}))
    if out is not None:
        save_reconstruction_grid(tokenizer, grid_images.to(device), out)
        click.echo(f"wrote {out}")


@main.command()
@click.argument("images", type=click.Path(exists=True, file_okay=False))
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A tokenizer directory (sundae train-tokenizer / convert-taming).")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--resolution", type=int, default=None, help="Default: the tokenizer's training resolution.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--validation-fraction", type=float, default=0.05, show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@user_errors
def encode(images: str, tokenizer_dir: str, output_dir: str, resolution: int | None, batch_size: int,
           validation_fraction: float, split_seed: int, device: str | None) -> None:
    """Encode an image folder (and every image's horizontal flip) into a memory-mapped token dataset."""
    from sundae.data.latents import encode_folder, tokenizer_identity
    from sundae.runtime import resolve_device
    from sundae.var.tokenizer import load_vqgan

    device = resolve_device(device)
    tokenizer = load_vqgan(tokenizer_dir, map_location=device)
    target = encode_folder(tokenizer, images, output_dir, resolution=resolution or tokenizer.config.resolution,
                           batch_size=batch_size, validation_fraction=validation_fraction, split_seed=split_seed,
                           device=device, tokenizer_id=tokenizer_identity(tokenizer_dir))
    manifest = json.loads((target / "manifest.json").read_text())
    splits = manifest["split_counts"]
    click.echo(f"latent dataset written to {target}: {manifest['count']} rows ({manifest['count'] // 2} images and "
               f"their flips; train {splits['train']}, validation {splits['validation']}), grid "
               f"{'x'.join(map(str, manifest['grid_shape']))}, {len(manifest['skipped'])} unreadable file(s) skipped")


def prior_loop_options(function: Callable) -> Callable:
    """The flags of the prior training loop, shared by ``train`` (SUNDAE) and ``train-var`` (VAR)."""
    for option in reversed([
        click.argument("data", type=click.Path(exists=True)),
        click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False),
                     help="Run folder; an existing checkpoint there is resumed exactly."),
        click.option("--steps", type=int, default=10_000, show_default=True),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Per process and micro-batch."),
        click.option("--gradient-accumulation", type=int, default=1, show_default=True),
        click.option("--lr", "learning_rate", type=float, default=3e-4, show_default=True),
        click.option("--warmup-steps", type=int, default=500, show_default=True),
        click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine",
                     show_default=True),
        click.option("--weight-decay", type=float, default=0.01, show_default=True),
        click.option("--ema-decay", type=float, default=None),
        click.option("--label-dropout", type=float, default=0.1, show_default=True),
        click.option("--unconditional", is_flag=True, help="Ignore the dataset's class labels."),
        click.option("--log-every", type=int, default=50, show_default=True),
        click.option("--eval-every", type=int, default=500, show_default=True),
        click.option("--eval-batches", type=int, default=8, show_default=True),
        click.option("--sample-every", type=int, default=1000, show_default=True),
        click.option("--checkpoint-every", type=int, default=1000, show_default=True),
        click.option("--stop-after-steps", type=int, default=None, help="End this run early (resume later)."),
        click.option("--init-from", default=None,
                     help="Start from the prior weights of this shipped model or model directory (same model "
                          "options, same tokenizer's tokens); the optimizer and schedule start afresh."),
        click.option("--flips/--no-flips", default=True, show_default=True,
                     help="Train on the flipped images' rows of the latents too; --no-flips where orientation "
                          "is fixed (Fashion-MNIST's shoes all point left)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default=None),
        click.option("--compile", is_flag=True, help="torch.compile the training step."),
        TRAINING_PRECISION_OPTION,
        ALLOW_CHANGED_SETTINGS_OPTION,
    ]):
        function = option(function)
    return function


@main.command("train")
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              help="Hourglass preset (Table 3: ffhq256, ffhq1024, celeba, mnist, fashion-mnist, imagenet).")
@click.option("--dim", type=int, default=None)
@click.option("--depth", default=None, help="pre,valley,post e.g. 2,8,2 or nested 2,(2,8,2),2.")
@click.option("--heads", type=int, default=None)
@click.option("--head-dim", type=int, default=None)
@click.option("--shorten-factor", type=int, default=None)
@click.option("--resample", type=click.Choice(["2d", "1d"]), default=None, help="1d: the original hourglass (ablation).")
@click.option("--dropout", type=float, default=None)
@click.option("--unroll-steps", type=int, default=None, help="Training unroll T (default: Table 3's value for the preset).")
@click.option("--sample-steps", type=int, default=50, show_default=True, help="Sampling steps of the sample grids.")
@prior_loop_options
@user_errors
def train_prior_command(data: str, output_dir: str, preset_name: str, dim, depth, heads, head_dim, shorten_factor,
                        resample, dropout, unroll_steps, unconditional: bool, **kwargs: Any) -> None:
    """Train a SUNDAE prior on a latent dataset (sundae encode) or a pixel-token .npz (MNIST-style, §4.2)."""
    from sundae.config import HOURGLASS_PRESETS, UNROLL_STEPS, preset
    from sundae.training.prior import PriorTrainingConfig, train_prior

    model = preset(preset_name, HOURGLASS_PRESETS).replace(**given(
        dim=dim, depth=None if depth is None else parse_depth(depth), heads=heads, head_dim=head_dim,
        shorten_factor=shorten_factor, resample=resample, dropout=dropout))
    config = PriorTrainingConfig(data=data, output_dir=output_dir, model=model.to_dict(),
                                 unroll_steps=unroll_steps or UNROLL_STEPS.get(preset_name, 2),
                                 class_conditional=not unconditional, **kwargs)
    click.echo(train_prior(config).summary("prior"))


@main.command("train-var")
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              help="Next-scale transformer preset (fashion-mnist, tiny); codebook, scales and classes come from "
                   "the data.")
@click.option("--dim", type=int, default=None)
@click.option("--depth", type=int, default=None, help="Transformer layers.")
@click.option("--heads", type=int, default=None)
@click.option("--head-dim", type=int, default=None)
@click.option("--dropout", type=float, default=None)
@prior_loop_options
@user_errors
def train_var_command(data: str, output_dir: str, preset_name: str, dim, depth, heads, head_dim, dropout,
                      unconditional: bool, **kwargs: Any) -> None:
    """Train VAR's next-scale prior (spec seed 003) on a latent dataset of a multi-scale tokenizer
    (sundae train-tokenizer --scales ..., then sundae encode): the SUNDAE loop's DDP, EMA, precision and
    exact resume, and a model directory that sample, inpaint, evaluate and the app take."""
    from sundae.config import NEXT_SCALE_PRESETS, preset
    from sundae.training.prior import PriorTrainingConfig
    from sundae.var.training import train_var

    model = preset(preset_name, NEXT_SCALE_PRESETS).replace(**given(
        dim=dim, depth=depth, heads=heads, head_dim=head_dim, dropout=dropout))
    config = PriorTrainingConfig(data=data, output_dir=output_dir, model=model.to_dict(), family="var",
                                 class_conditional=not unconditional, **kwargs)
    click.echo(train_var(config).summary("VAR prior"))


if __name__ == "__main__":
    main()
