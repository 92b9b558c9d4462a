"""The library's own timing (sundae.speed: `sundae bench`, `sundae describe`; sundae.training.benchmark:
`sundae bench --train`): consistent numbers, FLOPs as counted by hand, one summary line, clear errors
for bad settings."""

import json
import math

import pytest
from click.testing import CliRunner

import torch

from sundae.cli import main
from sundae.config import HOURGLASS_PRESETS
from sundae.denoiser import Hourglass
from sundae.speed import time_forward, time_sampling
from sundae.training.benchmark import ddp_scaling, time_prior_training, time_tokenizer_training
from sundae.training.throughput import count_flops


def test_tiny_timing_reports_consistent_times():
    result = time_sampling(preset="tiny", steps=2, batch_sizes=(1, 2), repeats=1, warmup=0, device="cpu")
    assert [entry["batch_size"] for entry in result["results"]] == [1, 2]
    for entry in result["results"]:
        assert entry["prior_seconds"] > 0 and entry["decode_seconds"] > 0
        assert math.isclose(entry["step_seconds"], entry["prior_seconds"] / 2)
        end_to_end = entry["prior_seconds"] + entry["decode_seconds"]
        assert math.isclose(entry["seconds_per_image"], end_to_end / entry["batch_size"])
        assert math.isclose(entry["images_per_second"], 1 / entry["seconds_per_image"])
        assert entry["mean_steps_taken"] == 2 and entry["peak_memory_bytes"] is None  # CPU: CUDA-only figure
    assert result["image_size"] == [32, 32] and result["dtype"] == "float32"
    assert "\n" not in result["summary"] and "batch 2" in result["summary"]


def test_prior_only_timing_has_no_decode():
    entry = time_sampling(preset="tiny", steps=1, decode=False, repeats=1, warmup=0, device="cpu")["results"][0]
    assert entry["decode_seconds"] is None and math.isclose(entry["seconds_per_image"], entry["prior_seconds"])


@pytest.mark.parametrize("settings, message", [
    ({"preset": "celeba"}, "no tokenizer"),
    ({"preset": "tiny", "steps": 0}, "steps >= 1"),
    ({"preset": "tiny", "cuda_graphs": True}, "CUDA device"),
])
def test_bad_settings_fail_with_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):  # BenchmarkError is an InputError (a ValueError)
        time_sampling(device="cpu", **settings)


def test_bench_command_prints_one_line_and_writes_the_result(tmp_path):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--steps", "1", "--repeats", "1", "--warmup", "0",
                                       "--no-decode", "--device", "cpu", "--json", str(path)])
    assert result.exit_code == 0, result.output
    saved = json.loads(path.read_text())
    assert result.output.strip() == saved["summary"] and saved["results"][0]["batch_size"] == 1


def test_forward_time_is_a_positive_number_of_milliseconds():
    assert time_forward(HOURGLASS_PRESETS["tiny"], repeats=1) > 0


def _check_training_entry(entry: dict, batch: int) -> None:
    """The invariants of a training-step figure: positive times and rates, consistent throughput."""
    assert entry["batch_size"] == batch and len(entry["step_seconds_all_repeats"]) == 2
    assert 0 < entry["step_seconds_min"] <= entry["step_seconds"]
    assert math.isclose(entry["samples_per_second"], batch / entry["step_seconds"])
    assert entry["flops_per_step"] > 0 and entry["achieved_flops_per_second"] > 0 and entry["peak_memory_bytes"] > 0


@pytest.fixture(scope="module")
def prior_training():
    return time_prior_training(preset="tiny", batch_sizes=(1, 2), repeats=2, warmup=1, device="cpu")


