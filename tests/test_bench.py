"""The speed harness (benchmarks/speed.py): the benchmarked loop samples exactly what the plain loop
samples, FLOPs are counted as in closed form (CPU attention included), the reported rates and
fractions agree with each other, and no figure is impossible (in a tiny run or a saved result file)."""

import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sundae.config import HOURGLASS_PRESETS
from sundae.denoiser import Hourglass
from sundae.sampler import SamplingOptions, sample
from sundae.speed import ForwardTimer, benchmark_sampling_options, compile_mode_for
from sundae.training.throughput import count_flops, measure_matmul_rate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # the harness is no package
from speed import (  # noqa: E402
    impossible_figures, impossible_result_files, peak_tensor_bytes, result_filename, run_benchmark, training_suffix,
    write_json,
)


@pytest.fixture(scope="module")
def stopping_model() -> Hourglass:
    """A tiny prior whose logits favour one code strongly, so samples settle and stop at different steps."""
    torch.manual_seed(0)
    model = Hourglass(HOURGLASS_PRESETS["tiny"].replace(num_classes=3)).eval()
    with torch.no_grad():
        model.to_logits.weight.mul_(20.0)
        model.to_logits.bias[5] = 10.0
    return model


def test_optimised_loop_gives_the_same_tokens_as_the_plain_loop(stopping_model):
    """Compiled whole step (fp32, CPU; one graph: fullgraph) + lazy compaction in power-of-two buckets
    == the plain eager loop, for a class-conditional model. The mode is the CUDA-graph one, so the
    loop's graph bookkeeping (step marks, output copies) runs too; the CPU compiles it without graphs."""
    seeds = [3, 1, 4, 1_000_003, 5, 9]
    labels = torch.tensor([2, 0, 2, 2, 2, 2])  # class 0 never settles: it runs all 24 steps
    plain = sample(stopping_model, options=SamplingOptions(steps=24, compaction_interval=1), num_samples=6,
                   grid_shape=(8, 8), seeds=seeds, class_labels=labels)
    options = benchmark_sampling_options(steps=24, early_stop=True)
    assert options.compaction_interval > 1
    fast = sample(stopping_model, options=options, num_samples=6, grid_shape=(8, 8), seeds=seeds, class_labels=labels,
                  compile_mode=compile_mode_for(compile=True, cuda_graphs=True))
    assert torch.equal(fast.tokens, plain.tokens)
    assert torch.equal(fast.steps_taken, plain.steps_taken)
    # the case worth testing: samples stop at different steps, some between two compactions
    assert len(set(plain.steps_taken.tolist())) > 2 and plain.steps_taken.min() < 24
    assert any(step % options.compaction_interval for step in plain.steps_taken.tolist())
    # finished samples left the compiled batch, in power-of-two buckets only
    assert fast.forward_rows[0] == 6 and fast.forward_rows[-1] < 6
    assert set(fast.forward_rows[options.compaction_interval:]) <= {1, 2, 4}


def test_flops_of_a_linear_stack_match_the_closed_form():
    widths = [24, 40, 8, 16]
    stack = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
    rows = 7
    expected = sum(2 * rows * a * b for a, b in zip(widths, widths[1:]))
    assert count_flops(lambda: stack(torch.randn(rows, widths[0]))) == expected


def test_cpu_attention_flops_are_counted():
    query, key = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8)
    value = torch.randn(2, 3, 6, 12)
    flops = count_flops(lambda: F.scaled_dot_product_attention(query, key, value))
    assert flops == 2 * 2 * 3 * 10 * 6 * 8 + 2 * 2 * 3 * 10 * 6 * 12


def test_peak_tensor_bytes_counts_the_live_tensors_at_the_peak():
    weight = torch.randn(256, 256)  # 256 KiB, touched by the function: counted, as weights are on a GPU

    def three_matrices_at_most() -> torch.Tensor:
        first = weight @ weight
        second = first @ weight  # weight, first and second live: the peak
        del first
        return second * 2  # weight, second and this result

    # (plus a few bytes for the wrapped scalar 2)
    assert peak_tensor_bytes(three_matrices_at_most, torch.device("cpu")) == pytest.approx(3 * 256 * 256 * 4, abs=64)


def test_matmul_rate_is_a_plausible_positive_rate():
    rate = measure_matmul_rate(64, 32, dtype=torch.float32, device=torch.device("cpu"), repeats=2)
    assert 1e6 < rate < 1e14


