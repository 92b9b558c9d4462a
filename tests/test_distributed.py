"""Process groups: the shard arithmetic, and ``sundae evaluate`` under torchrun writing the one-process report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sundae.cli import main
from sundae.distributed import DistributedContext, gather_shards, shard


@pytest.mark.parametrize("count, world_size", [(7, 2), (8, 2), (7, 3), (5, 5), (2, 8), (50_000, 8)])
def test_shards_cover_every_item_once_in_order_and_differ_by_at_most_one(count, world_size):
    shards = [shard(count, rank, world_size) for rank in range(world_size)]
    assert [index for part in shards for index in part] == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_seven_items_on_two_ranks():
    assert (shard(7, 0, 2), shard(7, 1, 2)) == (range(0, 3), range(3, 7))


def test_one_process_gathers_its_own_rows_unchanged():
    context = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    rows = torch.randn(7, 3, dtype=torch.float64)
    assert gather_shards(rows, 7, context) is rows


GATHER_SCRIPT = """
import sys
from pathlib import Path

import torch
from sundae.distributed import broadcast_from_main, gather_shards, run_distributed, shard

def work(context):  # one file per rank: two ranks printing to one pipe interleave their lines
    items = torch.tensor(shard(7, context.rank, context.world_size), dtype=torch.float64)
    gathered = gather_shards(torch.stack([items, -items], dim=1), 7, context)  # (7, 2) on rank 0
    told = broadcast_from_main(f"from rank {context.rank}", context)
    line = f"{context.rank} {told} {None if gathered is None else gathered.tolist()}"
    (Path(sys.argv[1]) / f"rank{context.rank}.txt").write_text(line)

run_distributed(work, "cpu")
"""


@pytest.mark.slow
def test_two_gloo_ranks_gather_uneven_shards_in_item_order(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert lines == [f"0 from rank 0 {[[float(i), -float(i)] for i in range(7)]}", "1 from rank 0 None"]


@pytest.fixture(scope="module")
def evaluation_inputs(tmp_path_factory):
    """A classifier and 12 real images that fit the tiny pipeline (RGB 16x16)."""
    from sundae.eval.classifier import ClassifierConfig, SmallClassifier

    folder = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    SmallClassifier(ClassifierConfig(in_channels=3, image_size=16, width=4, feature_dim=6)).save_pretrained(
        folder / "classifier")
    images = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    np.savez(folder / "real.npz", images=images)
    return folder


def assert_same_report(two: dict, one: dict) -> None:
    """Everything equal but the timings; metrics to 1e-6."""
    assert {k: v for k, v in two.items() if k not in ("timings", "metrics")} == \
        {k: v for k, v in one.items() if k not in ("timings", "metrics")}
    assert set(two["metrics"]) == set(one["metrics"]) and "class_accuracy" in one["metrics"]
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == (value if value is None else pytest.approx(value, abs=1e-6)), name
    assert (one["timings"]["processes"], two["timings"]["processes"]) == (1, 2)


def run_in_one_and_two_processes(arguments: list[str], one: list[str], two: list[str]) -> None:
    """``sundae *arguments *one`` in this process, then ``*arguments *two`` under torchrun with 2 gloo ranks."""
    single = CliRunner().invoke(main, [*arguments, *one], catch_exceptions=False)
    assert single.exit_code == 0, single.output
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sundae.cli",
               *arguments, *two]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, result.stdout  # rank 1 writes and prints nothing


def model_arguments(command: str, model_dir, inputs) -> list[str]:
    """7 samples on 2 ranks (3 + 4) in batches of 2: shards and batches split unevenly."""
    return [command, str(model_dir), "--real", str(inputs / "real.npz"), "--extractor-path", str(inputs / "classifier"),
            "--num-samples", "7", "--batch-size", "2", "--steps", "2", "--nearest-k", "2", "--device", "cpu"]


@pytest.mark.slow
def test_evaluate_under_torchrun_writes_the_one_process_report(tiny_pipeline_dir, evaluation_inputs, tmp_path):
    run_in_one_and_two_processes(model_arguments("evaluate", tiny_pipeline_dir, evaluation_inputs),
                                 ["--out", str(tmp_path / "one.json")], ["--out", str(tmp_path / "two.json")])
    assert_same_report(json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text()))


@pytest.mark.slow
def test_sweep_under_torchrun_writes_the_one_process_reports(tiny_pipeline_dir, evaluation_inputs, tmp_path):
    run_in_one_and_two_processes([*model_arguments("sweep", tiny_pipeline_dir, evaluation_inputs), "--parameter",
                                  "steps", "--values", "1,2"],
                                 ["--out-dir", str(tmp_path / "one")], ["--out-dir", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("one", "two"))
    assert [row["value"] for row in two] == [1, 2]
    for row_two, row_one in zip(two, one, strict=True):
        assert_same_report(row_two, row_one)
    assert (tmp_path / "two" / "sweep.csv").is_file() and (tmp_path / "two" / "sweep.png").is_file()
