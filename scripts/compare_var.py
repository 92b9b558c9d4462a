"""SUNDAE against VAR (issue 16; spec seed 003) on the same data, the same evaluation and the same machine.

Each setting draws the same class-balanced samples (sample i: class i mod 10, seed + i) and is scored as
`sundae evaluate` scores them: the dataset classifier's features against every held-out image (FID,
precision/recall, density/coverage) and the classifier's class accuracy. Next to the quality: prior
forward passes per image, wall time per image at batch 1 and 64 (sampling and decoding, median of
repeats), parameters, and the training wall time of each recipe (given: the stages ran separately). The
tokenizer rows (held-out images encoded and decoded) are each prior's ceiling.

    python scripts/compare_var.py --sundae runs/var/sundae-prior-run/model --var runs/var/prior-run/model \\
        --sundae-training-minutes 136.2 --var-training-minutes 144.5 \\
        --out benchmarks/results/var-vs-sundae.json --plot docs/var-vs-sundae.png

(scripts/train_var.sh runs it so, with the minutes of its own stages.) Settings: SUNDAE at its defaults
and at VAR's pass count and 10 steps; VAR at its defaults and
its sampling-time knobs (guidance ramped and constant, top-k). One side can be measured again on its own
(a retrained prior): pass ``--keep var`` (or ``sundae``) and that paradigm's rows and tokenizer ceiling
are kept from ``--previous`` (default: the ``--out`` file), each row saying where it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_quality import accuracy, draw_samples, held_out_images, reconstructions  # noqa: E402

from sundae.eval.evaluate import evaluate_images  # noqa: E402
from sundae.eval.features import ClassifierFeatures, reference_statistics  # noqa: E402
from sundae.models import model_directory  # noqa: E402
from sundae.pipelines import load_pipeline  # noqa: E402
from sundae.speed import device_facts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("fid", "precision", "recall", "density", "coverage")
PARADIGMS = ("sundae", "var")


def settings_of(sundae_passes: int, var_passes: int) -> list[tuple[str, str, dict]]:
    """(name, paradigm, options over the model's defaults) of every compared setting."""
    return [
        ("SUNDAE, defaults", "sundae", {}),
        (f"SUNDAE, {var_passes} steps (VAR's passes)", "sundae", {"steps": var_passes}),
        ("SUNDAE, 10 steps", "sundae", {"steps": 10}),
        ("VAR, defaults", "var", {}),
        ("VAR, guidance 1.5 ramped", "var", {"guidance_scale": 1.5}),
        ("VAR, guidance 3 ramped", "var", {"guidance_scale": 3.0}),
        ("VAR, guidance 1.5 constant", "var", {"guidance_scale": 1.5, "guidance_schedule": "constant"}),
        ("VAR, guidance 1.5 ramped, top-k 100", "var", {"guidance_scale": 1.5, "top_k": 100}),
    ]


def seconds_per_image(pipe, options: dict, batch: int, repeats: int) -> float:
    """Median wall time per image of one call making ``batch`` class-conditional images (decode included)."""
    labels = [index % 10 for index in range(batch)]
    pipe(batch, class_labels=labels, seed=0, output_type="pt", **options)  # warm-up
    times = []
    for repeat in range(repeats):
        started = time.perf_counter()
        pipe(batch, class_labels=labels, seed=repeat, output_type="pt", **options)
        times.append((time.perf_counter() - started) / batch)
    return statistics.median(times)


def kept_results(previous: Path, paradigm: str) -> tuple[list[dict], dict]:
    """The rows and tokenizer ceiling of ``paradigm`` in an earlier result of this script."""
    if not previous.is_file():
        raise ValueError(f"--keep {paradigm} needs an earlier result, and {previous} is not a file")
    result = json.loads(previous.read_text())
    rows = [row for row in result["rows"] if row["paradigm"] == paradigm]
    if not rows or paradigm not in result.get("tokenizers", {}):
        raise ValueError(f"{previous} has no {paradigm} rows to keep")
    return rows, result["tokenizers"][paradigm]


def passes_of(rows: list[dict]) -> int:
    """Forward passes per image at the defaults of the paradigm these rows belong to (its first row)."""
    return rows[0]["forward_passes_per_image"]


def parameters(pipe) -> dict[str, int]:
    return {"prior": sum(p.numel() for p in pipe.master_prior.parameters()),
            "tokenizer": sum(p.numel() for p in pipe.master_tokenizer.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sundae", default="fashion-mnist", help="SUNDAE model (shipped name or directory)")
    parser.add_argument("--var", help="VAR model directory (sundae train-var); not needed with --keep var")
    parser.add_argument("--keep", choices=PARADIGMS, help="keep this paradigm's rows from --previous")
    parser.add_argument("--previous", help="an earlier result of this script (default: the --out file)")
    parser.add_argument("--sundae-training-minutes", type=float)
    parser.add_argument("--var-training-minutes", type=float)
    parser.add_argument("--classifier", default=str(ROOT / "src/sundae/assets/fashion-mnist-classifier"))
    parser.add_argument("--real", default=str(ROOT / "data/fashion-mnist/validation"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/var-vs-sundae.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs/var-vs-sundae.png"))
    args = parser.parse_args()
    models = {"sundae": args.sundae, "var": args.var}
    minutes = {"sundae": args.sundae_training_minutes, "var": args.var_training_minutes}
    measured = [paradigm for paradigm in PARADIGMS if paradigm != args.keep]
    for paradigm in measured:
        if models[paradigm] is None or minutes[paradigm] is None:
            parser.error(f"--{paradigm} and --{paradigm}-training-minutes are needed (or --keep {paradigm})")

    tokenizers, kept_rows = {}, []
    if args.keep:
        try:
            kept_rows, tokenizers[args.keep] = kept_results(Path(args.previous or args.out), args.keep)
        except ValueError as error:
            parser.error(str(error))
    started = time.perf_counter()
    where = f"{datetime.date.today().isoformat()}, {device_facts(torch.device('cpu'))['name']}"
    pipes = {paradigm: load_pipeline(model_directory(models[paradigm]), device="cpu") for paradigm in measured}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    real, real_labels = held_out_images(Path(args.real))
    classifier = ClassifierFeatures(args.classifier)
    reference = reference_statistics(classifier, real, None, batch_size=250)
    for paradigm, pipe in pipes.items():
        recon = reconstructions(pipe.tokenizer, real)
        tokenizers[paradigm] = {"fid": evaluate_images(recon, reference, classifier, batch_size=250,
                                                       model_id=f"{paradigm} tokenizer")["metrics"]["fid"],
                                "class_accuracy": accuracy(classifier, recon, real_labels)}
    passes = {paradigm: pipe.forward_passes(pipe.sampling_options()) for paradigm, pipe in pipes.items()}
    if args.keep:
        passes[args.keep] = passes_of(kept_rows)
    rows = []
    for name, paradigm, options in settings_of(passes["sundae"], passes["var"]):
        if paradigm == args.keep:
            rows.extend(row for row in kept_rows if row["setting"] == name)
            continue
        pipe = pipes[paradigm]
        samples, labels, sampling = draw_samples(pipe, args.num_samples, options=options, seed=args.seed,
                                                 batch_size=args.batch_size)
        report = evaluate_images(samples, reference, classifier, batch_size=250, model_id=name)
        row = {"setting": name, "paradigm": paradigm, **{metric: report["metrics"][metric] for metric in METRICS},
               "class_accuracy": accuracy(classifier, samples, labels),
               "forward_passes_per_image": pipe.forward_passes(pipe.sampling_options(options)),
               "mean_passes_taken": sampling["mean_steps_taken"],
               "seconds_per_image_batch_1": seconds_per_image(pipe, options, 1, 4 * args.timing_repeats),
               "seconds_per_image_batch_64": seconds_per_image(pipe, options, 64, args.timing_repeats),
               "parameters": parameters(pipe), "training_minutes": minutes[paradigm],
               "sampling_options": sampling["sampling_options"], "measured": where}
        rows.append(row)
        print(json.dumps({key: row[key] for key in ("setting", "fid", "class_accuracy", "recall", "density",
                                                    "seconds_per_image_batch_64")}), flush=True)
    result = {"rows": rows, "tokenizers": tokenizers, "real_held_out_images": len(real),
              "class_accuracy_real_held_out": accuracy(classifier, real, real_labels), "num_samples": args.num_samples,
              "extractor": "fashion-mnist classifier features", "threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    save_plot(rows, Path(args.plot))
    print(f"wrote {out} and {args.plot}")


def save_plot(rows: list[dict], path: Path) -> None:
    """FID and class accuracy against the time per image at batch 64, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        colour = "tab:blue" if row["paradigm"] == "sundae" else "tab:orange"
        for axis, metric in zip(axes, ("fid", "class_accuracy")):
            axis.scatter(row["seconds_per_image_batch_64"] * 1000, row[metric], color=colour)
            axis.annotate(row["setting"], (row["seconds_per_image_batch_64"] * 1000, row[metric]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    for axis, label in zip(axes, ("FID (classifier features; lower is better)", "class accuracy")):
        axis.set_xlabel("ms per image at batch 64 (sampling + decoding, CPU)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_title("SUNDAE (blue) and VAR (orange) on Fashion-MNIST")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
