"""Quality figures of a trained class-conditional model against its dataset's held-out split, in one or
more feature networks (the dataset's classifier, the FID Inception):

* the model's samples (class-balanced, seeded; sampled once and scored in every network): FID,
  precision/recall, density/coverage and the class accuracy (share of class-conditional samples the
  classifier puts in the requested class);
* the tokenizer alone: every held-out image encoded and decoded (the ceiling the prior works under);
* the floor: real training images against the held-out images (real-vs-real);
* a weak baseline (with --latents): tokens drawn independently per position from their marginal frequencies;
* class control: the classifier's accuracy on held-out real images, reconstructions and samples;
* with --pictures DIR: a grid of 8 samples per class (one row each), and the memorisation check
  (:mod:`sundae.eval.memorisation`): each sample beside its nearest training image, and the
  sample-to-train against held-out-to-train distance histogram, with its summary in the JSON.

    python scripts/evaluate_quality.py [--model fashion-mnist] [--latents runs/default/latents]
        [--extractors classifier,inception] [--num-samples 2000] [--steps T] [--pictures DIR]
        [--out benchmarks/results/quality-default.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sundae.data.images import save_image_grid
from sundae.data.latents import LatentDataset
from sundae.eval.evaluate import (StoredImages, class_labels_for, evaluate_images, evaluate_tokens,
                                  marginal_token_baseline, sample_batches)
from sundae.eval.features import ClassifierFeatures, InceptionFeatures, reference_statistics
from sundae.eval.memorisation import (memorisation_summary, nearest_neighbours, save_distance_histogram,
                                      save_nearest_pairs)
from sundae.models import model_directory
from sundae.pipeline import SundaePipeline
from sundae.pipelines import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("fid", "precision", "recall", "density", "coverage")


def held_out_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) of a folder with one sub-folder per class, and their labels."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        batch = torch.cat(list(StoredImages(class_dir, batch_size=1000)))
        images.append(batch)
        labels.append(torch.full((len(batch),), label))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def reconstructions(tokenizer, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Encode and decode ``images`` with the tokenizer: what the prior's best samples could look like."""
    return torch.cat([tokenizer.decode(tokenizer.encode(chunk)).float().clamp(-1, 1)
                      for chunk in images.split(batch_size)])


