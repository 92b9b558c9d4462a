"""Quality figures of a trained Fashion-MNIST model (the shipped default by default), all measured
with one feature network (the dataset classifier) against the held-out split:

* the model's samples (class-balanced, seeded): FID, precision/recall, density/coverage and the
  class accuracy (share of class-conditional samples the classifier puts in the requested class);
* the tokenizer alone: every held-out image encoded and decoded (the ceiling the prior works under);
* the floor: real training images against the held-out images (real-vs-real);
* a weak baseline: tokens drawn independently per position from their marginal frequencies;
* class control: the classifier's accuracy on held-out real images and on class-conditional samples.

    python scripts/evaluate_default.py [--model src/sundae/assets/default] [--latents runs/default/latents]
        [--num-samples 2000] [--steps T] [--out benchmarks/results/quality-default.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sundae.data.latents import LatentDataset
from sundae.eval.evaluate import StoredImages, evaluate, evaluate_images, evaluate_tokens, marginal_token_baseline
from sundae.eval.features import ClassifierFeatures, reference_statistics
from sundae.pipeline import SundaePipeline

ROOT = Path(__file__).resolve().parent.parent


def held_out_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out images (N, 1, 28, 28) and their labels, class folder by class folder."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        batch = torch.cat(list(StoredImages(class_dir, batch_size=1000)))
        images.append(batch)
        labels.append(torch.full((len(batch),), label))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def reconstructions(tokenizer, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Encode and decode ``images`` with the tokenizer: what the prior's best samples could look like."""
    return torch.cat([tokenizer.decode(tokenizer.encode(chunk)).float().clamp(-1, 1)
                      for chunk in images.split(batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "src/sundae/assets/default"))
    parser.add_argument("--classifier", default=str(ROOT / "src/sundae/assets/fashion-mnist-classifier"))
    parser.add_argument("--latents", default=str(ROOT / "runs/default/latents"))
    parser.add_argument("--real", default=str(ROOT / "data/fashion-mnist/validation"))
    parser.add_argument("--train-images", default=str(ROOT / "data/fashion-mnist/train"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the CLI's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality-default.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    sampling = {} if args.steps is None else {"steps": args.steps}
    pipe = SundaePipeline.from_pretrained(args.model, device="cpu")
    extractor = ClassifierFeatures(args.classifier)
    reference = reference_statistics(extractor, StoredImages(args.real, batch_size=500), None, batch_size=500)
    real, real_labels = held_out_images(Path(args.real))
    recon = reconstructions(pipe.tokenizer, real)
    reports = {
        "model": evaluate(pipe, real_images=reference, extractor=extractor, num_samples=args.num_samples,
                          sampling_options=sampling, seed=args.seed, batch_size=250, progress=True),
        "tokenizer_reconstructions": evaluate_images(recon, reference, extractor, batch_size=500,
                                                     model_id="held-out images encoded and decoded"),
        "real_vs_real": evaluate_images(_train_subset(Path(args.train_images), args.num_samples), reference,
                                        extractor, batch_size=250, model_id="real training images"),
        "marginal_baseline": evaluate_tokens(
            marginal_token_baseline(LatentDataset(args.latents, split="train"), args.num_samples, seed=args.seed),
            pipe.tokenizer, real_images=reference, extractor=extractor, batch_size=250,
            model_id="independent per-position marginal tokens"),
    }
    reports["tokenizer_reconstructions"]["metrics"]["class_accuracy"] = accuracy(extractor, recon, real_labels)
    summary = {
        "extractor": extractor.name,
        "real_held_out_images": len(reference.features),
        "num_samples": args.num_samples,
        "sampling_options": reports["model"]["sampling_options"],
        **{f"{name}/{metric}": report["metrics"][metric] for name, report in reports.items()
           for metric in ("fid", "precision", "recall", "density", "coverage")},
        "class_accuracy/real_held_out": accuracy(extractor, real, real_labels),
        "class_accuracy/tokenizer_reconstructions": reports["tokenizer_reconstructions"]["metrics"]["class_accuracy"],
        "class_accuracy/model": reports["model"]["metrics"]["class_accuracy"],
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "reports": reports}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def accuracy(extractor: ClassifierFeatures, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (extractor.classify(images) == labels).float().mean().item()


def _train_subset(folder: Path, count: int) -> torch.Tensor:
    """An even spread of ``count`` training images over the class folders (the real-vs-real floor)."""
    files = StoredImages(folder, batch_size=count)
    step = max(1, len(files.files) // count)
    files.files = files.files[::step][:count]
    return torch.cat(list(files))


if __name__ == "__main__":
    main()
