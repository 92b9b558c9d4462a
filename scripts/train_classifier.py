"""Train a dataset's classifier (Fashion-MNIST, MNIST, emoji categories) that judges class-conditional
samples and serves as the dataset-specific feature extractor of `sundae evaluate` (its 128-d
penultimate layer).

    python scripts/train_classifier.py [--data data/fashion-mnist.npz] [--out src/sundae/assets/fashion-mnist-classifier]
        [--epochs 2] [--width 16] [--flips]

Grey (N, H, W) and RGB (N, H, W, 3) archives both work; ``--flips`` adds every training image's
horizontal mirror (for data whose classes do not depend on left and right, like emoji categories).

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
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--flips", action="store_true", help="also train on horizontal mirrors")
    parser.add_argument("--half-weights", action="store_true",
                        help="store the weights in float16 (half the size); the accuracy is measured on them")
    args = parser.parse_args()

    archive = load_pixel_archive(args.data)
    images = torch.from_numpy(archive.images).float().div(127.5).sub(1)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(archive.labels).long()
    train = torch.from_numpy(archive.split == SPLIT_CODES["train"])
    train_images, train_labels = images[train], labels[train]
    if args.flips:
        train_images, train_labels = torch.cat((train_images, train_images.flip(-1))), train_labels.repeat(2)
    config = ClassifierConfig(in_channels=images.shape[1], image_size=images.shape[-1],
                              num_classes=len(archive.class_names), width=args.width)
    started = time.perf_counter()
    model = train_classifier(train_images, train_labels, config=config, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    if args.half_weights:  # what ships is what is measured
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    accuracy = (predict(model, images[~train]) == labels[~train]).float().mean().item()
    facts = {"data": args.data, "source": archive.source, "class_names": archive.class_names,
             "held_out_accuracy": accuracy, "epochs": args.epochs, "flips": args.flips, "train_seconds": seconds}
    model.save_pretrained(out, weights_dtype=torch.float16 if args.half_weights else None, extra=facts)
    print(json.dumps({"held_out_accuracy": round(accuracy, 4), "held_out_images": int((~train).sum()),
                      "train_images": int(train.sum()), "train_seconds": round(seconds, 1), "out": str(out)}))


if __name__ == "__main__":
    main()
