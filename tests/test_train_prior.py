"""The prior's training loop: exact resume, refusal of foreign checkpoints, DDP under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sundae.checkpoint import CheckpointError
from sundae.config import HOURGLASS_PRESETS
from sundae.training.prior import PriorTrainingConfig, train_prior

TINY = HOURGLASS_PRESETS["tiny"].replace(dim=32, heads=2, head_dim=16, depth=(1, 1, 1)).to_dict()


def config(data: Path, out: Path, **changes) -> PriorTrainingConfig:
    fields = dict(data=str(data), output_dir=str(out), model=TINY, steps=4, batch_size=4, warmup_steps=1,
                  log_every=1, eval_every=2, eval_batches=1, sample_every=100, sample_steps=2, checkpoint_every=2,
                  ema_decay=0.9, device="cpu")
    return PriorTrainingConfig(**{**fields, **changes})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_killed_and_resumed_run_equals_uninterrupted_run(pixel_npz, tmp_path):
    straight = tmp_path / "straight"
    train_prior(config(pixel_npz, straight))
    resumed = tmp_path / "resumed"
    train_prior(config(pixel_npz, resumed, stop_after_steps=2))
    state = torch.load(resumed / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    train_prior(config(pixel_npz, resumed))
    for name in ("checkpoint", "model"):
        a, b = weights(straight / name), weights(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resume"
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("validation/loss" in line for line in lines)
    assert (straight / "samples" / "step_0000004.png").is_file()
    saved = json.loads((straight / "model" / "config.json").read_text())
    assert saved["config"]["num_classes"] == 3 and saved["data"]["class_names"] == ["class0", "class1", "class2"]


def test_loss_falls_below_the_uniform_baseline(pixel_npz, tmp_path):
    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=30, learning_rate=3e-3, eval_every=30, checkpoint_every=30,
                       ema_decay=None, log_every=10))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [line["validation/loss"] for line in lines if "validation/loss" in line]
    assert validation[-1] < 0.75 * torch.log(torch.tensor(256.0)).item()


def test_resume_with_other_data_is_refused(pixel_npz, tmp_path):
    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=2))
    manifest = json.loads((out / "checkpoint" / "config.json").read_text())
    manifest["data"]["codebook_size"] = 1024
    (out / "checkpoint" / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train_prior(config(pixel_npz, out, steps=4))


def test_resume_with_another_model_is_refused(pixel_npz, tmp_path):
    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=2))
    other = dict(TINY, dim=48)
    with pytest.raises(CheckpointError, match="another configuration"):
        train_prior(config(pixel_npz, out, steps=4, model=other))


@pytest.mark.slow
def test_two_process_torchrun_gloo_trains_and_checkpoints(pixel_npz, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sundae.cli",
               "train", str(pixel_npz), "--output-dir", str(out), "--preset", "tiny", "--dim", "32", "--heads", "2",
               "--head-dim", "16", "--depth", "1,1,1", "--steps", "3", "--batch-size", "2", "--warmup-steps", "1",
               "--log-every", "1", "--eval-every", "3", "--eval-batches", "1", "--sample-every", "100",
               "--checkpoint-every", "3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == [1, 2, 3]