@pytest.fixture(scope="module")
def tiny_result():
    return run_benchmark(preset="tiny", steps=3, batch_sizes=(1, 2), repeats=2, warmup=1, device="cpu")


NUMBER_KEYS = [
    "step_seconds", "step_seconds_min", "forward_seconds", "forward_seconds_min", "prior_seconds", "prior_seconds_min",
    "flops_per_step", "flops_per_sample_step", "achieved_flops_per_second", "forward_flops_per_second",
    "matmul_flops_per_second", "fraction_of_matmul_peak", "fraction_of_matmul_peak_best",
    "forward_fraction_of_matmul_peak", "decode_seconds", "decode_seconds_min", "decode_flops",
    "decode_flops_per_second", "seconds_per_image", "images_per_second", "peak_memory_bytes",
    "prior_peak_memory_bytes", "decode_peak_memory_bytes",
]


def test_tiny_benchmark_reports_every_number_positive(tiny_result):
    assert [entry["batch_size"] for entry in tiny_result["results"]] == [1, 2]
    for entry in tiny_result["results"]:
        for key in NUMBER_KEYS:
            assert isinstance(entry[key], (int, float)) and entry[key] > 0, key
        assert entry["iterations"] == 3 and entry["mean_steps_taken"] == 3
        assert len(entry["prior_seconds_all_repeats"]) == 2
    assert tiny_result["device"]["name"] and tiny_result["device"]["threads"] >= 1
    assert tiny_result["torch_version"] == torch.__version__
    assert tiny_result["dtype"] == "float32" and tiny_result["image_size"] == [32, 32]
    assert "\n" not in tiny_result["summary"] and "batch 2" in tiny_result["summary"]


def test_tiny_benchmark_figures_are_possible(tiny_result):
    """The invariants every result file must keep: times > 0, fractions of the peak in (0, 1], and a
    step's forward and sampling arithmetic (timed inside the same run) within the step."""
    assert impossible_figures(tiny_result) == []
    for entry in tiny_result["results"]:
        for suffix in ("", "_min"):  # each set of times comes from one run, so the parts add up
            step, forward = entry[f"step_seconds{suffix}"], entry[f"forward_seconds{suffix}"]
            sampling = entry[f"sampling_seconds_per_step{suffix}"]
            assert 0 < forward <= step and 0 <= sampling <= step
            assert math.isclose(forward + sampling, step)
        assert entry["step_seconds_min"] <= entry["step_seconds"]
        assert 0 < entry["fraction_of_matmul_peak"] <= entry["fraction_of_matmul_peak_best"] <= 1
        assert 0 < entry["forward_fraction_of_matmul_peak"] <= 1
        assert "decode_fraction_of_matmul_peak" not in entry  # Winograd convolutions beat a GEMM "peak"


def test_the_invariant_check_catches_impossible_figures():
    entry = {"step_seconds": 1.0, "forward_seconds": 1.2, "sampling_seconds_per_step": -0.2,
             "decode_fraction_of_matmul_peak": 1.09, "decode_seconds": 0.0, "fraction_of_matmul_peak_all": [0.5, 0.7]}
    problems = impossible_figures({"results": [entry]})
    assert len(problems) == 4 and all(problem.startswith("results[0].") for problem in problems)
    assert not any("fraction_of_matmul_peak_all" in problem for problem in problems)


def test_no_saved_speed_result_has_impossible_figures():
    assert impossible_result_files() == {}


