"""Decoders of the same codes compared where it matters: on held-out reconstructions and on a prior's samples.

Every tokenizer given must give every image the same codes as the model's own (a decoder-only fine-tune,
`sundae train-tokenizer --init-from DIR --decoder-only`; checked by ``codes_sha256``). The model's prior
samples tokens once (class-balanced, the model's default sampling, seeds as `sundae evaluate` draws them)
and each tokenizer decodes the same tokens; held-out images are encoded and decoded by each. Scores are in
the dataset classifier's features against the held-out images, as `scripts/evaluate_quality.py` gives them:

    python scripts/compare_decoders.py src/sundae/assets/default/tokenizer runs/default/decoder-run/tokenizer \
        --out benchmarks/results/decoders-default.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evaluate_quality import METRICS, ROOT, accuracy, held_out_images, reconstructions
from sundae.data.latents import same_codes, tokenizer_identity
from sundae.errors import InputError
from sundae.eval.evaluate import class_labels_for, evaluate_images, sample_batches
from sundae.eval.features import ClassifierFeatures, reference_statistics
from sundae.models import model_directory
from sundae.pipelines import load_pipeline
from sundae.tokenizer import VQGAN


def sampled_tokens(model: Path, count: int, *, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = load_pipeline(model, device="cpu")
    labels = class_labels_for(pipe, count, seed=seed, class_balanced=True)
    tokens = [batch.output.tokens for batch in sample_batches(
        pipe, samples=range(count), options=pipe.sampling_options({}), seed=seed, labels=labels,
        batch_size=batch_size, progress=True, description="sample")]
    return torch.cat(tokens), labels


@torch.no_grad()
def decoded(tokenizer: VQGAN, tokens: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    return torch.cat([tokenizer.decode(chunk).float().clamp(-1, 1) for chunk in tokens.split(batch_size)])


def scores(images: torch.Tensor, labels: torch.Tensor, reference, classifier: ClassifierFeatures, name: str) -> dict:
    metrics = evaluate_images(images, reference, classifier, batch_size=250, model_id=name)["metrics"]
    return {**{metric: metrics[metric] for metric in METRICS}, "class_accuracy": accuracy(classifier, images, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizers", nargs="+", help="tokenizer directories with the model tokenizer's codes")
    parser.add_argument("--model", default="fashion-mnist", help="a shipped model's name or a model directory")
    parser.add_argument("--classifier", default=str(ROOT / "src/sundae/assets/fashion-mnist-classifier"))
    parser.add_argument("--real", default=str(ROOT / "data/fashion-mnist/validation"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    model = model_directory(args.model)
    own = tokenizer_identity(model / "tokenizer")
    for directory in args.tokenizers:
        if not same_codes(own, tokenizer_identity(directory)):
            raise InputError(f"{directory} gives other codes than {model / 'tokenizer'}: only decoders of the "
                             "same codes can be compared on the same sampled tokens")
    tokens, labels = sampled_tokens(model, args.num_samples, seed=args.seed, batch_size=args.batch_size)
    real, real_labels = held_out_images(Path(args.real))
    classifier = ClassifierFeatures(args.classifier)
    reference = reference_statistics(classifier, real, None, batch_size=250)
    rows = []
    for directory in args.tokenizers:
        tokenizer = VQGAN.from_pretrained(directory).eval()
        recon = reconstructions(tokenizer, real)
        rows.append({"tokenizer": directory, "sha256": tokenizer_identity(directory)["sha256"],
                     "reconstructions": {**scores(recon, real_labels, reference, classifier, directory),
                                         "l1": float((recon - real).abs().mean())},
                     "samples": scores(decoded(tokenizer, tokens), labels, reference, classifier, directory)})
        print(json.dumps(rows[-1]), flush=True)
    report = {"model": str(model), "num_samples": args.num_samples, "seed": args.seed, "real_held_out_images": len(real),
              "classifier": classifier.name, "tokenizers": rows, "wall_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
