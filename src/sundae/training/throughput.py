"""How well a training loop uses the machine: the FLOPs of one optimizer step against the dense
matmul rate of this device and dtype (the rate a step could reach if it did nothing but its
largest matmuls), logged next to samples/s.

FLOPs and the matmul rate are measured by :func:`sundae.speed.count_flops` and
:func:`sundae.speed.measure_matmul_rate`, the functions the speed harness in ``benchmarks/`` uses.
"""

from __future__ import annotations

from typing import Callable

import torch

from sundae.speed import count_flops, measure_matmul_rate

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
