"""Process groups for ``torchrun`` (one process per GPU, or several CPU processes with gloo), shared
by training (data-parallel steps) and evaluation (samples shared out, features gathered to rank 0).

Single-process runs need no launcher: with no ``WORLD_SIZE`` in the environment everything here
degrades to rank 0 of 1 and no process group is created.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from sundae.runtime import resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistributedContext:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    ``device`` None means CUDA when available, else CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", local_rank if torch_device.index is None else torch_device.index)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def mean_across_ranks(values: dict[str, torch.Tensor], context: DistributedContext) -> dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over ranks in one collective (for logging only)."""
    if not values or not context.enabled:
        return values
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    dist.all_reduce(stacked)
    stacked /= context.world_size
    return dict(zip(names, stacked.unbind()))


def configure_logging(is_main: bool) -> None:
    """stdlib logging on rank 0 only (other ranks report warnings and errors)."""
    root = logging.getLogger()
    level = min(root.level, logging.INFO) if is_main else logging.WARNING  # keep `sundae -v`'s debug level
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root.setLevel(level)


def run_distributed(work: Callable[[DistributedContext], T], device: str | None) -> T:
    """Run ``work(context)`` inside this process's rank (see :func:`setup_distributed`), then leave the group.

    Ranks that finished meet at a barrier before leaving: a gloo rank that destroys its group while
    a peer is still in its last collective aborts ("terminate called without an active exception").
    A rank that failed leaves at once, so the others are not kept waiting on it."""
    context = setup_distributed(device)
    configure_logging(context.is_main)
    try:
        result = work(context)
        barrier(context)
        return result
    finally:
        teardown_distributed()


def shard(count: int, rank: int, world_size: int) -> range:
    """The items of ``range(count)`` that ``rank`` of ``world_size`` handles: one contiguous block,
    ``[rank * count // world_size, (rank + 1) * count // world_size)``. In rank order the blocks
    cover every item once, in order, and their sizes differ by at most one."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def gather_shards(rows: Tensor, count: int, context: DistributedContext) -> Tensor | None:
    """Every rank's rows (n, ...) of its :func:`shard` of ``count`` items, concatenated in rank order (so
    in item order) on rank 0's CPU; None on the other ranks; ``rows`` itself in a single process.
    Exact: the values are only copied."""
    if not context.enabled:
        return rows
    longest = -(-count // context.world_size)  # collectives move equal shapes: pad every shard to the longest
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[:len(rows)] = rows
    padded = padded.to(context.device)
    pieces = [torch.empty_like(padded) for _ in range(context.world_size)] if context.is_main else None
    dist.gather(padded, pieces, dst=0)
    if pieces is None:
        return None
    sizes = [len(shard(count, rank, context.world_size)) for rank in range(context.world_size)]
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).cpu()


def broadcast_from_main(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