def train_subset(folder: Path, count: int) -> torch.Tensor:
    """An even spread of ``count`` training images over the class folders (the real-vs-real floor)."""
    files = StoredImages(folder, batch_size=count)
    step = max(1, len(files.files) // count)
    files.files = files.files[::step][:count]
    return torch.cat(list(files))


def draw_samples(pipe: SundaePipeline, count: int, *, options: dict, seed: int,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``count`` class-balanced samples (sample i: class i mod C, seed + i), as `sundae evaluate` draws them,
    with the sampling ``options`` over the model's defaults (SUNDAE's or VAR's)."""
    options = pipe.sampling_options(options)
    labels = class_labels_for(pipe, count, seed=seed, class_balanced=True)
    images, steps_taken, seconds = [], [], 0.0
    for batch in sample_batches(pipe, samples=range(count), options=options, seed=seed, labels=labels,
                                batch_size=batch_size, progress=True, description="sample"):
        images.append(batch.output.images.float())
        steps_taken.append(batch.output.steps_taken)
        seconds += batch.seconds
    facts = {"sampling_options": options.to_dict(), "sampling_seconds": seconds,
             "mean_steps_taken": float(torch.cat(steps_taken).float().mean()), "seed": seed}
    return torch.cat(images), labels, facts


def extractor_named(name: str, classifier: str):
    return ClassifierFeatures(classifier) if name == "classifier" else InceptionFeatures(batch_size=50)


def scores_in(extractor, *, samples, recon, real, train_images, latents, pipe, seed: int) -> dict:
    reference = reference_statistics(extractor, real, None, batch_size=250)
    reports = {
        "model": evaluate_images(samples, reference, extractor, batch_size=250, model_id=pipe.name),
        "tokenizer_reconstructions": evaluate_images(recon, reference, extractor, batch_size=250,
                                                     model_id="held-out images encoded and decoded"),
        "real_vs_real": evaluate_images(train_images, reference, extractor, batch_size=250,
                                        model_id="real training images"),
    }
    if latents is not None:
        reports["marginal_baseline"] = evaluate_tokens(
            marginal_token_baseline(LatentDataset(latents, split="train"), len(samples), seed=seed), pipe.tokenizer,
            real_images=reference, extractor=extractor, batch_size=250,
            model_id="independent per-position marginal tokens")
    return reports


def save_pictures(folder: Path, samples: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  training_folder: Path, held_out: torch.Tensor) -> dict:
    """Samples by class, and the memorisation check against every training image."""
    folder.mkdir(parents=True, exist_ok=True)
    by_class = torch.cat([samples[labels == label][:8] for label in range(num_classes)])
    save_image_grid(by_class, folder / "samples-by-class.png", nrow=8)
    training, _ = held_out_images(training_folder)
    to_train = nearest_neighbours(samples, training)
    held_to_train = nearest_neighbours(held_out, training)
    shown = torch.arange(min(len(samples), 4 * num_classes))  # class-balanced: every class appears
    save_nearest_pairs(samples[shown], training, type(to_train)(to_train.distances[shown], to_train.indices[shown]),
                       folder / "nearest-training-images.png", pairs_per_row=num_classes)
    save_distance_histogram(to_train, held_to_train, folder / "nearest-distances.png")
    return {"training_images": len(training), **memorisation_summary(to_train, held_to_train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-mnist", help="a shipped model's name or a model directory")
    parser.add_argument("--classifier", default=str(ROOT / "src/sundae/assets/fashion-mnist-classifier"))
    parser.add_argument("--extractors", default="classifier", help="comma-separated: classifier, inception")
    parser.add_argument("--latents", default=None, help="latent dataset of the training images (marginal baseline)")
    parser.add_argument("--real", default=str(ROOT / "data/fashion-mnist/validation"))
    parser.add_argument("--train-images", default=str(ROOT / "data/fashion-mnist/train"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", default=None, help="folder for the class grid and memorisation pictures")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality-default.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    pipe = load_pipeline(model_directory(args.model), device="cpu")
    samples, labels, sampling = draw_samples(pipe, args.num_samples, options={} if args.steps is None else
                                             {"steps": args.steps}, seed=args.seed, batch_size=args.batch_size)
    real, real_labels = held_out_images(Path(args.real))
    recon = reconstructions(pipe.tokenizer, real)
    train_images = train_subset(Path(args.train_images), args.num_samples)
    classifier = ClassifierFeatures(args.classifier)
    reports = {name: scores_in(extractor_named(name, args.classifier), samples=samples, recon=recon, real=real,
                               train_images=train_images, latents=args.latents, pipe=pipe, seed=args.seed)
               for name in args.extractors.split(",")}
    summary = {
        "model": pipe.name, "real_held_out_images": len(real), "num_samples": args.num_samples, **sampling,
        **{f"{extractor}/{name}/{metric}": report["metrics"][metric] for extractor, by_name in reports.items()
           for name, report in by_name.items() for metric in METRICS},
        "class_accuracy/real_held_out": accuracy(classifier, real, real_labels),
        "class_accuracy/tokenizer_reconstructions": accuracy(classifier, recon, real_labels),
        "class_accuracy/model": accuracy(classifier, samples, labels),
    }
    if args.pictures is not None:
        summary["memorisation"] = save_pictures(Path(args.pictures), samples, labels, len(pipe.class_names),
                                                Path(args.train_images), real)
    summary["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "reports": reports}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def accuracy(classifier: ClassifierFeatures, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.cat([classifier.classify(chunk) == chunk_labels for chunk, chunk_labels
                            in zip(images.split(500), labels.split(500))]).float().mean())


if __name__ == "__main__":
    main()
