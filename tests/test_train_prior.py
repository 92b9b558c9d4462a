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
from sundae.config import HOURGLASS_PRESETS, ConfigError, SamplingOptions
from sundae.pipeline import SundaePipeline
from sundae.tokenizer.pixels import PixelTokenizer
from sundae.training.prior import PriorTrainingConfig, check_same_data, train_prior

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
    for name in ("checkpoint", "model/prior"):
        a, b = weights(straight / name), weights(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resume"
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("validation/loss" in line for line in lines)
    assert (straight / "samples" / "step_0000004_raw.png").is_file()
    assert (straight / "samples" / "step_0000004_ema.png").is_file()
    saved = json.loads((straight / "model" / "prior" / "config.json").read_text())
    assert saved["config"]["num_classes"] == 3 and saved["data"]["class_names"] == ["class0", "class1", "class2"]
    exported = SundaePipeline.from_pretrained(straight / "model", device="cpu")  # a model directory, pixel tokens
    assert exported.sampling_defaults == SamplingOptions() and isinstance(exported.tokenizer, PixelTokenizer)


def test_loss_falls_below_the_uniform_baseline(pixel_npz, tmp_path):
    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=30, learning_rate=3e-3, eval_every=30, checkpoint_every=30,
                       ema_decay=None, log_every=10))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [line["validation/loss"] for line in lines if "validation/loss" in line]
    assert validation[-1] < 0.75 * torch.log(torch.tensor(256.0)).item()


def test_resume_is_exact_with_dropout_in_bf16_and_logs_each_step_once(pixel_npz, tmp_path):
    """Dropout masks are drawn from (seed, step), so a resumed run draws the same ones; bf16 autocast
    leaves the master weights fp32; rows logged past the last checkpoint are not duplicated."""
    changes = dict(model=dict(TINY, dropout=0.2), precision="bfloat16", checkpoint_every=3, steps=5)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_prior(config(pixel_npz, straight, **changes))
    train_prior(config(pixel_npz, resumed, stop_after_steps=4, **changes))  # checkpoint at 3, rows up to 4
    train_prior(config(pixel_npz, resumed, **changes))
    for name in ("checkpoint", "model/prior"):
        a, b = weights(straight / name), weights(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resume"
        assert all(value.dtype == torch.float32 for value in b.values())
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    trained = [row["step"] for row in rows if "train/loss" in row]
    assert trained == [1, 2, 3, 4, 5]
    assert all(row["train/samples_per_second"] > 0 for row in rows if "train/loss" in row)


def test_validation_runs_on_the_ema_weights_too(pixel_npz, tmp_path):
    from sundae.denoiser import Hourglass
    from sundae.distributed import DistributedContext
    from sundae.training.prior import open_token_dataset, validation_loss

    out = tmp_path / "run"
    run_config = config(pixel_npz, out, steps=2, eval_every=2, precision="float32")
    train_prior(run_config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ema_row = next(row for row in rows if "validation_ema/loss" in row)
    exported = Hourglass.from_pretrained(out / "model" / "prior")  # the EMA weights: what ships
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    measured = validation_loss(exported, open_token_dataset(str(pixel_npz), "validation"), run_config, context)
    assert ema_row["validation_ema/loss"] == pytest.approx(float(measured["loss"]), rel=1e-5)
    raw_row = next(row for row in rows if "validation/loss" in row)
    assert raw_row["validation/loss"] != ema_row["validation_ema/loss"]


def test_resume_with_changed_settings_is_refused_unless_allowed(pixel_npz, tmp_path):
    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=4, stop_after_steps=2))
    with pytest.raises(CheckpointError, match=r"learning_rate 0.0003 -> 0.001.*seed 0 -> 3.*--allow-changed-settings"):
        train_prior(config(pixel_npz, out, steps=4, learning_rate=1e-3, seed=3))
    train_prior(config(pixel_npz, out, steps=4, log_every=2, checkpoint_every=4))  # cadence may change
    assert torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["step"] == 4
    train_prior(config(pixel_npz, out, steps=6, allow_changed_settings=True))
    assert torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("damage", ["missing", "stale", "mid-swap"])
def test_a_finished_run_repairs_a_missing_or_stale_export(pixel_npz, tmp_path, damage):
    import shutil

    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=2, checkpoint_every=1))
    expected = weights(out / "model" / "prior")
    if damage == "missing":
        shutil.rmtree(out / "model")
    elif damage == "stale":  # an export older than the checkpoint
        saved = json.loads((out / "model" / "prior" / "config.json").read_text())
        (out / "model" / "prior" / "config.json").write_text(json.dumps({**saved, "step": 1}))
    else:  # killed between the two renames of the swap: only the previous export, moved aside
        os.replace(out / "model", out / "model.old")
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / ".step_0000002_raw.png.abcd.tmp").write_bytes(b"half a file")
    result = train_prior(config(pixel_npz, out, steps=2, checkpoint_every=1))
    assert result.finished and result.export_dir == out / "model"
    assert json.loads((out / "model" / "prior" / "config.json").read_text())["step"] == 2
    repaired = weights(out / "model" / "prior")
    assert all(torch.equal(expected[k], repaired[k]) for k in expected)
    assert not (out / "model.old").exists() and not list(out.rglob(".*.tmp"))


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


