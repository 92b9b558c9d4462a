"""How well a training loop uses the machine: the FLOPs of one optimizer step against the dense
matmul rate of this device and dtype (the rate a step could reach if it did nothing but its
largest matmuls), logged next to samples/s.

FLOPs are counted on the real modules with :class:`torch.utils.flop_counter.FlopCounterMode`
(2 per multiply-add), CPU attention included; the speed harness in ``benchmarks/`` uses the
same two functions.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sundae.speed import median_seconds, time_call

MATMUL_REPEATS = 10
MATMUL_MIN_SECONDS = 0.05  # per timed matmul measurement


def attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    """Scores ``q @ kᵀ`` plus the weighted sum ``p @ v`` of an attention call, 2 FLOPs per multiply-add."""
    *batch, queries, width = query_shape
    keys = key_shape[-2]
    return 2 * math.prod(batch) * queries * keys * (width + value_shape[-1])


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which it would count as 0
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}


def count_flops(function: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``function`` runs (one real call)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        function()
    return counter.get_total_flops()


def measure_matmul_rate(rows: int, dim: int, *, dtype: torch.dtype, device: torch.device,
                        repeats: int = MATMUL_REPEATS) -> float:
    """Dense matmul FLOP/s of ``(rows, dim) @ (dim, 4·dim)`` in ``dtype``: median of ``repeats`` timings
    of at least ``MATMUL_MIN_SECONDS`` each, after warm-up.

    The shape of a transformer's feed-forward layer: the rate a step could reach if it did nothing
    but its largest matmuls.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(rows, dim, generator=generator, device=device, dtype=dtype)
    right = torch.randn(dim, 4 * dim, generator=generator, device=device, dtype=dtype)

    def multiply(times: int) -> None:
        for _ in range(times):
            torch.mm(left, right)

    with torch.inference_mode():
        # a small product takes microseconds: time enough of them in a row for the timer and clocks
        _, once = time_call(lambda: multiply(2), device)
        times = max(1, math.ceil(MATMUL_MIN_SECONDS / max(once / 2, 1e-9)))
        seconds = median_seconds(lambda: multiply(times), device, repeats=repeats) / times
    return 2 * rows * dim * 4 * dim / seconds


class Throughput:
    """The FLOPs of one optimizer step (counted on the process's first step, which runs for real
    inside the counter) against the dense matmul rate measured on this device and dtype at
    start-up, at the shape of the model's largest matmuls."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, rows: int, dim: int, enabled: bool) -> None:
        self.enabled = enabled
        self.flops_per_step: int | None = None
        self.matmul_rate = measure_matmul_rate(min(rows, 8192), dim, dtype=dtype, device=device, repeats=3) \
            if enabled else None

    def run_step(self, step: Callable[[], None]) -> None:
        if self.enabled and self.flops_per_step is None:
            self.flops_per_step = count_flops(step)
        else:
            step()

    def fraction_of_matmul_rate(self, steps_per_second: float) -> dict[str, torch.Tensor]:
        """``flops_per_second`` and ``matmul_fraction`` for the metrics (empty on other ranks)."""
        if not self.enabled or not self.flops_per_step or not self.matmul_rate:
            return {}
        rate = self.flops_per_step * steps_per_second
        return {"flops_per_second": torch.tensor(rate), "matmul_fraction": torch.tensor(rate / self.matmul_rate)}


__all__ = ["Throughput", "count_flops", "measure_matmul_rate"]
