"""Evaluation runs: generate, extract features, score, and write reports anyone can reproduce.

Paper §4.1 scores unconditional samples with FID∞, density and coverage (Tables 1-2) and sweeps
the sampler's steps, proportion and temperature (Figs. 8, 12, 13). :func:`evaluate` does one such
measurement and returns a JSON-able report holding everything needed to repeat it: the model
identity, the feature extractor's name (network + weights hash), the real set's hash, the seeds
(sample i uses seed + i, whatever the batch size), the full sampling options and the timings.
Under ``torchrun`` each process samples its share of the images and rank 0 gathers their
features and scores them: the same report, whatever the number of processes.
:func:`sweep` repeats it over one sampling parameter with the same seeds, and
:func:`write_sweep` writes the CSV and plot. :func:`marginal_token_baseline` is the weak baseline
that every prior must beat: each token position drawn independently from its code frequencies.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

import sundae
from sundae.checkpoint import WEIGHTS_NAME, atomic_path
from sundae.data.images import IMAGE_EXTENSIONS, DatasetError, list_images, pil_to_tensor
from sundae.data.latents import SPLIT_CODES, TokenDataset, sha256_file
from sundae.distributed import DistributedContext, broadcast_from_main, gather_shards, shard
from sundae.errors import InputError
from sundae.eval import metrics
from sundae.eval.features import (FeatureExtractor, FeatureExtractorError, ImageSource, ReferenceFeatures,
                                  image_batches, reference_statistics)
from sundae.pipeline import PRIOR_SUBDIR, SundaePipeline, decode_tokens_to_images
from sundae.sampler import SamplingOptions

log = logging.getLogger(__name__)

REPORT_FORMAT = "sundae-evaluation"
REPORT_FORMAT_VERSION = 1
SWEEP_FIELDS = {"steps": "steps", "temperature": "end_temperature", "proportion": "proportion",
                "guidance": "guidance_scale"}
SWEEP_COLUMNS = ("parameter", "field", "value", "fid", "fid_infinity", "density", "coverage", "precision", "recall",
                 "class_accuracy", "num_fake", "mean_steps_taken", "images_per_second")
PathLike = str | os.PathLike


# --- image files -------------------------------------------------------------------------------


class StoredImages:
    """Images in a folder (PNG, JPEG, ...) or an ``.npz`` (key ``images``, uint8 (N, H, W) or (N, H, W, C)),
    read lazily in batches of (B, C, H, W) floats in [-1, 1]; iterate as often as needed.

    Folder images keep their mode: all-grey folders give C = 1, anything else RGB. All images
    must have one size (generated samples do); nothing is resized. An .npz with a ``split`` array
    (``scripts/prepare_mnist.py``'s) is read as its validation split only: the held-out images
    are the reference, not train + validation.
    """

    def __init__(self, path: PathLike, *, batch_size: int = 64) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        if self.path.is_dir():
            self.files = [self.path / relative for relative in list_images(self.path, IMAGE_EXTENSIONS)]
            if not self.files:
                raise DatasetError(f"no images found under {self.path}")
            with Image.open(self.files[0]) as first:
                self.mode = "L" if first.mode in ("L", "1") else "RGB"
        elif self.path.suffix == ".npz" and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as archive:
                if "images" not in archive:
                    raise DatasetError(f"{self.path} has no 'images' array (found {', '.join(archive.files)})")
                self.array = archive["images"]
                if "split" in archive:
                    held_out = archive["split"] == SPLIT_CODES["validation"]
                    log.info("%s: using its validation split, %d of %d images", self.path, held_out.sum(),
                             len(self.array))
                    self.array = self.array[held_out]
            if self.array.dtype != np.uint8 or self.array.ndim not in (3, 4):
                raise DatasetError(f"{self.path}: 'images' must be uint8 (N, H, W) or (N, H, W, C), got "
                                   f"{self.array.dtype} {self.array.shape}")
        else:
            raise DatasetError(f"{self.path} is neither an image folder nor an .npz file")

    def __len__(self) -> int:
        return len(self.files) if self.path.is_dir() else len(self.array)

    def _read(self, file: Path) -> Tensor:
        with Image.open(file) as image:
            return pil_to_tensor(image.convert(self.mode))

    def _batch(self, start: int) -> Tensor:
        if self.path.is_dir():
            images = [self._read(file) for file in self.files[start:start + self.batch_size]]
            if any(image.shape != images[0].shape for image in images):
                raise DatasetError(f"images under {self.path} have different sizes; generated samples must share one")
            return torch.stack(images)
        pixels = torch.from_numpy(self.array[start:start + self.batch_size])
        pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
        return pixels.float() / 127.5 - 1.0

    def __iter__(self) -> Iterator[Tensor]:
        return (self._batch(start) for start in range(0, len(self), self.batch_size))


def as_image_source(images: ImageSource | PathLike, batch_size: int) -> ImageSource:
    return StoredImages(images, batch_size=batch_size) if isinstance(images, (str, os.PathLike)) else images


def as_reference(real_images: ImageSource | ReferenceFeatures | PathLike, extractor: FeatureExtractor, *,
                 batch_size: int, cache_dir: PathLike | None) -> ReferenceFeatures:
    """Real features from images, a path, or already extracted ones (which must match the extractor)."""
    if isinstance(real_images, ReferenceFeatures):
        if real_images.extractor != extractor.name:
            raise FeatureExtractorError(f"the reference features come from {real_images.extractor} but the samples "
                                        f"would be scored with {extractor.name}; extract both with one network")
        return real_images
    return reference_statistics(extractor, as_image_source(real_images, batch_size), cache_dir, batch_size=batch_size)


# --- scoring -----------------------------------------------------------------------------------


def compute_metrics(reference: ReferenceFeatures, fake: np.ndarray, *, nearest_k: int = 5, seed: int = 0,
                    fid_infinity: bool | None = None) -> tuple[dict[str, Any], list[str]]:
    """FID, FID∞, precision, recall, density and coverage -> (metrics, notes).

    ``fid_infinity``: True computes it (an error when there are too few samples), False skips it,
    None computes it when :func:`metrics.default_sample_counts` allows and notes why not otherwise.
    """
    fake = metrics.check_features(fake, name="fake", min_count=2, purpose="FID")
    metrics.check_same_dimension(reference.features, fake)
    results: dict[str, Any] = {"fid": metrics.frechet_distance(*reference.statistics, *metrics.gaussian_statistics(fake))}
    notes: list[str] = []
    infinity, points = None, None
    if fid_infinity is None:
        try:
            metrics.default_sample_counts(len(fake), fake.shape[1])
            fid_infinity = True
        except metrics.FeatureError as error:
            notes.append(f"FID∞ not computed: {error}")
    if fid_infinity:
        infinity, points = metrics.fid_infinity(reference.statistics, fake, seed=seed)
    results["fid_infinity"] = infinity
    results["fid_infinity_points"] = None if points is None else [[count, value] for count, value in points]
    results.update(metrics.precision_recall_density_coverage(reference.features, fake, k=nearest_k))
    return results, notes


def _base_report(reference: ReferenceFeatures, fake: np.ndarray, *, extractor: FeatureExtractor, model: str,
                 nearest_k: int, seed: int, fid_infinity: bool | None) -> dict[str, Any]:
    started = time.perf_counter()
    log.info("metrics: FID, FID-infinity, precision/recall, density/coverage of %d samples against %d real images ...",
             len(fake), reference.count)
    scores, notes = compute_metrics(reference, fake, nearest_k=nearest_k, seed=seed, fid_infinity=fid_infinity)
    log.info("metrics done in %.1f s", time.perf_counter() - started)
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_FORMAT_VERSION, "model": model,
        "extractor": extractor.name, "real_dataset_sha256": reference.dataset_sha256,
        "num_real": reference.count, "num_fake": len(fake), "nearest_k": nearest_k, "seed": seed, "metrics": scores,
        "notes": notes, "timings": {"metrics_seconds": time.perf_counter() - started},
        "environment": {"sundae": sundae.__version__, "torch": torch.__version__, "numpy": np.__version__},
    }


def _features_of(source: ImageSource, extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    return np.concatenate([extractor(batch) for batch in image_batches(source, batch_size)])


def evaluate_images(fake_images: ImageSource | PathLike, real_images: ImageSource | ReferenceFeatures | PathLike,
                    extractor: FeatureExtractor, *, batch_size: int = 64, nearest_k: int = 5, seed: int = 0,
                    fid_infinity: bool | None = None, cache_dir: PathLike | None = None,
                    model_id: str = "images") -> dict[str, Any]:
    """Score already generated images (a tensor, batches, a folder or an .npz) against real ones."""
    reference = as_reference(real_images, extractor, batch_size=batch_size, cache_dir=cache_dir)
    started = time.perf_counter()
    fake = _features_of(as_image_source(fake_images, batch_size), extractor, batch_size)
    features_seconds = time.perf_counter() - started
    report = _base_report(reference, fake, extractor=extractor, model=model_id, nearest_k=nearest_k, seed=seed,
                          fid_infinity=fid_infinity)
    report["timings"]["features_seconds"] = features_seconds
    return report


def pipeline_identity(directory: PathLike) -> str:
    """``<folder name>@sha256:<hash of the prior's weights>``: what a report calls the model."""
    directory = Path(directory)
    return f"{directory.name}@sha256:{sha256_file(directory / PRIOR_SUBDIR / WEIGHTS_NAME)}"


# --- generation --------------------------------------------------------------------------------


def class_labels_for(pipeline: SundaePipeline, num_samples: int, *, seed: int, class_balanced: bool) -> Tensor | None:
    """None for an unconditional model; else 0, 1, ..., C-1, 0, ... (balanced) or seeded uniform draws."""
    num_classes = pipeline.prior.config.num_classes
    if num_classes is None:
        return None
    if class_balanced:
        return torch.arange(num_samples) % num_classes
    return torch.from_numpy(np.random.default_rng(seed).integers(0, num_classes, num_samples))


@dataclass(frozen=True)
class SampledBatch:
    start: int  # index of its first sample
    labels: Tensor | None  # (n,) the requested classes, or None for an unconditional model
    output: Any  # the pipeline's SampleOutput (images in [-1, 1] as a tensor)
    seconds: float  # sampling wall time


def sample_batches(pipeline: SundaePipeline, *, samples: range, options: SamplingOptions, seed: int,
                   labels: Tensor | None, batch_size: int, progress: bool,
                   description: str = "evaluate") -> Iterator[SampledBatch]:
    """Sample the images ``samples`` batch by batch: sample i with seed + i and label ``labels[i]``, so
    the images do not depend on the batch size or on how the range is split across processes."""
    with tqdm(total=len(samples), disable=not progress, unit="img", desc=description) as bar:
        for start in range(samples.start, samples.stop, batch_size):
            count = min(batch_size, samples.stop - start)
            batch_labels = None if labels is None else labels[start:start + count]
            started = time.perf_counter()
            output = pipeline(count, class_labels=None if batch_labels is None else batch_labels.tolist(),
                              seed=seed + start, output_type="pt", **options.to_dict())
            yield SampledBatch(start, batch_labels, output, time.perf_counter() - started)
            bar.update(count)


def generate_features(pipeline: SundaePipeline, extractor: FeatureExtractor, *, samples: range,
                      options: SamplingOptions, seed: int, labels: Tensor | None, batch_size: int,
                      progress: bool) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Sample the images ``samples`` (:func:`sample_batches`) and extract their features batch by batch,
    so no more than one batch of images is ever held.

    Returns (rows, seconds): rows, one per sample, are ``features`` (n, D) float64, ``steps_taken``
    (n,) and, with a class-conditional model and an extractor that can ``classify``, ``class_hits``
    (n,): 1 where the classifier puts the sample in the requested class; seconds are the
    ``sampling_seconds`` and ``features_seconds`` spent.
    """
    chunks, steps, hits = [], [], []
    classify = getattr(extractor, "classify", None) if labels is not None else None
    seconds = {"sampling_seconds": 0.0, "features_seconds": 0.0}
    for batch in sample_batches(pipeline, samples=samples, options=options, seed=seed, labels=labels,
                                batch_size=batch_size, progress=progress):
        seconds["sampling_seconds"] += batch.seconds
        started = time.perf_counter()
        chunks.append(torch.from_numpy(extractor(batch.output.images)))
        if classify is not None:
            hits.append((classify(batch.output.images) == batch.labels).long())
        seconds["features_seconds"] += time.perf_counter() - started
        steps.append(batch.output.steps_taken)
    rows = {"features": torch.cat(chunks), "steps_taken": torch.cat(steps)}
    if hits:
        rows["class_hits"] = torch.cat(hits)
    return rows, seconds


def check_extractor_fits(extractor: FeatureExtractor, pipeline: SundaePipeline) -> None:
    """A dataset's own classifier only scores models of that dataset (see :class:`ClassifierFeatures`)."""
    check_domain = getattr(extractor, "check_domain", None)
    if check_domain is not None:
        check_domain(pipeline.class_names, (pipeline.channels, *pipeline.image_size))


def evaluate(pipeline: SundaePipeline, *, real_images: ImageSource | ReferenceFeatures | PathLike,
             extractor: FeatureExtractor, num_samples: int, sampling_options: Mapping[str, Any] | None = None,
             seed: int = 0, class_balanced: bool = True, batch_size: int = 64, progress: bool = False,
             nearest_k: int = 5, fid_infinity: bool | None = None, cache_dir: PathLike | None = None,
             model_id: str | None = None, context: DistributedContext | None = None) -> dict[str, Any]:
    """Generate ``num_samples`` images with ``pipeline`` and score them against ``real_images``.

    Args:
        real_images: images in [-1, 1] (a tensor, batches, a folder, an .npz) or their
            :class:`ReferenceFeatures` (reuse them across calls, as :func:`sweep` does).
        extractor: the feature network (:class:`InceptionFeatures`, :class:`ClassifierFeatures`).
        sampling_options: :class:`SamplingOptions` fields over the model's defaults (its ``scheduler/``);
            the report records all of them, defaults included.
        seed: sample i uses seed + i, so results do not depend on ``batch_size`` or the process count.
        class_balanced: for a class-conditional model, cycle the labels 0..C-1 (else draw them
            uniformly from ``seed``); ignored for an unconditional model.
        nearest_k: k of the k-NN metrics (Naeem et al. use 5).
        fid_infinity: see :func:`compute_metrics`.
        cache_dir: where real features are cached (see :func:`reference_statistics`).
        model_id: what the report calls the model; default the pipeline's name. The CLI passes
            :func:`pipeline_identity` of the model folder.
        context: this process's rank in a ``torchrun`` group (:func:`sundae.distributed.setup_distributed`);
            every rank samples its :func:`~sundae.distributed.shard` of the images, rank 0 extracts
            the real features, gathers the samples' and scores them, and every rank returns the
            report. None: one process.

    Returns:
        A JSON-able report: ``metrics`` (fid, fid_infinity, fid_infinity_points, precision, recall,
        density, coverage), ``num_real``, ``num_fake``, ``seed`` (also of the FID∞ subsets),
        ``sample_seeds``, ``class_labels``, ``sampling_options``, ``extractor``, ``model``,
        ``real_dataset_sha256``, ``timings`` (sampling, features, metrics seconds, those of the
        slowest process; images per second; processes), ``mean_steps_taken``, ``notes`` and
        ``environment``.
    """
    if num_samples < 2:
        raise InputError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
    check_extractor_fits(extractor, pipeline)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if context is None:
        context = DistributedContext(rank=0, local_rank=0, world_size=1, device=pipeline.device)
    if num_samples < context.world_size:
        raise InputError(f"num_samples ({num_samples}) is below the number of processes ({context.world_size}); "
                         "give each process at least one sample")
    options = pipeline.sampling_options(sampling_options)  # over the model's defaults (its scheduler/)
    reference = as_reference(real_images, extractor, batch_size=batch_size, cache_dir=cache_dir) \
        if context.is_main else None
    labels = class_labels_for(pipeline, num_samples, seed=seed, class_balanced=class_balanced)
    rows, seconds = generate_features(pipeline, extractor, samples=shard(num_samples, context.rank, context.world_size),
                                      options=options, seed=seed, labels=labels, batch_size=batch_size,
                                      progress=progress and context.is_main)
    rows = {name: gather_shards(values, num_samples, context) for name, values in rows.items()}
    seconds_by_rank = gather_shards(  # (ranks, 2): a shard of world_size items is one item per rank
        torch.tensor([[seconds["sampling_seconds"], seconds["features_seconds"]]], dtype=torch.float64),
        context.world_size, context)
    report = None
    if context.is_main:
        report = _base_report(reference, rows["features"].numpy(), extractor=extractor,
                              model=model_id or pipeline.name, nearest_k=nearest_k, seed=seed,
                              fid_infinity=fid_infinity)
        report.update({
            "sample_seeds": {"first": seed, "last": seed + num_samples - 1},
            "class_labels": None if labels is None else ("balanced" if class_balanced else "uniform"),
            "sampling_options": options.to_dict(), "mean_steps_taken": float(rows["steps_taken"].float().mean()),
        })
        if "class_hits" in rows:
            report["metrics"]["class_accuracy"] = float(rows["class_hits"].float().mean())
        sampling_seconds, features_seconds = seconds_by_rank.max(dim=0).values.tolist()
        report["timings"].update({
            "sampling_seconds": sampling_seconds, "features_seconds": features_seconds,
            "images_per_second": num_samples / sampling_seconds if sampling_seconds > 0 else None,
            "processes": context.world_size,
        })
        report["environment"]["device"] = str(pipeline.device)
    return broadcast_from_main(report, context)


# --- baselines ---------------------------------------------------------------------------------


def marginal_token_baseline(token_dataset: TokenDataset, num_samples: int, seed: int = 0, *,
                            chunk_size: int = 4096) -> Tensor:
    """(num_samples, h, w) tokens, each position drawn independently from its code frequencies in the data.

    A prior that cannot beat this has learnt no dependencies between positions.
    """
    if len(token_dataset) == 0:
        raise DatasetError("the token dataset is empty")
    height, width = token_dataset.grid_shape
    positions, vocabulary = height * width, token_dataset.codebook_size
    counts = np.zeros(positions * vocabulary, dtype=np.int64)
    offsets = np.arange(positions, dtype=np.int64) * vocabulary
    for start in range(0, len(token_dataset), chunk_size):
        tokens, _ = token_dataset.batch(np.arange(start, min(start + chunk_size, len(token_dataset))))
        counts += np.bincount((tokens.reshape(len(tokens), positions).numpy() + offsets).ravel(),
                              minlength=positions * vocabulary)
    cumulative = np.cumsum(counts.reshape(positions, vocabulary), axis=1)
    uniform = np.random.default_rng(seed).random((num_samples, positions)) * cumulative[:, -1]
    samples = np.stack([np.searchsorted(cumulative[p], uniform[:, p], side="right") for p in range(positions)], axis=1)
    return torch.from_numpy(samples).view(num_samples, height, width)


def evaluate_tokens(tokens: Tensor, tokenizer: nn.Module, *, real_images: ImageSource | ReferenceFeatures | PathLike,
                    extractor: FeatureExtractor, model_id: str, batch_size: int = 64, nearest_k: int = 5,
                    seed: int = 0, fid_infinity: bool | None = None,
                    cache_dir: PathLike | None = None) -> dict[str, Any]:
    """Decode token grids (e.g. :func:`marginal_token_baseline`'s) batch by batch and score the images."""
    decoded = (decode_tokens_to_images(chunk, tokenizer, batch_size) for chunk in tokens.split(batch_size))
    return evaluate_images(decoded, real_images, extractor, batch_size=batch_size, nearest_k=nearest_k,
                           seed=seed, fid_infinity=fid_infinity, cache_dir=cache_dir, model_id=model_id)


# --- sweeps ------------------------------------------------------------------------------------


def sweep_field(parameter: str, options_class: type = SamplingOptions) -> str:
    """The field of ``options_class`` (SUNDAE's :class:`SamplingOptions`, or VAR's options) a sweep
    parameter sets.

    For SUNDAE "temperature" sets ``end_temperature``, the low end of the annealing (§3.4) that Fig. 13
    varies; any other field name is used as given (VAR has one temperature).
    """
    known = {option.name for option in fields(options_class)}
    field = SWEEP_FIELDS.get(parameter, parameter)
    field = field if field in known else parameter
    if field not in known:
        raise InputError(f"cannot sweep {parameter!r}: use one of {', '.join(SWEEP_FIELDS)} or a sampling option "
                         f"({', '.join(sorted(known))})")
    return field


def sweep(pipeline: SundaePipeline, real_images: ImageSource | ReferenceFeatures | PathLike,
          extractor: FeatureExtractor, *, parameter: str, values: Sequence[float], num_samples: int,
          base_options: Mapping[str, Any] | None = None, seed: int = 0, batch_size: int = 64,
          cache_dir: PathLike | None = None, context: DistributedContext | None = None,
          **evaluate_options: Any) -> list[dict[str, Any]]:
    """One :func:`evaluate` report per value of ``parameter`` (paper Figs. 8, 12, 13), all with the same seeds.

    ``parameter``: "steps", "temperature" (the end temperature), "proportion", or any
    :class:`SamplingOptions` field. Real features are extracted once (on rank 0 of ``context``, a
    ``torchrun`` group, as :func:`evaluate` does). ``evaluate_options`` go to :func:`evaluate`
    (nearest_k, progress, model_id, class_balanced, fid_infinity).
    """
    field = sweep_field(parameter, pipeline.options_class)
    if not values:
        raise InputError("give at least one value to sweep")
    check_extractor_fits(extractor, pipeline)
    if context is None or context.is_main:  # the other ranks never read the real images
        real_images = as_reference(real_images, extractor, batch_size=batch_size, cache_dir=cache_dir)
    results = []
    for value in values:
        options = {**dict(base_options or {}), field: value}
        log.info("sweep %s=%s", parameter, value)
        report = evaluate(pipeline, real_images=real_images, extractor=extractor, num_samples=num_samples,
                          sampling_options=options, seed=seed, batch_size=batch_size, context=context,
                          **evaluate_options)
        results.append({"parameter": parameter, "field": field, "value": value, **report})
        log.info("sweep %s=%s: %s", parameter, value, summary_line(report))
    return results


def summary_line(report: Mapping[str, Any]) -> str:
    """One line of a report's headline figures, so that a long sweep shows each value's result as it lands."""
    scores = report["metrics"]
    figures = [f"{name} {scores[name]:.3g}" for name in ("fid", "precision", "recall", "density", "coverage",
                                                          "class_accuracy") if scores.get(name) is not None]
    if report.get("mean_steps_taken") is not None:
        figures.append(f"mean steps {report['mean_steps_taken']:.1f}")
    return ", ".join(figures)


def sweep_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per sweep report, with the columns of :data:`SWEEP_COLUMNS`."""
    rows = []
    for result in results:
        scores = result["metrics"]
        rows.append({"parameter": result["parameter"], "field": result["field"], "value": result["value"],
                     **{name: scores[name] for name in ("fid", "fid_infinity", "density", "coverage", "precision",
                                                        "recall")},
                     "class_accuracy": scores.get("class_accuracy"),
                     "num_fake": result["num_fake"], "mean_steps_taken": result.get("mean_steps_taken"),
                     "images_per_second": result.get("timings", {}).get("images_per_second")})
    return rows


def write_sweep(results: Sequence[Mapping[str, Any]], csv_path: PathLike, png_path: PathLike | None = None) -> None:
    """Write the sweep as CSV and, when ``png_path`` is given, plot FID (and FID∞), density and coverage."""
    rows = sweep_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SWEEP_COLUMNS)
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())
    if png_path is not None:
        plot_sweep(rows, png_path)


def plot_sweep(rows: Sequence[Mapping[str, Any]], png_path: PathLike) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting a sweep needs matplotlib: `pip install matplotlib` (or write only the CSV)") from None
    values = [row["value"] for row in rows]
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    for axis, (name, label) in zip(figure.subplots(1, 3), (("fid", "FID"), ("density", "Density"),
                                                           ("coverage", "Coverage"))):
        axis.plot(values, [row[name] for row in rows], marker="o", label=label)
        if name == "fid" and all(row["fid_infinity"] is not None for row in rows):
            axis.plot(values, [row["fid_infinity"] for row in rows], marker="s", linestyle="--", label="FID∞")
            axis.legend()
        axis.set_xlabel(rows[0]["parameter"])
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    with atomic_path(png_path) as tmp, open(tmp, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