def test_a_run_can_start_from_the_prior_of_a_model_directory(pixel_npz, tmp_path):
    """--init-from takes the exported prior's weights (the optimizer starts afresh): with a vanishing
    learning rate the new run's weights stay those of the model it started from, not a fresh init's."""
    first = tmp_path / "first"
    train_prior(config(pixel_npz, first, ema_decay=None, learning_rate=3e-3))
    started = weights(first / "model" / "prior")
    continued, fresh = tmp_path / "continued", tmp_path / "fresh"
    train_prior(config(pixel_npz, continued, steps=1, learning_rate=1e-9, init_from=str(first / "model")))
    train_prior(config(pixel_npz, fresh, steps=1, learning_rate=1e-9, seed=1))
    for name, value in weights(continued / "checkpoint").items():
        assert torch.allclose(value, started[name], atol=1e-6), name
    assert max((value - started[name]).abs().max() for name, value in weights(fresh / "checkpoint").items()) > 1e-2


def test_init_from_a_prior_of_another_model_or_other_tokens_is_refused(pixel_npz, tmp_path):
    first = tmp_path / "first"
    train_prior(config(pixel_npz, first, steps=1))
    with pytest.raises(ConfigError, match="another configuration"):
        train_prior(config(pixel_npz, tmp_path / "wider", model=dict(TINY, dim=48), init_from=str(first / "model")))
    prior_config = first / "model" / "prior" / "config.json"
    saved = json.loads(prior_config.read_text())
    saved["data"]["codebook_size"] = 1024
    prior_config.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="another tokenizer.*encode the images with .*or train without"):
        train_prior(config(pixel_npz, tmp_path / "other", init_from=str(first / "model")))
    assert not (tmp_path / "other" / "checkpoint").exists()


def test_a_prior_accepts_the_tokens_of_its_tokenizer_after_a_decoder_only_fine_tune(tmp_path):
    """Same codes hash (the decoder alone was fine-tuned): accepted; other codes: refused, one clear line."""
    trained_on = {"codebook_size": 8, "tokenizer": {"sha256": "first", "codes_sha256": "codes"}}
    check_same_data(trained_on, {"codebook_size": 8, "tokenizer": {"sha256": "tuned", "codes_sha256": "codes"}},
                    tmp_path)
    with pytest.raises(CheckpointError, match="another tokenizer .*sha256 first.*sha256 other"):
        check_same_data(trained_on, {"codebook_size": 8, "tokenizer": {"sha256": "other", "codes_sha256": "new"}},
                        tmp_path)


@pytest.mark.parametrize("name", ["fashion-mnist", "emoji"])
def test_each_shipped_prior_accepts_latents_encoded_with_its_shipped_tokenizer(name):
    """README: fine-tune a shipped model on images encoded with its own tokenizer (`--init-from fashion-mnist`):
    the default's decoder was fine-tuned after its prior trained (its codes were not); the emoji model's
    weights were stored in float16 after training."""
    from sundae.data.latents import tokenizer_identity
    from sundae.models import model_directory

    shipped = model_directory(name)
    trained_on = json.loads((shipped / "prior" / "config.json").read_text())["data"]
    encoded_with = tokenizer_identity(shipped / "tokenizer")
    check_same_data(trained_on, {"codebook_size": trained_on["codebook_size"], "tokenizer": encoded_with}, shipped)


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


def test_a_second_process_on_the_same_run_folder_is_refused(pixel_npz, tmp_path):
    """Two trainers writing one folder would corrupt each other's checkpoints; a dead holder never blocks."""
    from sundae.training.common import RunLock

    out = tmp_path / "run"
    holder = RunLock(out)  # another live process, as far as the lock file can tell
    with pytest.raises(CheckpointError, match="another training process is writing"):
        train_prior(config(pixel_npz, out, steps=2))
    holder.release()  # the holder ends (or is killed: the OS drops its lock)
    assert train_prior(config(pixel_npz, out, steps=2)).finished


def test_a_hostile_training_state_is_refused_without_running_or_allocating(pixel_npz, tmp_path):
    import pickle
    import resource

    class Bomb:
        def __reduce__(self):
            return bytearray, (3_000_000_000,)

    class Gadget:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    out = tmp_path / "run"
    train_prior(config(pixel_npz, out, steps=4, stop_after_steps=2))
    for payload in (Bomb(), Gadget(), {"step": "two"}):
        (out / "checkpoint" / "training_state.pt").write_bytes(pickle.dumps(payload))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(CheckpointError):
            train_prior(config(pixel_npz, out, steps=4))
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: no 3 GB bytearray
    assert not (tmp_path / "pwned").exists()