def test_tiny_benchmark_rates_and_fractions_agree(tiny_result):
    first, second = tiny_result["results"]
    assert second["flops_per_step"] == 2 * first["flops_per_step"]  # FLOPs are linear in the batch
    for entry in tiny_result["results"]:
        assert entry["prior_seconds"] in entry["prior_seconds_all_repeats"]
        assert entry["prior_seconds_min"] == min(entry["prior_seconds_all_repeats"])
        assert math.isclose(entry["step_seconds"], entry["prior_seconds"] / 3)
        assert math.isclose(entry["achieved_flops_per_second"], entry["flops_per_step"] / entry["step_seconds"])
        assert math.isclose(entry["forward_flops_per_second"], entry["flops_per_step"] / entry["forward_seconds"])
        # the peak is the best matmul rate measured before the first run and after each run, over several shapes
        rates = entry["matmul_flops_per_second_all_measurements"]
        assert len(rates) == 3 and entry["matmul_flops_per_second"] == max(rates)
        assert [entry["batch_size"] * 64, 64, 256] in entry["matmul_shapes"] and len(entry["matmul_shapes"]) == 4
        assert math.isclose(entry["fraction_of_matmul_peak"],
                            entry["achieved_flops_per_second"] / entry["matmul_flops_per_second"])
        assert math.isclose(entry["decode_flops_per_second"], entry["decode_flops"] / entry["decode_seconds"])
        end_to_end = entry["prior_seconds"] + entry["decode_seconds"]
        assert math.isclose(entry["seconds_per_image"], end_to_end / entry["batch_size"])
        assert math.isclose(entry["images_per_second"], 1 / entry["seconds_per_image"])
        assert entry["peak_memory_bytes"] == max(entry["prior_peak_memory_bytes"], entry["decode_peak_memory_bytes"])


def test_forward_timer_times_only_the_forwards_of_its_region():
    layer = nn.Linear(8, 8)
    with ForwardTimer(layer, torch.device("cpu")) as timer:
        started = time.perf_counter()
        for _ in range(3):
            layer(torch.randn(4, 8))
        elapsed = time.perf_counter() - started
    layer(torch.randn(4, 8))  # after the region: not counted, the hooks are gone
    assert timer.calls == 3 and 0 < timer.seconds <= elapsed


def test_prior_flops_match_a_hand_count_of_the_tiny_hourglass(tiny_result):
    config = HOURGLASS_PRESETS["tiny"]
    dim, width, tokens, blocks = config.dim, config.heads * config.head_dim, 64, 16

    def layer(queries: int, key_rows: int, query_key_pairs: int) -> int:
        """q, kv and out projections, scores and weighted values, feed-forward; 2 FLOPs per multiply-add."""
        projections = 2 * queries * dim * width + 2 * key_rows * dim * 2 * width + 2 * queries * width * dim
        return projections + 2 * query_key_pairs * 2 * width + 2 * 2 * queries * dim * 4 * dim

    pre, valley, post = config.depth
    expected = (
        (pre + post + 1) * layer(tokens, tokens, tokens**2)  # full-resolution layers and the upsampling attention
        + valley * layer(blocks, blocks, blocks**2)
        + 2 * blocks * 4 * dim * dim + layer(blocks, 5 * blocks, 5 * blocks)  # merge; each block: 1 query, 1 + 4 keys
        + 2 * blocks * dim * 4 * dim  # expansion
        + 2 * tokens * dim * config.codebook_size  # logits
    )
    assert tiny_result["results"][0]["flops_per_step"] == expected


def test_result_file_round_trip_and_name(tiny_result, tmp_path):
    import json

    path = write_json(tiny_result, tmp_path / "results" / result_filename(tiny_result))
    assert path.name == "cpu-tiny.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(tiny_result))
    gpu = {"device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "preset": "ffhq1024"}
    assert result_filename(gpu, "eager") == "nvidia-h100-80gb-hbm3-ffhq1024-eager.json"
    training = {"device": {"type": "cpu"}, "preset": "emoji (model)", "training_step": "prior", "dtype": "bfloat16",
                "compile": True}
    name = result_filename(training, training_suffix(training, None))
    assert name == "cpu-emoji-model-train-prior-bfloat16-compile.json"
    ddp = {"device": {"type": "cpu"}, "preset": "tiny", "training_step": "prior", "ranks": 2,
           "parallel": {"dtype": "float32", "compile": False}}
    assert result_filename(ddp, training_suffix(ddp, "xeon")) == "cpu-tiny-train-prior-float32-ddp2-xeon.json"


@pytest.mark.parametrize("settings, message", [
    ({"preset": "celeba"}, "no tokenizer"),
    ({"preset": "tiny", "batch_sizes": (0,)}, "batch sizes"),
    ({"preset": "tiny", "dtype": "float16"}, "precision must be"),
    ({"preset": "tiny", "cuda_graphs": True, "compile": True}, "CUDA"),
    ({"preset": "tiny", "repeats": 0}, "repeats"),
    ({"preset": "tiny", "decode_tiles": 0}, "decode_tiles"),
])
def test_bad_settings_fail_with_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):  # BenchmarkError is a ValueError
        run_benchmark(device="cpu", **settings)
