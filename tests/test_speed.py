"""The library's own timing (sundae.speed: `sundae bench`, `sundae describe`): consistent numbers,
one summary line, clear errors for bad settings."""

import json
import math

import pytest
from click.testing import CliRunner

from sundae.cli import main
from sundae.config import HOURGLASS_PRESETS
from sundae.speed import time_forward, time_sampling


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
