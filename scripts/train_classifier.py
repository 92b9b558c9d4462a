"""Train the Fashion-MNIST / MNIST classifier that judges class-conditional samples and serves as
the dataset-specific feature extractor of `sundae evaluate` (its 128-d penultimate layer).

    python scripts/train_classifier.py [--data data/fashion-mnist.npz] [--out src/sundae/assets/fashion-mnist-classifier]

Prints the accuracy on the held-out split and writes it beside the weights (classifier.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sundae.data.mnist import load_pixel_archive
from sundae.data.latents import SPLIT_CODES
from sundae.eval.classifier import ClassifierConfig, predict, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/fashion-mnist.npz")
    parser.add_argument("--out", default="src/sundae/assets/fashion-mnist-classifier")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    archive = load_pixel_archive(args.data)
    images = torch.from_numpy(archive.images).float().div(127.5).sub(1).unsqueeze(1)
    labels = torch.from_numpy(archive.labels).long()
    train = torch.from_numpy(archive.split == SPLIT_CODES["train"])
    started = time.perf_counter()
    model = train_classifier(images[train], labels[train], config=ClassifierConfig(num_classes=len(archive.class_names), width=16),
                             epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - started
    accuracy = (predict(model, images[~train]) == labels[~train]).float().mean().item()
    out = Path(args.out)
    model.save_pretrained(out, extra={"data": args.data, "source": archive.source, "class_names": archive.class_names,
                                      "held_out_accuracy": accuracy, "epochs": args.epochs, "train_seconds": seconds})
    print(json.dumps({"held_out_accuracy": round(accuracy, 4), "held_out_images": int((~train).sum()),
                      "train_images": int(train.sum()), "train_seconds": round(seconds, 1), "out": str(out)}))


if __name__ == "__main__":
    main()