def test_prior_training_figures_are_positive_and_below_the_peak(prior_training):
    assert prior_training["unroll_steps"] == 2 and prior_training["dtype"] == "float32"  # Table 3's T for "tiny"
    for entry, batch in zip(prior_training["results"], (1, 2)):
        _check_training_entry(entry, batch)
        assert math.isclose(entry["tokens_per_second"], entry["samples_per_second"] * 64)
        assert 0 < entry["fraction_of_matmul_peak"] <= entry["fraction_of_matmul_peak_best"] <= 1
        assert entry["matmul_flops_per_second"] == max(entry["matmul_flops_per_second_all_measurements"])
    assert "\n" not in prior_training["summary"] and "batch 2" in prior_training["summary"]


def test_prior_training_flops_are_three_forwards_per_unroll_step(prior_training):
    """Every matmul input needs a gradient (the first is the embedding's output), so the backward of
    each of the T forwards costs twice its forward: CPU attention's backward included."""
    model = Hourglass(HOURGLASS_PRESETS["tiny"])
    for entry in prior_training["results"]:
        tokens = torch.randint(0, 64, (entry["batch_size"], 8, 8))
        with torch.no_grad():
            forward = count_flops(lambda: model(tokens, None))
        assert entry["flops_per_step"] == 3 * prior_training["unroll_steps"] * forward


def test_tokenizer_training_figures_are_positive():
    result = time_tokenizer_training(preset="tiny", batch_sizes=(2,), repeats=2, warmup=1, device="cpu",
                                     perceptual="none")
    entry = result["results"][0]
    _check_training_entry(entry, 2)
    assert result["preset"] == "tiny-f4" and "fraction_of_matmul_peak" not in entry  # convolutions: no fraction
    assert math.isclose(entry["tokens_per_second"], entry["samples_per_second"] * 8 * 8)


def test_shipped_model_prior_is_benchmarked_with_its_own_config():
    result = time_prior_training(model="fashion-mnist", batch_sizes=(1,), repeats=2, warmup=1, device="cpu")
    assert result["latent_shape"] == [7, 7] and result["codebook_size"] == 1024 and result["unroll_steps"] == 2
    _check_training_entry(result["results"][0], 1)


@pytest.mark.slow
def test_ddp_scaling_of_two_gloo_processes():
    result = ddp_scaling(ranks=2, threads_per_rank=1, preset="tiny", batch_sizes=(2,), repeats=2, warmup=1)
    single, parallel = result["single"], result["parallel"]
    assert single["world_size"] == 1 and parallel["world_size"] == 2
    _check_training_entry(single["results"][0], 2)
    two = parallel["results"][0]
    assert math.isclose(two["samples_per_second"], 4 / two["step_seconds"])  # both ranks' samples
    one = single["results"][0]["samples_per_second"]
    assert math.isclose(result["efficiency"][0], two["samples_per_second"] / (2 * one))
    assert result["efficiency"][0] > 0 and "DDP efficiency" in result["summary"]


@pytest.mark.parametrize("settings, message", [
    ({}, "either a prior preset or a model"),
    ({"preset": "tiny", "model": "emoji"}, "either a prior preset or a model"),
    ({"preset": "tiny", "batch_sizes": (0,)}, "batch sizes"),
    ({"preset": "tiny", "warmup": 0}, "warmup >= 1"),
    ({"preset": "tiny", "unroll_steps": 0}, "unroll_steps"),
])
def test_bad_training_settings_fail_with_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):
        time_prior_training(device="cpu", **settings)


def test_bench_train_command_writes_the_result_and_refuses_sampling_options(tmp_path):
    path = tmp_path / "train.json"
    arguments = ["bench", "--preset", "tiny", "--train", "--precision", "float32", "--repeats", "1",
                 "--device", "cpu", "--json", str(path)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    saved = json.loads(path.read_text())
    assert saved["training_step"] == "prior" and saved["dtype"] == "float32" and saved["results"][0]["flops_per_step"]
    refused = CliRunner().invoke(main, [*arguments, "--early-stop"])
    assert refused.exit_code != 0 and "--early-stop: not used by --train prior" in refused.output
