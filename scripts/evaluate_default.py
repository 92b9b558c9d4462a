"""Quality figures of a trained Fashion-MNIST model (the shipped default by default), all measured
with one feature network (the dataset classifier) against the held-out split:

* the model's samples (class-balanced, seeded): FID, precision/recall, density/coverage;
* the floor: real training images against the held-out images (real-vs-real);
* a weak baseline: tokens drawn independently per position from their marginal frequencies;
* class control: the classifier's accuracy on held-out real images and on class-conditional samples.

    python scripts/evaluate_default.py [--model src/sundae/assets/default] [--latents runs/default/latents]
        [--num-samples 2000] [--out benchmarks/results/quality-default.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sundae.data.latents import LatentDataset
from sundae.eval.classifier import SmallClassifier, predict
from sundae.eval.evaluate import StoredImages, evaluate, evaluate_images, evaluate_tokens, marginal_token_baseline
from sundae.eval.features import ClassifierFeatures, reference_statistics
from sundae.pipeline import SundaePipeline

ROOT = Path(__file__).resolve().parent.parent


def class_accuracy(pipe: SundaePipeline, classifier: SmallClassifier, *, per_class: int, steps: int, seed: int) -> float:
    """Share of class-conditional samples that the classifier assigns to the requested class."""
    num_classes = pipe.prior.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = pipe(len(labels), class_labels=labels.tolist(), seed=seed, steps=steps, output_type="pt").images
    return (predict(classifier, images.mean(dim=1, keepdim=True)) == labels).float().mean().item()


def real_accuracy(classifier: SmallClassifier, folder: Path) -> float:
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        batch = torch.cat(list(StoredImages(class_dir, batch_size=1000)))
        images.append(batch)
        labels.append(torch.full((len(batch),), label))
    return (predict(classifier, torch.cat(images)) == torch.cat(labels)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "src/sundae/assets/default"))
    parser.add_argument("--classifier", default=str(ROOT / "src/sundae/assets/fashion-mnist-classifier"))
    parser.add_argument("--latents", default=str(ROOT / "runs/default/latents"))
    parser.add_argument("--real", default=str(ROOT / "data/fashion-mnist/validation"))
    parser.add_argument("--train-images", default=str(ROOT / "data/fashion-mnist/train"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality-default.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    pipe = SundaePipeline.from_pretrained(args.model, device="cpu")
    extractor = ClassifierFeatures(args.classifier)
    reference = reference_statistics(extractor, StoredImages(args.real, batch_size=500), None, batch_size=500)
    reports = {
        "model": evaluate(pipe, real_images=reference, extractor=extractor, num_samples=args.num_samples,
                          sampling_options={"steps": args.steps}, seed=args.seed, batch_size=250),
        "real_vs_real": evaluate_images(_train_subset(Path(args.train_images), args.num_samples), reference,
                                        extractor, batch_size=250, model_id="real training images"),
        "marginal_baseline": evaluate_tokens(
            marginal_token_baseline(LatentDataset(args.latents, split="train"), args.num_samples, seed=args.seed),
            pipe.tokenizer, real_images=reference, extractor=extractor, batch_size=250,
            model_id="independent per-position marginal tokens"),
    }
    classifier = SmallClassifier.from_pretrained(args.classifier).eval()
    summary = {
        "extractor": extractor.name,
        "real_held_out_images": len(reference.features),
        "num_samples": args.num_samples,
        **{f"{name}/{metric}": report["metrics"][metric] for name, report in reports.items()
           for metric in ("fid", "precision", "recall", "density", "coverage")},
        "classifier_accuracy_real_held_out": real_accuracy(classifier, Path(args.real)),
        "classifier_accuracy_conditional_samples": class_accuracy(pipe, classifier, per_class=100, steps=args.steps,
                                                                  seed=args.seed + 10_000),
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "reports": reports}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _train_subset(folder: Path, count: int) -> torch.Tensor:
    """An even spread of ``count`` training images over the class folders (the real-vs-real floor)."""
    files = StoredImages(folder, batch_size=count)
    step = max(1, len(files.files) // count)
    files.files = files.files[::step][:count]
    return torch.cat(list(files))


if __name__ == "__main__":
    main()
